// Whole KVMI messages out of a stream socket: a message may arrive in pieces and several may
// arrive in one read. The framer owns one receive buffer per connection and never trusts
// hdr.size beyond the limit it was built with.
#ifndef KVMID_KERNEL_ABI_FRAMING_H_
#define KVMID_KERNEL_ABI_FRAMING_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernel/abi/bytes.h"
#include "kernel/abi/status.h"
#include "kernel/uapi/kvmi.h"

namespace kvmi {

struct Frame {
  kvmi_msg_hdr hdr{};
  ByteView payload;  // valid until the next call to the framer
};

class MessageFramer {
 public:
  // max_payload: kMaxCommandPayload on the kernel side, kMaxReplyPayload on the tool side.
  explicit MessageFramer(size_t max_payload);

  // Space to recv() into: at least `min_free` bytes. Commit what was received.
  uint8_t* WritableTail(size_t min_free);
  size_t writable_size() const { return buffer_.size() - end_; }
  void Commit(size_t n);
  // Convenience for tests and fuzzers: copy bytes in.
  void Append(ByteView bytes);

  enum class Result : uint8_t { kMessage, kNeedMore, kError };
  // kMessage: *frame is the next whole message. kError: *status says why (payload too large);
  // the stream cannot be resynchronised after that, so the connection must end.
  Result Next(Frame* frame, DecodeStatus* status);

  // Bytes received but not yet returned as messages.
  size_t buffered() const { return end_ - begin_; }

 private:
  void Compact();

  size_t max_payload_;
  std::vector<uint8_t> buffer_;
  size_t begin_ = 0;             // first byte not yet returned
  size_t end_ = 0;               // one past the last received byte
  size_t consumed_pending_ = 0;  // bytes of the frame returned by the last Next()
};

}  // namespace kvmi

#endif  // KVMID_KERNEL_ABI_FRAMING_H_
