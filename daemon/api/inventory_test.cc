// ListVMs/GetVM and the policy RPCs through a real server.
#include "daemon/api/api_test_fixture.h"

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
  EXPECT_TRUE(Apply(stub_.get(), CrPolicy("b", 10)).ok());  // a replacement adds none
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

  // A deleted policy that ended a page: the next page starts where it was.
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
  for (const std::string& bad : {std::string("not base64!"), std::string("djEvMTI=")}) {
    kvmi::v1::ListPoliciesRequest forged;
    forged.set_page_token(bad);
    grpc::ClientContext ctx;
    grpc::Status s = stub_->ListPolicies(&ctx, forged, &page);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_THAT(s.error_message(), HasSubstr("page_token")) << bad;
  }
}

}  // namespace
}  // namespace kvmid
