// Stream framing: messages split over reads, many per read, empty payloads, and a header that
// announces more than the receiver's limit (rejected from the header alone, before any payload).
#include "kernel/abi/framing.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "kernel/abi/messages.h"
#include "kernel/abi/protocol.h"
#include "kernel/abi/test_util.h"

namespace kvmi {
namespace {

using testing::Bytes;
using testing::Cat;
using testing::Hex;
using testing::Message;

struct Received {
  kvmi_msg_hdr hdr;
  Bytes payload;
};

// Three messages of different sizes, one with an empty payload, one at the kernel's limit.
Bytes ThreeMessages() {
  Bytes stream;
  EncodeCommand(GetVersionRequest{}, 1, &stream);
  EncodeCommand(ControlEventsRequest{0, KVMI_EVENT_PF, true}, 2, &stream);
  Bytes data(kMaxWritePhysicalData, 0xab);
  EncodeCommand(WritePhysicalRequest{0x4000, data.size(), ByteView(data)}, 3, &stream);
  return stream;
}

// Takes every complete message out of the framer; fails the test on kError.
std::vector<Received> Drain(MessageFramer* framer) {
  std::vector<Received> out;
  Frame frame;
  DecodeStatus status;
  for (;;) {
    MessageFramer::Result result = framer->Next(&frame, &status);
    if (result == MessageFramer::Result::kNeedMore) return out;
    EXPECT_EQ(result, MessageFramer::Result::kMessage) << status.ToString();
    if (result != MessageFramer::Result::kMessage) return out;
    EXPECT_EQ(frame.payload.size(), frame.hdr.size);
    out.push_back({frame.hdr, frame.payload.ToVector()});
  }
}

void ExpectThreeMessages(const std::vector<Received>& got) {
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got[0].hdr.id, KVMI_GET_VERSION);
  EXPECT_EQ(got[0].hdr.seq, 1u);
  EXPECT_TRUE(got[0].payload.empty());
  EXPECT_EQ(got[1].hdr.id, KVMI_CONTROL_EVENTS);
  EXPECT_EQ(got[1].hdr.seq, 2u);
  EXPECT_EQ(Hex(ByteView(got[1].payload)),
            Hex(ByteView(Cat(kvmi_vcpu_hdr{0, 0, 0}, kvmi_control_events{6, 1, 0, 0}))));
  EXPECT_EQ(got[2].hdr.id, KVMI_WRITE_PHYSICAL);
  EXPECT_EQ(got[2].hdr.size, kMaxCommandPayload);
  EXPECT_EQ(got[2].payload.back(), 0xab);
}

TEST(Framer, ByteByByte) {
  Bytes stream = ThreeMessages();
  MessageFramer framer(kMaxCommandPayload);
  std::vector<Received> got;
  for (size_t i = 0; i < stream.size(); ++i) {
    framer.Append(ByteView(&stream[i], 1));
    std::vector<Received> now = Drain(&framer);
    // A message appears exactly when its last byte has arrived.
    size_t ends[] = {8, 8 + 24, stream.size()};
    bool is_end = std::find(std::begin(ends), std::end(ends), i + 1) != std::end(ends);
    EXPECT_EQ(now.size(), is_end ? 1u : 0u) << "after byte " << i;
    got.insert(got.end(), now.begin(), now.end());
  }
  ExpectThreeMessages(got);
  EXPECT_EQ(framer.buffered(), 0u);
}

TEST(Framer, ManyMessagesInOneChunk) {
  Bytes stream = ThreeMessages();
  Bytes twice = stream;
  testing::AppendTo(&twice, stream);
  MessageFramer framer(kMaxCommandPayload);
  framer.Append(ByteView(twice));
  std::vector<Received> got = Drain(&framer);
  ASSERT_EQ(got.size(), 6u);
  ExpectThreeMessages(std::vector<Received>(got.begin(), got.begin() + 3));
  ExpectThreeMessages(std::vector<Received>(got.begin() + 3, got.end()));
  EXPECT_EQ(framer.buffered(), 0u);
}

TEST(Framer, ChunksThatCutHeadersAndPayloadsAnywhere) {
  Bytes stream = ThreeMessages();
  for (size_t chunk : {2u, 3u, 7u, 9u, 13u, 1000u, 4095u}) {
    SCOPED_TRACE(chunk);
    MessageFramer framer(kMaxCommandPayload);
    std::vector<Received> got;
    for (size_t at = 0; at < stream.size(); at += chunk) {
      size_t n = std::min(chunk, stream.size() - at);
      framer.Append(ByteView(stream.data() + at, n));
      std::vector<Received> now = Drain(&framer);
      got.insert(got.end(), now.begin(), now.end());
    }
    ExpectThreeMessages(got);
  }
}

TEST(Framer, RecvStyleWritableTailAndCommit) {
  Bytes stream = ThreeMessages();
  MessageFramer framer(kMaxCommandPayload);
  std::vector<Received> got;
  size_t at = 0;
  while (at < stream.size()) {
    uint8_t* tail = framer.WritableTail(100);
    ASSERT_NE(tail, nullptr);
    ASSERT_GE(framer.writable_size(), 100u);
    size_t n = std::min<size_t>({100, framer.writable_size(), stream.size() - at});
    std::memcpy(tail, stream.data() + at, n);
    framer.Commit(n);
    at += n;
    std::vector<Received> now = Drain(&framer);
    got.insert(got.end(), now.begin(), now.end());
  }
  ExpectThreeMessages(got);
}

TEST(Framer, PartialMessageIsBufferedNotReturned) {
  Bytes stream = ThreeMessages();
  MessageFramer framer(kMaxCommandPayload);
  framer.Append(ByteView(stream.data(), 8 + 20));  // first message + 20 of the second's 24
  std::vector<Received> got = Drain(&framer);
  EXPECT_EQ(got.size(), 1u);
  EXPECT_EQ(framer.buffered(), 20u);
}

TEST(Framer, OversizedHeaderIsRejectedBeforeThePayloadArrives) {
  MessageFramer framer(kMaxCommandPayload);
  framer.Append(ByteView(Cat(kvmi_msg_hdr{KVMI_WRITE_PHYSICAL, 4089, 1})));
  Frame frame;
  DecodeStatus status;
  EXPECT_EQ(framer.Next(&frame, &status), MessageFramer::Result::kError);
  EXPECT_EQ(status.error, CodecError::kPayloadTooLarge);
  EXPECT_STRNE(status.field, "");
}

TEST(Framer, MaximumSizeHeaderIsRejected) {
  MessageFramer framer(kMaxCommandPayload);
  Bytes stream;
  EncodeCommand(GetVersionRequest{}, 1, &stream);
  testing::AppendTo(&stream, Cat(kvmi_msg_hdr{KVMI_GET_VERSION, 0xffff, 2}));
  framer.Append(ByteView(stream));
  Frame frame;
  DecodeStatus status;
  // The good message before the bad header is still delivered.
  ASSERT_EQ(framer.Next(&frame, &status), MessageFramer::Result::kMessage);
  EXPECT_EQ(frame.hdr.seq, 1u);
  EXPECT_EQ(framer.Next(&frame, &status), MessageFramer::Result::kError);
  EXPECT_EQ(status.error, CodecError::kPayloadTooLarge);
}

TEST(Framer, ToolSideAcceptsTheLargestReply) {
  // The tool's framer allows 8 + 4096 (GET_XSAVE) but nothing more.
  MessageFramer framer(kMaxReplyPayload);
  Bytes xsave(KVMI_XSAVE_SIZE, 0x11);
  Bytes reply;
  EncodeReply(KVMI_GET_XSAVE, 5, 0, ByteView(xsave), &reply);
  framer.Append(ByteView(reply));
  std::vector<Received> got = Drain(&framer);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].hdr.size, 4104u);

  framer.Append(ByteView(Message(KVMI_GET_XSAVE, 4105, 6, {})));
  Frame frame;
  DecodeStatus status;
  EXPECT_EQ(framer.Next(&frame, &status), MessageFramer::Result::kError);
  EXPECT_EQ(status.error, CodecError::kPayloadTooLarge);
}

TEST(Framer, KernelSideLimitIsTheKernelsLimit) {
  MessageFramer framer(kMaxCommandPayload);
  Bytes at_limit = Message(KVMI_WRITE_PHYSICAL, 4088, 1, Bytes(4088, 0));
  framer.Append(ByteView(at_limit));
  EXPECT_EQ(Drain(&framer).size(), 1u);
  framer.Append(ByteView(Message(KVMI_GET_XSAVE, 4104, 2, {})));
  Frame frame;
  DecodeStatus status;
  EXPECT_EQ(framer.Next(&frame, &status), MessageFramer::Result::kError);
}

}  // namespace
}  // namespace kvmi
