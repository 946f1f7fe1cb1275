// Typed decode results of the KVMI codec. Decoding never throws and never allocates on success;
// a failure names the violated rule and the field, so a log line can say exactly what a peer
// sent wrong.
#ifndef KVMID_KERNEL_ABI_STATUS_H_
#define KVMID_KERNEL_ABI_STATUS_H_

#include <cstdint>
#include <string>

namespace kvmi {

enum class CodecError : uint8_t {
  kOk = 0,
  kTruncated,              // fewer bytes than the layout needs
  kTrailingBytes,          // more bytes than the layout allows
  kPayloadTooLarge,        // hdr.size above the receiver's limit (KVMI_MSG_SIZE for the kernel)
  kUnknownMessageId,       // not a v6 message id
  kUnknownEventId,         // not a v6 event id
  kNonZeroPadding,         // a padding field of the message's own struct is not zero
  kNonZeroVcpuHdrPadding,  // kvmi_vcpu_hdr padding (the kernel CLOSEs on this one)
  kCountMismatch,          // a count/size field disagrees with hdr.size
  kCountTooLarge,          // a count exceeds what fits one message
  kBadValue,               // a field outside its ABI range
  kUnexpectedMessage,      // well formed, but not what this receiver expects here
};

const char* CodecErrorName(CodecError error);

struct DecodeStatus {
  CodecError error = CodecError::kOk;
  const char* field = "";  // static string: "kvmi_get_registers.nmsrs", "hdr.size", ...

  bool ok() const { return error == CodecError::kOk; }
  static DecodeStatus Ok() { return {}; }
  static DecodeStatus Fail(CodecError e, const char* f) { return {e, f}; }
  // "truncated: kvmi_event_pf" -- for logs and gRPC status messages.
  std::string ToString() const;
};

inline bool operator==(const DecodeStatus& a, const DecodeStatus& b) {
  return a.error == b.error && std::string(a.field) == b.field;
}

}  // namespace kvmi

#endif  // KVMID_KERNEL_ABI_STATUS_H_
