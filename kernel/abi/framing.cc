#include "kernel/abi/framing.h"

#include <cstring>

#include "kernel/abi/protocol.h"

namespace kvmi {

MessageFramer::MessageFramer(size_t max_payload)
    : max_payload_(max_payload), buffer_(2 * (kHdrSize + max_payload)) {}

void MessageFramer::Compact() {
  // The previous frame's payload view is invalidated here, as documented.
  begin_ += consumed_pending_;
  consumed_pending_ = 0;
  if (begin_ == end_) {
    begin_ = end_ = 0;
  } else if (begin_ > 0 && buffer_.size() - end_ < kHdrSize + max_payload_) {
    std::memmove(buffer_.data(), buffer_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
}

uint8_t* MessageFramer::WritableTail(size_t min_free) {
  Compact();
  if (buffer_.size() - end_ < min_free) buffer_.resize(end_ + min_free);
  return buffer_.data() + end_;
}

void MessageFramer::Commit(size_t n) { end_ += n; }

void MessageFramer::Append(ByteView bytes) {
  uint8_t* tail = WritableTail(bytes.size());
  if (!bytes.empty()) std::memcpy(tail, bytes.data(), bytes.size());
  Commit(bytes.size());
}

MessageFramer::Result MessageFramer::Next(Frame* frame, DecodeStatus* status) {
  begin_ += consumed_pending_;
  consumed_pending_ = 0;
  size_t available = end_ - begin_;
  if (available < kHdrSize) return Result::kNeedMore;
  kvmi_msg_hdr hdr;
  std::memcpy(&hdr, buffer_.data() + begin_, kHdrSize);
  // Checked on the header alone, before waiting for the payload: the v6 kernel closes on it
  // without reading further (§1), and so must anything that cannot trust the peer.
  if (hdr.size > max_payload_) {
    *status = DecodeStatus::Fail(CodecError::kPayloadTooLarge, "hdr.size");
    return Result::kError;
  }
  if (available < kHdrSize + hdr.size) return Result::kNeedMore;
  frame->hdr = hdr;
  frame->payload = ByteView(buffer_.data() + begin_ + kHdrSize, hdr.size);
  consumed_pending_ = kHdrSize + hdr.size;
  *status = DecodeStatus::Ok();
  return Result::kMessage;
}

}  // namespace kvmi
