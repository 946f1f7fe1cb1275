#include "kernel/abi/events.h"

#include <cstring>

namespace kvmi {
namespace {

using S = DecodeStatus;

// Bytes of the event-specific struct that go on the wire for `id` (S in §6).
size_t SpecificSize(uint8_t id) {
  const EventInfo* info = FindEvent(id);
  return info != nullptr ? info->specific_size : 0;
}

size_t ReplySize(uint8_t id) {
  const EventInfo* info = FindEvent(id);
  return info != nullptr ? info->reply_size : 0;
}

// Non-zero padding inside an event-specific struct, per event kind.
bool SpecificPaddingZero(uint8_t id, const Event::Specific& s) {
  switch (id) {
    case KVMI_EVENT_CR:
      return s.cr.padding[0] == 0 && s.cr.padding[1] == 0 && s.cr.padding[2] == 0;
    case KVMI_EVENT_MSR:
      return s.msr.padding == 0;
    case KVMI_EVENT_BREAKPOINT:
      return AllZero(s.breakpoint.padding);
    case KVMI_EVENT_PF:
      return s.pf.padding1 == 0 && s.pf.padding2 == 0;
    case KVMI_EVENT_TRAP:
      return s.trap.padding == 0;
    case KVMI_EVENT_DESCRIPTOR:
      return AllZero(s.descriptor.padding);
    default:
      return true;
  }
}

}  // namespace

void EncodeEvent(const Event& event, std::vector<uint8_t>* out) {
  ByteWriter w(out);
  size_t specific = SpecificSize(event.common.event);
  kvmi_msg_hdr hdr{KVMI_EVENT, static_cast<uint16_t>(kEventCommonSize + specific), event.seq};
  w.Write(hdr);
  kvmi_event common = event.common;
  common.size = static_cast<uint16_t>(kEventCommonSize);
  w.Write(common);
  w.WriteBytes(ByteView(reinterpret_cast<const uint8_t*>(&event.specific), specific));
}

DecodeStatus DecodeEvent(const kvmi_msg_hdr& hdr, ByteView payload, Event* event) {
  if (hdr.id != KVMI_EVENT) return S::Fail(CodecError::kUnexpectedMessage, "hdr.id");
  if (payload.size() != hdr.size) return S::Fail(CodecError::kCountMismatch, "hdr.size");
  ByteReader in(payload);
  if (!in.Read(&event->common)) return S::Fail(CodecError::kTruncated, "kvmi_event");
  const kvmi_event& c = event->common;
  const EventInfo* info = FindEvent(c.event);
  if (info == nullptr) return S::Fail(CodecError::kUnknownEventId, "kvmi_event.event");
  if (c.size != kEventCommonSize) return S::Fail(CodecError::kBadValue, "kvmi_event.size");
  if (!AllZero(c.padding) || !AllZero(c.arch.padding)) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_event.padding");
  }
  // arch.mode is 2/4/8 for vCPU events; UNHOOK carries an all-zero arch (§6.1).
  bool mode_ok = c.event == KVMI_EVENT_UNHOOK
                     ? c.arch.mode == 0
                     : (c.arch.mode == 2 || c.arch.mode == 4 || c.arch.mode == 8);
  if (!mode_ok) return S::Fail(CodecError::kBadValue, "kvmi_event.arch.mode");
  size_t specific = info->specific_size;
  if (in.remaining() != specific) {
    return S::Fail(in.remaining() < specific ? CodecError::kTruncated : CodecError::kTrailingBytes,
                   "event-specific data");
  }
  std::memset(&event->specific, 0, sizeof(event->specific));
  ByteView rest;
  in.ReadBytes(specific, &rest);
  if (specific != 0) std::memcpy(&event->specific, rest.data(), specific);
  if (!SpecificPaddingZero(c.event, event->specific)) {
    return S::Fail(CodecError::kNonZeroPadding, "event-specific padding");
  }
  event->seq = hdr.seq;
  return S::Ok();
}

EventReply MakeEventReply(const Event& event, uint8_t action) {
  EventReply reply;
  reply.seq = event.seq;
  reply.vcpu = event.common.vcpu;
  reply.action = action;
  reply.event = event.common.event;
  reply.specific_size = static_cast<uint16_t>(ReplySize(event.common.event));
  // CR/MSR: a reply with new_val 0 would zero the register (§6 "Caution"); default to the
  // value the guest asked for, which is what CONTINUE means to a reader.
  if (event.common.event == KVMI_EVENT_CR) reply.specific.cr.new_val = event.specific.cr.new_value;
  if (event.common.event == KVMI_EVENT_MSR) {
    reply.specific.msr.new_val = event.specific.msr.new_value;
  }
  return reply;
}

void EncodeEventReply(const EventReply& reply, std::vector<uint8_t>* out) {
  ByteWriter w(out);
  size_t specific =
      reply.specific_size <= sizeof(reply.specific) ? reply.specific_size : sizeof(reply.specific);
  kvmi_msg_hdr hdr{KVMI_EVENT_REPLY, static_cast<uint16_t>(kEventReplyCommonSize + specific),
                   reply.seq};
  w.Write(hdr);
  kvmi_vcpu_hdr vcpu{};
  vcpu.vcpu = reply.vcpu;
  w.Write(vcpu);
  kvmi_event_reply common{};
  common.action = reply.action;
  common.event = reply.event;
  w.Write(common);
  w.WriteBytes(ByteView(reinterpret_cast<const uint8_t*>(&reply.specific), specific));
}

DecodeStatus DecodeEventReply(ByteView payload, uint8_t pending_event, EventReply* reply) {
  // R is only defined for an event that is answered: an unknown id or UNHOOK (never replied,
  // §6.1) as the pending event is the caller's mistake, not a zero-length R.
  const EventInfo* pending = FindEvent(pending_event);
  if (pending == nullptr) return S::Fail(CodecError::kUnknownEventId, "pending event");
  if (!pending->has_reply) return S::Fail(CodecError::kUnexpectedMessage, "reply to UNHOOK");
  ByteReader in(payload);
  kvmi_vcpu_hdr vcpu;
  if (!in.Read(&vcpu)) return S::Fail(CodecError::kTruncated, "kvmi_vcpu_hdr");
  if (vcpu.padding1 != 0 || vcpu.padding2 != 0) {
    return S::Fail(CodecError::kNonZeroVcpuHdrPadding, "kvmi_vcpu_hdr.padding");
  }
  kvmi_event_reply common;
  if (!in.Read(&common)) return S::Fail(CodecError::kTruncated, "kvmi_event_reply");
  if (common.padding1 != 0 || common.padding2 != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_event_reply.padding");
  }
  size_t expected = pending->reply_size;
  if (in.remaining() > expected) {
    return S::Fail(CodecError::kTrailingBytes, "event reply specific data");
  }
  reply->vcpu = vcpu.vcpu;
  reply->action = common.action;
  reply->event = common.event;
  reply->specific_size = static_cast<uint16_t>(in.remaining());
  std::memset(&reply->specific, 0, sizeof(reply->specific));
  ByteView rest = in.Rest();
  if (!rest.empty()) std::memcpy(&reply->specific, rest.data(), rest.size());
  return S::Ok();
}

}  // namespace kvmi
