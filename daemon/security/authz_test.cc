#include "daemon/security/authz.h"

#include <absl/strings/str_cat.h>
#include <gmock/gmock.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/text_format.h>
#include <gtest/gtest.h>

#include <set>
#include <thread>

namespace kvmid {
namespace security {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

const GuestRef kWeb1{"web-1", "11111111-1111-1111-1111-111111111111", {{"tier", "prod"}}};
const GuestRef kWeb2{"web-2", "22222222-2222-2222-2222-222222222222", {{"tier", "dev"}}};
const GuestRef kLab1{"lab-1", "33333333-3333-3333-3333-333333333333", {}};

config::KvmidConfig ParseKvmidConfig(const std::string& text) {
  config::KvmidConfig c;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &c)) << text;
  return c;
}

std::shared_ptr<const Authorizer> Build(const std::string& authz_text) {
  config::Authz c;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(authz_text, &c)) << authz_text;
  auto a = Authorizer::FromConfig(c);
  EXPECT_TRUE(a.ok()) << a.status();
  return a.ok() ? *a : nullptr;
}

absl::Status BuildError(const std::string& authz_text) {
  config::Authz c;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(authz_text, &c)) << authz_text;
  return Authorizer::FromConfig(c).status();
}

TEST(RoleTest, NamesRoundTripAndOrder) {
  for (Role r : {Role::kViewer, Role::kResponder, Role::kOperator, Role::kAdmin}) {
    ASSERT_TRUE(RoleFromName(RoleName(r)).has_value());
    EXPECT_EQ(*RoleFromName(RoleName(r)), r);
  }
  EXPECT_FALSE(RoleFromName("root").has_value());
  EXPECT_FALSE(RoleFromName("none").has_value());
  EXPECT_FALSE(RoleFromName("Admin").has_value());
  EXPECT_LT(Role::kViewer, Role::kResponder);
  EXPECT_LT(Role::kResponder, Role::kOperator);
  EXPECT_LT(Role::kOperator, Role::kAdmin);
}

// The table covers exactly the service's methods, by name and by full method path.
TEST(RpcTableTest, MatchesServiceDescriptor) {
  const google::protobuf::ServiceDescriptor* service =
      kvmi::v1::ListVMsRequest::descriptor()->file()->FindServiceByName("Introspection");
  ASSERT_NE(service, nullptr);
  ASSERT_EQ(RpcTable().size(), static_cast<size_t>(service->method_count()));
  for (int i = 0; i < service->method_count(); ++i) {
    const auto* m = service->method(i);
    const RpcInfo* info = FindRpc(m->name());
    ASSERT_NE(info, nullptr) << m->name();
    EXPECT_EQ(info->method, "/" + service->full_name() + "/" + m->name());
    EXPECT_EQ(FindRpc(info->method), info);
    EXPECT_EQ(&InfoOf(info->rpc), info);
    // Streams that fan out over guests (no `vm` in their request) are list-scoped.
    if (m->server_streaming() && m->input_type()->FindFieldByName("vm") == nullptr) {
      EXPECT_EQ(info->scope, RpcScope::kList) << m->name();
    }
  }
  EXPECT_EQ(FindRpc("Nope"), nullptr);
  EXPECT_EQ(FindRpc("/kvmi.v1.Introspection/Nope"), nullptr);
}

// The roles exactly as issue 10 defines them.
TEST(RpcTableTest, RolesAsSpecified) {
  const std::map<std::string, Role> expected = {
      {"ListVMs", Role::kViewer},
      {"GetVM", Role::kViewer},
      {"WatchVMs", Role::kViewer},
      {"StreamEvents", Role::kViewer},
      {"ListPolicies", Role::kViewer},
      {"Attach", Role::kResponder},
      {"PauseVCPU", Role::kOperator},
      {"ResumeVCPU", Role::kOperator},
      {"GetRegisters", Role::kOperator},
      {"SetRegisters", Role::kOperator},
      {"GetCPUID", Role::kOperator},
      {"GetXSAVE", Role::kOperator},
      {"GetMTRRType", Role::kOperator},
      {"ReadPhysical", Role::kOperator},
      {"GetPageAccess", Role::kOperator},
      {"SetPageAccess", Role::kOperator},
      {"ControlEvents", Role::kOperator},
      {"InjectException", Role::kOperator},
      {"ControlSPP", Role::kOperator},
      {"GetPageWriteBitmap", Role::kOperator},
      {"SetPageWriteBitmap", Role::kOperator},
      {"TranslateAddress", Role::kOperator},  // issue 15: reads guest memory
      {"ReadVirtual", Role::kOperator},
      {"ReadVirtualStream", Role::kOperator},
      {"WriteVirtual", Role::kAdmin},
      {"ReadPhysicalStream", Role::kOperator},  // issue 12: bulk memory, read like ReadPhysical
      {"WritePhysicalStream", Role::kAdmin},    // written like WritePhysical
      {"WritePhysical", Role::kAdmin},
      {"ApplyPolicy", Role::kAdmin},
      {"DeletePolicy", Role::kAdmin},
      {"UnhookVM", Role::kAdmin},
  };
  ASSERT_EQ(expected.size(), RpcTable().size());
  for (const RpcInfo& info : RpcTable()) {
    auto it = expected.find(info.name);
    ASSERT_NE(it, expected.end()) << info.name;
    EXPECT_EQ(info.role, it->second) << info.name;
  }
  const std::set<std::string> mutating = {"ApplyPolicy",     "DeletePolicy",        "Attach",
                                          "WritePhysical",   "PauseVCPU",           "ResumeVCPU",
                                          "InjectException", "SetPageAccess",       "SetRegisters",
                                          "ControlSPP",      "SetPageWriteBitmap",  "ControlEvents",
                                          "UnhookVM",        "WritePhysicalStream", "WriteVirtual"};
  for (const RpcInfo& info : RpcTable()) {
    EXPECT_EQ(info.mutating, mutating.count(info.name) == 1) << info.name;
  }
  EXPECT_EQ(InfoOf(Rpc::kApplyPolicy).scope, RpcScope::kDaemon);
  EXPECT_EQ(InfoOf(Rpc::kDeletePolicy).scope, RpcScope::kDaemon);
  EXPECT_EQ(InfoOf(Rpc::kGetVM).scope, RpcScope::kGuest);
}

// Every inline command maps to the unary RPC taking the same request message.
TEST(RpcTableTest, EveryAttachCommandMapsToItsUnaryRpc) {
  const auto* service =
      kvmi::v1::ListVMsRequest::descriptor()->file()->FindServiceByName("Introspection");
  const auto* command = kvmi::v1::Command::descriptor();
  const auto* oneof = command->FindOneofByName("request");
  ASSERT_NE(oneof, nullptr);
  ASSERT_GT(oneof->field_count(), 0);
  for (int i = 0; i < oneof->field_count(); ++i) {
    const auto* field = oneof->field(i);
    kvmi::v1::Command c;
    c.GetReflection()->MutableMessage(&c, field);
    absl::StatusOr<Rpc> rpc = RpcOfCommand(c);
    ASSERT_TRUE(rpc.ok()) << field->name() << ": " << rpc.status();
    const auto* method = service->FindMethodByName(InfoOf(*rpc).name);
    ASSERT_NE(method, nullptr);
    EXPECT_EQ(method->input_type(), field->message_type()) << field->name();
  }
  EXPECT_EQ(RpcOfCommand(kvmi::v1::Command()).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CrashTest, CanCrash) {
  kvmi::v1::Verdict v;
  EXPECT_FALSE(CanCrash(v));
  v.set_action(kvmi::v1::ACTION_RETRY);
  EXPECT_FALSE(CanCrash(v));
  v.set_action(kvmi::v1::ACTION_CRASH);
  EXPECT_TRUE(CanCrash(v));
  kvmi::v1::Claim c;
  c.set_fallback(kvmi::v1::ACTION_CONTINUE);
  EXPECT_FALSE(CanCrash(c));
  c.set_fallback(kvmi::v1::ACTION_CRASH);
  EXPECT_TRUE(CanCrash(c));
  kvmi::v1::Policy p;
  p.mutable_lock_msr()->set_msr(0xc0000082);
  EXPECT_FALSE(CanCrash(p));
  p.set_action(kvmi::v1::ACTION_CRASH);
  EXPECT_TRUE(CanCrash(p));
  p.set_mode(kvmi::v1::MODE_MONITOR);
  EXPECT_TRUE(CanCrash(p));
}

TEST(AuthorizerTest, DefaultRootIsAdminEverythingElseDenied) {
  auto a = Authorizer::Default();
  const Caller root = Caller::Unix(0, 0, 1);
  const Caller user = Caller::Unix(1000, 1000, 2);
  const Caller tls = Caller::Tls("spiffe://corp/ns/sec/sa/x", "ipv4:10.0.0.1:1");
  for (const RpcInfo& info : RpcTable()) {
    const GuestRef* guest = info.scope == RpcScope::kGuest ? &kWeb1 : nullptr;
    EXPECT_TRUE(a->Check(root, info.rpc, guest).ok()) << info.name;
    EXPECT_EQ(a->Check(user, info.rpc, guest).code(), absl::StatusCode::kPermissionDenied)
        << info.name;
    EXPECT_EQ(a->Check(tls, info.rpc, guest).code(), absl::StatusCode::kPermissionDenied)
        << info.name;
    EXPECT_EQ(a->Check(Caller::None("ipv4:1.2.3.4:5"), info.rpc, guest).code(),
              absl::StatusCode::kUnauthenticated)
        << info.name;
  }
  EXPECT_TRUE(a->Visible(root, kWeb1));
  EXPECT_FALSE(a->Visible(user, kWeb1));
  EXPECT_TRUE(a->CheckCrash(root, Rpc::kAttach, nullptr).ok());
}

TEST(AuthorizerTest, FromKvmidConfigWithoutSectionIsDefault) {
  auto a = Authorizer::FromKvmidConfig(ParseKvmidConfig("io_threads: 2"));
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE((*a)->Check(Caller::Unix(0, 0), Rpc::kWritePhysical, &kWeb1).ok());
  EXPECT_FALSE((*a)->Check(Caller::Unix(1, 1), Rpc::kListVMs, nullptr).ok());

  auto b = Authorizer::FromKvmidConfig(
      ParseKvmidConfig(R"(authz { bindings { uid: 1000 role: "viewer" } })"));
  ASSERT_TRUE(b.ok());
  EXPECT_TRUE((*b)->Check(Caller::Unix(1000, 5), Rpc::kListVMs, nullptr).ok());
  EXPECT_TRUE((*b)->Check(Caller::Unix(0, 0), Rpc::kUnhookVM, &kWeb1).ok());  // root kept

  auto c = Authorizer::FromKvmidConfig(ParseKvmidConfig(R"(authz { bindings { role: "x" } })"));
  EXPECT_FALSE(c.ok());
}

TEST(AuthorizerTest, UnauthenticatedMessage) {
  auto a = Authorizer::Default();
  absl::Status s = a->Check(Caller::Tls("", "ipv4:1.2.3.4:5"), Rpc::kGetVM, &kWeb1);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(s.message(), HasSubstr("GetVM"));
  EXPECT_EQ(a->ClaimWithinScope(Caller::None(), {kWeb1}, false).code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(a->CheckCrash(Caller::None(), Rpc::kAttach, &kWeb1).code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(a->ScopeOf(Caller::None(), Role::kViewer).empty());
}

TEST(AuthorizerTest, RolesAreCumulative) {
  auto a = Build(R"(
    bindings { principal: "v" role: "viewer" }
    bindings { principal: "r" role: "responder" }
    bindings { principal: "o" role: "operator" }
    bindings { principal: "a" role: "admin" }
  )");
  ASSERT_NE(a, nullptr);
  const std::map<std::string, Role> callers = {
      {"v", Role::kViewer}, {"r", Role::kResponder}, {"o", Role::kOperator}, {"a", Role::kAdmin}};
  for (const auto& [principal, role] : callers) {
    const Caller caller = Caller::Tls(principal, "ipv4:10.0.0.1:1");
    for (const RpcInfo& info : RpcTable()) {
      const GuestRef* guest = info.scope == RpcScope::kGuest ? &kWeb1 : nullptr;
      absl::Status s = a->Check(caller, info.rpc, guest);
      if (role >= info.role) {
        EXPECT_TRUE(s.ok()) << principal << " " << info.name << ": " << s;
      } else {
        EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << principal << " " << info.name;
        EXPECT_THAT(s.message(), HasSubstr(info.name));
        EXPECT_THAT(s.message(), HasSubstr(absl::StrCat("\"", RoleName(info.role), "\"")));
      }
    }
    EXPECT_EQ(a->CheckCrash(caller, Rpc::kAttach, &kWeb1).ok(), role == Role::kAdmin);
    EXPECT_EQ(a->CheckCrash(caller, Rpc::kApplyPolicy, nullptr).ok(), role == Role::kAdmin);
  }
}

TEST(AuthorizerTest, DeniedMessageNamesRpcGuestAndMissingRole) {
  auto a = Build(R"(bindings { uid: 1000 role: "operator" })");
  absl::Status s = a->Check(Caller::Unix(1000, 1000), Rpc::kWritePhysical, &kWeb1);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(s.message(), AllOf(HasSubstr("WritePhysical"), HasSubstr("web-1"),
                                 HasSubstr(kWeb1.uuid), HasSubstr("needs role \"admin\""),
                                 HasSubstr("uid=1000"), HasSubstr("\"operator\"")));
}

TEST(AuthorizerTest, GuestRpcWithoutGuestFailsClosed) {
  auto a = Authorizer::Default();
  EXPECT_EQ(a->Check(Caller::Unix(0, 0), Rpc::kGetRegisters, nullptr).code(),
            absl::StatusCode::kInternal);
  EXPECT_TRUE(a->CheckAnyGuest(Caller::Unix(0, 0), Rpc::kGetRegisters).ok());
  EXPECT_EQ(a->CheckAnyGuest(Caller::Unix(7, 7), Rpc::kGetRegisters).code(),
            absl::StatusCode::kPermissionDenied);
}

TEST(AuthorizerTest, IdentityKinds) {
  auto a = Build(R"(
    bindings { principal: "spiffe://corp/ns/sec/sa/exact" role: "admin" }
    bindings { principal_prefix: "spiffe://corp/ns/sec/" role: "viewer" }
    bindings { uid: 1000 role: "operator" }
    bindings { gid: 990 role: "responder" }
  )");
  auto role = [&](const Caller& c) { return a->RoleOn(c, &kWeb1); };
  EXPECT_EQ(role(Caller::Tls("spiffe://corp/ns/sec/sa/exact", "p")), Role::kAdmin);
  EXPECT_EQ(role(Caller::Tls("spiffe://corp/ns/sec/sa/other", "p")), Role::kViewer);
  EXPECT_EQ(role(Caller::Tls("spiffe://corp/ns/secret/sa/x", "p")), Role::kNone);
  EXPECT_EQ(role(Caller::Tls("spiffe://corp/ns/sec/sa/exact/", "p")), Role::kViewer);
  EXPECT_EQ(role(Caller::Unix(1000, 1)), Role::kOperator);
  EXPECT_EQ(role(Caller::Unix(5, 990)), Role::kResponder);
  EXPECT_EQ(role(Caller::Unix(1000, 990)), Role::kOperator);  // the highest binding
  EXPECT_EQ(role(Caller::Unix(5, 5)), Role::kNone);
  // A TLS principal never matches a UNIX binding, nor the reverse.
  EXPECT_EQ(role(Caller::Tls("1000", "p")), Role::kNone);
  Caller unix_with_principal = Caller::Unix(5, 5);
  unix_with_principal.principal = "spiffe://corp/ns/sec/sa/exact";
  EXPECT_EQ(role(unix_with_principal), Role::kNone);
  // Root is admin unless turned off.
  EXPECT_EQ(role(Caller::Unix(0, 0)), Role::kAdmin);
  auto no_root = Build(R"(bindings { uid: 1000 role: "operator" } unix_root_is_admin: false)");
  EXPECT_EQ(no_root->RoleOn(Caller::Unix(0, 0), &kWeb1), Role::kNone);
  EXPECT_EQ(no_root->Check(Caller::Unix(0, 0), Rpc::kListVMs, nullptr).code(),
            absl::StatusCode::kPermissionDenied);
}

TEST(AuthorizerTest, GuestScopes) {
  auto a = Build(R"(
    bindings { uid: 1 role: "operator" guests { names: "web-1" } }
    bindings { uid: 2 role: "operator" guests { uuids: "22222222-2222-2222-2222-222222222222" } }
    bindings { uid: 3 role: "operator" guests { labels { key: "tier" value: "prod" } } }
    bindings { uid: 4 role: "operator" guests { names: "web-*" } }
    bindings { uid: 5 role: "operator" guests { names: "web-*" labels { key: "tier" value: "dev" } } }
    bindings { uid: 6 role: "operator" guests { names: "web-1" } guests { names: "lab-1" } }
    bindings { uid: 7 role: "viewer" }
    bindings { uid: 7 role: "admin" guests { names: "lab-*" } }
  )");
  auto on = [&](uint32_t uid, const GuestRef& g) {
    return a->Check(Caller::Unix(uid, 100), Rpc::kGetRegisters, &g).ok();
  };
  EXPECT_TRUE(on(1, kWeb1));
  EXPECT_FALSE(on(1, kWeb2));
  EXPECT_FALSE(on(2, kWeb1));
  EXPECT_TRUE(on(2, kWeb2));
  EXPECT_TRUE(on(2, GuestRef{"x", "22222222-2222-2222-2222-222222222222", {}}));
  GuestRef upper = kWeb2;
  upper.uuid = "22222222-2222-2222-2222-222222222222";
  for (char& ch : upper.uuid) ch = static_cast<char>(toupper(ch));
  EXPECT_TRUE(on(2, upper));
  EXPECT_TRUE(on(3, kWeb1));
  EXPECT_FALSE(on(3, kWeb2));
  EXPECT_FALSE(on(3, kLab1));
  EXPECT_TRUE(on(4, kWeb1));
  EXPECT_TRUE(on(4, kWeb2));
  EXPECT_FALSE(on(4, kLab1));
  EXPECT_FALSE(on(5, kWeb1));  // name matches, label does not: every field must match
  EXPECT_TRUE(on(5, kWeb2));
  EXPECT_TRUE(on(6, kWeb1));
  EXPECT_TRUE(on(6, kLab1));
  EXPECT_FALSE(on(6, kWeb2));
  EXPECT_FALSE(on(7, kWeb1));  // viewer everywhere
  EXPECT_TRUE(on(7, kLab1));   // admin on lab-*
  EXPECT_TRUE(a->Visible(Caller::Unix(7, 0), kWeb2));
  EXPECT_TRUE(a->Check(Caller::Unix(7, 0), Rpc::kWritePhysical, &kLab1).ok());
  EXPECT_TRUE(a->CheckCrash(Caller::Unix(7, 0), Rpc::kAttach, &kLab1).ok());
  EXPECT_FALSE(a->CheckCrash(Caller::Unix(7, 0), Rpc::kAttach, &kWeb1).ok());

  // Out-of-scope denial names the guest.
  absl::Status s = a->Check(Caller::Unix(1, 100), Rpc::kGetRegisters, &kWeb2);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(s.message(), AllOf(HasSubstr("GetRegisters"), HasSubstr("web-2"),
                                 HasSubstr("\"operator\""), HasSubstr("\"none\" there")));
}

TEST(AuthorizerTest, DaemonRpcsNeedEveryGuest) {
  auto a = Build(R"(
    bindings { uid: 1 role: "admin" guests { names: "web-*" } }
    bindings { uid: 2 role: "admin" }
    bindings { uid: 3 role: "viewer" guests { names: "lab-1" } }
  )");
  absl::Status s = a->Check(Caller::Unix(1, 0), Rpc::kApplyPolicy, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr("ApplyPolicy"), HasSubstr("every guest"), HasSubstr("\"admin\"")));
  // A guest passed to a daemon RPC does not narrow it.
  EXPECT_FALSE(a->Check(Caller::Unix(1, 0), Rpc::kDeletePolicy, &kWeb1).ok());
  EXPECT_TRUE(a->Check(Caller::Unix(2, 0), Rpc::kApplyPolicy, nullptr).ok());
  EXPECT_FALSE(a->CheckAnyGuest(Caller::Unix(1, 0), Rpc::kApplyPolicy).ok());
  EXPECT_FALSE(a->CheckCrash(Caller::Unix(1, 0), Rpc::kApplyPolicy, nullptr).ok());
  EXPECT_TRUE(a->CheckCrash(Caller::Unix(2, 0), Rpc::kApplyPolicy, nullptr).ok());
  // Reading policies: a viewer of any guest.
  EXPECT_TRUE(a->Check(Caller::Unix(3, 0), Rpc::kListPolicies, nullptr).ok());
}

TEST(AuthorizerTest, ScopeFiltersLists) {
  auto a = Build(R"(
    bindings { principal_prefix: "spiffe://corp/ns/web/" role: "viewer" guests { names: "web-*" } }
    bindings { principal: "spiffe://corp/ns/web/sa/ir" role: "operator" guests { names: "web-1" } }
    bindings { principal: "spiffe://corp/ns/all/sa/x" role: "viewer" }
  )");
  const Caller web = Caller::Tls("spiffe://corp/ns/web/sa/other", "p");
  const Caller ir = Caller::Tls("spiffe://corp/ns/web/sa/ir", "p");
  const Caller all = Caller::Tls("spiffe://corp/ns/all/sa/x", "p");
  const Caller nobody = Caller::Tls("spiffe://corp/ns/none/sa/x", "p");

  EXPECT_TRUE(a->Check(web, Rpc::kStreamEvents, nullptr).ok());
  EXPECT_EQ(a->Check(nobody, Rpc::kListVMs, nullptr).code(), absl::StatusCode::kPermissionDenied);

  Scope s = a->ScopeOf(web, Role::kViewer);
  EXPECT_FALSE(s.all());
  EXPECT_FALSE(s.empty());
  EXPECT_TRUE(s.Contains(kWeb1));
  EXPECT_TRUE(s.Contains(kWeb2));
  EXPECT_FALSE(s.Contains(kLab1));
  EXPECT_EQ(a->Visible(web, kLab1), s.Contains(kLab1));

  Scope op = a->ScopeOf(ir, Role::kOperator);
  EXPECT_TRUE(op.Contains(kWeb1));
  EXPECT_FALSE(op.Contains(kWeb2));
  Scope view = a->ScopeOf(ir, Role::kViewer);  // prefix binding and exact binding together
  EXPECT_TRUE(view.Contains(kWeb2));

  EXPECT_TRUE(a->ScopeOf(all, Role::kViewer).all());
  EXPECT_TRUE(a->ScopeOf(all, Role::kViewer).Contains(kLab1));
  EXPECT_TRUE(a->ScopeOf(all, Role::kOperator).empty());
  EXPECT_TRUE(a->ScopeOf(nobody, Role::kViewer).empty());
  EXPECT_FALSE(a->ScopeOf(nobody, Role::kViewer).Contains(kWeb1));
  EXPECT_FALSE(Scope().Contains(kWeb1));

  // A Scope stays valid after its Authorizer is gone (it keeps the bindings alive).
  Scope kept;
  {
    auto b = Build(R"(bindings { uid: 9 role: "viewer" guests { names: "web-1" } })");
    kept = b->ScopeOf(Caller::Unix(9, 9), Role::kViewer);
  }
  EXPECT_TRUE(kept.Contains(kWeb1));
  EXPECT_FALSE(kept.Contains(kWeb2));
}

TEST(AuthorizerTest, ClaimWithinScope) {
  auto a = Build(R"(
    bindings { uid: 1 role: "responder" guests { names: "web-*" } }
    bindings { uid: 1 role: "viewer" }
    bindings { uid: 2 role: "responder" }
  )");
  const Caller scoped = Caller::Unix(1, 1);
  EXPECT_TRUE(a->Check(scoped, Rpc::kAttach, nullptr).ok());
  EXPECT_TRUE(a->ClaimWithinScope(scoped, {kWeb1, kWeb2}, false).ok());
  absl::Status s = a->ClaimWithinScope(scoped, {kWeb1, kLab1}, false);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(s.message(), AllOf(HasSubstr("Attach"), HasSubstr("lab-1"),
                                 HasSubstr("\"responder\""), HasSubstr("\"viewer\" there")));
  s = a->ClaimWithinScope(scoped, {}, true);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(s.message(), HasSubstr("every guest"));
  EXPECT_TRUE(a->ClaimWithinScope(Caller::Unix(2, 2), {}, true).ok());
  EXPECT_TRUE(a->ClaimWithinScope(Caller::Unix(2, 2), {kLab1}, false).ok());
  EXPECT_FALSE(a->ClaimWithinScope(Caller::Unix(3, 3), {kLab1}, false).ok());
  // A claim's CRASH fallback needs admin.
  EXPECT_FALSE(a->CheckCrash(Caller::Unix(2, 2), Rpc::kAttach, &kWeb1).ok());
}

TEST(AuthorizerConfigTest, ErrorsNameTheField) {
  struct Case {
    const char* text;
    const char* error;
  };
  const Case cases[] = {
      {R"(bindings { uid: 1 role: "viewer" } bindings { uid: 2 role: "viewer" }
          bindings { uid: 3 role: "root" })",
       "authz.bindings[2].role: unknown role \"root\""},
      {R"(bindings { uid: 1 })", "authz.bindings[0].role: required"},
      {R"(bindings { role: "viewer" })", "authz.bindings[0]: exactly one of principal"},
      {R"(bindings { uid: 1 gid: 2 role: "viewer" })", "authz.bindings[0]: exactly one of"},
      {R"(bindings { principal: "a" principal_prefix: "b" role: "viewer" })",
       "authz.bindings[0]: exactly one of"},
      {R"(bindings { principal_prefix: "spiffe://corp" role: "viewer" })",
       "authz.bindings[0].principal_prefix: a SPIFFE prefix must end with '/'"},
      {R"(bindings { uid: 1 role: "viewer" guests {} })",
       "authz.bindings[0].guests[0]: empty selector"},
      {R"(bindings { uid: 1 role: "viewer" guests { names: "a" } guests { names: "w*b" } })",
       "authz.bindings[0].guests[1].names[0]: '*' only as the last character"},
      {R"(bindings { uid: 1 role: "viewer" guests { names: "*" } })",
       "authz.bindings[0].guests[0].names[0]: \"*\" alone"},
      {R"(bindings { uid: 1 role: "viewer" guests { names: "" } })",
       "authz.bindings[0].guests[0].names[0]: empty"},
      {R"(bindings { uid: 1 role: "viewer" guests { uuids: "" } })",
       "authz.bindings[0].guests[0].uuids[0]: empty"},
      {R"(bindings { uid: 1 role: "viewer" guests { labels { key: "" value: "x" } } })",
       "authz.bindings[0].guests[0].labels: empty key"},
  };
  for (const Case& c : cases) {
    absl::Status s = BuildError(c.text);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.error)) << c.text;
  }
  // A non-SPIFFE prefix may end anywhere; uid 0 may be bound explicitly.
  EXPECT_TRUE(BuildError(R"(bindings { principal_prefix: "host-" role: "viewer" })").ok());
  EXPECT_TRUE(BuildError(R"(bindings { uid: 0 role: "viewer" })").ok());
}

TEST(AuthorizerConfigTest, ProtoCommentExampleParses) {
  auto a = Authorizer::FromKvmidConfig(ParseKvmidConfig(R"(
    authz {
      bindings { principal_prefix: "spiffe://corp/ns/sec/" role: "viewer" }
      bindings { principal: "spiffe://corp/ns/sec/sa/responder" role: "responder"
                 guests { labels { key: "tier" value: "prod" } } }
      bindings { gid: 990 role: "operator" guests { names: "lab-*" } }
    }
  )"));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ((*a)->bindings().size(), 4u);  // three + root
  const Caller responder = Caller::Tls("spiffe://corp/ns/sec/sa/responder", "p");
  EXPECT_TRUE((*a)->ClaimWithinScope(responder, {kWeb1}, false).ok());
  EXPECT_FALSE((*a)->ClaimWithinScope(responder, {kWeb2}, false).ok());
  EXPECT_TRUE((*a)->Check(Caller::Unix(1000, 990), Rpc::kPauseVCPU, &kLab1).ok());
}

TEST(AuthorizerHolderTest, SwapsAtomically) {
  AuthorizerHolder holder;
  const Caller user = Caller::Unix(1000, 1000);
  EXPECT_FALSE(holder.Get()->Check(user, Rpc::kListVMs, nullptr).ok());
  const uint64_t gen = holder.generation();
  std::shared_ptr<const Authorizer> old = holder.Get();
  holder.Set(Build(R"(bindings { uid: 1000 role: "viewer" })"));
  EXPECT_GT(holder.generation(), gen);
  EXPECT_TRUE(holder.Get()->Check(user, Rpc::kListVMs, nullptr).ok());
  // A snapshot taken before the reload keeps answering as before.
  EXPECT_FALSE(old->Check(user, Rpc::kListVMs, nullptr).ok());
}

TEST(AuthorizerHolderTest, ConcurrentReadersAndReloads) {
  AuthorizerHolder holder;
  auto viewer = Build(R"(bindings { uid: 1000 role: "viewer" })");
  auto none = Authorizer::Default();
  std::atomic<bool> stop{false};
  std::vector<std::thread> readers;
  std::atomic<int> allowed{0};
  readers.reserve(2);
  for (int i = 0; i < 2; ++i) {
    readers.emplace_back([&] {
      while (!stop.load()) {
        auto a = holder.Get();
        if (a->Check(Caller::Unix(1000, 1), Rpc::kListVMs, nullptr).ok()) ++allowed;
        EXPECT_TRUE(a->Check(Caller::Unix(0, 0), Rpc::kListVMs, nullptr).ok());
      }
    });
  }
  for (int i = 0; i < 2000; ++i) holder.Set(i % 2 ? none : viewer);
  stop = true;
  for (auto& t : readers) t.join();
  EXPECT_EQ(holder.generation(), 2000u);
}

}  // namespace
}  // namespace security
}  // namespace kvmid
