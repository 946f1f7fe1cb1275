// ListVMs/GetVM and the policy RPCs through a real server.
#include <absl/strings/escaping.h>

#include <fstream>
#include <functional>
#include <map>

#include "daemon/api/api_test_fixture.h"
#include "daemon/config/policy_convert.h"

namespace kvmid {
namespace {

using ::testing::HasSubstr;

TEST_F(ApiTest, ListAndGetVmsShowIdentityStateAndLeases) {
  ASSERT_NE(Connect(1, "web-1"), nullptr);
  ASSERT_NE(Connect(2, "db-1"), nullptr);
  grpc::ClientContext list_ctx;
  kvmi::v1::ListVMsResponse list;
  ASSERT_TRUE(stub_->ListVMs(&list_ctx, {}, &list).ok());
  ASSERT_EQ(list.vms_size(), 2);

  grpc::ClientContext get_ctx;
  kvmi::v1::GetVMRequest get;
  get.set_vm("web-1");
  kvmi::v1::VM vm;
  ASSERT_TRUE(stub_->GetVM(&get_ctx, get, &vm).ok());
  EXPECT_EQ(vm.name(), "web-1");
  EXPECT_EQ(vm.uuid(), "00000000-0000-0000-0000-000000000001");
  EXPECT_EQ(vm.state(), kvmi::v1::VM_STATE_HOOKED);
  EXPECT_EQ(vm.vcpu_count(), 2u);
  EXPECT_EQ(vm.kvmi_version(), 1u);
  EXPECT_EQ(vm.allowed_commands_size(), 26);
  EXPECT_EQ(vm.allowed_events_size(), 12);
  EXPECT_EQ(vm.labels().at("tier"), "prod");
  ASSERT_GE(vm.leases_size(), 1);
  EXPECT_EQ(vm.leases(0).owner(), "daemon");

  // By UUID too; unknown and empty names are errors with a reason.
  grpc::ClientContext by_uuid_ctx;
  get.set_vm("00000000-0000-0000-0000-000000000002");
  ASSERT_TRUE(stub_->GetVM(&by_uuid_ctx, get, &vm).ok());
  EXPECT_EQ(vm.name(), "db-1");
  grpc::ClientContext missing_ctx;
  get.set_vm("nope");
  grpc::Status missing = stub_->GetVM(&missing_ctx, get, &vm);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(missing.error_message(), HasSubstr("nope"));
  grpc::ClientContext empty_ctx;
  get.set_vm("");
  EXPECT_EQ(stub_->GetVM(&empty_ctx, get, &vm).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(ApiTest, PoliciesAreAppliedListedWithCountersAndDeleted) {
  ScriptedHost* host = Connect(3, "web-1");
  ASSERT_NE(host, nullptr);
  kvmi::v1::ApplyPolicyRequest apply;
  apply.mutable_policy()->set_name("wp");
  apply.mutable_policy()->set_mode(kvmi::v1::MODE_ENFORCE);
  apply.mutable_policy()->mutable_forbid_cr_bits_clear()->set_cr(0);
  apply.mutable_policy()->mutable_forbid_cr_bits_clear()->set_bits(1u << 16);
  grpc::ClientContext apply_ctx;
  kvmi::v1::ApplyPolicyResponse applied;
  ASSERT_TRUE(stub_->ApplyPolicy(&apply_ctx, apply, &applied).ok());
  EXPECT_FALSE(applied.replaced());
  // Armed on the guest that is already there.
  EXPECT_TRUE(host->WaitFor([](const ReceivedMessage& m) {
    kvmi::ControlCrRequest r;
    return m.hdr.id == KVMI_CONTROL_CR && kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() &&
           r.cr == 0 && r.enable;
  }));
  kvmi::Event event = MakeTestEvent(KVMI_EVENT_CR, 0, 1);
  event.specific.cr.cr = 0;
  event.specific.cr.old_value = 1u << 16;
  host->SendEvent(event);
  ASSERT_TRUE(host->WaitForId(KVMI_EVENT_REPLY));

  grpc::ClientContext list_ctx;
  kvmi::v1::ListPoliciesResponse list;
  ASSERT_TRUE(stub_->ListPolicies(&list_ctx, {}, &list).ok());
  ASSERT_EQ(list.policies_size(), 1);
  EXPECT_EQ(list.policies(0).policy().forbid_cr_bits_clear().bits(), 1u << 16);
  EXPECT_EQ(list.policies(0).counters().hits(), 1u);
  EXPECT_EQ(list.policies(0).counters().enforced(), 1u);

  grpc::ClientContext again_ctx;
  apply.set_allow_replace(true);
  ASSERT_TRUE(stub_->ApplyPolicy(&again_ctx, apply, &applied).ok());
  EXPECT_TRUE(applied.replaced());

  kvmi::v1::ApplyPolicyRequest bad;
  bad.mutable_policy()->set_name("bad");
  bad.mutable_policy()->mutable_protect_pages()->set_allowed("rq");
  grpc::ClientContext bad_ctx;
  grpc::Status s = stub_->ApplyPolicy(&bad_ctx, bad, &applied);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("policy.protect_pages.allowed"));

  kvmi::v1::DeletePolicyRequest del;
  del.set_name("wp");
  grpc::ClientContext del_ctx;
  kvmi::v1::DeletePolicyResponse deleted;
  ASSERT_TRUE(stub_->DeletePolicy(&del_ctx, del, &deleted).ok());
  EXPECT_TRUE(host->WaitFor([](const ReceivedMessage& m) {  // disarmed
    kvmi::ControlCrRequest r;
    return m.hdr.id == KVMI_CONTROL_CR && kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() &&
           r.cr == 0 && !r.enable;
  }));
  grpc::ClientContext del_again_ctx;
  EXPECT_EQ(stub_->DeletePolicy(&del_again_ctx, del, &deleted).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

// ---- Limits: policy sizes and count, ListPolicies pages ----------------------------------------

kvmi::v1::ApplyPolicyRequest CrPolicy(const std::string& name, size_t description_bytes = 0) {
  kvmi::v1::ApplyPolicyRequest apply;
  apply.mutable_policy()->set_name(name);
  apply.mutable_policy()->set_description(std::string(description_bytes, 'd'));
  apply.mutable_policy()->set_mode(kvmi::v1::MODE_ENFORCE);
  apply.mutable_policy()->mutable_forbid_cr_bits_clear()->set_cr(0);
  apply.mutable_policy()->mutable_forbid_cr_bits_clear()->set_bits(1u << 16);
  return apply;
}

grpc::Status Apply(kvmi::v1::Introspection::Stub* stub, const kvmi::v1::ApplyPolicyRequest& r) {
  grpc::ClientContext ctx;
  kvmi::v1::ApplyPolicyResponse response;
  return stub->ApplyPolicy(&ctx, r, &response);
}

TEST_F(ApiTest, HugePoliciesAreRefusedNamingTheLimit) {
  // The flood: 300 policies with 3.9 MB descriptions. None is applied; RSS does not grow
  // with them.
  const kvmi::v1::ApplyPolicyRequest flood = CrPolicy("flood", 3900000);
  security::Limits limits = daemon_->limits();
  limits.refusal_delay_max_ms = 1;  // the tarpit (tarpit_test) would hold this loop for minutes
  daemon_->set_limits(limits);
  for (int i = 0; i < 300; ++i) {
    grpc::Status s = Apply(stub_.get(), flood);
    ASSERT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << i;
    if (i == 0) {
      EXPECT_THAT(s.error_message(), HasSubstr("policy.description is 3900000 bytes"));
      EXPECT_THAT(s.error_message(), HasSubstr("limits.max_policy_description_bytes"));
    }
  }
  EXPECT_EQ(daemon_->policies().size(), 0u);
  kvmi::v1::ApplyPolicyRequest long_name = CrPolicy(std::string(129, 'n'));
  grpc::Status s = Apply(stub_.get(), long_name);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("limits.max_policy_name_bytes"));
  kvmi::v1::ApplyPolicyRequest heavy = CrPolicy("heavy");
  for (int i = 0; i < 6000; ++i) heavy.mutable_policy()->mutable_guests()->add_names("guest-name");
  s = Apply(stub_.get(), heavy);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("limits.max_policy_bytes"));
}

TEST_F(ApiTest, NewPoliciesBeyondMaxPoliciesAreRefusedReplacementsAreNot) {
  security::Limits limits;
  limits.max_policies = 3;
  daemon_->set_limits(limits);
  for (const char* name : {"a", "b", "c"}) ASSERT_TRUE(Apply(stub_.get(), CrPolicy(name)).ok());
  grpc::Status s = Apply(stub_.get(), CrPolicy("d"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("max_policies = 3"));
  EXPECT_THAT(s.error_message(), HasSubstr("limits.max_policies"));
  kvmi::v1::ApplyPolicyRequest replacement = CrPolicy("b", 10);
  replacement.set_allow_replace(true);
  EXPECT_TRUE(Apply(stub_.get(), replacement).ok());  // a replacement adds none
  grpc::ClientContext del_ctx;
  kvmi::v1::DeletePolicyRequest del;
  del.set_name("a");
  kvmi::v1::DeletePolicyResponse deleted;
  ASSERT_TRUE(stub_->DeletePolicy(&del_ctx, del, &deleted).ok());
  EXPECT_TRUE(Apply(stub_.get(), CrPolicy("d")).ok());
  EXPECT_EQ(daemon_->policies().size(), 3u);
}

// Every page of `request` (its token replaced as the pages go), as the client received them.
std::vector<kvmi::v1::ListPoliciesResponse> AllPages(kvmi::v1::Introspection::Stub* stub,
                                                     kvmi::v1::ListPoliciesRequest request) {
  std::vector<kvmi::v1::ListPoliciesResponse> pages;
  do {
    grpc::ClientContext ctx;
    kvmi::v1::ListPoliciesResponse page;
    grpc::Status s = stub->ListPolicies(&ctx, request, &page);
    EXPECT_TRUE(s.ok()) << s.error_message();
    if (!s.ok() || pages.size() > 1000) break;
    request.set_page_token(page.next_page_token());
    pages.push_back(std::move(page));
  } while (!request.page_token().empty());
  return pages;
}

TEST_F(ApiTest, ListPoliciesIsPagedBelowTheClientsDefaultMessageSize) {
  security::Limits limits;
  limits.max_policy_bytes = 1u << 20;
  limits.max_policy_description_bytes = 1u << 20;
  ASSERT_TRUE(security::ValidateLimits(limits).ok());
  daemon_->set_limits(limits);
  // 12 policies of ~900 KB: ~10.8 MB in all, far over one 4 MiB message.
  std::vector<std::string> names;
  for (int i = 0; i < 12; ++i) {
    names.push_back("big-" + std::to_string(100 - i));  // not in name order: list order is kept
    ASSERT_TRUE(Apply(stub_.get(), CrPolicy(names.back(), 900000)).ok());
  }
  std::vector<kvmi::v1::ListPoliciesResponse> pages = AllPages(stub_.get(), {});
  ASSERT_GE(pages.size(), 4u);
  std::vector<std::string> listed;
  for (const auto& page : pages) {
    EXPECT_LE(page.ByteSizeLong(), limits.list_policies_max_bytes);
    EXPECT_LT(page.ByteSizeLong(), security::kClientDefaultMaxMessageBytes);
    EXPECT_GE(page.policies_size(), 1);
    for (const auto& status : page.policies()) {
      listed.push_back(status.policy().name());
      EXPECT_EQ(status.policy().description().size(), 900000u);
      EXPECT_EQ(status.counters().name(), status.policy().name());
    }
  }
  EXPECT_EQ(listed, names);

  // The client's page size, and kvmid's.
  kvmi::v1::ListPoliciesRequest two;
  two.set_page_size(2);
  pages = AllPages(stub_.get(), two);
  EXPECT_EQ(pages.size(), 6u);
  limits.list_policies_page_size = 5;
  daemon_->set_limits(limits);
  kvmi::v1::ListPoliciesRequest many;
  many.set_page_size(1000);
  for (const auto& page : AllPages(stub_.get(), many)) EXPECT_LE(page.policies_size(), 5);

  // A deleted policy that ended a page: the next page starts after it.
  kvmi::v1::ListPoliciesRequest first;
  first.set_page_size(3);
  grpc::ClientContext first_ctx;
  kvmi::v1::ListPoliciesResponse page;
  ASSERT_TRUE(stub_->ListPolicies(&first_ctx, first, &page).ok());
  ASSERT_EQ(page.policies_size(), 3);
  grpc::ClientContext del_ctx;
  kvmi::v1::DeletePolicyRequest del;
  del.set_name(names[2]);
  kvmi::v1::DeletePolicyResponse deleted;
  ASSERT_TRUE(stub_->DeletePolicy(&del_ctx, del, &deleted).ok());
  first.set_page_token(page.next_page_token());
  grpc::ClientContext next_ctx;
  ASSERT_TRUE(stub_->ListPolicies(&next_ctx, first, &page).ok());
  ASSERT_GE(page.policies_size(), 1);
  EXPECT_EQ(page.policies(0).policy().name(), names[3]);

  // A token kvmid did not issue.
  for (const std::string& bad :
       {std::string("not base64!"), std::string("djEvMTI="), absl::WebSafeBase64Escape("p2/x"),
        absl::WebSafeBase64Escape("p2/")}) {
    kvmi::v1::ListPoliciesRequest forged;
    forged.set_page_token(bad);
    grpc::ClientContext ctx;
    grpc::Status s = stub_->ListPolicies(&ctx, forged, &page);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_THAT(s.error_message(), HasSubstr("page_token")) << bad;
  }
}

// ---- Safe policy writes: create vs replace, etags, the configuration's policies, mode ---------

kvmi::v1::ApplyPolicyResponse MustApply(kvmi::v1::Introspection::Stub* stub,
                                        const kvmi::v1::ApplyPolicyRequest& r) {
  grpc::ClientContext ctx;
  kvmi::v1::ApplyPolicyResponse response;
  grpc::Status s = stub->ApplyPolicy(&ctx, r, &response);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return response;
}

std::map<std::string, kvmi::v1::PolicyStatus> Listed(kvmi::v1::Introspection::Stub* stub) {
  std::map<std::string, kvmi::v1::PolicyStatus> by_name;
  for (const auto& page : AllPages(stub, {})) {
    for (const auto& status : page.policies()) by_name[status.policy().name()] = status;
  }
  return by_name;
}

TEST_F(ApiTest, ApplyCreatesAndReplacingNeedsTheCurrentEtag) {
  const kvmi::v1::ApplyPolicyResponse created = MustApply(stub_.get(), CrPolicy("mine"));
  EXPECT_FALSE(created.replaced());
  ASSERT_FALSE(created.etag().empty());
  EXPECT_EQ(Listed(stub_.get())["mine"].etag(), created.etag());
  EXPECT_EQ(Listed(stub_.get())["mine"].origin(), kvmi::v1::POLICY_ORIGIN_API);

  // The same name again, with neither etag nor allow_replace: ALREADY_EXISTS naming it.
  grpc::Status s = Apply(stub_.get(), CrPolicy("mine", 10));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_THAT(s.error_message(), HasSubstr("'mine'"));
  EXPECT_THAT(s.error_message(), HasSubstr(created.etag()));
  // A stale etag: FAILED_PRECONDITION naming the current one.
  kvmi::v1::ApplyPolicyRequest stale = CrPolicy("mine", 10);
  stale.set_etag("1-0000000000000000");
  s = Apply(stub_.get(), stale);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr(created.etag()));
  EXPECT_EQ(Listed(stub_.get())["mine"].policy().description(), "");
  // The current one replaces it, and the etag moves on.
  kvmi::v1::ApplyPolicyRequest current = CrPolicy("mine", 10);
  current.set_etag(created.etag());
  const kvmi::v1::ApplyPolicyResponse replaced = MustApply(stub_.get(), current);
  EXPECT_TRUE(replaced.replaced());
  EXPECT_NE(replaced.etag(), created.etag());
  EXPECT_EQ(Listed(stub_.get())["mine"].policy().description().size(), 10u);
  // A second writer with the first etag loses.
  EXPECT_EQ(Apply(stub_.get(), current).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  // An etag for a name that does not exist creates nothing.
  kvmi::v1::ApplyPolicyRequest ghost = CrPolicy("ghost");
  ghost.set_etag(replaced.etag());
  EXPECT_EQ(Apply(stub_.get(), ghost).error_code(), grpc::StatusCode::NOT_FOUND);
  kvmi::v1::ApplyPolicyRequest huge_etag = CrPolicy("mine");
  huge_etag.set_etag(std::string(1000, 'e'));
  s = Apply(stub_.get(), huge_etag);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("etag"));

  // DeletePolicy with a stale etag fails; with the current one it deletes.
  kvmi::v1::DeletePolicyRequest del;
  del.set_name("mine");
  del.set_etag(created.etag());
  kvmi::v1::DeletePolicyResponse deleted;
  grpc::ClientContext stale_del;
  s = stub_->DeletePolicy(&stale_del, del, &deleted);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr(replaced.etag()));
  del.set_etag(replaced.etag());
  grpc::ClientContext del_ctx;
  ASSERT_TRUE(stub_->DeletePolicy(&del_ctx, del, &deleted).ok());
  EXPECT_FALSE(deleted.overrode_config());
  EXPECT_EQ(daemon_->policies().size(), 0u);
}

TEST_F(ApiTest, ModeUnspecifiedIsRefusedNamingTheField) {
  kvmi::v1::ApplyPolicyRequest no_mode = CrPolicy("no-mode");
  no_mode.mutable_policy()->clear_mode();
  grpc::Status s = Apply(stub_.get(), no_mode);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("policy.mode"));
  EXPECT_THAT(s.error_message(), HasSubstr("MODE_UNSPECIFIED"));
  EXPECT_EQ(daemon_->policies().size(), 0u);
}

TEST_F(ApiTest, ConfiguredPoliciesNeedOverrideConfigAndAReloadPutsThemBack) {
  LoadedConfig config;
  config.daemon.unix_socket = dir_ + "/kvmi.sock";
  kvmi::v1::ApplyPolicyRequest file = CrPolicy("lstar-locked");
  absl::StatusOr<std::shared_ptr<Rule>> rule = PolicyToRule(file.policy());
  ASSERT_TRUE(rule.ok());
  config.rules = {*rule};
  ASSERT_TRUE(daemon_->Reload(config).ok());
  kvmi::v1::PolicyStatus listed = Listed(stub_.get())["lstar-locked"];
  EXPECT_EQ(listed.origin(), kvmi::v1::POLICY_ORIGIN_CONFIG);

  // A README recipe that applies its own version over the baseline: refused, even blind.
  kvmi::v1::ApplyPolicyRequest weaker = CrPolicy("lstar-locked");
  weaker.mutable_policy()->set_mode(kvmi::v1::MODE_MONITOR);
  grpc::Status s = Apply(stub_.get(), weaker);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("'lstar-locked'"));
  EXPECT_THAT(s.error_message(), HasSubstr("configuration file"));
  EXPECT_THAT(s.error_message(), HasSubstr("override_config"));
  weaker.set_allow_replace(true);
  EXPECT_EQ(Apply(stub_.get(), weaker).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  kvmi::v1::DeletePolicyRequest del;
  del.set_name("lstar-locked");
  kvmi::v1::DeletePolicyResponse deleted;
  grpc::ClientContext del_ctx;
  EXPECT_EQ(stub_->DeletePolicy(&del_ctx, del, &deleted).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Listed(stub_.get())["lstar-locked"].etag(), listed.etag());

  // The explicit override (admin): done, shown as an override.
  weaker.set_override_config(true);
  const kvmi::v1::ApplyPolicyResponse overridden = MustApply(stub_.get(), weaker);
  EXPECT_TRUE(overridden.replaced());
  EXPECT_TRUE(overridden.overrode_config());
  listed = Listed(stub_.get())["lstar-locked"];
  EXPECT_EQ(listed.origin(), kvmi::v1::POLICY_ORIGIN_API_OVERRIDE);
  EXPECT_EQ(listed.policy().mode(), kvmi::v1::MODE_MONITOR);

  // SIGHUP: the configuration's version is back.
  ASSERT_TRUE(daemon_->Reload(config).ok());
  listed = Listed(stub_.get())["lstar-locked"];
  EXPECT_EQ(listed.origin(), kvmi::v1::POLICY_ORIGIN_CONFIG);
  EXPECT_EQ(listed.policy().mode(), kvmi::v1::MODE_ENFORCE);

  // Deleting it needs the flag too; the reload brings it back as well.
  del.set_override_config(true);
  grpc::ClientContext override_del_ctx;
  ASSERT_TRUE(stub_->DeletePolicy(&override_del_ctx, del, &deleted).ok());
  EXPECT_TRUE(deleted.overrode_config());
  EXPECT_EQ(Listed(stub_.get()).count("lstar-locked"), 0u);
  ASSERT_TRUE(daemon_->Reload(config).ok());
  EXPECT_EQ(Listed(stub_.get()).count("lstar-locked"), 1u);
}

// The audit record of a call that overrode a configured policy says so (and one that did not,
// does not).
TEST_F(ApiTest, OverridesOfConfiguredPoliciesAreAudited) {
  const std::string audit_path = dir_ + "/audit.log";
  absl::StatusOr<std::unique_ptr<security::AuditLog>> audit = security::AuditLog::Open(audit_path);
  ASSERT_TRUE(audit.ok()) << audit.status();
  auto audited = std::make_unique<ApiServer>(daemon_.get(), /*history=*/4, audit->get());
  security::ApiListenOptions listen;
  listen.unix_socket = dir_ + "/audited.sock";
  ASSERT_TRUE(audited->Start(listen).ok());
  auto stub = kvmi::v1::Introspection::NewStub(
      grpc::CreateChannel("unix:" + listen.unix_socket, grpc::InsecureChannelCredentials()));

  LoadedConfig config;
  config.daemon.unix_socket = dir_ + "/kvmi.sock";
  absl::StatusOr<std::shared_ptr<Rule>> rule = PolicyToRule(CrPolicy("baseline").policy());
  ASSERT_TRUE(rule.ok());
  config.rules = {*rule};
  ASSERT_TRUE(daemon_->Reload(config).ok());
  ASSERT_TRUE(Apply(stub.get(), CrPolicy("own")).ok());
  kvmi::v1::ApplyPolicyRequest over = CrPolicy("baseline", 3);
  over.set_allow_replace(true);
  over.set_override_config(true);
  ASSERT_TRUE(Apply(stub.get(), over).ok());
  kvmi::v1::DeletePolicyRequest del;
  del.set_name("baseline");
  del.set_override_config(true);
  grpc::ClientContext del_ctx;
  kvmi::v1::DeletePolicyResponse deleted;
  ASSERT_TRUE(stub->DeletePolicy(&del_ctx, del, &deleted).ok());
  audited.reset();
  audit->reset();

  std::ifstream in(audit_path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ::unlink(audit_path.c_str());
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_THAT(lines[0], HasSubstr("\"policy\":\"own\""));
  EXPECT_THAT(lines[0], ::testing::Not(HasSubstr("overrode_config")));
  EXPECT_THAT(lines[1], HasSubstr("\"rpc\":\"ApplyPolicy\""));
  EXPECT_THAT(lines[1], HasSubstr("\"override_config\":true"));
  EXPECT_THAT(lines[1], HasSubstr("\"overrode_config\":true"));
  EXPECT_THAT(lines[2], HasSubstr("\"rpc\":\"DeletePolicy\""));
  EXPECT_THAT(lines[2], HasSubstr("\"overrode_config\":true"));
}

// Pages resume after the last policy listed: policies present throughout are listed once each,
// whatever is applied, replaced or deleted between pages.
TEST_F(ApiTest, ListPoliciesPagesAreStableUnderConcurrentChanges) {
  for (int i = 0; i < 10; ++i)
    ASSERT_TRUE(Apply(stub_.get(), CrPolicy("p" + std::to_string(i))).ok());
  kvmi::v1::ListPoliciesRequest request;
  request.set_page_size(4);
  std::vector<std::string> listed;
  int page_number = 0;
  do {
    grpc::ClientContext ctx;
    kvmi::v1::ListPoliciesResponse page;
    ASSERT_TRUE(stub_->ListPolicies(&ctx, request, &page).ok());
    for (const auto& status : page.policies()) listed.push_back(status.policy().name());
    request.set_page_token(page.next_page_token());
    if (page_number++ == 0) {
      // After page 1 (p0..p3): p3 (the token's own policy) and p1 go, p5 is replaced, p10 comes.
      for (const char* name : {"p3", "p1"}) {
        kvmi::v1::DeletePolicyRequest del;
        del.set_name(name);
        grpc::ClientContext del_ctx;
        kvmi::v1::DeletePolicyResponse deleted;
        ASSERT_TRUE(stub_->DeletePolicy(&del_ctx, del, &deleted).ok());
      }
      kvmi::v1::ApplyPolicyRequest replace = CrPolicy("p5", 5);
      replace.set_allow_replace(true);
      ASSERT_TRUE(Apply(stub_.get(), replace).ok());
      ASSERT_TRUE(Apply(stub_.get(), CrPolicy("p10")).ok());
    }
  } while (!request.page_token().empty() && page_number < 100);
  EXPECT_THAT(listed, ::testing::ElementsAre("p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8",
                                             "p9", "p10"));
}

// ---- ListVMs pages ------------------------------------------------------------------------------

std::vector<std::string> ListedVms(kvmi::v1::Introspection::Stub* stub, uint32_t page_size,
                                   const std::function<void(int page)>& between = nullptr) {
  kvmi::v1::ListVMsRequest request;
  request.set_page_size(page_size);
  std::vector<std::string> names;
  int page_number = 0;
  do {
    grpc::ClientContext ctx;
    kvmi::v1::ListVMsResponse page;
    grpc::Status s = stub->ListVMs(&ctx, request, &page);
    EXPECT_TRUE(s.ok()) << s.error_message();
    if (!s.ok()) break;
    if (page_size != 0) {
      EXPECT_LE(page.vms_size(), static_cast<int>(page_size));
    }
    for (const auto& vm : page.vms()) names.push_back(vm.name());
    request.set_page_token(page.next_page_token());
    if (between) between(page_number);
    ++page_number;
  } while (!request.page_token().empty() && page_number < 100);
  return names;
}

TEST_F(ApiTest, ListVmsPagesByUuidAndResumesAfterTheLastOne) {
  // A fleet of simulated guests, connected out of UUID order, names unlike their order.
  for (uint8_t id : {7, 3, 9, 5, 4, 8, 6}) {
    ASSERT_NE(Connect(id, "vm-" + std::string(1, static_cast<char>('z' - id))), nullptr);
  }
  EXPECT_THAT(ListedVms(stub_.get(), 3),
              ::testing::ElementsAre("vm-w", "vm-v", "vm-u", "vm-t", "vm-s", "vm-r", "vm-q"));
  EXPECT_EQ(ListedVms(stub_.get(), 0).size(), 7u);  // 0: kvmid's default page

  // Between pages: a guest before the token (uuid 2: not listed, it came after that page) and
  // one after it (uuid 10: listed); the guests present throughout are listed once each.
  std::vector<std::string> names = ListedVms(stub_.get(), 3, [this](int page) {
    if (page != 0) return;
    ASSERT_NE(Connect(2, "vm-early"), nullptr);
    ASSERT_NE(Connect(10, "vm-late"), nullptr);
  });
  EXPECT_THAT(names, ::testing::ElementsAre("vm-w", "vm-v", "vm-u", "vm-t", "vm-s", "vm-r", "vm-q",
                                            "vm-late"));

  // A token kvmid did not issue.
  for (const std::string& bad : {std::string("%%%"), absl::WebSafeBase64Escape("v2/not-a-uuid"),
                                 absl::WebSafeBase64Escape("p2/3")}) {
    kvmi::v1::ListVMsRequest forged;
    forged.set_page_token(bad);
    grpc::ClientContext ctx;
    kvmi::v1::ListVMsResponse page;
    grpc::Status s = stub_->ListVMs(&ctx, forged, &page);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_THAT(s.error_message(), HasSubstr("page_token")) << bad;
  }
}

}  // namespace
}  // namespace kvmid
