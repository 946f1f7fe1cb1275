// Events and event replies: every event id and every reply both ways, §12's CR example, and the
// malformed cases of §4.2/§6 (common.size, hdr.size vs S, unknown ids, padding, reply sizes).
#include "kernel/abi/events.h"

#include <gtest/gtest.h>

#include <cstddef>

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
using testing::SampleEvent;
using testing::SampleEventReply;

// §6 table, written out rather than taken from protocol.h so that the table is checked too.
struct EventSizes {
  uint8_t id;
  uint16_t specific;  // S
  int reply;          // R, -1 = no reply at all
};
constexpr EventSizes kEventSizes[] = {
    {KVMI_EVENT_UNHOOK, 0, -1},     {KVMI_EVENT_CR, 24, 8},         {KVMI_EVENT_MSR, 24, 8},
    {KVMI_EVENT_XSETBV, 0, 0},      {KVMI_EVENT_BREAKPOINT, 16, 0}, {KVMI_EVENT_HYPERCALL, 0, 0},
    {KVMI_EVENT_PF, 24, 272},       {KVMI_EVENT_TRAP, 24, 0},       {KVMI_EVENT_DESCRIPTOR, 8, 0},
    {KVMI_EVENT_CREATE_VCPU, 0, 0}, {KVMI_EVENT_PAUSE_VCPU, 0, 0},  {KVMI_EVENT_SINGLESTEP, 0, 0},
};

// The event-specific struct's bytes, as the uapi declares them.
Bytes SpecificBytes(const Event& event) {
  switch (event.id()) {
    case KVMI_EVENT_CR:
      return Cat(event.specific.cr);
    case KVMI_EVENT_MSR:
      return Cat(event.specific.msr);
    case KVMI_EVENT_BREAKPOINT:
      return Cat(event.specific.breakpoint);
    case KVMI_EVENT_PF:
      return Cat(event.specific.pf);
    case KVMI_EVENT_TRAP:
      return Cat(event.specific.trap);
    case KVMI_EVENT_DESCRIPTOR:
      return Cat(event.specific.descriptor);
    default:
      return {};
  }
}

Bytes ReplySpecificBytes(const EventReply& reply, uint8_t id) {
  switch (id) {
    case KVMI_EVENT_CR:
      return Cat(reply.specific.cr);
    case KVMI_EVENT_MSR:
      return Cat(reply.specific.msr);
    case KVMI_EVENT_PF:
      return Cat(reply.specific.pf);
    default:
      return {};
  }
}

Bytes Encode(const Event& event) {
  Bytes out;
  EncodeEvent(event, &out);
  return out;
}

DecodeStatus DecodeMessage(const Bytes& message, Event* event) {
  return DecodeEvent(HeaderOf(message), PayloadOf(message), event);
}

TEST(EventRoundTrip, EveryEventId) {
  for (const EventSizes& sizes : kEventSizes) {
    SCOPED_TRACE(EventName(sizes.id));
    Event event = SampleEvent(sizes.id, 3, 1000 + sizes.id);
    Bytes message = Encode(event);
    kvmi_msg_hdr hdr = HeaderOf(message);
    EXPECT_EQ(hdr.id, KVMI_EVENT);
    EXPECT_EQ(hdr.seq, 1000u + sizes.id);
    EXPECT_EQ(hdr.size, 544u + sizes.specific);
    ASSERT_EQ(message.size(), kHdrSize + hdr.size);

    kvmi_event common = event.common;
    common.size = 544;
    EXPECT_EQ(Hex(PayloadOf(message)), Hex(ByteView(Cat(common, SpecificBytes(event)))));

    Event decoded;
    DecodeStatus status = DecodeMessage(message, &decoded);
    ASSERT_TRUE(status.ok()) << status.ToString();
    EXPECT_EQ(decoded.seq, event.seq);
    EXPECT_EQ(decoded.id(), sizes.id);
    EXPECT_EQ(decoded.vcpu(), sizes.id == KVMI_EVENT_UNHOOK ? 0 : 3);
    EXPECT_EQ(decoded.common.arch.regs.rip, event.common.arch.regs.rip);
    EXPECT_EQ(decoded.common.arch.msrs.shadow_gs, event.common.arch.msrs.shadow_gs);
    EXPECT_EQ(Hex(ByteView(Encode(decoded))), Hex(ByteView(message)));
  }
}

TEST(EventRoundTrip, SpecificFieldsLandAtTheirAbiOffsets) {
  // Payload offset 544 is where the specific struct begins (common.size).
  Bytes pf = Encode(SampleEvent(KVMI_EVENT_PF, 1, 1));
  const uint8_t* specific = PayloadOf(pf).data() + 544;
  uint64_t gpa = 0;
  std::memcpy(&gpa, specific + 8, 8);
  EXPECT_EQ(gpa, 0x7f001234u);
  EXPECT_EQ(specific[16], KVMI_PAGE_ACCESS_W);

  Bytes msr = Encode(SampleEvent(KVMI_EVENT_MSR, 1, 1));
  uint32_t index = 0;
  std::memcpy(&index, PayloadOf(msr).data() + 544, 4);
  EXPECT_EQ(index, 0xc0000082u);

  // arch.mode at payload offset 8, vcpu at 2, event at 4.
  ByteView payload = PayloadOf(msr);
  EXPECT_EQ(payload[8], 8);
  EXPECT_EQ(payload[2], 1);
  EXPECT_EQ(payload[4], KVMI_EVENT_MSR);
}

TEST(EventRoundTrip, SpecificFieldsSurviveDecoding) {
  Event decoded;
  Bytes cr = Encode(SampleEvent(KVMI_EVENT_CR, 0, 1));
  ASSERT_TRUE(DecodeMessage(cr, &decoded).ok());
  EXPECT_EQ(decoded.specific.cr.cr, 3);
  EXPECT_EQ(decoded.specific.cr.new_value, 0x5678000u);
  Bytes trap = Encode(SampleEvent(KVMI_EVENT_TRAP, 0, 1));
  ASSERT_TRUE(DecodeMessage(trap, &decoded).ok());
  EXPECT_EQ(decoded.specific.trap.type, unsigned{KVMI_TRAP_TYPE_HARD_EXCEPTION});
  EXPECT_EQ(decoded.specific.trap.cr2, 0xdead000u);
  Bytes descriptor = Encode(SampleEvent(KVMI_EVENT_DESCRIPTOR, 0, 1));
  ASSERT_TRUE(DecodeMessage(descriptor, &decoded).ok());
  EXPECT_EQ(decoded.specific.descriptor.descriptor, KVMI_DESC_IDTR);
  EXPECT_EQ(decoded.specific.descriptor.write, 1);
  Bytes breakpoint = Encode(SampleEvent(KVMI_EVENT_BREAKPOINT, 0, 1));
  ASSERT_TRUE(DecodeMessage(breakpoint, &decoded).ok());
  EXPECT_EQ(decoded.specific.breakpoint.gpa, 0x1000ccu);
  EXPECT_EQ(decoded.specific.breakpoint.insn_len, 1);
}

TEST(EventReplyRoundTrip, EveryEventWithAReply) {
  for (const EventSizes& sizes : kEventSizes) {
    if (sizes.reply < 0) continue;
    SCOPED_TRACE(EventName(sizes.id));
    Event event = SampleEvent(sizes.id, 2, 77);
    EventReply reply = SampleEventReply(event, KVMI_EVENT_ACTION_RETRY);
    EXPECT_EQ(reply.seq, 77u);
    EXPECT_EQ(reply.vcpu, 2);
    EXPECT_EQ(reply.event, sizes.id);
    EXPECT_EQ(reply.specific_size, sizes.reply);

    Bytes message;
    EncodeEventReply(reply, &message);
    kvmi_msg_hdr hdr = HeaderOf(message);
    EXPECT_EQ(hdr.id, KVMI_EVENT_REPLY);
    EXPECT_EQ(hdr.seq, 77u);
    EXPECT_EQ(hdr.size, 16 + sizes.reply);
    Bytes expected =
        Cat(kvmi_vcpu_hdr{2, 0, 0}, kvmi_event_reply{KVMI_EVENT_ACTION_RETRY, sizes.id, 0, 0},
            ReplySpecificBytes(reply, sizes.id));
    EXPECT_EQ(Hex(PayloadOf(message)), Hex(ByteView(expected)));

    EventReply decoded;
    DecodeStatus status = DecodeEventReply(PayloadOf(message), sizes.id, &decoded);
    ASSERT_TRUE(status.ok()) << status.ToString();
    EXPECT_EQ(decoded.vcpu, 2);
    EXPECT_EQ(decoded.action, KVMI_EVENT_ACTION_RETRY);
    EXPECT_EQ(decoded.event, sizes.id);
    EXPECT_EQ(decoded.specific_size, sizes.reply);
    EXPECT_EQ(Hex(ByteView(ReplySpecificBytes(decoded, sizes.id))),
              Hex(ByteView(ReplySpecificBytes(reply, sizes.id))));
  }
}

TEST(EventReplyRoundTrip, PfReplyFields) {
  Event event = SampleEvent(KVMI_EVENT_PF, 0, 9);
  EventReply reply = SampleEventReply(event, KVMI_EVENT_ACTION_CONTINUE);
  Bytes message;
  EncodeEventReply(reply, &message);
  EventReply decoded;
  ASSERT_TRUE(DecodeEventReply(PayloadOf(message), KVMI_EVENT_PF, &decoded).ok());
  EXPECT_EQ(decoded.specific.pf.ctx_addr, event.specific.pf.gva);
  EXPECT_EQ(decoded.specific.pf.ctx_size, 16u);
  EXPECT_EQ(decoded.specific.pf.singlestep, 1);
  EXPECT_EQ(decoded.specific.pf.rep_complete, 1);
  EXPECT_EQ(decoded.specific.pf.ctx_data[255], 255);
}

// ---- §12: the CR event and its reply
// ---------------------------------------------------------------

TEST(GoldenBytes, CrEventAndReply) {
  Event event = SampleEvent(KVMI_EVENT_CR, 2, 5);
  Bytes message = Encode(event);
  EXPECT_EQ(Hex(ByteView(message).subview(0, 8)), "01 00 38 02 05 00 00 00");
  EXPECT_EQ(message.size(), 8u + 568u);
  EXPECT_EQ(message[8 + 4], KVMI_EVENT_CR);  // kvmi_event.event

  constexpr uint64_t kNewValue = 0x1122334455667788ull;
  EventReply reply = MakeEventReply(event, KVMI_EVENT_ACTION_CONTINUE);
  reply.specific.cr.new_val = kNewValue;
  Bytes encoded;
  EncodeEventReply(reply, &encoded);
  Bytes golden = FromHex(
      "00 00 18 00 05 00 00 00 | 02 00 00 00 00 00 00 00 | 00 01 00 00 00 00 00 00 | "
      "88 77 66 55 44 33 22 11");
  EXPECT_EQ(Hex(ByteView(encoded)), Hex(ByteView(golden)));

  EventReply decoded;
  ASSERT_TRUE(DecodeEventReply(PayloadOf(golden), KVMI_EVENT_CR, &decoded).ok());
  EXPECT_EQ(decoded.vcpu, 2);
  EXPECT_EQ(decoded.action, KVMI_EVENT_ACTION_CONTINUE);
  EXPECT_EQ(decoded.specific.cr.new_val, kNewValue);
}

// ---- Malformed events
// -------------------------------------------------------------------------------

TEST(EventRejection, NotAnEventMessage) {
  Bytes message = Encode(SampleEvent(KVMI_EVENT_XSETBV, 0, 1));
  Poke<uint16_t>(&message, 0, KVMI_EVENT_REPLY);
  Event decoded;
  EXPECT_FALSE(DecodeMessage(message, &decoded).ok());
  Poke<uint16_t>(&message, 0, KVMI_GET_VERSION);
  EXPECT_FALSE(DecodeMessage(message, &decoded).ok());
}

TEST(EventRejection, UnknownEventId) {
  for (uint8_t id : {12, 13, 0x80, 0xff}) {
    Bytes message = Encode(SampleEvent(KVMI_EVENT_XSETBV, 0, 1));
    message[kHdrSize + offsetof(kvmi_event, event)] = id;
    Event decoded;
    EXPECT_EQ(DecodeMessage(message, &decoded).error, CodecError::kUnknownEventId) << int{id};
  }
}

TEST(EventRejection, CommonSizeIsNot544) {
  for (uint16_t size : {0, 8, 543, 545, 568, 0xffff}) {
    Bytes message = Encode(SampleEvent(KVMI_EVENT_HYPERCALL, 0, 1));
    Poke<uint16_t>(&message, kHdrSize + offsetof(kvmi_event, size), size);
    Event decoded;
    DecodeStatus status = DecodeMessage(message, &decoded);
    EXPECT_FALSE(status.ok()) << size;
    EXPECT_STRNE(status.field, "");
  }
}

TEST(EventRejection, PayloadShorterOrLongerThanTheEventsSize) {
  for (const EventSizes& sizes : kEventSizes) {
    SCOPED_TRACE(EventName(sizes.id));
    Bytes full = Encode(SampleEvent(sizes.id, 0, 1));
    Event decoded;

    Bytes shorter = full;
    shorter.pop_back();
    Poke<uint16_t>(&shorter, 2, static_cast<uint16_t>(shorter.size() - kHdrSize));
    EXPECT_EQ(DecodeMessage(shorter, &decoded).error, CodecError::kTruncated);

    Bytes longer = full;
    longer.push_back(0);
    Poke<uint16_t>(&longer, 2, static_cast<uint16_t>(longer.size() - kHdrSize));
    EXPECT_EQ(DecodeMessage(longer, &decoded).error, CodecError::kTrailingBytes);
  }
  Event decoded;
  EXPECT_EQ(DecodeMessage(Cat(kvmi_msg_hdr{KVMI_EVENT, 0, 1}), &decoded).error,
            CodecError::kTruncated);
}

TEST(EventRejection, HeaderSizeDisagreesWithPayload) {
  Bytes message = Encode(SampleEvent(KVMI_EVENT_CR, 0, 1));
  Poke<uint16_t>(&message, 2, 544);  // hdr.size says "no specific data", the bytes are there
  Event decoded;
  EXPECT_FALSE(DecodeMessage(message, &decoded).ok());
}

TEST(EventRejection, NonZeroPadding) {
  struct Case {
    uint8_t id;
    size_t offset;  // payload offset of one padding byte
  };
  const Case cases[] = {
      {KVMI_EVENT_XSETBV, offsetof(kvmi_event, padding) + 0},
      {KVMI_EVENT_XSETBV, offsetof(kvmi_event, padding) + 2},
      {KVMI_EVENT_XSETBV, offsetof(kvmi_event, arch) + offsetof(kvmi_event_arch, padding) + 6},
      {KVMI_EVENT_CR, 544 + offsetof(kvmi_event_cr, padding) + 5},
      {KVMI_EVENT_MSR, 544 + offsetof(kvmi_event_msr, padding) + 3},
      {KVMI_EVENT_BREAKPOINT, 544 + offsetof(kvmi_event_breakpoint, padding) + 6},
      {KVMI_EVENT_PF, 544 + offsetof(kvmi_event_pf, padding1)},
      {KVMI_EVENT_PF, 544 + offsetof(kvmi_event_pf, padding2) + 3},
      {KVMI_EVENT_TRAP, 544 + offsetof(kvmi_event_trap, padding) + 1},
      {KVMI_EVENT_DESCRIPTOR, 544 + offsetof(kvmi_event_descriptor, padding) + 5},
  };
  for (const Case& c : cases) {
    Bytes message = Encode(SampleEvent(c.id, 0, 1));
    message[kHdrSize + c.offset] = 0x10;
    Event decoded;
    EXPECT_EQ(DecodeMessage(message, &decoded).error, CodecError::kNonZeroPadding)
        << EventName(c.id) << " payload offset " << c.offset;
  }
}

// ---- Malformed event replies
// ----------------------------------------------------------------------

Bytes ReplyPayload(uint8_t event_id, uint16_t vcpu = 0) {
  Bytes message;
  EncodeEventReply(SampleEventReply(SampleEvent(event_id, vcpu, 1), KVMI_EVENT_ACTION_CONTINUE),
                   &message);
  return Bytes(message.begin() + kHdrSize, message.end());
}

TEST(EventReplyRejection, ShorterThanTheCommonPart) {
  for (size_t size : {0, 8, 15}) {
    Bytes payload = ReplyPayload(KVMI_EVENT_XSETBV);
    payload.resize(size);
    EventReply decoded;
    EXPECT_EQ(DecodeEventReply(ByteView(payload), KVMI_EVENT_XSETBV, &decoded).error,
              CodecError::kTruncated)
        << size;
  }
}

TEST(EventReplyRejection, BiggerThanR) {
  for (const EventSizes& sizes : kEventSizes) {
    if (sizes.reply < 0) continue;
    SCOPED_TRACE(EventName(sizes.id));
    Bytes payload = ReplyPayload(sizes.id);
    payload.push_back(0);
    EventReply decoded;
    EXPECT_EQ(DecodeEventReply(ByteView(payload), sizes.id, &decoded).error,
              CodecError::kTrailingBytes);
  }
}

TEST(EventReplyRejection, ShorterThanRIsZeroFilled) {
  // Only the first 12 of the PF reply's 272 bytes arrive: ctx_addr and ctx_size, nothing else.
  Bytes payload = ReplyPayload(KVMI_EVENT_PF);
  payload.resize(16 + 12);
  EventReply decoded;
  DecodeStatus status = DecodeEventReply(ByteView(payload), KVMI_EVENT_PF, &decoded);
  ASSERT_TRUE(status.ok()) << status.ToString();
  EXPECT_EQ(decoded.specific_size, 12);
  EXPECT_EQ(decoded.specific.pf.ctx_size, 16u);
  EXPECT_EQ(decoded.specific.pf.singlestep, 0);
  EXPECT_EQ(decoded.specific.pf.ctx_data[0], 0);

  // §6 caution: a 16-byte reply to a CR event is accepted and new_val becomes 0.
  Bytes cr = ReplyPayload(KVMI_EVENT_CR);
  cr.resize(16);
  ASSERT_TRUE(DecodeEventReply(ByteView(cr), KVMI_EVENT_CR, &decoded).ok());
  EXPECT_EQ(decoded.specific_size, 0);
  EXPECT_EQ(decoded.specific.cr.new_val, 0u);
}

TEST(EventReplyRejection, NoReplyToUnhookOrUnknownEvents) {
  Bytes payload = Cat(kvmi_vcpu_hdr{0, 0, 0}, kvmi_event_reply{0, 0, 0, 0});
  EventReply decoded;
  EXPECT_FALSE(DecodeEventReply(ByteView(payload), KVMI_EVENT_UNHOOK, &decoded).ok());
  EXPECT_EQ(DecodeEventReply(ByteView(payload), KVMI_NUM_EVENTS, &decoded).error,
            CodecError::kUnknownEventId);
}

TEST(EventReplyRejection, VcpuHdrPadding) {
  for (size_t offset = 2; offset < 8; ++offset) {
    Bytes payload = ReplyPayload(KVMI_EVENT_MSR, 1);
    payload[offset] = 1;
    EventReply decoded;
    EXPECT_EQ(DecodeEventReply(ByteView(payload), KVMI_EVENT_MSR, &decoded).error,
              CodecError::kNonZeroVcpuHdrPadding)
        << offset;
  }
}

TEST(EventReplyRejection, EventReplyPadding) {
  for (size_t offset = 8 + 2; offset < 16; ++offset) {
    Bytes payload = ReplyPayload(KVMI_EVENT_MSR, 1);
    payload[offset] = 1;
    EventReply decoded;
    EXPECT_EQ(DecodeEventReply(ByteView(payload), KVMI_EVENT_MSR, &decoded).error,
              CodecError::kNonZeroPadding)
        << offset;
  }
}

TEST(EventReplyRejection, ActionAndEchoAreNotJudgedByTheCodec) {
  // The kernel does not check the echoed id; an unknown action is the host model's business
  // (§3.2), so both decode.
  Bytes payload = Cat(kvmi_vcpu_hdr{0, 0, 0}, kvmi_event_reply{7, KVMI_EVENT_PF, 0, 0});
  EventReply decoded;
  ASSERT_TRUE(DecodeEventReply(ByteView(payload), KVMI_EVENT_XSETBV, &decoded).ok());
  EXPECT_EQ(decoded.action, 7);
  EXPECT_EQ(decoded.event, KVMI_EVENT_PF);
}

}  // namespace
}  // namespace kvmi
