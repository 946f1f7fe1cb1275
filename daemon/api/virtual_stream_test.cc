// ReadVirtualStream and WriteVirtual through a real server to scripted guests. The scripted
// hosts run with paging off (a vCPU's CR0 is 0, or PAGING_MODE_OFF given), so guest-virtual is
// guest-physical and the bytes are the scripted host's (each the low byte of its address); the
// walks themselves are checked against real page tables in tests/e2e/translate_e2e_test.cc.
#include "daemon/api/virtual_stream.h"

#include <fstream>

#include "daemon/api/api_test_fixture.h"
#include "daemon/security/audit.h"

namespace kvmid {
namespace {

using ::testing::HasSubstr;

kvmi::v1::ReadVirtualStreamRequest StreamRequest(const std::string& vm, uint64_t gva, uint64_t size,
                                                 uint32_t chunk_bytes = 0) {
  kvmi::v1::ReadVirtualStreamRequest r;
  r.set_vm(vm);
  r.mutable_address_space()->set_mode(kvmi::v1::PAGING_MODE_OFF);
  r.set_gva(gva);
  r.set_size(size);
  r.set_chunk_bytes(chunk_bytes);
  return r;
}

grpc::Status ReadAll(kvmi::v1::Introspection::Stub* stub,
                     const kvmi::v1::ReadVirtualStreamRequest& request,
                     std::vector<kvmi::v1::ReadVirtualStreamResponse>* chunks) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = stub->ReadVirtualStream(&ctx, request);
  kvmi::v1::ReadVirtualStreamResponse chunk;
  while (reader->Read(&chunk)) chunks->push_back(chunk);
  return reader->Finish();
}

TEST_F(ApiTest, ReadVirtualStreamReturnsEveryByteAndNamesThePagesItCouldNotRead) {
  ScriptedHost* host = Connect(31, "virt");
  host->set_responder(RichResponder());  // READ_PHYSICAL at 0xbad000: -KVM_EINVAL
  const uint64_t gva = 0xbab800, size = 0x5000;
  std::vector<kvmi::v1::ReadVirtualStreamResponse> chunks;
  grpc::Status s = ReadAll(stub_.get(), StreamRequest("virt", gva, size, 4096), &chunks);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(chunks.size(), 5u);
  uint64_t at = gva;
  for (const auto& c : chunks) {
    ASSERT_EQ(c.gva(), at);
    ASSERT_EQ(c.size(), 4096u);
    ASSERT_EQ(c.data().size(), 4096u);
    EXPECT_EQ(c.mode(), kvmi::v1::PAGING_MODE_OFF);
    for (size_t i = 0; i < c.data().size(); ++i) {
      const uint64_t a = c.gva() + i;
      const uint8_t want = (a >= 0xbad000 && a < 0xbad800) ? 0 : static_cast<uint8_t>(a);
      ASSERT_EQ(static_cast<uint8_t>(c.data()[i]), want) << std::hex << a;
    }
    at += c.size();
  }
  // Only the chunk [0xbac800, 0xbad800) lost a piece: exactly [0xbad000, 0xbad800).
  for (size_t i = 0; i < chunks.size(); ++i) {
    EXPECT_EQ(chunks[i].complete(), i != 1) << i;
  }
  ASSERT_EQ(chunks[1].unread_size(), 1);
  EXPECT_EQ(chunks[1].unread(0).gva(), 0xbad000u);
  EXPECT_EQ(chunks[1].unread(0).size(), 0x800u);
  EXPECT_FALSE(chunks[1].unread(0).read());
  EXPECT_THAT(chunks[1].unread(0).why(), HasSubstr("KVM_EINVAL"));
}

TEST_F(ApiTest, ReadVirtualStreamThroughAVcpuTakesItsPagingModeOnce) {
  ScriptedHost* host = Connect(32, "virt");
  host->set_responder(RichResponder());  // CR0 = 0: paging off
  kvmi::v1::ReadVirtualStreamRequest request = StreamRequest("virt", 0x10000, (1 << 20) + 5);
  request.set_vcpu(1);
  std::vector<kvmi::v1::ReadVirtualStreamResponse> chunks;
  grpc::Status s = ReadAll(stub_.get(), request, &chunks);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(chunks.size(), 5u);  // 4 x 256 KiB + 5 bytes
  EXPECT_EQ(chunks.back().size(), 5u);
  for (const auto& c : chunks) {
    EXPECT_TRUE(c.complete());
    EXPECT_EQ(c.cr3(), 0x2000u);  // vCPU 1's, as the scripted host answers
    EXPECT_EQ(static_cast<uint8_t>(c.data()[0]), static_cast<uint8_t>(c.gva()));
  }
  // One GET_REGISTERS for the whole stream.
  EXPECT_TRUE(host->WaitForId(KVMI_GET_REGISTERS));
  EXPECT_FALSE(host->WaitForId(KVMI_GET_REGISTERS, std::chrono::milliseconds(0)));
}

TEST_F(ApiTest, ReadVirtualStreamRefusesBadArgumentsNamingTheField) {
  Connect(33, "virt");
  auto no_space = StreamRequest("virt", 0, 4096);
  no_space.clear_address_space();
  auto no_mode = StreamRequest("virt", 0, 4096);
  no_mode.mutable_address_space()->set_mode(kvmi::v1::PAGING_MODE_UNSPECIFIED);
  auto bad_vcpu = StreamRequest("virt", 0, 4096);
  bad_vcpu.set_vcpu(99);
  struct Case {
    kvmi::v1::ReadVirtualStreamRequest request;
    grpc::StatusCode code;
    const char* text;
  };
  const Case cases[] = {
      {StreamRequest("virt", 0x1000, 0), grpc::StatusCode::INVALID_ARGUMENT, "size"},
      {StreamRequest("virt", ~uint64_t{0} - 100, 4096), grpc::StatusCode::INVALID_ARGUMENT,
       "wraps"},
      {StreamRequest("virt", 0, 4096, 100), grpc::StatusCode::INVALID_ARGUMENT, "chunk_bytes"},
      {StreamRequest("virt", 0, 4096, 2 << 20), grpc::StatusCode::INVALID_ARGUMENT, "chunk_bytes"},
      {no_space, grpc::StatusCode::INVALID_ARGUMENT, "vcpu or an address_space"},
      {no_mode, grpc::StatusCode::INVALID_ARGUMENT, "address_space.mode"},
      {bad_vcpu, grpc::StatusCode::INVALID_ARGUMENT, "vcpu"},
      {StreamRequest("nope", 0, 4096), grpc::StatusCode::NOT_FOUND, "nope"},
  };
  for (const Case& c : cases) {
    std::vector<kvmi::v1::ReadVirtualStreamResponse> chunks;
    grpc::Status s = ReadAll(stub_.get(), c.request, &chunks);
    EXPECT_EQ(s.error_code(), c.code) << c.request.ShortDebugString() << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(c.text));
    EXPECT_TRUE(chunks.empty());
  }
}

TEST_F(ApiTest, ReadVirtualStreamIsBoundedByTheStreamLimits) {
  Connect(34, "virt");
  security::Limits limits = daemon_->limits();
  limits.streams_per_identity = 1;
  daemon_->set_limits(limits);
  grpc::ClientContext first_ctx;
  auto first =
      stub_->ReadVirtualStream(&first_ctx, StreamRequest("virt", 0, uint64_t{64} << 20, 4096));
  kvmi::v1::ReadVirtualStreamResponse chunk;
  ASSERT_TRUE(first->Read(&chunk));  // open, and holding its place
  std::vector<kvmi::v1::ReadVirtualStreamResponse> chunks;
  grpc::Status s = ReadAll(stub_.get(), StreamRequest("virt", 0, 4096), &chunks);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("streams_per_identity"));
  first_ctx.TryCancel();
  while (first->Read(&chunk)) {
  }
  first->Finish();
  ASSERT_TRUE(WaitUntil([&] {
    std::vector<kvmi::v1::ReadVirtualStreamResponse> again;
    return ReadAll(stub_.get(), StreamRequest("virt", 0, 4096), &again).ok();
  }));
}

kvmi::v1::WriteVirtualRequest WriteRequest(const std::string& vm, uint64_t gva,
                                           const std::string& data) {
  kvmi::v1::WriteVirtualRequest r;
  r.set_vm(vm);
  r.mutable_address_space()->set_mode(kvmi::v1::PAGING_MODE_OFF);
  r.set_gva(gva);
  r.set_data(data);
  return r;
}

TEST_F(ApiTest, WriteVirtualWritesEachPageAndIsAuditedWithGvaAndSizeOnly) {
  ScriptedHost* host = Connect(35, "virt");
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
    // Across a page boundary: two WRITE_PHYSICAL, one per page.
    kvmi::v1::WriteVirtualResponse response;
    grpc::ClientContext ctx;
    grpc::Status s = stub->WriteVirtual(&ctx, WriteRequest("virt", 0x7ffc, "SECRET!!"), &response);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_TRUE(response.written());
    EXPECT_EQ(response.bytes_written(), 8u);
    ASSERT_EQ(response.pages_size(), 2);
    EXPECT_EQ(response.pages(0).gpa(), 0x7ffcu);
    EXPECT_EQ(response.pages(1).gpa(), 0x8000u);
    EXPECT_TRUE(response.pages(0).writable() && response.pages(1).written());
    std::map<uint64_t, std::string> written;
    for (int i = 0; i < 2; ++i) {
      auto m = host->WaitForId(KVMI_WRITE_PHYSICAL);
      ASSERT_TRUE(m);
      kvmi::WritePhysicalRequest r;
      ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &r).ok());
      written[r.gpa] = std::string(reinterpret_cast<const char*>(r.data.data()), r.data.size());
    }
    EXPECT_EQ(written, (std::map<uint64_t, std::string>{{0x7ffc, "SECR"}, {0x8000, "ET!!"}}));
    // Refused requests name their field (and are audited too).
    grpc::ClientContext ctx2;
    s = stub->WriteVirtual(&ctx2, WriteRequest("virt", 0x1000, ""), &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("data"));
  }
  audit->reset();
  std::ifstream in(audit_path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_THAT(lines[0], HasSubstr("\"rpc\":\"WriteVirtual\""));
  EXPECT_THAT(lines[0], HasSubstr("0x7ffc"));
  EXPECT_THAT(lines[0], HasSubstr("\"size\":8"));
  EXPECT_THAT(lines[0], ::testing::Not(HasSubstr("SECRET")));
  EXPECT_THAT(lines[1], HasSubstr("\"code\":\"INVALID_ARGUMENT\""));
  ::unlink(audit_path.c_str());
}

TEST_F(ApiTest, WriteVirtualReportsAPageTheGuestRefused) {
  ScriptedHost* host = Connect(36, "virt");
  auto defaults = std::make_shared<ScriptedHost>();
  host->set_responder([defaults](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    if (m.hdr.id == KVMI_WRITE_PHYSICAL) {
      kvmi::WritePhysicalRequest r;
      kvmi::DecodePayload(kvmi::ByteView(m.payload), &r);
      if (r.gpa == 0x3000) {
        std::vector<uint8_t> out;
        kvmi::EncodeReply(m.hdr.id, m.hdr.seq, -KVM_EINVAL, {}, &out);
        return out;
      }
    }
    return defaults->DefaultReply(m);
  });
  kvmi::v1::WriteVirtualResponse response;
  grpc::ClientContext ctx;
  grpc::Status s =
      stub_->WriteVirtual(&ctx, WriteRequest("virt", 0x2ff0, std::string(32, 'x')), &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_FALSE(response.written());
  EXPECT_EQ(response.bytes_written(), 16u);
  ASSERT_EQ(response.pages_size(), 2);
  EXPECT_TRUE(response.pages(0).written());
  EXPECT_FALSE(response.pages(1).written());
  EXPECT_THAT(response.pages(1).why(), HasSubstr("0x3000"));
  EXPECT_THAT(response.pages(1).why(), HasSubstr("KVM_EINVAL"));
}

}  // namespace
}  // namespace kvmid
