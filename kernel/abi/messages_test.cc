// Commands and replies: round trip of every request and reply-data type with the expected wire
// bytes built from the layout-checked uapi structs, the golden bytes of §12, and the malformed
// cases §1/§5 of KVMI-V6-ABI.md name.
#include "kernel/abi/messages.h"

#include <gtest/gtest.h>

#include <vector>

#include "kernel/abi/protocol.h"
#include "kernel/abi/test_util.h"

namespace kvmi {
namespace {

using testing::Bytes;
using testing::Cat;
using testing::FromHex;
using testing::HeaderOf;
using testing::Hex;
using testing::PayloadOf;
using testing::Poke;

constexpr uint32_t kSeq = 0x0a0b0c0d;

template <typename Request>
Bytes PayloadBytes(const Request& request) {
  Bytes out;
  ByteWriter w(&out);
  EncodePayload(request, w);
  return out;
}

template <typename Request>
DecodeStatus Decode(const Bytes& payload, SizeRule rule = SizeRule::kExact) {
  Request request;
  return DecodePayload(ByteView(payload), &request, rule);
}

// Encodes `request` as a whole message, checks the header, the payload bytes and the protocol
// table's size for this id, then decodes it strictly and checks that nothing was lost. The
// message is kept in *storage when given: WritePhysicalRequest::data borrows from it.
template <typename Request>
Request ExpectRoundTrip(const Request& request, const Bytes& expected_payload,
                        Bytes* storage = nullptr) {
  Bytes local;
  Bytes& message = storage != nullptr ? *storage : local;
  message.clear();
  EXPECT_EQ(EncodeCommand(request, kSeq, &message), 0u);
  kvmi_msg_hdr hdr = HeaderOf(message);
  EXPECT_EQ(hdr.id, Request::kId);
  EXPECT_EQ(hdr.seq, kSeq);
  EXPECT_EQ(hdr.size, message.size() - kHdrSize);
  EXPECT_EQ(Hex(PayloadOf(message)), Hex(ByteView(expected_payload)));

  const CommandInfo* info = FindCommand(Request::kId);
  EXPECT_NE(info, nullptr);
  if (info != nullptr) {
    EXPECT_GE(hdr.size, info->request_fixed);
    if (info->request_item == 0) {
      EXPECT_EQ(hdr.size, info->request_fixed) << info->name;
    } else {
      EXPECT_EQ((hdr.size - info->request_fixed) % info->request_item, 0u) << info->name;
    }
  }

  Request decoded;
  DecodeStatus status = DecodePayload(PayloadOf(message), &decoded, SizeRule::kExact);
  EXPECT_TRUE(status.ok()) << status.ToString();
  EXPECT_EQ(Hex(ByteView(PayloadBytes(decoded))), Hex(ByteView(expected_payload)));
  return decoded;
}

// ---- Round trip of every request type ----------------------------------------------------------

TEST(RequestRoundTrip, GetVersion) { ExpectRoundTrip(GetVersionRequest{}, Bytes{}); }

TEST(RequestRoundTrip, CheckCommand) {
  auto decoded = ExpectRoundTrip(CheckCommandRequest{KVMI_GET_XSAVE},
                                 Cat(kvmi_check_command{KVMI_GET_XSAVE, 0, 0}));
  EXPECT_EQ(decoded.id, KVMI_GET_XSAVE);
}

TEST(RequestRoundTrip, CheckEvent) {
  auto decoded = ExpectRoundTrip(CheckEventRequest{KVMI_EVENT_SINGLESTEP},
                                 Cat(kvmi_check_event{KVMI_EVENT_SINGLESTEP, 0, 0}));
  EXPECT_EQ(decoded.id, KVMI_EVENT_SINGLESTEP);
}

TEST(RequestRoundTrip, GetGuestInfo) { ExpectRoundTrip(GetGuestInfoRequest{}, Bytes{}); }

TEST(RequestRoundTrip, GetVcpuInfo) {
  auto decoded = ExpectRoundTrip(GetVcpuInfoRequest{513}, Cat(kvmi_vcpu_hdr{513, 0, 0}));
  EXPECT_EQ(decoded.vcpu, 513);
}

TEST(RequestRoundTrip, PauseVcpu) {
  auto decoded = ExpectRoundTrip(PauseVcpuRequest{3, true},
                                 Cat(kvmi_vcpu_hdr{3, 0, 0}, kvmi_pause_vcpu{1, 0, 0, 0}));
  EXPECT_EQ(decoded.vcpu, 3);
  EXPECT_TRUE(decoded.wait);
  decoded = ExpectRoundTrip(PauseVcpuRequest{3, false},
                            Cat(kvmi_vcpu_hdr{3, 0, 0}, kvmi_pause_vcpu{0, 0, 0, 0}));
  EXPECT_FALSE(decoded.wait);
}

TEST(RequestRoundTrip, ControlVmEvents) {
  auto decoded = ExpectRoundTrip(ControlVmEventsRequest{KVMI_EVENT_CREATE_VCPU, true},
                                 Cat(kvmi_control_vm_events{KVMI_EVENT_CREATE_VCPU, 1, 0, 0}));
  EXPECT_EQ(decoded.event_id, KVMI_EVENT_CREATE_VCPU);
  EXPECT_TRUE(decoded.enable);
}

TEST(RequestRoundTrip, ControlEvents) {
  auto decoded = ExpectRoundTrip(
      ControlEventsRequest{5, KVMI_EVENT_BREAKPOINT, true},
      Cat(kvmi_vcpu_hdr{5, 0, 0}, kvmi_control_events{KVMI_EVENT_BREAKPOINT, 1, 0, 0}));
  EXPECT_EQ(decoded.vcpu, 5);
  EXPECT_EQ(decoded.event_id, KVMI_EVENT_BREAKPOINT);
  EXPECT_TRUE(decoded.enable);
}

TEST(RequestRoundTrip, ControlCr) {
  auto decoded = ExpectRoundTrip(ControlCrRequest{2, 4, true},
                                 Cat(kvmi_vcpu_hdr{2, 0, 0}, kvmi_control_cr{1, 0, 0, 4}));
  EXPECT_EQ(decoded.vcpu, 2);
  EXPECT_EQ(decoded.cr, 4u);
  EXPECT_TRUE(decoded.enable);
}

TEST(RequestRoundTrip, ControlMsr) {
  auto decoded =
      ExpectRoundTrip(ControlMsrRequest{1, 0xc0000081u, false},
                      Cat(kvmi_vcpu_hdr{1, 0, 0}, kvmi_control_msr{0, 0, 0, 0xc0000081u}));
  EXPECT_EQ(decoded.msr, 0xc0000081u);
  EXPECT_FALSE(decoded.enable);
}

TEST(RequestRoundTrip, GetRegistersWithMsrs) {
  GetRegistersRequest request{7, {0x174, 0x175, 0xc0000080u}};
  Bytes expected = Cat(kvmi_vcpu_hdr{7, 0, 0}, kvmi_get_registers{3, 0, 0}, uint32_t{0x174},
                       uint32_t{0x175}, uint32_t{0xc0000080u});
  auto decoded = ExpectRoundTrip(request, expected);
  EXPECT_EQ(decoded.vcpu, 7);
  EXPECT_EQ(decoded.msrs, request.msrs);
}

TEST(RequestRoundTrip, GetRegistersWithoutMsrs) {
  auto decoded = ExpectRoundTrip(GetRegistersRequest{0, {}},
                                 Cat(kvmi_vcpu_hdr{0, 0, 0}, kvmi_get_registers{0, 0, 0}));
  EXPECT_TRUE(decoded.msrs.empty());
}

TEST(RequestRoundTrip, SetRegisters) {
  SetRegistersRequest request{4, testing::SampleRegs()};
  auto decoded = ExpectRoundTrip(request, Cat(kvmi_vcpu_hdr{4, 0, 0}, request.regs));
  EXPECT_EQ(decoded.regs.rip, request.regs.rip);
  EXPECT_EQ(decoded.regs.rflags, request.regs.rflags);
}

TEST(RequestRoundTrip, GetCpuid) {
  auto decoded = ExpectRoundTrip(GetCpuidRequest{1, 0xd, 1},
                                 Cat(kvmi_vcpu_hdr{1, 0, 0}, kvmi_get_cpuid{0xd, 1}));
  EXPECT_EQ(decoded.function, 0xdu);
  EXPECT_EQ(decoded.index, 1u);
}

TEST(RequestRoundTrip, GetXsave) {
  EXPECT_EQ(ExpectRoundTrip(GetXsaveRequest{9}, Cat(kvmi_vcpu_hdr{9, 0, 0})).vcpu, 9);
}

TEST(RequestRoundTrip, ReadPhysical) {
  auto decoded = ExpectRoundTrip(ReadPhysicalRequest{0x7f000800, 0x800},
                                 Cat(kvmi_read_physical{0x7f000800, 0x800}));
  EXPECT_EQ(decoded.gpa, 0x7f000800u);
  EXPECT_EQ(decoded.size, 0x800u);
}

TEST(RequestRoundTrip, WritePhysical) {
  Bytes data = {0xde, 0xad, 0xbe, 0xef, 0x01};
  Bytes expected = Cat(kvmi_write_physical{0x1ff0, 5}, data);
  Bytes message;
  auto decoded =
      ExpectRoundTrip(WritePhysicalRequest{0x1ff0, 5, ByteView(data)}, expected, &message);
  EXPECT_EQ(decoded.gpa, 0x1ff0u);
  EXPECT_EQ(decoded.size, 5u);
  EXPECT_EQ(Hex(decoded.data), Hex(ByteView(data)));
}

TEST(RequestRoundTrip, WritePhysicalLargestData) {
  Bytes data(kMaxWritePhysicalData, 0x90);
  Bytes message;
  auto decoded = ExpectRoundTrip(WritePhysicalRequest{0x10000, data.size(), ByteView(data)},
                                 Cat(kvmi_write_physical{0x10000, data.size()}, data), &message);
  EXPECT_EQ(decoded.data.size(), 4072u);
}

TEST(RequestRoundTrip, InjectException) {
  auto decoded =
      ExpectRoundTrip(InjectExceptionRequest{1, 14, true, 0x2, 0xdead000},
                      Cat(kvmi_vcpu_hdr{1, 0, 0}, kvmi_inject_exception{14, 1, 0, 0x2, 0xdead000}));
  EXPECT_EQ(decoded.nr, 14);
  EXPECT_TRUE(decoded.has_error);
  EXPECT_EQ(decoded.error_code, 2u);
  EXPECT_EQ(decoded.address, 0xdead000u);
}

TEST(RequestRoundTrip, GetPageAccess) {
  GetPageAccessRequest request{0, {0x1000, 0x7fff000, 0xfee00000}};
  auto decoded = ExpectRoundTrip(request, Cat(kvmi_get_page_access{0, 3, 0}, uint64_t{0x1000},
                                              uint64_t{0x7fff000}, uint64_t{0xfee00000}));
  EXPECT_EQ(decoded.gpas, request.gpas);
}

TEST(RequestRoundTrip, SetPageAccess) {
  SetPageAccessRequest request{0,
                               {{0x1000, KVMI_PAGE_ACCESS_R, true},
                                {0x2000, KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X, true}}};
  auto decoded = ExpectRoundTrip(
      request,
      Cat(kvmi_set_page_access{0, 2, 0},
          kvmi_page_access_entry{0x1000, KVMI_PAGE_ACCESS_R, 0, 0, 0},
          kvmi_page_access_entry{0x2000, KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X, 0, 0, 0}));
  ASSERT_EQ(decoded.entries.size(), 2u);
  EXPECT_EQ(decoded.entries[1].gpa, 0x2000u);
  EXPECT_EQ(decoded.entries[1].access, KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X);
  EXPECT_TRUE(decoded.entries[0].padding_ok);
}

TEST(RequestRoundTrip, SetPageAccessMaximumEntries) {
  SetPageAccessRequest request;
  for (size_t i = 0; i < kMaxSetPageAccessEntries; ++i) {
    request.entries.push_back({i << 12, KVMI_PAGE_ACCESS_RWX, true});
  }
  Bytes message;
  EncodeCommand(request, 1, &message);
  EXPECT_EQ(HeaderOf(message).size, 8u + 16u * 255u);
  SetPageAccessRequest decoded;
  EXPECT_TRUE(DecodePayload(PayloadOf(message), &decoded).ok());
  EXPECT_EQ(decoded.entries.size(), 255u);
}

TEST(RequestRoundTrip, GetMapToken) { ExpectRoundTrip(GetMapTokenRequest{}, Bytes{}); }

TEST(RequestRoundTrip, GetMtrrType) {
  auto decoded = ExpectRoundTrip(GetMtrrTypeRequest{6, 0xfee00000},
                                 Cat(kvmi_vcpu_hdr{6, 0, 0}, kvmi_get_mtrr_type{0xfee00000}));
  EXPECT_EQ(decoded.gpa, 0xfee00000u);
}

TEST(RequestRoundTrip, ControlSpp) {
  EXPECT_TRUE(ExpectRoundTrip(ControlSppRequest{true}, Cat(kvmi_control_spp{1, 0, 0, 0})).enable);
  EXPECT_FALSE(ExpectRoundTrip(ControlSppRequest{false}, Cat(kvmi_control_spp{0, 0, 0, 0})).enable);
}

TEST(RequestRoundTrip, GetPageWriteBitmap) {
  GetPageWriteBitmapRequest request{0, {0x5000, 0x6000}};
  auto decoded = ExpectRoundTrip(
      request, Cat(kvmi_get_page_write_bitmap{0, 2, 0}, uint64_t{0x5000}, uint64_t{0x6000}));
  EXPECT_EQ(decoded.gpas, request.gpas);
}

TEST(RequestRoundTrip, SetPageWriteBitmap) {
  SetPageWriteBitmapRequest request{0, {{0x5000, 0x0000ffffu}, {0x6000, 0xffffffffu}}};
  auto decoded = ExpectRoundTrip(request, Cat(kvmi_set_page_write_bitmap{0, 2, 0},
                                              kvmi_page_write_bitmap_entry{0x5000, 0xffff, 0},
                                              kvmi_page_write_bitmap_entry{0x6000, ~0u, 0}));
  ASSERT_EQ(decoded.entries.size(), 2u);
  EXPECT_EQ(decoded.entries[0].bitmap, 0xffffu);
}

TEST(RequestRoundTrip, ControlCmdResponse) {
  auto decoded = ExpectRoundTrip(ControlCmdResponseRequest{false, true},
                                 Cat(kvmi_control_cmd_response{0, 1, 0, 0}));
  EXPECT_FALSE(decoded.enable);
  EXPECT_TRUE(decoded.now);
}

// ---- §12 golden bytes
// ----------------------------------------------------------------------------

TEST(GoldenBytes, GetVersionRequestAndReply) {
  Bytes request;
  EncodeCommand(GetVersionRequest{}, 1, &request);
  EXPECT_EQ(Hex(ByteView(request)), Hex(ByteView(FromHex("02 00 00 00 01 00 00 00"))));

  Bytes data;
  ByteWriter w(&data);
  EncodeReplyData(GetVersionReply{1}, w);
  Bytes reply;
  EncodeReply(KVMI_GET_VERSION, 1, 0, ByteView(data), &reply);
  Bytes golden =
      FromHex("02 00 10 00 01 00 00 00 | 00 00 00 00 00 00 00 00 | 01 00 00 00 00 00 00 00");
  EXPECT_EQ(Hex(ByteView(reply)), Hex(ByteView(golden)));

  Reply parsed;
  ASSERT_TRUE(DecodeReply(HeaderOf(golden), PayloadOf(golden), &parsed).ok());
  EXPECT_EQ(parsed.id, KVMI_GET_VERSION);
  EXPECT_EQ(parsed.seq, 1u);
  EXPECT_EQ(parsed.err, 0);
  GetVersionReply version;
  ASSERT_TRUE(DecodeReplyData(parsed.data, &version).ok());
  EXPECT_EQ(version.version, 1u);
}

TEST(GoldenBytes, UnsupportedIdReply) {
  Bytes reply;
  EncodeReply(KVMI_CONTROL_VE, 7, -KVM_EOPNOTSUPP, ByteView(), &reply);
  Bytes golden = FromHex("0C 00 08 00 07 00 00 00 | A1 FF FF FF 00 00 00 00");
  EXPECT_EQ(Hex(ByteView(reply)), Hex(ByteView(golden)));

  Reply parsed;
  ASSERT_TRUE(DecodeReply(HeaderOf(golden), PayloadOf(golden), &parsed).ok());
  EXPECT_EQ(parsed.id, 12);
  EXPECT_EQ(parsed.seq, 7u);
  EXPECT_EQ(parsed.err, -95);
  EXPECT_TRUE(parsed.data.empty());
  EXPECT_STREQ(ErrorName(parsed.err), "KVM_EOPNOTSUPP");
}

TEST(GoldenBytes, ControlEventsEnablePf) {
  Bytes request;
  EncodeCommand(ControlEventsRequest{0, KVMI_EVENT_PF, true}, 9, &request);
  Bytes golden =
      FromHex("09 00 10 00 09 00 00 00 | 00 00 00 00 00 00 00 00 | 06 00 01 00 00 00 00 00");
  EXPECT_EQ(Hex(ByteView(request)), Hex(ByteView(golden)));

  ControlEventsRequest parsed;
  ASSERT_TRUE(DecodePayload(PayloadOf(golden), &parsed).ok());
  EXPECT_EQ(parsed.vcpu, 0);
  EXPECT_EQ(parsed.event_id, KVMI_EVENT_PF);
  EXPECT_TRUE(parsed.enable);
}

// ---- Fixed-size requests: exact vs. the kernel's zero-filled receive buffer ---------------------

TEST(RequestSize, TruncatedFixedRequestIsAnErrorWhenExact) {
  Bytes payload = Cat(kvmi_vcpu_hdr{1, 0, 0}, kvmi_control_cr{1, 0, 0, 3});
  payload.pop_back();
  EXPECT_EQ(Decode<ControlCrRequest>(payload).error, CodecError::kTruncated);
  EXPECT_EQ(Decode<ControlCrRequest>(Bytes{}).error, CodecError::kTruncated);
  Bytes regs = Cat(kvmi_vcpu_hdr{1, 0, 0}, testing::SampleRegs());
  regs.resize(regs.size() - 8);
  EXPECT_EQ(Decode<SetRegistersRequest>(regs).error, CodecError::kTruncated);
}

TEST(RequestSize, TruncatedFixedRequestIsZeroFilledLikeTheKernel) {
  // Only the vcpu hdr and the first byte (enable) arrive: cr reads as 0.
  Bytes payload = Cat(kvmi_vcpu_hdr{1, 0, 0}, uint8_t{1});
  ControlCrRequest request;
  DecodeStatus status = DecodePayload(ByteView(payload), &request, SizeRule::kKernelZeroFill);
  ASSERT_TRUE(status.ok()) << status.ToString();
  EXPECT_EQ(request.vcpu, 1);
  EXPECT_TRUE(request.enable);
  EXPECT_EQ(request.cr, 0u);

  // An empty CHECK_COMMAND asks about id 0.
  CheckCommandRequest check{KVMI_GET_XSAVE};
  ASSERT_TRUE(DecodePayload(ByteView(), &check, SizeRule::kKernelZeroFill).ok());
  EXPECT_EQ(check.id, 0);
}

TEST(RequestSize, TrailingBytesAreAnErrorWhenExactAndIgnoredByTheKernel) {
  Bytes payload = Cat(kvmi_vcpu_hdr{1, 0, 0}, kvmi_get_cpuid{7, 0}, uint32_t{0xffffffff});
  EXPECT_EQ(Decode<GetCpuidRequest>(payload).error, CodecError::kTrailingBytes);
  GetCpuidRequest request;
  ASSERT_TRUE(DecodePayload(ByteView(payload), &request, SizeRule::kKernelZeroFill).ok());
  EXPECT_EQ(request.function, 7u);

  EXPECT_EQ(Decode<GetVersionRequest>(Bytes{0}).error, CodecError::kTrailingBytes);
  EXPECT_TRUE(Decode<GetVersionRequest>(Bytes{0}, SizeRule::kKernelZeroFill).ok());
  EXPECT_EQ(Decode<GetMapTokenRequest>(Bytes(8, 0)).error, CodecError::kTrailingBytes);
}

// ---- Non-zero padding ------------------------------------------------------------------------

// Every padding byte of every fixed request struct, one at a time.
template <typename Request, typename Wire>
void ExpectEachPaddingByteRejected(const Bytes& prefix, const Wire& wire,
                                   const std::vector<size_t>& padding_offsets) {
  for (size_t offset : padding_offsets) {
    Bytes payload = Cat(prefix, wire);
    payload[prefix.size() + offset] = 0x01;
    DecodeStatus status = Decode<Request>(payload);
    EXPECT_EQ(status.error, CodecError::kNonZeroPadding)
        << "padding byte " << offset << " of " << Request::kId << ": " << status.ToString();
    EXPECT_STRNE(status.field, "");
  }
}

TEST(RequestPadding, EachStructsPaddingIsRejected) {
  Bytes none;
  Bytes vcpu = Cat(kvmi_vcpu_hdr{1, 0, 0});
  ExpectEachPaddingByteRejected<CheckCommandRequest>(none, kvmi_check_command{2, 0, 0},
                                                     {2, 3, 4, 5, 6, 7});
  ExpectEachPaddingByteRejected<CheckEventRequest>(none, kvmi_check_event{1, 0, 0},
                                                   {2, 3, 4, 5, 6, 7});
  ExpectEachPaddingByteRejected<PauseVcpuRequest>(vcpu, kvmi_pause_vcpu{1, 0, 0, 0},
                                                  {1, 2, 3, 4, 5, 6, 7});
  ExpectEachPaddingByteRejected<ControlVmEventsRequest>(none, kvmi_control_vm_events{0, 1, 0, 0},
                                                        {3, 4, 5, 6, 7});
  ExpectEachPaddingByteRejected<ControlEventsRequest>(vcpu, kvmi_control_events{6, 1, 0, 0},
                                                      {3, 4, 5, 6, 7});
  ExpectEachPaddingByteRejected<ControlCrRequest>(vcpu, kvmi_control_cr{1, 0, 0, 3}, {1, 2, 3});
  ExpectEachPaddingByteRejected<ControlMsrRequest>(vcpu, kvmi_control_msr{1, 0, 0, 0x174},
                                                   {1, 2, 3});
  ExpectEachPaddingByteRejected<GetRegistersRequest>(vcpu, kvmi_get_registers{0, 0, 0},
                                                     {2, 3, 4, 5, 6, 7});
  ExpectEachPaddingByteRejected<InjectExceptionRequest>(
      vcpu, kvmi_inject_exception{14, 1, 0, 2, 0x1000}, {2, 3});
  ExpectEachPaddingByteRejected<GetPageAccessRequest>(none, kvmi_get_page_access{0, 0, 0},
                                                      {4, 5, 6, 7});
  ExpectEachPaddingByteRejected<SetPageAccessRequest>(none, kvmi_set_page_access{0, 0, 0},
                                                      {4, 5, 6, 7});
  ExpectEachPaddingByteRejected<ControlSppRequest>(none, kvmi_control_spp{1, 0, 0, 0},
                                                   {1, 2, 3, 4, 5, 6, 7});
  ExpectEachPaddingByteRejected<GetPageWriteBitmapRequest>(
      none, kvmi_get_page_write_bitmap{0, 0, 0}, {4, 5, 6, 7});
  ExpectEachPaddingByteRejected<SetPageWriteBitmapRequest>(
      none, kvmi_set_page_write_bitmap{0, 0, 0}, {4, 5, 6, 7});
  ExpectEachPaddingByteRejected<ControlCmdResponseRequest>(
      none, kvmi_control_cmd_response{1, 0, 0, 0}, {2, 3, 4, 5, 6, 7});
}

// The kernel CLOSEs on vcpu-hdr padding, so it has its own error, for every vCPU command.
template <typename Request>
void ExpectVcpuHdrPaddingRejected(const Bytes& rest) {
  for (size_t offset = 2; offset < sizeof(kvmi_vcpu_hdr); ++offset) {
    Bytes payload = Cat(kvmi_vcpu_hdr{1, 0, 0}, rest);
    payload[offset] = 0x80;
    EXPECT_EQ(Decode<Request>(payload).error, CodecError::kNonZeroVcpuHdrPadding)
        << "vcpu hdr byte " << offset << " of command " << Request::kId;
    EXPECT_EQ(Decode<Request>(payload, SizeRule::kKernelZeroFill).error,
              CodecError::kNonZeroVcpuHdrPadding);
    uint16_t vcpu = 0;
    EXPECT_EQ(DecodeVcpuHdr(ByteView(payload), &vcpu).error, CodecError::kNonZeroVcpuHdrPadding);
  }
}

TEST(RequestPadding, VcpuHdrPaddingIsRejectedForEveryVcpuCommand) {
  ExpectVcpuHdrPaddingRejected<GetVcpuInfoRequest>(Bytes{});
  ExpectVcpuHdrPaddingRejected<ControlEventsRequest>(Cat(kvmi_control_events{6, 1, 0, 0}));
  ExpectVcpuHdrPaddingRejected<ControlCrRequest>(Cat(kvmi_control_cr{1, 0, 0, 3}));
  ExpectVcpuHdrPaddingRejected<ControlMsrRequest>(Cat(kvmi_control_msr{1, 0, 0, 0x174}));
  ExpectVcpuHdrPaddingRejected<GetRegistersRequest>(Cat(kvmi_get_registers{0, 0, 0}));
  ExpectVcpuHdrPaddingRejected<SetRegistersRequest>(Cat(testing::SampleRegs()));
  ExpectVcpuHdrPaddingRejected<GetCpuidRequest>(Cat(kvmi_get_cpuid{0, 0}));
  ExpectVcpuHdrPaddingRejected<GetXsaveRequest>(Bytes{});
  ExpectVcpuHdrPaddingRejected<InjectExceptionRequest>(Cat(kvmi_inject_exception{3, 0, 0, 0, 0}));
  ExpectVcpuHdrPaddingRejected<GetMtrrTypeRequest>(Cat(kvmi_get_mtrr_type{0x1000}));
}

TEST(RequestPadding, PauseVcpuHdrPaddingIsRejected) {
  // PAUSE_VCPU checks its vcpu hdr itself (-KVM_EINVAL, not CLOSE), but it is still padding.
  Bytes payload = Cat(kvmi_vcpu_hdr{1, 0, 1}, kvmi_pause_vcpu{0, 0, 0, 0});
  EXPECT_FALSE(Decode<PauseVcpuRequest>(payload).ok());
}

TEST(RequestPadding, DecodeVcpuHdrReadsTheIndex) {
  uint16_t vcpu = 0;
  ASSERT_TRUE(DecodeVcpuHdr(ByteView(Cat(kvmi_vcpu_hdr{0x1234, 0, 0})), &vcpu).ok());
  EXPECT_EQ(vcpu, 0x1234);
  // Like the kernel's zeroed receive buffer, missing bytes of the hdr read as 0.
  ASSERT_TRUE(DecodeVcpuHdr(ByteView(Bytes{5}), &vcpu).ok());
  EXPECT_EQ(vcpu, 5);
  ASSERT_TRUE(DecodeVcpuHdr(ByteView(), &vcpu).ok());
  EXPECT_EQ(vcpu, 0);
}

TEST(RequestPadding, PageAccessEntryPadding) {
  // A strict reader rejects the message; the kernel answers -KVM_EINVAL for such an entry but
  // keeps going (§5.20), so under kKernelZeroFill the decoder keeps the entry and marks it.
  for (size_t offset : {9, 10, 11, 12, 13, 14, 15}) {
    Bytes payload = Cat(kvmi_set_page_access{0, 2, 0},
                        kvmi_page_access_entry{0x1000, KVMI_PAGE_ACCESS_R, 0, 0, 0},
                        kvmi_page_access_entry{0x2000, KVMI_PAGE_ACCESS_W, 0, 0, 0});
    payload[sizeof(kvmi_set_page_access) + sizeof(kvmi_page_access_entry) + offset] = 1;
    EXPECT_EQ(Decode<SetPageAccessRequest>(payload).error, CodecError::kNonZeroPadding);
    SetPageAccessRequest request;
    DecodeStatus status = DecodePayload(ByteView(payload), &request, SizeRule::kKernelZeroFill);
    ASSERT_TRUE(status.ok()) << status.ToString();
    ASSERT_EQ(request.entries.size(), 2u);
    EXPECT_TRUE(request.entries[0].padding_ok);
    EXPECT_FALSE(request.entries[1].padding_ok) << "entry byte " << offset;
  }
}

TEST(RequestPadding, PageWriteBitmapEntryPaddingIsOnlyCheckedWhenStrict) {
  // §5.25 (code): the v6 kernel does not check this padding at all.
  Bytes payload =
      Cat(kvmi_set_page_write_bitmap{0, 1, 0}, kvmi_page_write_bitmap_entry{0x1000, 0xff, 0x1});
  EXPECT_EQ(Decode<SetPageWriteBitmapRequest>(payload).error, CodecError::kNonZeroPadding);
  EXPECT_TRUE(Decode<SetPageWriteBitmapRequest>(payload, SizeRule::kKernelZeroFill).ok());
}

// ---- Variable-length requests: counts against hdr.size and per-message maxima
// ---------------------

TEST(RequestCounts, GetRegistersNmsrsBeyondThePayload) {
  Bytes payload =
      Cat(kvmi_vcpu_hdr{0, 0, 0}, kvmi_get_registers{3, 0, 0}, uint32_t{0x174}, uint32_t{0x175});
  EXPECT_EQ(Decode<GetRegistersRequest>(payload).error, CodecError::kCountMismatch);
  EXPECT_EQ(Decode<GetRegistersRequest>(payload, SizeRule::kKernelZeroFill).error,
            CodecError::kCountMismatch);
}

TEST(RequestCounts, GetRegistersBytesBeyondTheCount) {
  Bytes payload =
      Cat(kvmi_vcpu_hdr{0, 0, 0}, kvmi_get_registers{1, 0, 0}, uint32_t{0x174}, uint32_t{0x175});
  EXPECT_EQ(Decode<GetRegistersRequest>(payload).error, CodecError::kTrailingBytes);
  // The kernel only checks hdr.size < needed: the extra MSR index is ignored.
  GetRegistersRequest request;
  ASSERT_TRUE(DecodePayload(ByteView(payload), &request, SizeRule::kKernelZeroFill).ok());
  EXPECT_EQ(request.msrs, std::vector<uint32_t>{0x174});
}

TEST(RequestCounts, GetRegistersOverTheRequestMaximum) {
  Bytes payload = Cat(kvmi_vcpu_hdr{0, 0, 0}, kvmi_get_registers{1019, 0, 0});
  payload.resize(payload.size() + 4 * 1019, 0);
  EXPECT_EQ(Decode<GetRegistersRequest>(payload).error, CodecError::kCountTooLarge);
  // 1018 fits 4088 bytes (the kernel would then answer -KVM_ENOMEM for the reply).
  Bytes largest = Cat(kvmi_vcpu_hdr{0, 0, 0}, kvmi_get_registers{1018, 0, 0});
  largest.resize(largest.size() + 4 * 1018, 0);
  EXPECT_EQ(largest.size(), kMaxCommandPayload);
  EXPECT_TRUE(Decode<GetRegistersRequest>(largest).ok());
}

TEST(RequestCounts, PageAccessCountsBeyondThePayload) {
  Bytes get = Cat(kvmi_get_page_access{0, 2, 0}, uint64_t{0x1000});
  EXPECT_EQ(Decode<GetPageAccessRequest>(get).error, CodecError::kCountMismatch);
  Bytes set = Cat(kvmi_set_page_access{0, 2, 0}, kvmi_page_access_entry{0x1000, 1, 0, 0, 0});
  EXPECT_EQ(Decode<SetPageAccessRequest>(set).error, CodecError::kCountMismatch);
  Bytes get_bitmap = Cat(kvmi_get_page_write_bitmap{0, 1, 0});
  EXPECT_EQ(Decode<GetPageWriteBitmapRequest>(get_bitmap).error, CodecError::kCountMismatch);
  Bytes set_bitmap = Cat(kvmi_set_page_write_bitmap{0, 1, 0}, uint64_t{0x1000});
  EXPECT_EQ(Decode<SetPageWriteBitmapRequest>(set_bitmap).error, CodecError::kCountMismatch);
}

TEST(RequestCounts, PageAccessCountsOverThePerMessageMaximum) {
  Bytes get = Cat(kvmi_get_page_access{0, 511, 0});
  get.resize(get.size() + 8 * 511, 0);
  EXPECT_EQ(Decode<GetPageAccessRequest>(get).error, CodecError::kCountTooLarge);
  Bytes set = Cat(kvmi_set_page_access{0, 256, 0});
  set.resize(set.size() + 16 * 256, 0);
  EXPECT_EQ(Decode<SetPageAccessRequest>(set).error, CodecError::kCountTooLarge);
  Bytes get_bitmap = Cat(kvmi_get_page_write_bitmap{0, 511, 0});
  get_bitmap.resize(get_bitmap.size() + 8 * 511, 0);
  EXPECT_EQ(Decode<GetPageWriteBitmapRequest>(get_bitmap).error, CodecError::kCountTooLarge);
  Bytes set_bitmap = Cat(kvmi_set_page_write_bitmap{0, 256, 0});
  set_bitmap.resize(set_bitmap.size() + 16 * 256, 0);
  EXPECT_EQ(Decode<SetPageWriteBitmapRequest>(set_bitmap).error, CodecError::kCountTooLarge);

  Bytes largest = Cat(kvmi_get_page_access{0, 510, 0});
  largest.resize(largest.size() + 8 * 510, 0);
  EXPECT_TRUE(Decode<GetPageAccessRequest>(largest).ok());
}

TEST(RequestCounts, WritePhysicalSizeBeyondThePayload) {
  Bytes payload = Cat(kvmi_write_physical{0x1000, 8}, uint32_t{0xcccccccc});
  EXPECT_EQ(Decode<WritePhysicalRequest>(payload).error, CodecError::kCountMismatch);
  EXPECT_EQ(Decode<WritePhysicalRequest>(payload, SizeRule::kKernelZeroFill).error,
            CodecError::kCountMismatch);
  // A size that does not even fit a u16 hdr.size must not be trusted either.
  Bytes huge = Cat(kvmi_write_physical{0x1000, ~0ull});
  EXPECT_FALSE(Decode<WritePhysicalRequest>(huge).ok());
}

TEST(RequestCounts, WritePhysicalOverTheMessageMaximum) {
  Bytes payload = Cat(kvmi_write_physical{0x10000, 4073});
  payload.resize(payload.size() + 4073, 0);
  EXPECT_EQ(Decode<WritePhysicalRequest>(payload).error, CodecError::kCountTooLarge);
}

TEST(RequestCounts, TruncatedCountHeader) {
  EXPECT_EQ(Decode<GetPageAccessRequest>(Bytes(7, 0)).error, CodecError::kTruncated);
  EXPECT_EQ(Decode<WritePhysicalRequest>(Bytes(15, 0)).error, CodecError::kTruncated);
  EXPECT_EQ(Decode<GetRegistersRequest>(Cat(kvmi_vcpu_hdr{0, 0, 0}, uint32_t{0})).error,
            CodecError::kTruncated);
}

// ---- Replies ------------------------------------------------------------------------------------

template <typename Data>
Bytes ReplyDataBytes(const Data& data) {
  Bytes out;
  ByteWriter w(&out);
  EncodeReplyData(data, w);
  return out;
}

TEST(ReplyRoundTrip, GetVersion) {
  Bytes data = ReplyDataBytes(GetVersionReply{KVMI_VERSION});
  EXPECT_EQ(Hex(ByteView(data)), Hex(ByteView(Cat(kvmi_get_version_reply{1, 0}))));
  GetVersionReply decoded;
  ASSERT_TRUE(DecodeReplyData(ByteView(data), &decoded).ok());
  EXPECT_EQ(decoded.version, 1u);
}

TEST(ReplyRoundTrip, GuestInfo) {
  Bytes data = ReplyDataBytes(GuestInfoReply{64});
  EXPECT_EQ(Hex(ByteView(data)), Hex(ByteView(Cat(kvmi_get_guest_info_reply{64, {0, 0, 0}}))));
  GuestInfoReply decoded;
  ASSERT_TRUE(DecodeReplyData(ByteView(data), &decoded).ok());
  EXPECT_EQ(decoded.vcpu_count, 64u);
}

TEST(ReplyRoundTrip, VcpuInfo) {
  Bytes data = ReplyDataBytes(VcpuInfoReply{2'400'000'000ull});
  EXPECT_EQ(Hex(ByteView(data)), Hex(ByteView(Cat(kvmi_get_vcpu_info_reply{2'400'000'000ull}))));
  VcpuInfoReply decoded;
  ASSERT_TRUE(DecodeReplyData(ByteView(data), &decoded).ok());
  EXPECT_EQ(decoded.tsc_speed, 2'400'000'000ull);
}

TEST(ReplyRoundTrip, Registers) {
  RegistersReply reply{8,
                       testing::SampleRegs(),
                       testing::SampleSregs(),
                       {kvm_msr_entry{0x174, 0, 0x10}, kvm_msr_entry{0xc0000080u, 0, 0xd01}}};
  Bytes data = ReplyDataBytes(reply);
  Bytes expected = Cat(uint32_t{8}, uint32_t{0}, reply.regs, reply.sregs, uint32_t{2}, uint32_t{0},
                       reply.msrs[0], reply.msrs[1]);
  EXPECT_EQ(data.size(), 472u + 2 * 16u);
  EXPECT_EQ(Hex(ByteView(data)), Hex(ByteView(expected)));
  RegistersReply decoded;
  ASSERT_TRUE(DecodeReplyData(ByteView(data), 2, &decoded).ok());
  EXPECT_EQ(decoded.mode, 8u);
  EXPECT_EQ(decoded.regs.rip, reply.regs.rip);
  EXPECT_EQ(decoded.sregs.cr3, reply.sregs.cr3);
  ASSERT_EQ(decoded.msrs.size(), 2u);
  EXPECT_EQ(decoded.msrs[1].index, 0xc0000080u);
  EXPECT_EQ(decoded.msrs[1].data, 0xd01u);
}

TEST(ReplyRoundTrip, Cpuid) {
  Bytes data = ReplyDataBytes(CpuidReply{0xd, 0x756e6547, 0x6c65746e, 0x49656e69});
  EXPECT_EQ(Hex(ByteView(data)),
            Hex(ByteView(Cat(kvmi_get_cpuid_reply{0xd, 0x756e6547, 0x6c65746e, 0x49656e69}))));
  CpuidReply decoded;
  ASSERT_TRUE(DecodeReplyData(ByteView(data), &decoded).ok());
  EXPECT_EQ(decoded.eax, 0xdu);
  EXPECT_EQ(decoded.ebx, 0x756e6547u);
  EXPECT_EQ(decoded.ecx, 0x6c65746eu);
  EXPECT_EQ(decoded.edx, 0x49656e69u);
}

TEST(ReplyRoundTrip, Xsave) {
  XsaveReply reply;
  for (int i = 0; i < KVMI_XSAVE_SIZE; ++i) reply.region.push_back(static_cast<uint8_t>(i * 7));
  Bytes data = ReplyDataBytes(reply);
  EXPECT_EQ(data, reply.region);
  XsaveReply decoded;
  ASSERT_TRUE(DecodeReplyData(ByteView(data), &decoded).ok());
  EXPECT_EQ(decoded.region, reply.region);
  // The whole reply is 8 + 4096 = the largest payload the kernel sends.
  Bytes message;
  EncodeReply(KVMI_GET_XSAVE, 3, 0, ByteView(data), &message);
  EXPECT_EQ(HeaderOf(message).size, kMaxReplyPayload);
}

TEST(ReplyRoundTrip, ReadPhysical) {
  Bytes memory = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  Bytes data = ReplyDataBytes(ReadPhysicalReply{ByteView(memory)});
  EXPECT_EQ(data, memory);
  ReadPhysicalReply decoded;
  ASSERT_TRUE(DecodeReplyData(ByteView(data), memory.size(), &decoded).ok());
  EXPECT_EQ(Hex(decoded.data), Hex(ByteView(memory)));
  EXPECT_EQ(DecodeReplyData(ByteView(data), memory.size() + 1, &decoded).error,
            CodecError::kTruncated);
  EXPECT_EQ(DecodeReplyData(ByteView(data), memory.size() - 1, &decoded).error,
            CodecError::kTrailingBytes);
}

TEST(ReplyRoundTrip, PageAccess) {
  Bytes data = ReplyDataBytes(PageAccessReply{{KVMI_PAGE_ACCESS_R, KVMI_PAGE_ACCESS_RWX, 0}});
  EXPECT_EQ(data, (Bytes{1, 7, 0}));  // no padding or alignment added (§5.19)
  PageAccessReply decoded;
  ASSERT_TRUE(DecodeReplyData(ByteView(data), 3, &decoded).ok());
  EXPECT_EQ(decoded.access, (std::vector<uint8_t>{1, 7, 0}));
  EXPECT_EQ(DecodeReplyData(ByteView(data), 4, &decoded).error, CodecError::kTruncated);
  EXPECT_EQ(DecodeReplyData(ByteView(data), 2, &decoded).error, CodecError::kTrailingBytes);
}

TEST(ReplyRoundTrip, MapToken) {
  MapTokenReply reply;
  reply.token = kvmi_map_mem_token{{1, 2, 3, 0xffffffffffffffffull}};
  Bytes data = ReplyDataBytes(reply);
  EXPECT_EQ(Hex(ByteView(data)), Hex(ByteView(Cat(reply.token))));
  MapTokenReply decoded;
  ASSERT_TRUE(DecodeReplyData(ByteView(data), &decoded).ok());
  EXPECT_EQ(decoded.token.token[3], 0xffffffffffffffffull);
}

TEST(ReplyRoundTrip, MtrrType) {
  Bytes data = ReplyDataBytes(MtrrTypeReply{6});
  EXPECT_EQ(Hex(ByteView(data)),
            Hex(ByteView(Cat(kvmi_get_mtrr_type_reply{6, {0, 0, 0, 0, 0, 0, 0}}))));
  MtrrTypeReply decoded;
  ASSERT_TRUE(DecodeReplyData(ByteView(data), &decoded).ok());
  EXPECT_EQ(decoded.type, 6);
}

TEST(ReplyRoundTrip, PageWriteBitmap) {
  Bytes data = ReplyDataBytes(PageWriteBitmapReply{{0xffffffffu, 0x1}});
  EXPECT_EQ(Hex(ByteView(data)), Hex(ByteView(Cat(uint32_t{0xffffffffu}, uint32_t{1}))));
  PageWriteBitmapReply decoded;
  ASSERT_TRUE(DecodeReplyData(ByteView(data), 2, &decoded).ok());
  EXPECT_EQ(decoded.bitmaps, (std::vector<uint32_t>{0xffffffffu, 1}));
  EXPECT_EQ(DecodeReplyData(ByteView(data), 3, &decoded).error, CodecError::kTruncated);
}

TEST(ReplyRoundTrip, EmptyReplyData) {
  EXPECT_TRUE(DecodeEmptyReplyData(ByteView()).ok());
  EXPECT_EQ(DecodeEmptyReplyData(ByteView(Bytes{0})).error, CodecError::kTrailingBytes);
}

TEST(ReplyRoundTrip, ErrorReplyCarriesNoData) {
  Bytes data = {1, 2, 3};
  Bytes message;
  // Data passed with an error must not be sent (§1: reply data only when err == 0).
  EncodeReply(KVMI_GET_CPUID, 44, -KVM_ENOENT, ByteView(data), &message);
  EXPECT_EQ(
      Hex(ByteView(message)),
      Hex(ByteView(Cat(kvmi_msg_hdr{KVMI_GET_CPUID, 8, 44}, kvmi_error_code{-KVM_ENOENT, 0}))));
  Reply reply;
  ASSERT_TRUE(DecodeReply(HeaderOf(message), PayloadOf(message), &reply).ok());
  EXPECT_EQ(reply.err, -2);
  EXPECT_TRUE(reply.data.empty());
}

// ---- Malformed replies
// ---------------------------------------------------------------------------

TEST(ReplyRejection, MissingErrorCode) {
  Bytes payload = {0, 0, 0, 0};
  Reply reply;
  EXPECT_EQ(DecodeReply(kvmi_msg_hdr{KVMI_GET_VERSION, 4, 1}, ByteView(payload), &reply).error,
            CodecError::kTruncated);
  EXPECT_EQ(DecodeReply(kvmi_msg_hdr{KVMI_GET_VERSION, 0, 1}, ByteView(), &reply).error,
            CodecError::kTruncated);
}

TEST(ReplyRejection, ErrorCodePadding) {
  Bytes payload = Cat(kvmi_error_code{0, 0x100});
  Reply reply;
  EXPECT_EQ(DecodeReply(kvmi_msg_hdr{KVMI_CONTROL_CR, 8, 1}, ByteView(payload), &reply).error,
            CodecError::kNonZeroPadding);
}

TEST(ReplyRejection, DataAfterAnError) {
  Bytes payload = Cat(kvmi_error_code{-KVM_EINVAL, 0}, uint64_t{0});
  Reply reply;
  EXPECT_EQ(DecodeReply(kvmi_msg_hdr{KVMI_GET_CPUID, 16, 1}, ByteView(payload), &reply).error,
            CodecError::kTrailingBytes);
}

TEST(ReplyRejection, HeaderSizeDisagreesWithPayload) {
  // The framer hands over exactly hdr.size bytes; a caller passing a mismatching pair is a bug
  // that must not make the decoder read past the buffer.
  Bytes payload = Cat(kvmi_error_code{0, 0});
  Reply reply;
  EXPECT_FALSE(DecodeReply(kvmi_msg_hdr{KVMI_GET_VERSION, 16, 1}, ByteView(payload), &reply).ok());
}

TEST(ReplyRejection, FixedReplyDataOfTheWrongSize) {
  Bytes short_version(7, 0);
  GetVersionReply version;
  EXPECT_EQ(DecodeReplyData(ByteView(short_version), &version).error, CodecError::kTruncated);
  Bytes long_version(9, 0);
  EXPECT_EQ(DecodeReplyData(ByteView(long_version), &version).error, CodecError::kTrailingBytes);
  CpuidReply cpuid;
  EXPECT_EQ(DecodeReplyData(ByteView(Bytes(15, 0)), &cpuid).error, CodecError::kTruncated);
  MapTokenReply token;
  EXPECT_EQ(DecodeReplyData(ByteView(Bytes(40, 0)), &token).error, CodecError::kTrailingBytes);
}

TEST(ReplyRejection, ReplyStructPadding) {
  GetVersionReply version;
  EXPECT_EQ(DecodeReplyData(ByteView(Cat(kvmi_get_version_reply{1, 1})), &version).error,
            CodecError::kNonZeroPadding);
  GuestInfoReply info;
  EXPECT_EQ(DecodeReplyData(ByteView(Cat(kvmi_get_guest_info_reply{1, {0, 0, 9}})), &info).error,
            CodecError::kNonZeroPadding);
  MtrrTypeReply mtrr;
  EXPECT_EQ(
      DecodeReplyData(ByteView(Cat(kvmi_get_mtrr_type_reply{6, {0, 0, 0, 0, 0, 0, 1}})), &mtrr)
          .error,
      CodecError::kNonZeroPadding);
}

TEST(ReplyRejection, RegistersCountMismatch) {
  RegistersReply reply{8, {}, {}, {kvm_msr_entry{0x174, 0, 1}}};
  Bytes data = ReplyDataBytes(reply);
  RegistersReply decoded;
  // The request asked for 2 MSRs; the reply says (and carries) 1.
  EXPECT_EQ(DecodeReplyData(ByteView(data), 2, &decoded).error, CodecError::kCountMismatch);
  // nmsrs says 1 but the bytes of the entry are missing.
  data.resize(data.size() - 1);
  EXPECT_FALSE(DecodeReplyData(ByteView(data), 1, &decoded).ok());
  // nmsrs says 2 but only one entry follows.
  Bytes lying = ReplyDataBytes(reply);
  Poke<uint32_t>(&lying, 464, 2);
  EXPECT_FALSE(DecodeReplyData(ByteView(lying), 2, &decoded).ok());
}

TEST(ReplyRejection, RegistersOverTheReplyMaximum) {
  // 472 + 16 * 227 > 4096: the kernel answers -KVM_ENOMEM instead, so this cannot be a reply.
  RegistersReply reply;
  reply.mode = 8;
  reply.msrs.resize(227);
  Bytes data = ReplyDataBytes(reply);
  RegistersReply decoded;
  EXPECT_EQ(DecodeReplyData(ByteView(data), 227, &decoded).error, CodecError::kCountTooLarge);
  reply.msrs.resize(226);
  EXPECT_TRUE(DecodeReplyData(ByteView(ReplyDataBytes(reply)), 226, &decoded).ok());
}

TEST(ReplyRejection, XsaveOfTheWrongSize) {
  XsaveReply decoded;
  EXPECT_FALSE(DecodeReplyData(ByteView(Bytes(KVMI_XSAVE_SIZE + 1, 0)), &decoded).ok());
}

// ---- Unknown ids
// ---------------------------------------------------------------------------------

TEST(MessageIds, OnlyV6CommandIdsAreKnown) {
  for (uint16_t id : {0, 1, 28, 29, 0x8002, 0xffff}) {
    EXPECT_EQ(FindCommand(id), nullptr) << id;
    EXPECT_FALSE(IsKnownCommand(id)) << id;
  }
  for (uint16_t id = KVMI_FIRST_COMMAND; id < KVMI_NEXT_AVAILABLE_COMMAND; ++id) {
    ASSERT_NE(FindCommand(id), nullptr) << id;
    EXPECT_EQ(FindCommand(id)->id, id);
    EXPECT_TRUE(IsKnownCommand(id));
  }
}

// ---- CONTROL_CMD_RESPONSE batches --------------------------------------------------------------

// The closing CMD_RESPONSE uses now=1: replies are back on before it is answered, so exactly it
// is (§5.2 semantics; with now=0 it would be answered under "replies off", i.e. never).
TEST(Batch, WrapsMessagesInCmdResponsePair) {
  Bytes out;
  BatchBuilder batch(&out, 100);
  batch.Add(SetRegistersRequest{1, testing::SampleRegs()}, 101);
  Bytes reply_message;
  Event event = testing::SampleEvent(KVMI_EVENT_BREAKPOINT, 1, 5);
  EncodeEventReply(MakeEventReply(event, KVMI_EVENT_ACTION_RETRY), &reply_message);
  batch.AddEncoded(ByteView(reply_message));
  batch.Close(102);
  EXPECT_EQ(batch.count(), 2u);

  Bytes expected;
  EncodeCommand(ControlCmdResponseRequest{false, true}, 100, &expected);
  EncodeCommand(SetRegistersRequest{1, testing::SampleRegs()}, 101, &expected);
  testing::AppendTo(&expected, reply_message);
  EncodeCommand(ControlCmdResponseRequest{true, true}, 102, &expected);
  EXPECT_EQ(Hex(ByteView(out)), Hex(ByteView(expected)));
}

}  // namespace
}  // namespace kvmi
