// Bulk memory: the chunked pipelined reader alone (order, window, cancellation, zero runs), and
// ReadPhysicalStream / WritePhysicalStream through a real server to scripted guests.
#include "daemon/api/memory_stream.h"

#include <atomic>
#include <fstream>
#include <map>

#include "daemon/api/api_test_fixture.h"
#include "daemon/security/audit.h"

namespace kvmid {
namespace {

using api::ChunkedReader;
using ::testing::HasSubstr;

// ---- ChunkedReader alone -----------------------------------------------------------------------

// A ReadFn whose reads complete only when the test says so.
struct ManualReads {
  struct Read {
    uint64_t gpa, size;
    CommandCallback done;
  };
  Mutex mu;
  std::vector<Read> reads ABSL_GUARDED_BY(mu);

  ChunkedReader::ReadFn Fn() {
    return [this](uint64_t gpa, uint64_t size, CommandCallback done) {
      MutexLock lock(&mu);
      reads.push_back({gpa, size, std::move(done)});
    };
  }
  size_t count() {
    MutexLock lock(&mu);
    return reads.size();
  }
  // Completes read `i` with bytes equal to the low byte of their address.
  void Complete(size_t i) {
    Read read;
    {
      MutexLock lock(&mu);
      read = std::move(reads[i]);
    }
    std::vector<uint8_t> data;
    for (uint64_t a = read.gpa; a < read.gpa + read.size; ++a) data.push_back(uint8_t(a));
    read.done(CommandResult::Ok(std::move(data)));
  }
};

TEST(ChunkedReaderTest, HandsChunksOutInOrderWithinTheWindow) {
  ManualReads reads;
  ChunkedReader::Options options;
  options.chunk_bytes = 0x1000;
  options.window = 3;
  auto reader = ChunkedReader::Create({{0x10800, 0x3000}, {0x90000, 0x1800}}, options, reads.Fn());
  ASSERT_TRUE(reader.ok()) << reader.status();
  std::atomic<int> ready{0};
  (*reader)->SetOnReady([&] { ++ready; });
  (*reader)->Fill();
  ASSERT_EQ(reads.count(), 3u);  // the window, not the 5 chunks
  ChunkedReader::Chunk chunk;
  EXPECT_EQ((*reader)->Next(&chunk), ChunkedReader::Poll::kNotReady);
  reads.Complete(2);  // out of order: the front is still missing
  EXPECT_EQ(ready.load(), 0);
  EXPECT_EQ((*reader)->Next(&chunk), ChunkedReader::Poll::kNotReady);
  reads.Complete(0);
  EXPECT_EQ(ready.load(), 1);
  ASSERT_EQ((*reader)->Next(&chunk), ChunkedReader::Poll::kChunk);
  EXPECT_EQ(chunk.gpa, 0x10800u);
  EXPECT_EQ(chunk.size, 0x1000u);
  EXPECT_EQ(chunk.result.data[0], 0x00);
  (*reader)->Fill();  // one slot freed: one more read
  EXPECT_EQ(reads.count(), 4u);
  EXPECT_EQ((*reader)->outstanding(), 3u);
  reads.Complete(1);
  reads.Complete(3);
  std::vector<std::pair<uint64_t, uint64_t>> got;
  while ((*reader)->Next(&chunk) == ChunkedReader::Poll::kChunk) {
    ASSERT_TRUE(chunk.result.ok());
    got.emplace_back(chunk.gpa, chunk.size);
    (*reader)->Fill();
  }
  // The first range's last chunk is short; the second range starts its own chunks.
  EXPECT_EQ(got, (std::vector<std::pair<uint64_t, uint64_t>>{
                     {0x11800, 0x1000}, {0x12800, 0x1000}, {0x90000, 0x1000}}));
  ASSERT_EQ(reads.count(), 5u);
  reads.Complete(4);
  ASSERT_EQ((*reader)->Next(&chunk), ChunkedReader::Poll::kChunk);
  EXPECT_EQ(chunk.gpa, 0x91000u);
  EXPECT_EQ(chunk.size, 0x800u);
  EXPECT_EQ((*reader)->Next(&chunk), ChunkedReader::Poll::kEnd);
  EXPECT_EQ((*reader)->max_outstanding(), 3u);
}

TEST(ChunkedReaderTest, ShortReplyIsAnErrorAndCancelStopsReads) {
  std::vector<CommandCallback> pending;
  ChunkedReader::Options options;
  options.chunk_bytes = 0x1000;
  options.window = 2;
  auto reader = ChunkedReader::Create(
      {{0, 0x10000}}, options,
      [&](uint64_t, uint64_t, CommandCallback done) { pending.push_back(std::move(done)); });
  ASSERT_TRUE(reader.ok());
  bool notified = false;
  (*reader)->SetOnReady([&] { notified = true; });
  (*reader)->Fill();
  ASSERT_EQ(pending.size(), 2u);
  ChunkedReader::Chunk chunk;
  EXPECT_EQ((*reader)->Next(&chunk), ChunkedReader::Poll::kNotReady);
  pending[0](CommandResult::Ok(std::vector<uint8_t>(10)));
  EXPECT_TRUE(notified);
  ASSERT_EQ((*reader)->Next(&chunk), ChunkedReader::Poll::kChunk);
  EXPECT_EQ(chunk.result.status, CommandResult::Status::kProtocolError);
  (*reader)->Cancel();
  (*reader)->Fill();
  EXPECT_EQ(pending.size(), 2u);  // nothing more issued
  notified = false;
  pending[1](CommandResult::Ok(std::vector<uint8_t>(0x1000)));
  EXPECT_FALSE(notified);
}

TEST(ChunkedReaderTest, RefusesEmptyOrWrappingRanges) {
  auto none = [](uint64_t, uint64_t, const CommandCallback&) {};
  EXPECT_FALSE(ChunkedReader::Create({{0x1000, 0}}, {}, none).ok());
  auto wraps = ChunkedReader::Create({{~uint64_t{0} - 10, 100}}, {}, none);
  ASSERT_FALSE(wraps.ok());
  EXPECT_THAT(std::string(wraps.status().message()), HasSubstr("ranges[0]"));
  ChunkedReader::Options zero;
  zero.chunk_bytes = 0;
  EXPECT_FALSE(ChunkedReader::Create({{0, 1}}, zero, none).ok());
}

TEST(ChunkedReaderTest, ZeroPagesBecomeRunsAndPartialPagesStayData) {
  ChunkedReader::Chunk chunk;
  chunk.gpa = 0x800;  // half a page, then 4 whole pages, then half a page
  chunk.size = 0x5000;
  std::vector<uint8_t> data(chunk.size, 0);
  data[0x800 + 0x1000 + 7] = 1;  // the page at 0x2000 is not zero
  chunk.result = CommandResult::Ok(data);
  std::deque<kvmi::v1::ReadPhysicalStreamResponse> out;
  api::AppendChunkMessages(chunk, /*skip_zero_pages=*/true, &out);
  std::vector<std::tuple<uint64_t, uint64_t, bool, size_t>> got;
  got.reserve(out.size());
  for (const auto& m : out) got.emplace_back(m.gpa(), m.size(), m.zero(), m.data().size());
  EXPECT_EQ(got, (std::vector<std::tuple<uint64_t, uint64_t, bool, size_t>>{
                     {0x800, 0x800, false, 0x800},  // partial page: data even if zero
                     {0x1000, 0x1000, true, 0},     // zero page
                     {0x2000, 0x1000, false, 0x1000},
                     {0x3000, 0x2000, true, 0},  // two zero pages, one run
                     {0x5000, 0x800, false, 0x800}}));
  out.clear();
  api::AppendChunkMessages(chunk, /*skip_zero_pages=*/false, &out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].data().size(), 0x5000u);
  EXPECT_FALSE(out[0].zero());
}

// ---- through the server ------------------------------------------------------------------------

// Reads a whole stream; the status and the chunks.
grpc::Status ReadAll(kvmi::v1::Introspection::Stub* stub,
                     const kvmi::v1::ReadPhysicalStreamRequest& request,
                     std::vector<kvmi::v1::ReadPhysicalStreamResponse>* chunks) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = stub->ReadPhysicalStream(&ctx, request);
  kvmi::v1::ReadPhysicalStreamResponse chunk;
  while (reader->Read(&chunk)) chunks->push_back(chunk);
  return reader->Finish();
}

kvmi::v1::ReadPhysicalStreamRequest ReadRequest(const std::string& vm, uint64_t gpa, uint64_t size,
                                                uint32_t chunk_bytes = 0) {
  kvmi::v1::ReadPhysicalStreamRequest r;
  r.set_vm(vm);
  r.set_gpa(gpa);
  r.set_size(size);
  r.set_chunk_bytes(chunk_bytes);
  return r;
}

TEST_F(ApiTest, ReadPhysicalStreamReturnsEveryByteInOrderInBoundedChunks) {
  Connect(21, "mem");
  const uint64_t gpa = 0x10123, size = (3u << 20) + 777;
  std::vector<kvmi::v1::ReadPhysicalStreamResponse> chunks;
  grpc::Status s = ReadAll(stub_.get(), ReadRequest("mem", gpa, size, 64 << 10), &chunks);
  ASSERT_TRUE(s.ok()) << s.error_message();
  uint64_t at = gpa;
  for (const auto& c : chunks) {
    ASSERT_EQ(c.gpa(), at);
    ASSERT_LE(c.size(), 64u << 10);
    ASSERT_EQ(c.data().size(), c.size());
    for (size_t i = 0; i < c.data().size(); i += 997) {
      ASSERT_EQ(static_cast<uint8_t>(c.data()[i]), static_cast<uint8_t>(c.gpa() + i));
    }
    at += c.size();
  }
  EXPECT_EQ(at, gpa + size);
  EXPECT_EQ(chunks.size(), (size + (64 << 10) - 1) / (64 << 10));
}

TEST_F(ApiTest, ReadPhysicalStreamRefusesBadArgumentsNamingTheField) {
  Connect(22, "mem");
  struct Case {
    kvmi::v1::ReadPhysicalStreamRequest request;
    grpc::StatusCode code;
    const char* text;
  };
  const Case cases[] = {
      {ReadRequest("mem", 0x1000, 0), grpc::StatusCode::INVALID_ARGUMENT, "size"},
      {ReadRequest("mem", ~uint64_t{0} - 100, 4096), grpc::StatusCode::INVALID_ARGUMENT, "size"},
      {ReadRequest("mem", (uint64_t{1} << 52) - 4096, 8192), grpc::StatusCode::INVALID_ARGUMENT,
       "physical address space"},
      {ReadRequest("mem", 0, 4096, 2 << 20), grpc::StatusCode::INVALID_ARGUMENT, "chunk_bytes"},
      {ReadRequest("mem", 0, 4096, 100), grpc::StatusCode::INVALID_ARGUMENT, "chunk_bytes"},
      {ReadRequest("nope", 0, 4096), grpc::StatusCode::NOT_FOUND, "nope"},
  };
  for (const Case& c : cases) {
    std::vector<kvmi::v1::ReadPhysicalStreamResponse> chunks;
    grpc::Status s = ReadAll(stub_.get(), c.request, &chunks);
    EXPECT_EQ(s.error_code(), c.code) << c.request.ShortDebugString() << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(c.text));
    EXPECT_TRUE(chunks.empty());
  }
}

TEST_F(ApiTest, ReadPhysicalStreamEndsAtAnUnreadableChunkOrReportsItAndGoesOn) {
  ScriptedHost* host = Connect(23, "mem");
  host->set_responder(RichResponder());  // READ_PHYSICAL of 0xbad000: -KVM_EINVAL
  std::vector<kvmi::v1::ReadPhysicalStreamResponse> chunks;
  grpc::Status s = ReadAll(stub_.get(), ReadRequest("mem", 0xbab000, 0x6000, 4096), &chunks);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("gpa 0xbad000"));
  EXPECT_THAT(s.error_message(), HasSubstr("KVM_EINVAL"));
  ASSERT_EQ(chunks.size(), 2u);  // 0xbab000 and 0xbac000, then the error
  EXPECT_EQ(chunks[1].gpa(), 0xbac000u);

  chunks.clear();
  auto request = ReadRequest("mem", 0xbab000, 0x6000, 4096);
  request.set_continue_on_error(true);
  s = ReadAll(stub_.get(), request, &chunks);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(chunks.size(), 6u);
  EXPECT_EQ(chunks[2].gpa(), 0xbad000u);
  EXPECT_THAT(chunks[2].error(), HasSubstr("KVM_EINVAL"));
  EXPECT_TRUE(chunks[2].data().empty());
  EXPECT_EQ(chunks[3].data().size(), 4096u);

  // A guest that goes away ends the stream even with continue_on_error (no endless error chunks).
  auto defaults = std::make_shared<ScriptedHost>();
  host->set_responder([defaults](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    if (m.hdr.id == KVMI_READ_PHYSICAL) return std::nullopt;  // never answered
    return defaults->DefaultReply(m);
  });
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto huge = ReadRequest("mem", 0, uint64_t{1} << 40, 4096);
  huge.set_continue_on_error(true);
  auto reader = stub_->ReadPhysicalStream(&ctx, huge);
  host->Close();
  kvmi::v1::ReadPhysicalStreamResponse chunk;
  size_t errors = 0;
  while (reader->Read(&chunk)) errors += chunk.error().empty() ? 0 : 1;
  s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_EQ(errors, 0u);
}

TEST_F(ApiTest, ReadPhysicalStreamSkipsZeroPagesWhenAsked) {
  ScriptedHost* host = Connect(24, "mem");
  auto defaults = std::make_shared<ScriptedHost>();
  host->set_responder([defaults](const ReceivedMessage& m) {
    kvmi::ReadPhysicalRequest r;
    if (m.hdr.id == KVMI_READ_PHYSICAL && kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() &&
        r.gpa >= 0x20000) {
      std::vector<uint8_t> out;
      std::vector<uint8_t> zeros(r.size, 0);
      kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(zeros), &out);
      return std::optional<std::vector<uint8_t>>(out);
    }
    return std::optional<std::vector<uint8_t>>(defaults->DefaultReply(m));
  });
  auto request = ReadRequest("mem", 0x1e000, 0x8000);
  request.set_skip_zero_pages(true);
  std::vector<kvmi::v1::ReadPhysicalStreamResponse> chunks;
  grpc::Status s = ReadAll(stub_.get(), request, &chunks);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(chunks.size(), 2u);
  EXPECT_EQ(chunks[0].gpa(), 0x1e000u);
  EXPECT_EQ(chunks[0].size(), 0x2000u);
  EXPECT_EQ(chunks[0].data().size(), 0x2000u);
  EXPECT_EQ(chunks[1].gpa(), 0x20000u);
  EXPECT_EQ(chunks[1].size(), 0x6000u);
  EXPECT_TRUE(chunks[1].zero());
  EXPECT_TRUE(chunks[1].data().empty());
}

// A reader that stops reading: kvmid stops asking the guest (its window and gRPC's flow-control
// buffers), instead of reading everything into memory.
TEST_F(ApiTest, ReadPhysicalStreamSlowReaderHoldsTheReadsBack) {
  ScriptedHost* host = Connect(25, "mem");
  auto defaults = std::make_shared<ScriptedHost>();
  auto reads = std::make_shared<std::atomic<uint64_t>>(0);
  host->set_responder([defaults, reads](const ReceivedMessage& m) {
    if (m.hdr.id == KVMI_READ_PHYSICAL) ++*reads;
    return std::optional<std::vector<uint8_t>>(defaults->DefaultReply(m));
  });
  const uint64_t total_pages = (uint64_t{256} << 20) / 4096;
  grpc::ClientContext ctx;
  auto reader = stub_->ReadPhysicalStream(&ctx, ReadRequest("mem", 0, uint64_t{256} << 20));
  kvmi::v1::ReadPhysicalStreamResponse chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  // Reads go on until the window and the transport's buffers are full, then stop.
  ASSERT_TRUE(WaitUntil([&] { return reads->load() >= api::StreamWindow(256 << 10) * 64; }));
  uint64_t seen = 0;
  for (int i = 0; i < 100; ++i) {  // 1 s of watching: the count settles far below the total
    seen = reads->load();
    ASSERT_LT(seen, total_pages / 4);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ctx.TryCancel();
  while (reader->Read(&chunk)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

// ---- WritePhysicalStream -----------------------------------------------------------------------

grpc::Status WriteAll(kvmi::v1::Introspection::Stub* stub,
                      const std::vector<kvmi::v1::WritePhysicalStreamRequest>& messages,
                      kvmi::v1::WritePhysicalStreamResponse* response) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto writer = stub->WritePhysicalStream(&ctx, response);
  for (const auto& m : messages) {
    if (!writer->Write(m)) break;
  }
  writer->WritesDone();
  return writer->Finish();
}

kvmi::v1::WritePhysicalStreamRequest WriteMessage(std::string data, const std::string& vm = "",
                                                  uint64_t gpa = 0, uint64_t size = 0) {
  kvmi::v1::WritePhysicalStreamRequest m;
  m.set_vm(vm);
  m.set_gpa(gpa);
  m.set_size(size);
  m.set_data(std::move(data));
  return m;
}

// Memory streams count among their identity's streams, and their windows are charged to the
// stream budget: one caller cannot open them without bound.
TEST_F(ApiTest, MemoryStreamsAreBoundedByTheStreamLimits) {
  ScriptedHost* host = Connect(26, "mem");
  (void)host;
  security::Limits limits = daemon_->limits();
  limits.streams_per_identity = 1;
  daemon_->set_limits(limits);
  grpc::ClientContext first_ctx;
  auto first = stub_->ReadPhysicalStream(&first_ctx, ReadRequest("mem", 0, uint64_t{64} << 20));
  kvmi::v1::ReadPhysicalStreamResponse chunk;
  ASSERT_TRUE(first->Read(&chunk));  // open, and holding its place
  {
    grpc::ClientContext ctx;
    auto second = stub_->ReadPhysicalStream(&ctx, ReadRequest("mem", 0, 4096));
    while (second->Read(&chunk)) {
    }
    grpc::Status s = second->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(s.error_message(), HasSubstr("streams_per_identity"));
  }
  {
    kvmi::v1::WritePhysicalStreamResponse response;
    grpc::Status s = WriteAll(stub_.get(), {WriteMessage("abcd", "mem", 0x1000, 4)}, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(s.error_message(), HasSubstr("streams_per_identity"));
  }
  first_ctx.TryCancel();
  while (first->Read(&chunk)) {
  }
  first->Finish();
  // The place is free again once the first stream ended; a window over the budget is refused.
  limits.streams_per_identity = 64;
  limits.stream_queue_budget_bytes = uint64_t{1} << 20;  // under one read window
  daemon_->set_limits(limits);
  {
    grpc::ClientContext ctx;
    auto read = stub_->ReadPhysicalStream(&ctx, ReadRequest("mem", 0, 4096));
    while (read->Read(&chunk)) {
    }
    grpc::Status s = read->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(s.error_message(), HasSubstr("stream_queue_budget_bytes"));
  }
  limits.stream_queue_budget_bytes = uint64_t{128} << 20;
  daemon_->set_limits(limits);
  ASSERT_TRUE(WaitUntil([&] {
    grpc::ClientContext ctx;
    auto read = stub_->ReadPhysicalStream(&ctx, ReadRequest("mem", 0, 4096));
    while (read->Read(&chunk)) {
    }
    return read->Finish().ok();
  }));
}

TEST_F(ApiTest, WritePhysicalStreamWritesEveryByteWhereItBelongs) {
  ScriptedHost* host = Connect(26, "mem");
  std::string bytes((1 << 20) + (1 << 19) + 100, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 7 + 3);
  const uint64_t gpa = 0x40ff0;
  std::vector<kvmi::v1::WritePhysicalStreamRequest> messages = {
      WriteMessage(bytes.substr(0, 1 << 20), "mem", gpa, bytes.size()),
      WriteMessage(bytes.substr(1 << 20, 1000)), WriteMessage(""),
      WriteMessage(bytes.substr((1 << 20) + 1000))};
  kvmi::v1::WritePhysicalStreamResponse response;
  grpc::Status s = WriteAll(stub_.get(), messages, &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response.bytes_written(), bytes.size());
  std::map<uint64_t, std::string> written;  // what the guest got, by GPA
  uint64_t total = 0;
  while (total < bytes.size()) {
    auto m = host->WaitForId(KVMI_WRITE_PHYSICAL);
    ASSERT_TRUE(m);
    kvmi::WritePhysicalRequest r;
    ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &r).ok());
    written[r.gpa] = std::string(reinterpret_cast<const char*>(r.data.data()), r.data.size());
    total += r.size;
  }
  std::string joined;
  uint64_t at = gpa;
  for (const auto& [piece_gpa, piece] : written) {
    ASSERT_EQ(piece_gpa, at);
    joined += piece;
    at += piece.size();
  }
  EXPECT_EQ(joined, bytes);
}

TEST_F(ApiTest, WritePhysicalStreamRefusesMalformedStreams) {
  Connect(27, "mem");
  struct Case {
    std::vector<kvmi::v1::WritePhysicalStreamRequest> messages;
    grpc::StatusCode code;
    const char* text;
  };
  const Case cases[] = {
      {{WriteMessage("abc", "mem", 0x1000, 10)},
       grpc::StatusCode::INVALID_ARGUMENT,
       "carried 3 of 10"},
      {{WriteMessage("abcdef", "mem", 0x1000, 4)},
       grpc::StatusCode::INVALID_ARGUMENT,
       "more than size"},
      {{WriteMessage("ab", "mem", 0x1000, 4), WriteMessage("cd", "mem")},
       grpc::StatusCode::INVALID_ARGUMENT,
       "first message only"},
      {{WriteMessage("", "mem", 0x1000, 0)}, grpc::StatusCode::INVALID_ARGUMENT, "size"},
      {{WriteMessage("ab", "mem", ~uint64_t{0}, 2)},
       grpc::StatusCode::INVALID_ARGUMENT,
       "physical address space"},
      {{WriteMessage(std::string((1 << 20) + 1, 'x'), "mem", 0, 2 << 20)},
       grpc::StatusCode::INVALID_ARGUMENT,
       "data"},
      {{WriteMessage("ab", "nope", 0x1000, 2)}, grpc::StatusCode::NOT_FOUND, "nope"},
      {{}, grpc::StatusCode::INVALID_ARGUMENT, "vm"},
  };
  for (const Case& c : cases) {
    kvmi::v1::WritePhysicalStreamResponse response;
    grpc::Status s = WriteAll(stub_.get(), c.messages, &response);
    EXPECT_EQ(s.error_code(), c.code) << c.text << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(c.text));
  }
}

// A write stream is audited like WritePhysical: its guest, GPA and size, and its result.
TEST_F(ApiTest, WritePhysicalStreamIsAuditedWithGpaAndSize) {
  Connect(28, "mem");
  const std::string audit_path = dir_ + "/audit.log";
  auto audit = security::AuditLog::Open(audit_path);
  ASSERT_TRUE(audit.ok()) << audit.status();
  {
    ApiServer audited(daemon_.get(), /*history=*/4, audit->get());
    security::ApiListenOptions listen;
    listen.unix_socket = dir_ + "/audited.sock";
    ASSERT_TRUE(audited.Start(listen).ok());
    auto stub = kvmi::v1::Introspection::NewStub(
        grpc::CreateChannel("unix:" + dir_ + "/audited.sock", grpc::InsecureChannelCredentials()));
    kvmi::v1::WritePhysicalStreamResponse response;
    ASSERT_TRUE(WriteAll(stub.get(), {WriteMessage("abcd", "mem", 0x7000, 4)}, &response).ok());
    EXPECT_EQ(WriteAll(stub.get(), {WriteMessage("ab", "mem", 0x8000, 3)}, &response).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
    kvmi::v1::ReadPhysicalStreamRequest read = ReadRequest("mem", 0x7000, 4);
    std::vector<kvmi::v1::ReadPhysicalStreamResponse> chunks;
    ASSERT_TRUE(ReadAll(stub.get(), read, &chunks).ok());  // a read: not audited
  }
  audit->reset();
  std::ifstream in(audit_path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_THAT(lines[0], HasSubstr("\"rpc\":\"WritePhysicalStream\""));
  EXPECT_THAT(lines[0], HasSubstr("0x7000"));
  EXPECT_THAT(lines[0], HasSubstr("\"size\":4"));
  EXPECT_THAT(lines[0], HasSubstr("\"code\":\"OK\""));
  EXPECT_THAT(lines[1], HasSubstr("0x8000"));
  EXPECT_THAT(lines[1], HasSubstr("\"code\":\"INVALID_ARGUMENT\""));
  ::unlink(audit_path.c_str());
}

}  // namespace
}  // namespace kvmid
