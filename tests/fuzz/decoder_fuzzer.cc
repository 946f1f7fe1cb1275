// libFuzzer target: arbitrary bytes as a KVMI stream, cut into reads of a fuzzer-chosen size,
// framed, and every whole message decoded every way the codec can read it (as each request
// type under both size rules, as a reply with every reply-data type, as an event, as a reply to
// every event). Besides "no crash, no out-of-bounds read" (ASan/UBSan), anything the decoder
// accepts must re-encode to the same bytes (or, for requests, to a fixed point): a decoder that
// accepts what the encoder cannot produce has lost or invented information.
//
// Input layout: byte 0 = options (bit 0: tool-side framer limit 4104 instead of the kernel's
// 4088; bits 1..7: read size - 1), the rest = the stream.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernel/abi/events.h"
#include "kernel/abi/framing.h"
#include "kernel/abi/messages.h"
#include "kernel/abi/protocol.h"

namespace kvmi {
namespace {

[[noreturn]] void Fail(const char* what, const kvmi_msg_hdr& hdr) {
  std::fprintf(stderr, "decoder_fuzzer: %s (id %u size %u seq %u)\n", what, hdr.id, hdr.size,
               hdr.seq);
  std::abort();
}

using Bytes = std::vector<uint8_t>;

bool SameBytes(const Bytes& a, ByteView b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

template <typename Request>
Bytes EncodePayloadOf(const Request& request) {
  Bytes out;
  ByteWriter w(&out);
  EncodePayload(request, w);
  return out;
}

// Whatever a request decoder accepts must encode to a payload the kernel would accept, which
// decodes strictly and re-encodes to itself.
template <typename Request>
void CheckRequest(const Frame& frame) {
  for (SizeRule rule : {SizeRule::kExact, SizeRule::kKernelZeroFill}) {
    Request request;
    if (!DecodePayload(frame.payload, &request, rule).ok()) continue;
    Bytes first = EncodePayloadOf(request);
    if (first.size() > kMaxCommandPayload) Fail("accepted request re-encodes too large", frame.hdr);
    if (rule == SizeRule::kExact && !SameBytes(first, frame.payload)) {
      // Only bools may be normalised (a wire `enable` of 5 reads as true and encodes as 1) and
      // entries with bad padding re-encode with zero padding; the size must not change.
      if (first.size() != frame.payload.size()) Fail("strict request changed size", frame.hdr);
    }
    Request again;
    if (!DecodePayload(ByteView(first), &again, SizeRule::kExact).ok()) {
      Fail("re-encoded request does not decode", frame.hdr);
    }
    if (EncodePayloadOf(again) != first) Fail("request encoding is not a fixed point", frame.hdr);
  }
}

void CheckAsRequest(const Frame& frame) {
  switch (frame.hdr.id) {
#define KVMI_CHECK_REQUEST_CASE(T) \
  case T::kId:                     \
    CheckRequest<T>(frame);        \
    break;
    KVMI_FOR_EACH_REQUEST(KVMI_CHECK_REQUEST_CASE)
#undef KVMI_CHECK_REQUEST_CASE
    default:
      break;
  }
  uint16_t vcpu = 0;
  (void)DecodeVcpuHdr(frame.payload, &vcpu);
}

template <typename Data, typename... Count>
void CheckReplyData(const Frame& frame, ByteView data, Count... count) {
  Data decoded;
  if (!DecodeReplyData(data, count..., &decoded).ok()) return;
  Bytes again;
  ByteWriter w(&again);
  EncodeReplyData(decoded, w);
  if (!SameBytes(again, data)) Fail("reply data does not re-encode to itself", frame.hdr);
}

void CheckAsReply(const Frame& frame) {
  Reply reply;
  if (!DecodeReply(frame.hdr, frame.payload, &reply).ok()) return;
  Bytes message;
  EncodeReply(reply.id, reply.seq, reply.err, reply.data, &message);
  Bytes original(reinterpret_cast<const uint8_t*>(&frame.hdr),
                 reinterpret_cast<const uint8_t*>(&frame.hdr) + kHdrSize);
  original.insert(original.end(), frame.payload.data(),
                  frame.payload.data() + frame.payload.size());
  if (message != original) Fail("reply does not re-encode to itself", frame.hdr);
  if (reply.err != 0) return;

  ByteView data = reply.data;
  (void)DecodeEmptyReplyData(data);
  CheckReplyData<GetVersionReply>(frame, data);
  CheckReplyData<GuestInfoReply>(frame, data);
  CheckReplyData<VcpuInfoReply>(frame, data);
  size_t msrs = data.size() >= sizeof(kvmi_get_registers_reply)
                    ? (data.size() - sizeof(kvmi_get_registers_reply)) / sizeof(kvm_msr_entry)
                    : 0;
  CheckReplyData<RegistersReply>(frame, data, msrs);
  CheckReplyData<RegistersReply>(frame, data, size_t{frame.hdr.seq & 0x3ff});
  CheckReplyData<CpuidReply>(frame, data);
  CheckReplyData<XsaveReply>(frame, data);
  CheckReplyData<ReadPhysicalReply>(frame, data, data.size());
  CheckReplyData<PageAccessReply>(frame, data, data.size());
  CheckReplyData<MapTokenReply>(frame, data);
  CheckReplyData<MtrrTypeReply>(frame, data);
  CheckReplyData<PageWriteBitmapReply>(frame, data, data.size() / sizeof(uint32_t));
}

void CheckAsEvent(const Frame& frame) {
  Event event;
  if (!DecodeEvent(frame.hdr, frame.payload, &event).ok()) return;
  Bytes message;
  EncodeEvent(event, &message);
  if (message.size() != kHdrSize + frame.payload.size() ||
      std::memcmp(message.data(), &frame.hdr, kHdrSize) != 0 ||
      std::memcmp(message.data() + kHdrSize, frame.payload.data(), frame.payload.size()) != 0) {
    Fail("event does not re-encode to itself", frame.hdr);
  }
}

void CheckAsEventReply(const Frame& frame) {
  for (int pending = 0; pending <= KVMI_NUM_EVENTS; ++pending) {
    EventReply reply;
    if (!DecodeEventReply(frame.payload, static_cast<uint8_t>(pending), &reply).ok()) continue;
    reply.seq = frame.hdr.seq;
    Bytes message;
    EncodeEventReply(reply, &message);
    if (message.size() != kHdrSize + frame.payload.size() ||
        std::memcmp(message.data() + kHdrSize, frame.payload.data(), frame.payload.size()) != 0) {
      Fail("event reply does not re-encode to itself", frame.hdr);
    }
  }
}

}  // namespace
}  // namespace kvmi

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvmi;
  if (size == 0) return 0;
  const bool tool_side = (data[0] & 1) != 0;
  const size_t read_size = (data[0] >> 1) + 1u;
  const size_t limit = tool_side ? kMaxReplyPayload : kMaxCommandPayload;
  MessageFramer framer(limit);
  size_t fed = 0;
  size_t delivered = 0;
  for (size_t at = 1; at < size; at += read_size) {
    size_t n = size - at < read_size ? size - at : read_size;
    framer.Append(ByteView(data + at, n));
    fed += n;
    Frame frame;
    DecodeStatus status;
    for (;;) {
      MessageFramer::Result result = framer.Next(&frame, &status);
      if (result == MessageFramer::Result::kNeedMore) break;
      if (result == MessageFramer::Result::kError) return 0;  // connection would end here
      if (frame.hdr.size > limit || frame.payload.size() != frame.hdr.size) {
        Fail("framer returned a frame that breaks its limit", frame.hdr);
      }
      delivered += kHdrSize + frame.payload.size();
      CheckAsRequest(frame);
      CheckAsReply(frame);
      CheckAsEvent(frame);
      CheckAsEventReply(frame);
    }
    if (delivered + framer.buffered() != fed) {
      std::fprintf(stderr, "decoder_fuzzer: framer lost or invented bytes\n");
      std::abort();
    }
  }
  return 0;
}
