// StreamEvents and WatchVMs through a real server: filters, verdicts, drop notices for a slow
// reader while the guest runs at full speed, resuming after a cursor; the stream limits (queue
// budget, streams per identity, Attach included), no thread per stream, non-readers bounded by
// the budget, cancellation while events flow; plus the filter units alone (the queue alone:
// stream_outbox_test).
#include "daemon/api/event_stream.h"

#include <atomic>

#include "daemon/api/api_test_fixture.h"
#include "daemon/api/stream_limits.h"
#include "daemon/testing/threads.h"

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
  f.add_events(kvmi::v1::EVENT_TYPE_PF);
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

// ---- through a real server ----------------------------------------------------------------------

TEST_F(ApiTest, StreamEventsFiltersAndCarriesVerdicts) {
  ScriptedHost* web = Connect(4, "web-1");
  ScriptedHost* db = Connect(5, "db-1");
  grpc::ClientContext ctx;
  kvmi::v1::StreamEventsRequest request;
  kvmi::v1::EventFilter* allow = request.add_allow();
  allow->add_vms("web-1");
  allow->add_events(kvmi::v1::EVENT_TYPE_MSR);
  request.set_include_registers(true);
  auto reader = stub_->StreamEvents(&ctx, request);
  // The stream is registered once the server runs the call: wait for its observer (the event
  // history is the first).
  ASSERT_TRUE(WaitUntil([&] { return api::EventFanout::live_subscriptions() == 1; }));
  kvmi::Event other = MakeTestEvent(KVMI_EVENT_MSR, 0, 1);  // db-1: filtered out
  db->SendEvent(other);
  kvmi::Event wanted = MakeTestEvent(KVMI_EVENT_MSR, 1, 1);
  wanted.specific.msr.msr = 0xC0000082;
  wanted.specific.msr.new_value = 0x1234;
  wanted.common.arch.regs.rip = 0xffffffff81000010;
  web->SendEvent(wanted);
  kvmi::v1::StreamEventsResponse message;
  ASSERT_TRUE(reader->Read(&message));
  ASSERT_TRUE(message.has_event());
  const kvmi::v1::Event& e = message.event();
  EXPECT_EQ(e.vm_name(), "web-1");
  EXPECT_EQ(e.vcpu(), 1u);
  EXPECT_EQ(e.type(), kvmi::v1::EVENT_TYPE_MSR);
  EXPECT_EQ(e.msr().msr(), 0xC0000082u);
  EXPECT_EQ(e.msr().new_value(), 0x1234u);
  EXPECT_EQ(e.registers().rip(), 0xffffffff81000010u);
  EXPECT_EQ(e.action(), kvmi::v1::ACTION_CONTINUE);
  EXPECT_EQ(e.decided_by(), "default");
  // Event.latency is a google.protobuf.Duration: normalized (0 <= nanos < 1e9), set (the reply
  // took some time) and short (the default verdict is decided at once).
  ASSERT_TRUE(e.has_latency());
  EXPECT_GE(e.latency().nanos(), 0);
  EXPECT_LT(e.latency().nanos(), 1000000000);
  EXPECT_GT(e.latency().seconds() * 1000000000 + e.latency().nanos(), 0);
  EXPECT_LT(e.latency().seconds(), 10);
  EXPECT_TRUE(e.has_time());
  ctx.TryCancel();
  while (reader->Read(&message)) {
  }
}

TEST_F(ApiTest, StreamEventsCarriesTheContextItAskedForWhileItLasts) {
  ScriptedHost* web = Connect(7, "ctx-1");
  EXPECT_TRUE(daemon_->pipeline().context_demand(KVMI_EVENT_MSR).empty());
  auto ctx = std::make_unique<grpc::ClientContext>();
  kvmi::v1::StreamEventsRequest request;
  request.add_allow()->add_events(kvmi::v1::EVENT_TYPE_MSR);
  request.mutable_context()->set_rip_bytes(8);
  request.mutable_context()->set_rsp_bytes(4);
  request.mutable_field_mask()->add_paths("rip");  // "context" comes with asking for it
  auto reader = stub_->StreamEvents(ctx.get(), request);
  // A stream that asks for no context gets none, though kvmid reads it for the first one.
  grpc::ClientContext plain_ctx;
  kvmi::v1::StreamEventsRequest plain_request;
  plain_request.add_allow()->add_events(kvmi::v1::EVENT_TYPE_MSR);
  auto plain = stub_->StreamEvents(&plain_ctx, plain_request);
  ASSERT_TRUE(WaitUntil([&] { return api::EventFanout::live_subscriptions() == 2; }));
  // Only the types the stream lets through.
  EXPECT_EQ(daemon_->pipeline().context_demand(KVMI_EVENT_MSR), (vmem::ContextDemand{8, 4, 0}));
  EXPECT_TRUE(daemon_->pipeline().context_demand(KVMI_EVENT_CR).empty());
  kvmi::Event wanted = MakeTestEvent(KVMI_EVENT_MSR, 0, 1);  // CR0 = 0: paging off, GVA = GPA
  wanted.common.arch.regs.rip = 0x1234;
  wanted.common.arch.regs.rsp = 0x8ffe;  // the block crosses a page boundary
  web->SendEvent(wanted);
  kvmi::v1::StreamEventsResponse message;
  ASSERT_TRUE(reader->Read(&message));
  ASSERT_TRUE(message.has_event());
  const kvmi::v1::EventContext& context = message.event().context();
  // The scripted host's memory: each byte is the low byte of its address.
  EXPECT_EQ(context.rip().gva(), 0x1234u);
  EXPECT_TRUE(context.rip().complete());
  EXPECT_EQ(context.rip().data(), std::string("\x34\x35\x36\x37\x38\x39\x3a\x3b", 8));
  EXPECT_TRUE(context.rsp().complete());
  EXPECT_EQ(context.rsp().data(), std::string("\xfe\xff\x00\x01", 4));
  EXPECT_FALSE(context.has_pf());
  EXPECT_EQ(message.event().rip(), 0x1234u);
  EXPECT_TRUE(message.event().vm_name().empty());  // not in the mask
  kvmi::v1::StreamEventsResponse other;
  ASSERT_TRUE(plain->Read(&other));
  ASSERT_TRUE(other.has_event());
  EXPECT_EQ(other.event().id(), message.event().id());
  EXPECT_FALSE(other.event().has_context());
  plain_ctx.TryCancel();
  while (plain->Read(&other)) {
  }
  plain->Finish();
  ctx->TryCancel();
  while (reader->Read(&message)) {
  }
  reader->Finish();
  // The stream's demand went with it.
  ASSERT_TRUE(WaitUntil([&] { return api::EventFanout::live_subscriptions() == 0; }));
  EXPECT_TRUE(
      WaitUntil([&] { return daemon_->pipeline().context_demand(KVMI_EVENT_MSR).empty(); }));
}

TEST_F(ApiTest, StreamEventsRejectsBadFilters) {
  grpc::ClientContext ctx;
  kvmi::v1::StreamEventsRequest request;
  request.add_allow()->set_access("z");
  auto reader = stub_->StreamEvents(&ctx, request);
  kvmi::v1::StreamEventsResponse message;
  EXPECT_FALSE(reader->Read(&message));
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("allow[0].access"));
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
  ASSERT_TRUE(WaitUntil([&] { return api::EventFanout::live_subscriptions() == 1; }));
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
  kvmi::v1::StreamEventsResponse message;
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
  kvmi::v1::WatchVMsResponse change;
  ASSERT_TRUE(reader->Read(&change));
  EXPECT_EQ(change.kind(), kvmi::v1::WatchVMsResponse::KIND_EXISTING);
  EXPECT_EQ(change.vm().name(), "first");
  ScriptedHost* second = Connect(12, "second");
  ASSERT_NE(second, nullptr);
  auto next_state_of = [&](const std::string& name, kvmi::v1::VMState state) {
    while (reader->Read(&change)) {
      if (change.kind() == kvmi::v1::WatchVMsResponse::KIND_CHANGED && change.vm().name() == name &&
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
  kvmi::v1::StreamEventsResponse message;
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

// ---- limits ------------------------------------------------------------------------------------

size_t ThreadCount() { return kvmid::testing::ListThreads().size(); }

// A client stream and its context, cancelled and drained at the end.
template <typename Message>
struct OpenStream {
  std::unique_ptr<grpc::ClientContext> ctx = std::make_unique<grpc::ClientContext>();
  std::unique_ptr<grpc::ClientReader<Message>> reader;
  void Cancel() {
    if (!reader) return;
    ctx->TryCancel();
    Message m;
    while (reader->Read(&m)) {
    }
    reader->Finish();
    reader.reset();
  }
};
using EventStream = OpenStream<kvmi::v1::StreamEventsResponse>;

// A stream the server refused at once: its status.
template <typename Message>
grpc::Status RefusedStatus(grpc::ClientReader<Message>* reader) {
  Message m;
  EXPECT_FALSE(reader->Read(&m));
  return reader->Finish();
}

class StreamLimitsTest : public ApiTest {
 protected:
  // Applies `limits` to the running daemon as a configuration reload does (the streams read them
  // when they start).
  void SetLimits(const security::Limits& limits) {
    LoadedConfig loaded;
    loaded.daemon.unix_socket = dir_ + "/kvmi.sock";
    loaded.guest_labels = {{"web-1", {{"tier", "prod"}}}};
    loaded.security.limits = limits;
    ASSERT_TRUE(daemon_->Reload(loaded).ok());
  }
  // StreamEvents streams subscribed to the shared ring.
  size_t open_streams() { return api::EventFanout::live_subscriptions(); }
  EventStream Open(kvmi::v1::Introspection::Stub* stub,
                   const kvmi::v1::StreamEventsRequest& request = {}) {
    EventStream stream;
    stream.reader = stub->StreamEvents(stream.ctx.get(), request);
    return stream;
  }
  // A server of StreamEvents/WatchVMs alone over its own UNIX socket, with the limits in reach.
  struct StreamServer
      : kvmi::v1::Introspection::WithAsyncMethod_StreamEvents<
            kvmi::v1::Introspection::WithAsyncMethod_WatchVMs<kvmi::v1::Introspection::Service>> {
    StreamServer(Daemon* daemon, const std::string& socket)
        : limits(daemon->limits(), &daemon->memory_trimmer()), streams(daemon, nullptr, &limits) {
      grpc::ServerBuilder builder;
      builder.AddListeningPort("unix:" + socket, grpc::InsecureServerCredentials());
      builder.RegisterService(this);
      async = std::make_unique<api::AsyncServer>(&builder, 1);
      async->ServerStreaming<kvmi::v1::StreamEventsRequest, kvmi::v1::StreamEventsResponse>(
          [this](grpc::ServerContext* ctx, kvmi::v1::StreamEventsRequest* request,
                 grpc::ServerAsyncWriter<kvmi::v1::StreamEventsResponse>* writer,
                 grpc::ServerCompletionQueue* cq,
                 void* tag) { RequestStreamEvents(ctx, request, writer, cq, cq, tag); },
          [this](grpc::ServerContext*, const kvmi::v1::StreamEventsRequest* request) {
            return streams.StreamEvents(call, *request);
          });
      async->ServerStreaming<kvmi::v1::WatchVMsRequest, kvmi::v1::WatchVMsResponse>(
          [this](grpc::ServerContext* ctx, kvmi::v1::WatchVMsRequest* request,
                 grpc::ServerAsyncWriter<kvmi::v1::WatchVMsResponse>* writer,
                 grpc::ServerCompletionQueue* cq,
                 void* tag) { RequestWatchVMs(ctx, request, writer, cq, cq, tag); },
          [this](grpc::ServerContext*, const kvmi::v1::WatchVMsRequest* request) {
            return streams.WatchVMs(call, *request);
          });
      server = builder.BuildAndStart();
      async->Start();
    }
    ~StreamServer() override {
      server->Shutdown(std::chrono::system_clock::now());
      async->Stop();
    }
    api::CallContext call = api::CallContext::Unrestricted();  // every stream's caller
    api::StreamLimits limits;
    api::EventStreams streams;
    std::unique_ptr<api::AsyncServer> async;
    std::unique_ptr<grpc::Server> server;
  };
  // Events the guest sends, each answered by the daemon before the next (the guest never waits
  // on a stream).
  void RunEvents(ScriptedHost* host, uint32_t first, uint32_t count) {
    for (uint32_t seq = first; seq < first + count; ++seq) {
      host->SendEvent(MakeTestEvent(KVMI_EVENT_HYPERCALL, 0, seq));
      ASSERT_TRUE(host->WaitFor([seq](const ReceivedMessage& m) {
        return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == seq;
      })) << "the guest waited at event "
          << seq;
    }
  }
  std::unique_ptr<kvmi::v1::Introspection::Stub> SlowStub(const std::string& socket) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8192);
    return kvmi::v1::Introspection::NewStub(
        grpc::CreateCustomChannel("unix:" + socket, grpc::InsecureChannelCredentials(), args));
  }
};

TEST_F(StreamLimitsTest, TheNextStreamOfAnIdentityOverItsCapIsRefusedUntilOneEnds) {
  security::Limits limits;
  limits.streams_per_identity = 3;
  SetLimits(limits);
  ASSERT_NE(Connect(21, "capped"), nullptr);
  // Three streams of the same caller (root on the API socket), one of each kind.
  EventStream events = Open(stub_.get());
  ASSERT_TRUE(WaitUntil([&] { return open_streams() == 1; }));
  OpenStream<kvmi::v1::WatchVMsResponse> watch;
  watch.reader = stub_->WatchVMs(watch.ctx.get(), {});
  kvmi::v1::WatchVMsResponse change;
  ASSERT_TRUE(watch.reader->Read(&change));  // admitted: the current guest came
  grpc::ClientContext attach_ctx;
  auto attach = stub_->Attach(&attach_ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("capped");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_TYPE_BREAKPOINT);
  ASSERT_TRUE(attach->Write(claim));
  kvmi::v1::AttachResponse claimed;
  ASSERT_TRUE(attach->Read(&claimed));
  ASSERT_TRUE(claimed.has_claimed());

  // The fourth, whatever its kind, is refused with the limit's name and knob.
  for (int kind = 0; kind < 3; ++kind) {
    grpc::ClientContext ctx;
    grpc::Status status;
    if (kind == 0) {
      status = RefusedStatus(stub_->StreamEvents(&ctx, {}).get());
    } else if (kind == 1) {
      status = RefusedStatus(stub_->WatchVMs(&ctx, {}).get());
    } else {
      auto refused = stub_->Attach(&ctx);
      refused->Write(claim);
      kvmi::v1::AttachResponse response;
      EXPECT_FALSE(refused->Read(&response));
      status = refused->Finish();
    }
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << kind;
    EXPECT_THAT(status.error_message(), HasSubstr("streams_per_identity = 3")) << kind;
    EXPECT_THAT(status.error_message(), HasSubstr("limits.streams_per_identity")) << kind;
  }

  // One ends: its place is free again (released in OnDone, before its subscription goes).
  events.Cancel();
  ASSERT_TRUE(WaitUntil([&] { return open_streams() == 0; }));
  EventStream again = Open(stub_.get());
  EXPECT_TRUE(WaitUntil([&] { return open_streams() == 1; }));
  again.Cancel();
  watch.Cancel();
  attach_ctx.TryCancel();
  while (attach->Read(&claimed)) {
  }
  attach->Finish();
}

TEST_F(StreamLimitsTest, AnExhaustedQueueBudgetRefusesNewStreamsNamingIt) {
  security::Limits limits;
  limits.stream_queue_budget_bytes = 1u << 20;  // the smallest: 64 streams' base charge
  limits.streams_per_identity = 1000;
  SetLimits(limits);
  constexpr size_t kFit = (1u << 20) / api::kStreamBaseBytes;
  std::vector<EventStream> streams;
  for (size_t i = 0; i < kFit; ++i) streams.push_back(Open(stub_.get()));
  ASSERT_TRUE(WaitUntil([&] { return open_streams() == kFit; }));
  for (int kind = 0; kind < 2; ++kind) {
    grpc::ClientContext ctx;
    grpc::Status status = kind == 0 ? RefusedStatus(stub_->StreamEvents(&ctx, {}).get())
                                    : RefusedStatus(stub_->WatchVMs(&ctx, {}).get());
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(status.error_message(), HasSubstr("stream_queue_budget_bytes"));
    EXPECT_THAT(status.error_message(), HasSubstr("limits.stream_queue_budget_bytes"));
  }
  streams.back().Cancel();
  streams.pop_back();
  ASSERT_TRUE(WaitUntil([&] { return open_streams() == kFit - 1; }));
  streams.push_back(Open(stub_.get()));  // its charge came back
  EXPECT_TRUE(WaitUntil([&] { return open_streams() == kFit; }));
  for (EventStream& s : streams) s.Cancel();
}

// kvmid's threads do not grow with its streams (each used to hold a thread of the sync server).
TEST_F(StreamLimitsTest, OpenStreamsCostNoThread) {
  security::Limits limits;
  limits.streams_per_identity = 1000;
  SetLimits(limits);
  ScriptedHost* host = Connect(22, "threads");
  ASSERT_NE(host, nullptr);
  std::vector<EventStream> streams;
  streams.reserve(10);
  for (int i = 0; i < 10; ++i) streams.push_back(Open(stub_.get()));  // warm gRPC's pools up
  ASSERT_TRUE(WaitUntil([&] { return open_streams() == 10; }));
  const size_t before = ThreadCount();
  constexpr size_t kStreams = 300;
  for (size_t i = 0; i < kStreams; ++i) streams.push_back(Open(stub_.get()));
  ASSERT_TRUE(WaitUntil([&] { return open_streams() == 10 + kStreams; }));
  RunEvents(host, 1, 3);  // and they work: every stream gets the events
  for (size_t i = 0; i < streams.size(); i += 50) {
    kvmi::v1::StreamEventsResponse message;
    for (uint64_t id = 1; id <= 3; ++id) {
      ASSERT_TRUE(streams[i].reader->Read(&message));
      EXPECT_EQ(message.event().id(), id);
    }
  }
  const size_t after = ThreadCount();
  EXPECT_LE(after, before + 8) << "threads: " << before << " with 10 streams, " << after << " with "
                               << 10 + kStreams;
  for (EventStream& s : streams) s.Cancel();
  EXPECT_TRUE(WaitUntil([&] { return open_streams() == 0; }));
}

// 50 streams that never read while the guest runs: they drop (counted) within the shared budget,
// the guest never waits, and a stream that reads still gets events (told of what it missed).
TEST_F(StreamLimitsTest, NonReadersStayWithinTheBudgetAndOthersStillReceive) {
  security::Limits limits;
  limits.stream_queue_budget_bytes = 1u << 20;
  limits.streams_per_identity = 1000;
  SetLimits(limits);
  ScriptedHost* host = Connect(23, "busy");
  ASSERT_NE(host, nullptr);
  StreamServer server(daemon_.get(), dir_ + "/streams.sock");
  auto slow = SlowStub(dir_ + "/streams.sock");
  kvmi::v1::StreamEventsRequest request;
  request.set_include_registers(true);
  std::vector<EventStream> stuck;
  stuck.reserve(50);
  for (int i = 0; i < 50; ++i) stuck.push_back(Open(slow.get(), request));
  auto fast = kvmi::v1::Introspection::NewStub(
      grpc::CreateChannel("unix:" + dir_ + "/streams.sock", grpc::InsecureChannelCredentials()));
  EventStream reader = Open(fast.get(), request);
  ASSERT_TRUE(WaitUntil([&] { return open_streams() == 51; }));

  constexpr uint32_t kEvents = 2000;
  std::atomic<uint64_t> events{0}, dropped{0};
  std::thread read([&] {
    kvmi::v1::StreamEventsResponse message;
    while (events + dropped < kEvents && reader.reader->Read(&message)) {
      if (message.has_event()) ++events;
      if (message.has_dropped()) dropped = message.dropped().dropped_total();
    }
  });
  uint64_t peak = 0;
  for (uint32_t seq = 1; seq <= kEvents; seq += 100) {
    RunEvents(host, seq, 100);
    peak = std::max(peak, server.limits.budget()->used());
    ASSERT_LE(server.limits.budget()->used(), server.limits.budget()->budget());
  }
  EXPECT_TRUE(WaitUntil([&] { return events + dropped == kEvents; }));
  read.join();
  EXPECT_GT(events.load(), 0u);
  EXPECT_EQ(events + dropped, kEvents);  // nothing lost silently
  // The non-readers hold nothing but their base charge: the events stay in the shared ring.
  EXPECT_EQ(peak, 51 * api::kStreamBaseBytes);
  for (EventStream& s : stuck) s.Cancel();
  reader.Cancel();
  ASSERT_TRUE(WaitUntil([&] { return open_streams() == 0; }));
  EXPECT_EQ(server.limits.budget()->used(), 0u);  // every charge came back
}

// Streams cancelled while the guest's events are being queued and written: every subscription,
// charge and slot goes, once.
TEST_F(StreamLimitsTest, StreamsCancelledWhileEventsFlowReleaseEverything) {
  security::Limits limits;
  limits.streams_per_identity = 1000;
  SetLimits(limits);
  ScriptedHost* host = Connect(24, "racing");
  ASSERT_NE(host, nullptr);
  StreamServer server(daemon_.get(), dir_ + "/streams.sock");
  auto slow = SlowStub(dir_ + "/streams.sock");
  std::atomic<bool> stop{false};
  std::thread guest([&] {
    for (uint32_t seq = 1; !stop; ++seq) {
      host->SendEvent(MakeTestEvent(KVMI_EVENT_HYPERCALL, 0, seq));
      if (!host->WaitFor([seq](const ReceivedMessage& m) {
            return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == seq;
          })) {
        ADD_FAILURE() << "the guest waited at event " << seq;
        return;
      }
    }
  });
  kvmi::v1::StreamEventsRequest request;
  request.set_include_registers(true);
  request.set_max_queue(16);
  for (int round = 0; round < 10; ++round) {
    std::vector<EventStream> streams;
    streams.reserve(20);
    for (int i = 0; i < 20; ++i) streams.push_back(Open(slow.get(), request));
    OpenStream<kvmi::v1::WatchVMsResponse> watch;
    watch.reader = slow->WatchVMs(watch.ctx.get(), {});
    // Some read a little, then every one is cancelled mid-flow.
    kvmi::v1::StreamEventsResponse message;
    for (int i = 0; i < 20; i += 2) streams[i].reader->Read(&message);
    for (EventStream& s : streams) s.Cancel();
    watch.Cancel();
  }
  stop = true;
  guest.join();
  EXPECT_TRUE(WaitUntil([&] { return open_streams() == 0; }));
  EXPECT_TRUE(WaitUntil([&] { return server.limits.budget()->used() == 0; }));
  EXPECT_EQ(server.limits.streams_of(api::CallContext::Unrestricted()), 0u);
}

// ---- visibility
// ----------------------------------------------------------------------------------

// A viewer scoped to some guests sees only their events and only them in WatchVMs; a label change
// that brings a guest into scope shows it from then on (the per-guest decision is not stale).
TEST_F(StreamLimitsTest, StreamsShowOnlyTheGuestsInTheCallersScope) {
  ScriptedHost* seen = Connect(25, "seen");
  ScriptedHost* hidden = Connect(26, "hidden");
  ASSERT_NE(seen, nullptr);
  ASSERT_NE(hidden, nullptr);
  StreamServer server(daemon_.get(), dir_ + "/streams.sock");
  config::Authz authz;
  auto* binding = authz.add_bindings();
  binding->set_principal("spiffe://test/viewer");
  binding->set_role("viewer");
  binding->add_guests()->add_names("seen");
  (*binding->add_guests()->mutable_labels())["team"] = "red";
  auto authorizer = security::Authorizer::FromConfig(authz);
  ASSERT_TRUE(authorizer.ok()) << authorizer.status();
  server.call.caller = security::Caller::Tls("spiffe://test/viewer", "test");
  server.call.authorizer = *authorizer;
  auto stub = kvmi::v1::Introspection::NewStub(
      grpc::CreateChannel("unix:" + dir_ + "/streams.sock", grpc::InsecureChannelCredentials()));

  OpenStream<kvmi::v1::WatchVMsResponse> watch;
  watch.reader = stub->WatchVMs(watch.ctx.get(), {});
  kvmi::v1::WatchVMsResponse change;
  ASSERT_TRUE(watch.reader->Read(&change));
  EXPECT_EQ(change.vm().name(), "seen");  // "hidden" is not listed
  EventStream events = Open(stub.get());
  ASSERT_TRUE(WaitUntil([&] { return open_streams() == 1; }));

  RunEvents(hidden, 1, 2);
  RunEvents(seen, 1, 1);
  kvmi::v1::StreamEventsResponse message;
  ASSERT_TRUE(events.reader->Read(&message));
  EXPECT_EQ(message.event().vm_name(), "seen");
  // Labelled into scope: its events come from now on.
  daemon_->pipeline().SetGuestLabels("hidden", {{"team", "red"}});
  RunEvents(hidden, 3, 1);
  ASSERT_TRUE(events.reader->Read(&message));
  EXPECT_EQ(message.event().vm_name(), "hidden");
  events.Cancel();
  watch.Cancel();
}

// A guest that reconnects under another name (a migration, a rename) is decided again: renamed
// out of the caller's scope, its events no longer reach the stream.
TEST_F(StreamLimitsTest, AGuestRenamedOutOfScopeIsDecidedAgain) {
  ScriptedHost* guest = Connect(27, "seen");
  ScriptedHost* marker = Connect(28, "marker");
  ASSERT_NE(guest, nullptr);
  ASSERT_NE(marker, nullptr);
  StreamServer server(daemon_.get(), dir_ + "/streams.sock");
  config::Authz authz;
  auto* binding = authz.add_bindings();
  binding->set_principal("spiffe://test/viewer");
  binding->set_role("viewer");
  binding->add_guests()->add_names("seen");
  binding->add_guests()->add_names("marker");
  auto authorizer = security::Authorizer::FromConfig(authz);
  ASSERT_TRUE(authorizer.ok()) << authorizer.status();
  server.call.caller = security::Caller::Tls("spiffe://test/viewer", "test");
  server.call.authorizer = *authorizer;
  auto stub = kvmi::v1::Introspection::NewStub(
      grpc::CreateChannel("unix:" + dir_ + "/streams.sock", grpc::InsecureChannelCredentials()));
  EventStream events = Open(stub.get());
  ASSERT_TRUE(WaitUntil([&] { return open_streams() == 1; }));
  RunEvents(guest, 1, 1);
  kvmi::v1::StreamEventsResponse message;
  ASSERT_TRUE(events.reader->Read(&message));
  EXPECT_EQ(message.event().vm_name(), "seen");

  guest->Close();
  std::shared_ptr<Guest> same = daemon_->registry().Lookup("seen");
  ASSERT_NE(same, nullptr);
  ASSERT_TRUE(WaitUntil([&] { return same->state() != GuestState::kHooked; }));
  ScriptedHost* renamed = Connect(27, "renamed");  // the same UUID, another name
  ASSERT_NE(renamed, nullptr);
  RunEvents(renamed, 1, 2);
  RunEvents(marker, 1, 1);
  ASSERT_TRUE(events.reader->Read(&message));
  EXPECT_EQ(message.event().vm_name(), "marker");  // nothing from "renamed" came before it
  events.Cancel();
}

// ---- allow/deny lists, unknown guests, heartbeats, field masks, labels ------------------------

TEST_F(ApiTest, AFilterNamingAnUnknownGuestIsNotFoundAtOnce) {
  ASSERT_NE(Connect(4, "web-1"), nullptr);
  kvmi::v1::StreamEventsRequest request;
  request.add_allow()->add_vms("web-1");  // known
  request.add_deny()->add_vms("ghost");   // not
  grpc::ClientContext ctx;
  auto reader = stub_->StreamEvents(&ctx, request);
  grpc::Status s = RefusedStatus(reader.get());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(s.error_message(), HasSubstr("no guest 'ghost'"));

  kvmi::v1::StreamEventsRequest masked;
  masked.mutable_field_mask()->add_paths("vm_colour");
  grpc::ClientContext ctx2;
  reader = stub_->StreamEvents(&ctx2, masked);
  s = RefusedStatus(reader.get());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("field_mask.paths[0]: 'vm_colour'"));

  kvmi::v1::StreamEventsRequest fast;
  fast.mutable_heartbeat_interval()->set_nanos(1000000);  // 1 ms: below the bound
  grpc::ClientContext ctx3;
  reader = stub_->StreamEvents(&ctx3, fast);
  s = RefusedStatus(reader.get());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("heartbeat_interval"));
}

TEST_F(StreamLimitsTest, AGuestOutsideTheCallersScopeIsAsUnknownAsOneThatDoesNotExist) {
  ASSERT_NE(Connect(25, "seen"), nullptr);
  ASSERT_NE(Connect(26, "hidden"), nullptr);
  StreamServer server(daemon_.get(), dir_ + "/streams.sock");
  config::Authz authz;
  auto* binding = authz.add_bindings();
  binding->set_principal("spiffe://test/viewer");
  binding->set_role("viewer");
  binding->add_guests()->add_names("seen");
  auto authorizer = security::Authorizer::FromConfig(authz);
  ASSERT_TRUE(authorizer.ok()) << authorizer.status();
  server.call.caller = security::Caller::Tls("spiffe://test/viewer", "test");
  server.call.authorizer = *authorizer;
  auto stub = kvmi::v1::Introspection::NewStub(
      grpc::CreateChannel("unix:" + dir_ + "/streams.sock", grpc::InsecureChannelCredentials()));
  auto refused = [&](const std::string& vm) {
    kvmi::v1::StreamEventsRequest request;
    request.add_allow()->add_vms(vm);
    EventStream stream = Open(stub.get(), request);
    return RefusedStatus(stream.reader.get());
  };
  grpc::Status hidden = refused("hidden"), ghost = refused("ghost");
  EXPECT_EQ(hidden.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(ghost.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(hidden.error_message(), "no guest 'hidden' (in a filter's vms)");
  EXPECT_EQ(ghost.error_message(), "no guest 'ghost' (in a filter's vms)");  // same words
  EXPECT_EQ(open_streams(), 0u);

  kvmi::v1::StreamEventsRequest request;
  request.add_allow()->add_vms("seen");
  EventStream stream = Open(stub.get(), request);
  ASSERT_TRUE(WaitUntil([&] { return open_streams() == 1; }));
  stream.Cancel();
}

TEST_F(ApiTest, AnyAllowFilterDenyWinsHeartbeatsMaskAndLabels) {
  ScriptedHost* web = Connect(4, "web-1");
  ASSERT_NE(web, nullptr);
  kvmi::v1::StreamEventsRequest request;
  request.add_allow()->add_events(kvmi::v1::EVENT_TYPE_MSR);
  request.add_allow()->add_crs(4);
  request.add_deny()->add_vcpus(1);
  request.mutable_heartbeat_interval()->set_nanos(100000000);  // 100 ms
  for (const char* path : {"vm_name", "vm_uuid", "vm_labels", "type", "detail", "vcpu"}) {
    request.mutable_field_mask()->add_paths(path);
  }
  grpc::ClientContext ctx;
  auto reader = stub_->StreamEvents(&ctx, request);
  // Nothing happens: the stream says it is alive.
  kvmi::v1::StreamEventsResponse message;
  ASSERT_TRUE(reader->Read(&message));
  ASSERT_TRUE(message.has_heartbeat()) << message.DebugString();
  EXPECT_GT(message.heartbeat().time().seconds(), 1700000000);

  // The next event of the stream after heartbeats; the number of heartbeats skipped.
  auto next_event = [&](int* beats) {
    while (reader->Read(&message)) {
      if (message.has_event()) return true;
      if (message.has_heartbeat()) ++*beats;
    }
    return false;
  };
  kvmi::Event cr3 = MakeTestEvent(KVMI_EVENT_CR, 0, 1);  // no allow filter takes CR3
  cr3.specific.cr.cr = 3;
  web->SendEvent(cr3);
  kvmi::Event denied = MakeTestEvent(KVMI_EVENT_MSR, 1, 2);  // allowed, but vCPU 1 is denied
  web->SendEvent(denied);
  kvmi::Event msr = MakeTestEvent(KVMI_EVENT_MSR, 0, 3);  // the first allow filter
  msr.specific.msr.msr = 0xC0000082;
  web->SendEvent(msr);
  int beats = 0;
  ASSERT_TRUE(next_event(&beats));
  kvmi::v1::Event e = message.event();
  EXPECT_EQ(e.type(), kvmi::v1::EVENT_TYPE_MSR);
  EXPECT_EQ(e.vcpu(), 0u);
  EXPECT_EQ(e.msr().msr(), 0xC0000082u);
  EXPECT_EQ(e.vm_name(), "web-1");
  EXPECT_FALSE(e.vm_uuid().empty());
  ASSERT_EQ(e.vm_labels().count("tier"), 1u);
  EXPECT_EQ(e.vm_labels().at("tier"), "prod");
  EXPECT_NE(e.id(), 0u);       // always sent
  EXPECT_EQ(e.node(), "");     // left out by the mask
  EXPECT_FALSE(e.has_time());  // likewise
  EXPECT_EQ(e.decided_by(), "");
  const uint64_t msr_id = e.id();

  kvmi::Event cr4 = MakeTestEvent(KVMI_EVENT_CR, 0, 4);  // the second allow filter
  cr4.specific.cr.cr = 4;
  web->SendEvent(cr4);
  ASSERT_TRUE(next_event(&beats));
  EXPECT_EQ(message.event().type(), kvmi::v1::EVENT_TYPE_CR);
  EXPECT_EQ(message.event().cr().cr(), 4u);
  const uint64_t cr4_id = message.event().id();
  EXPECT_GT(cr4_id, msr_id);

  // Quiet again: the heartbeat says how far the stream has looked.
  beats = 0;
  while (reader->Read(&message) && !message.has_heartbeat()) {
  }
  ASSERT_TRUE(message.has_heartbeat());
  EXPECT_GE(message.heartbeat().last_event_id(), cr4_id);
  ctx.TryCancel();
  while (reader->Read(&message)) {
  }
}

TEST_F(ApiTest, AnAttachClaimsFieldMaskShapesItsEvents) {
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("masked");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_TYPE_MSR);
  claim.mutable_claim()->mutable_field_mask()->add_paths("nope");
  grpc::ClientContext ctx;
  auto stream = stub_->Attach(&ctx);
  ASSERT_TRUE(stream->Write(claim));
  kvmi::v1::AttachResponse response;
  EXPECT_FALSE(stream->Read(&response));
  grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("claim.field_mask.paths[0]: 'nope'"));
}

}  // namespace
}  // namespace kvmid
