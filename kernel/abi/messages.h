// Typed KVMI v6 commands and their replies: the one place that turns them into bytes and back.
//
// Every request type has a kId, and three overloads:
//   void EncodePayload(const T&, ByteWriter&)             -- tool side (and tests)
//   DecodeStatus DecodePayload(ByteView, T*, SizeRule)     -- host side
//   EncodeCommand(const T&, seq, out)                      -- header + payload, one message
// Reply data types (what follows kvmi_error_code when err == 0) have EncodeReplyData /
// DecodeReplyData overloads; variable-length replies take the count the request asked for,
// because the reply itself does not carry it (GET_PAGE_ACCESS, READ_PHYSICAL, ...).
//
// Validation is exactly §1/§5 of KVMI-V6-ABI.md. Padding that the kernel answers with
// -KVM_EINVAL is reported as kNonZeroPadding, vcpu-hdr padding (which the kernel CLOSEs on) as
// kNonZeroVcpuHdrPadding; the host model maps them to its behaviour, the daemon never sends them.
#ifndef KVMID_KERNEL_ABI_MESSAGES_H_
#define KVMID_KERNEL_ABI_MESSAGES_H_

#include <array>
#include <cstdint>
#include <vector>

#include "kernel/abi/bytes.h"
#include "kernel/abi/protocol.h"
#include "kernel/abi/status.h"
#include "kernel/uapi/kvmi.h"

namespace kvmi {

// How a fixed-size request whose payload is shorter or longer than its layout is treated.
enum class SizeRule : uint8_t {
  kExact,           // any difference is an error (what a strict peer or a test wants)
  kKernelZeroFill,  // v6 kernel (code): missing bytes read as 0, extra bytes ignored
};

// ---- Requests (tool -> kernel) ---------------------------------------------------------------

struct GetVersionRequest {
  static constexpr uint16_t kId = KVMI_GET_VERSION;
};
struct CheckCommandRequest {
  static constexpr uint16_t kId = KVMI_CHECK_COMMAND;
  uint16_t id = 0;
};
struct CheckEventRequest {
  static constexpr uint16_t kId = KVMI_CHECK_EVENT;
  uint16_t id = 0;
};
struct GetGuestInfoRequest {
  static constexpr uint16_t kId = KVMI_GET_GUEST_INFO;
};
struct GetVcpuInfoRequest {
  static constexpr uint16_t kId = KVMI_GET_VCPU_INFO;
  uint16_t vcpu = 0;
};
struct PauseVcpuRequest {
  static constexpr uint16_t kId = KVMI_PAUSE_VCPU;
  uint16_t vcpu = 0;
  bool wait = false;
};
struct ControlVmEventsRequest {
  static constexpr uint16_t kId = KVMI_CONTROL_VM_EVENTS;
  uint16_t event_id = 0;
  bool enable = false;
};
struct ControlEventsRequest {
  static constexpr uint16_t kId = KVMI_CONTROL_EVENTS;
  uint16_t vcpu = 0;
  uint16_t event_id = 0;
  bool enable = false;
};
struct ControlCrRequest {
  static constexpr uint16_t kId = KVMI_CONTROL_CR;
  uint16_t vcpu = 0;
  uint32_t cr = 0;
  bool enable = false;
};
struct ControlMsrRequest {
  static constexpr uint16_t kId = KVMI_CONTROL_MSR;
  uint16_t vcpu = 0;
  uint32_t msr = 0;
  bool enable = false;
};
struct GetRegistersRequest {
  static constexpr uint16_t kId = KVMI_GET_REGISTERS;
  uint16_t vcpu = 0;
  std::vector<uint32_t> msrs;  // at most kMaxGetRegistersMsrs for a successful reply
};
struct SetRegistersRequest {
  static constexpr uint16_t kId = KVMI_SET_REGISTERS;
  uint16_t vcpu = 0;
  kvm_regs regs{};
};
struct GetCpuidRequest {
  static constexpr uint16_t kId = KVMI_GET_CPUID;
  uint16_t vcpu = 0;
  uint32_t function = 0;
  uint32_t index = 0;
};
struct GetXsaveRequest {
  static constexpr uint16_t kId = KVMI_GET_XSAVE;
  uint16_t vcpu = 0;
};
struct ReadPhysicalRequest {
  static constexpr uint16_t kId = KVMI_READ_PHYSICAL;
  uint64_t gpa = 0;
  uint64_t size = 0;  // 1..4096, not crossing a page (checked by the receiver, which CLOSEs)
};
struct WritePhysicalRequest {
  static constexpr uint16_t kId = KVMI_WRITE_PHYSICAL;
  uint64_t gpa = 0;
  uint64_t size = 0;  // the declared size; data may be longer (kernel ignores extra bytes)
  ByteView data;      // borrowed: points into the encoder's caller or the decoded message
};
struct InjectExceptionRequest {
  static constexpr uint16_t kId = KVMI_INJECT_EXCEPTION;
  uint16_t vcpu = 0;
  uint8_t nr = 0;
  bool has_error = false;
  uint32_t error_code = 0;
  uint64_t address = 0;
};
struct GetPageAccessRequest {
  static constexpr uint16_t kId = KVMI_GET_PAGE_ACCESS;
  uint16_t view = 0;
  std::vector<uint64_t> gpas;
};
struct PageAccess {
  uint64_t gpa = 0;
  uint8_t access = 0;      // KVMI_PAGE_ACCESS_* bits
  bool padding_ok = true;  // decode only: this entry's padding was zero (kernel: -KVM_EINVAL)
};
struct SetPageAccessRequest {
  static constexpr uint16_t kId = KVMI_SET_PAGE_ACCESS;
  uint16_t view = 0;
  std::vector<PageAccess> entries;
};
struct GetMapTokenRequest {
  static constexpr uint16_t kId = KVMI_GET_MAP_TOKEN;
};
struct GetMtrrTypeRequest {
  static constexpr uint16_t kId = KVMI_GET_MTRR_TYPE;
  uint16_t vcpu = 0;
  uint64_t gpa = 0;
};
struct ControlSppRequest {
  static constexpr uint16_t kId = KVMI_CONTROL_SPP;
  bool enable = false;
};
struct GetPageWriteBitmapRequest {
  static constexpr uint16_t kId = KVMI_GET_PAGE_WRITE_BITMAP;
  uint16_t view = 0;
  std::vector<uint64_t> gpas;
};
struct PageWriteBitmap {
  uint64_t gpa = 0;
  uint32_t bitmap = 0;  // bit i: 128-byte sub-page i writable
};
struct SetPageWriteBitmapRequest {
  static constexpr uint16_t kId = KVMI_SET_PAGE_WRITE_BITMAP;
  uint16_t view = 0;
  std::vector<PageWriteBitmap> entries;
};
struct ControlCmdResponseRequest {
  static constexpr uint16_t kId = KVMI_CONTROL_CMD_RESPONSE;
  bool enable = true;
  bool now = false;
};

#define KVMI_FOR_EACH_REQUEST(X) \
  X(GetVersionRequest)           \
  X(CheckCommandRequest)         \
  X(CheckEventRequest)           \
  X(GetGuestInfoRequest)         \
  X(GetVcpuInfoRequest)          \
  X(PauseVcpuRequest)            \
  X(ControlVmEventsRequest)      \
  X(ControlEventsRequest)        \
  X(ControlCrRequest)            \
  X(ControlMsrRequest)           \
  X(GetRegistersRequest)         \
  X(SetRegistersRequest)         \
  X(GetCpuidRequest)             \
  X(GetXsaveRequest)             \
  X(ReadPhysicalRequest)         \
  X(WritePhysicalRequest)        \
  X(InjectExceptionRequest)      \
  X(GetPageAccessRequest)        \
  X(SetPageAccessRequest)        \
  X(GetMapTokenRequest)          \
  X(GetMtrrTypeRequest)          \
  X(ControlSppRequest)           \
  X(GetPageWriteBitmapRequest)   \
  X(SetPageWriteBitmapRequest)   \
  X(ControlCmdResponseRequest)

// T is a type: it cannot be parenthesized.
// NOLINTBEGIN(bugprone-macro-parentheses)
#define KVMI_DECLARE_REQUEST_CODEC(T)                    \
  void EncodePayload(const T& request, ByteWriter& out); \
  DecodeStatus DecodePayload(ByteView payload, T* request, SizeRule rule = SizeRule::kExact);
// NOLINTEND(bugprone-macro-parentheses)
KVMI_FOR_EACH_REQUEST(KVMI_DECLARE_REQUEST_CODEC)
#undef KVMI_DECLARE_REQUEST_CODEC

// Reads only the leading kvmi_vcpu_hdr of a vCPU command or event reply: the kernel's generic
// vCPU dispatch checks it (index, padding -> CLOSE) before the command's own handler runs.
DecodeStatus DecodeVcpuHdr(ByteView payload, uint16_t* vcpu);

// Writes hdr + payload of one command; returns the message's offset in *out.
template <typename Request>
size_t EncodeCommand(const Request& request, uint32_t seq, std::vector<uint8_t>* out) {
  ByteWriter w(out);
  size_t start = w.size();
  kvmi_msg_hdr hdr{Request::kId, 0, seq};
  w.Write(hdr);
  EncodePayload(request, w);
  hdr.size = static_cast<uint16_t>(w.size() - start - kHdrSize);
  w.WriteAt(start, hdr);
  return start;
}

// ---- Replies (kernel -> tool) ------------------------------------------------------------------

// A reply split into its parts; `data` borrows from the decoded message.
struct Reply {
  uint16_t id = 0;
  uint32_t seq = 0;
  int32_t err = 0;  // 0 or -KVM_E*
  ByteView data;    // empty unless err == 0
};
// Checks the error-code prefix (present, zero padding, no data after an error).
DecodeStatus DecodeReply(const kvmi_msg_hdr& hdr, ByteView payload, Reply* reply);
// hdr{id, 8 + data.size(), seq} + error code + data (data only when err == 0).
void EncodeReply(uint16_t id, uint32_t seq, int32_t err, ByteView data, std::vector<uint8_t>* out);

struct GetVersionReply {
  uint32_t version = 0;
};
struct GuestInfoReply {
  uint32_t vcpu_count = 0;
};
struct VcpuInfoReply {
  uint64_t tsc_speed = 0;
};
struct RegistersReply {
  uint32_t mode = 0;
  kvm_regs regs{};
  kvm_sregs sregs{};
  std::vector<kvm_msr_entry> msrs;
};
struct CpuidReply {
  uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
};
struct XsaveReply {
  std::vector<uint8_t> region;  // hdr.size - 8 bytes (4096 in v6)
};
struct ReadPhysicalReply {
  ByteView data;  // borrowed
};
struct PageAccessReply {
  std::vector<uint8_t> access;  // one per requested gpa
};
struct MapTokenReply {
  kvmi_map_mem_token token{};
};
struct MtrrTypeReply {
  uint8_t type = 0;
};
struct PageWriteBitmapReply {
  std::vector<uint32_t> bitmaps;  // one per requested gpa
};

void EncodeReplyData(const GetVersionReply& r, ByteWriter& out);
void EncodeReplyData(const GuestInfoReply& r, ByteWriter& out);
void EncodeReplyData(const VcpuInfoReply& r, ByteWriter& out);
void EncodeReplyData(const RegistersReply& r, ByteWriter& out);
void EncodeReplyData(const CpuidReply& r, ByteWriter& out);
void EncodeReplyData(const XsaveReply& r, ByteWriter& out);
void EncodeReplyData(const ReadPhysicalReply& r, ByteWriter& out);
void EncodeReplyData(const PageAccessReply& r, ByteWriter& out);
void EncodeReplyData(const MapTokenReply& r, ByteWriter& out);
void EncodeReplyData(const MtrrTypeReply& r, ByteWriter& out);
void EncodeReplyData(const PageWriteBitmapReply& r, ByteWriter& out);

DecodeStatus DecodeReplyData(ByteView data, GetVersionReply* r);
DecodeStatus DecodeReplyData(ByteView data, GuestInfoReply* r);
DecodeStatus DecodeReplyData(ByteView data, VcpuInfoReply* r);
// expected_msrs: how many MSRs the request asked for (the reply must echo that count).
DecodeStatus DecodeReplyData(ByteView data, size_t expected_msrs, RegistersReply* r);
DecodeStatus DecodeReplyData(ByteView data, CpuidReply* r);
DecodeStatus DecodeReplyData(ByteView data, XsaveReply* r);
DecodeStatus DecodeReplyData(ByteView data, size_t expected_size, ReadPhysicalReply* r);
DecodeStatus DecodeReplyData(ByteView data, size_t expected_count, PageAccessReply* r);
DecodeStatus DecodeReplyData(ByteView data, MapTokenReply* r);
DecodeStatus DecodeReplyData(ByteView data, MtrrTypeReply* r);
DecodeStatus DecodeReplyData(ByteView data, size_t expected_count, PageWriteBitmapReply* r);

// Commands whose reply carries no data (everything not listed above) must have an empty
// `data`; this checks it.
DecodeStatus DecodeEmptyReplyData(ByteView data);

// ---- CONTROL_CMD_RESPONSE batching (§5.2)
// --------------------------------------------------------

// Builds CMD_RESPONSE(enable=0, now=1), the caller's messages, CMD_RESPONSE(enable=1, now=1) in
// one buffer, for one write: only the closing CMD_RESPONSE is answered (with `close_seq`).
// Reply timing (v6 code, kvmi_msg_dispatch_vcpu_msg): whether a command is answered is decided by
// the receive thread when it accepts the command, not when the vCPU thread runs it, so the
// batched vCPU commands stay unanswered although replies are back on by the time they run.
class BatchBuilder {
 public:
  BatchBuilder(std::vector<uint8_t>* out, uint32_t open_seq);
  std::vector<uint8_t>* buffer() { return out_; }
  template <typename Request>
  void Add(const Request& request, uint32_t seq) {
    EncodeCommand(request, seq, out_);
    ++count_;
  }
  // Appends raw, already encoded messages (an event reply).
  void AddEncoded(ByteView message) {
    ByteWriter(out_).WriteBytes(message);
    ++count_;
  }
  void Close(uint32_t close_seq);
  size_t count() const { return count_; }

 private:
  std::vector<uint8_t>* out_;
  size_t count_ = 0;
};

}  // namespace kvmi

#endif  // KVMID_KERNEL_ABI_MESSAGES_H_
