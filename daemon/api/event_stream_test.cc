// StreamEvents and WatchVMs through a real server: filters, verdicts, drop notices for a slow
// reader while the guest runs at full speed, resuming after a cursor; plus the filter and queue
// units alone.
#include "daemon/api/event_stream.h"

#include "daemon/api/api_test_fixture.h"

namespace kvmid {
namespace {

using ::testing::HasSubstr;

// ---- the units alone ----------------------------------------------------------------------------

ObservedEvent PfEvent(uint16_t vcpu, uint64_t gpa, uint8_t access) {
  ObservedEvent o;
  o.event.common.event = KVMI_EVENT_PF;
  o.event.common.vcpu = vcpu;
  o.event.specific.pf.gpa = gpa;
  o.event.specific.pf.access = access;
  return o;
}

TEST(CompiledFilterTest, EveryGivenFieldMustMatch) {
  kvmi::v1::EventFilter f;
  f.add_events(kvmi::v1::EVENT_PF);
  f.add_vcpus(1);
  f.set_gpa_first(0x1000);
  f.set_gpa_last(0x1fff);
  f.set_access("w");
  api::CompiledFilter filter;
  ASSERT_TRUE(api::CompileFilter(f, "allow", &filter).ok());
  EXPECT_TRUE(filter.Matches(PfEvent(1, 0x1800, KVMI_PAGE_ACCESS_W)));
  EXPECT_FALSE(filter.Matches(PfEvent(0, 0x1800, KVMI_PAGE_ACCESS_W)));  // vCPU
  EXPECT_FALSE(filter.Matches(PfEvent(1, 0x2000, KVMI_PAGE_ACCESS_W)));  // above gpa_last
  EXPECT_FALSE(filter.Matches(PfEvent(1, 0x0fff, KVMI_PAGE_ACCESS_W)));  // below gpa_first
  EXPECT_FALSE(filter.Matches(PfEvent(1, 0x1800, KVMI_PAGE_ACCESS_R)));  // access
  ObservedEvent cr;
  cr.event.common.event = KVMI_EVENT_CR;
  cr.event.common.vcpu = 1;
  EXPECT_FALSE(filter.Matches(cr));                 // event type
  EXPECT_FALSE(api::CompiledFilter().Matches(cr));  // no filter compiled: matches nothing

  api::CompiledFilter crs;
  kvmi::v1::EventFilter only_cr3;
  only_cr3.add_crs(3);
  ASSERT_TRUE(api::CompileFilter(only_cr3, "deny", &crs).ok());
  cr.event.specific.cr.cr = 3;
  EXPECT_TRUE(crs.Matches(cr));
  cr.event.specific.cr.cr = 4;
  EXPECT_FALSE(crs.Matches(cr));
}

TEST(CompiledFilterTest, MalformedFiltersNameTheirField) {
  auto error = [](const kvmi::v1::EventFilter& f, const std::string& field) {
    api::CompiledFilter filter;
    return api::CompileFilter(f, field, &filter).error_message();
  };
  kvmi::v1::EventFilter f;
  f.add_vcpus(0x10000);
  EXPECT_THAT(error(f, "deny"), HasSubstr("deny.vcpus"));
  f.clear_vcpus();
  f.set_gpa_first(2);
  f.set_gpa_last(1);
  EXPECT_THAT(error(f, "allow"), HasSubstr("allow.gpa_first"));
  f.clear_gpa_first();
  f.set_access("q");
  EXPECT_THAT(error(f, "allow"), HasSubstr("allow.access"));
  f.set_access("rw");
  EXPECT_EQ(error(f, "allow"), "");
}

TEST(StreamQueueTest, ABoundedQueueCountsWhatDoesNotFitAndWaitsOnlyUntilSomethingCame) {
  api::StreamQueue queue(2);
  uint64_t dropped = 0;
  auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(queue.Take(std::chrono::milliseconds(20), &dropped).empty());
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(20));
  EXPECT_EQ(dropped, 0u);
  for (uint64_t id = 1; id <= 5; ++id) {
    ObservedEvent o = PfEvent(0, 0, 0);
    o.event_id = id;
    queue.Push(o);
  }
  auto batch = queue.Take(std::chrono::seconds(10), &dropped);
  ASSERT_EQ(batch.size(), 2u);
  EXPECT_EQ(batch[0].event_id, 1u);
  EXPECT_EQ(batch[1].event_id, 2u);
  EXPECT_EQ(dropped, 3u);
  // A push from another thread wakes a waiting reader long before its wait is over.
  std::thread pusher([&] { queue.Push(PfEvent(0, 0, 0)); });
  start = std::chrono::steady_clock::now();
  batch = queue.Take(std::chrono::seconds(30), &dropped);
  pusher.join();
  EXPECT_EQ(batch.size(), 1u);
  EXPECT_EQ(dropped, 0u);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
}

// ---- through a real server ----------------------------------------------------------------------

TEST_F(ApiTest, StreamEventsFiltersAndCarriesVerdicts) {
  ScriptedHost* web = Connect(4, "web-1");
  ScriptedHost* db = Connect(5, "db-1");
  grpc::ClientContext ctx;
  kvmi::v1::StreamEventsRequest request;
  request.mutable_allow()->add_vms("web-1");
  request.mutable_allow()->add_events(kvmi::v1::EVENT_MSR);
  request.set_include_registers(true);
  auto reader = stub_->StreamEvents(&ctx, request);
  // The stream is registered once the server runs the call: wait for its observer (the event
  // history is the first).
  ASSERT_TRUE(WaitUntil([&] { return daemon_->pipeline().observer_count() == 2; }));
  kvmi::Event other = MakeTestEvent(KVMI_EVENT_MSR, 0, 1);  // db-1: filtered out
  db->SendEvent(other);
  kvmi::Event wanted = MakeTestEvent(KVMI_EVENT_MSR, 1, 1);
  wanted.specific.msr.msr = 0xC0000082;
  wanted.specific.msr.new_value = 0x1234;
  wanted.common.arch.regs.rip = 0xffffffff81000010;
  web->SendEvent(wanted);
  kvmi::v1::EventMessage message;
  ASSERT_TRUE(reader->Read(&message));
  ASSERT_TRUE(message.has_event());
  const kvmi::v1::Event& e = message.event();
  EXPECT_EQ(e.vm_name(), "web-1");
  EXPECT_EQ(e.vcpu(), 1u);
  EXPECT_EQ(e.type(), kvmi::v1::EVENT_MSR);
  EXPECT_EQ(e.msr().msr(), 0xC0000082u);
  EXPECT_EQ(e.msr().new_value(), 0x1234u);
  EXPECT_EQ(e.registers().rip(), 0xffffffff81000010u);
  EXPECT_EQ(e.action(), kvmi::v1::ACTION_CONTINUE);
  EXPECT_EQ(e.decided_by(), "default");
  ctx.TryCancel();
  while (reader->Read(&message)) {
  }
}

TEST_F(ApiTest, StreamEventsRejectsBadFilters) {
  grpc::ClientContext ctx;
  kvmi::v1::StreamEventsRequest request;
  request.mutable_allow()->set_access("z");
  auto reader = stub_->StreamEvents(&ctx, request);
  kvmi::v1::EventMessage message;
  EXPECT_FALSE(reader->Read(&message));
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("allow.access"));
}

TEST_F(ApiTest, ASlowReaderGetsDropNoticesWhileTheGuestRunsAtFullSpeed) {
  ScriptedHost* host = Connect(6, "busy");
  // A reader with a small HTTP/2 window (no BDP growth), as over a slow link: the server's
  // writes stall soon, and the stream's own bounded queue has to overflow.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8192);
  auto slow = kvmi::v1::Introspection::NewStub(grpc::CreateCustomChannel(
      "unix:" + dir_ + "/api.sock", grpc::InsecureChannelCredentials(), args));
  grpc::ClientContext ctx;
  kvmi::v1::StreamEventsRequest request;
  request.set_max_queue(4);
  request.set_include_registers(true);  // ~250 bytes an event
  auto reader = slow->StreamEvents(&ctx, request);
  ASSERT_TRUE(WaitUntil([&] { return daemon_->pipeline().observer_count() == 2; }));
  // Events answered at once by the daemon while nobody reads the stream: more than HTTP/2's
  // window can hold, so the stream's own queue overflows.
  constexpr uint32_t kEvents = 3000;
  for (uint32_t seq = 1; seq <= kEvents; ++seq) {
    host->SendEvent(MakeTestEvent(KVMI_EVENT_HYPERCALL, 0, seq));
    ASSERT_TRUE(host->WaitFor([seq](const ReceivedMessage& m) {
      return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == seq;
    })) << "the guest waited on the slow reader at event "
        << seq;
  }
  uint64_t events = 0, dropped = 0;
  kvmi::v1::EventMessage message;
  auto deadline = Clock::now() + std::chrono::seconds(5);
  while (events + dropped < kEvents && Clock::now() < deadline && reader->Read(&message)) {
    if (message.has_event()) ++events;
    if (message.has_dropped()) dropped = message.dropped().dropped_total();
  }
  EXPECT_EQ(events + dropped, kEvents);  // nothing lost silently
  EXPECT_GT(dropped, 0u);
  ctx.TryCancel();
  while (reader->Read(&message)) {
  }
}

TEST_F(ApiTest, WatchVmsSendsTheCurrentGuestsThenEveryChange) {
  ASSERT_NE(Connect(11, "first"), nullptr);
  grpc::ClientContext ctx;
  auto reader = stub_->WatchVMs(&ctx, {});
  kvmi::v1::VMChange change;
  ASSERT_TRUE(reader->Read(&change));
  EXPECT_EQ(change.kind(), kvmi::v1::VMChange::KIND_EXISTING);
  EXPECT_EQ(change.vm().name(), "first");
  ScriptedHost* second = Connect(12, "second");
  ASSERT_NE(second, nullptr);
  auto next_state_of = [&](const std::string& name, kvmi::v1::VMState state) {
    while (reader->Read(&change)) {
      if (change.kind() == kvmi::v1::VMChange::KIND_CHANGED && change.vm().name() == name &&
          change.vm().state() == state) {
        return true;
      }
    }
    return false;
  };
  EXPECT_TRUE(next_state_of("second", kvmi::v1::VM_STATE_HOOKED));
  second->Close();
  EXPECT_TRUE(next_state_of("second", kvmi::v1::VM_STATE_GONE));
  ctx.TryCancel();
  while (reader->Read(&change)) {
  }
}

TEST_F(ApiTest, AReconnectingReaderResumesAfterItsCursorAndIsToldWhatIsGone) {
  ScriptedHost* host = Connect(13, "resumable");
  // Six events while nobody streams; kvmid remembers the last four (ids 3..6).
  for (uint32_t seq = 1; seq <= 6; ++seq) {
    host->SendEvent(MakeTestEvent(KVMI_EVENT_XSETBV, 0, seq));
    ASSERT_TRUE(host->WaitFor([seq](const ReceivedMessage& m) {
      return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == seq;
    }));
  }
  // Observers run just after each reply is written: wait for the last one to be remembered.
  ASSERT_TRUE(WaitUntil([&] { return api_->history().latest_id() == 6; }));
  grpc::ClientContext ctx;
  kvmi::v1::StreamEventsRequest request;
  request.set_resume_after(1);  // the reader had seen event 1
  auto reader = stub_->StreamEvents(&ctx, request);
  kvmi::v1::EventMessage message;
  ASSERT_TRUE(reader->Read(&message));
  ASSERT_TRUE(message.has_dropped());
  EXPECT_EQ(message.dropped().dropped(), 1u);  // event 2 is gone
  std::vector<uint64_t> ids;
  for (int i = 0; i < 4 && reader->Read(&message); ++i) {
    ASSERT_TRUE(message.has_event());
    ids.push_back(message.event().id());
  }
  EXPECT_THAT(ids, ::testing::ElementsAre(3u, 4u, 5u, 6u));
  host->SendEvent(MakeTestEvent(KVMI_EVENT_XSETBV, 0, 7));  // then live, without duplicates
  ASSERT_TRUE(reader->Read(&message));
  ASSERT_TRUE(message.has_event());
  EXPECT_EQ(message.event().id(), 7u);
  ctx.TryCancel();
  while (reader->Read(&message)) {
  }
}

}  // namespace
}  // namespace kvmid
