#include "kernel/abi/status.h"

namespace kvmi {

const char* CodecErrorName(CodecError error) {
  switch (error) {
    case CodecError::kOk:
      return "ok";
    case CodecError::kTruncated:
      return "truncated";
    case CodecError::kTrailingBytes:
      return "trailing bytes";
    case CodecError::kPayloadTooLarge:
      return "payload too large";
    case CodecError::kUnknownMessageId:
      return "unknown message id";
    case CodecError::kUnknownEventId:
      return "unknown event id";
    case CodecError::kNonZeroPadding:
      return "non-zero padding";
    case CodecError::kNonZeroVcpuHdrPadding:
      return "non-zero kvmi_vcpu_hdr padding";
    case CodecError::kCountMismatch:
      return "count does not match size";
    case CodecError::kCountTooLarge:
      return "count too large";
    case CodecError::kBadValue:
      return "bad value";
    case CodecError::kUnexpectedMessage:
      return "unexpected message";
  }
  return "unknown codec error";
}

std::string DecodeStatus::ToString() const {
  std::string s = CodecErrorName(error);
  if (field != nullptr && *field != '\0') {
    s += ": ";
    s += field;
  }
  return s;
}

}  // namespace kvmi
