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

}  // namespace
}  // namespace kvmid
