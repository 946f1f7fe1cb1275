// KVMI v6 events (kernel -> tool) and event replies (tool -> kernel), §4.2 and §6.
#ifndef KVMID_KERNEL_ABI_EVENTS_H_
#define KVMID_KERNEL_ABI_EVENTS_H_

#include <cstdint>
#include <vector>

#include "kernel/abi/bytes.h"
#include "kernel/abi/protocol.h"
#include "kernel/abi/status.h"
#include "kernel/uapi/kvmi.h"

namespace kvmi {

// One event as sent by a vCPU: the common part (vCPU state) plus the event-specific struct.
struct Event {
  uint32_t seq = 0;
  kvmi_event common{};  // common.event is the event id, common.vcpu the vCPU
  union Specific {
    kvmi_event_cr cr;
    kvmi_event_msr msr;
    kvmi_event_breakpoint breakpoint;
    kvmi_event_pf pf;
    kvmi_event_trap trap;
    kvmi_event_descriptor descriptor;
  } specific{};

  uint8_t id() const { return common.event; }
  uint16_t vcpu() const { return common.vcpu; }
};

// hdr{KVMI_EVENT, 544 + S, seq} + kvmi_event (size field set to 544) + S specific bytes.
void EncodeEvent(const Event& event, std::vector<uint8_t>* out);
// Strict: id known, common.size == 544, hdr.size == 544 + S, all paddings zero.
DecodeStatus DecodeEvent(const kvmi_msg_hdr& hdr, ByteView payload, Event* event);

struct EventReply {
  uint32_t seq = 0;   // the event's seq
  uint16_t vcpu = 0;  // the event's vCPU
  uint8_t action = KVMI_EVENT_ACTION_CONTINUE;
  uint8_t event = 0;  // echo of the event id (the kernel does not check it)
  union Specific {
    kvmi_event_cr_reply cr;
    kvmi_event_msr_reply msr;
    kvmi_event_pf_reply pf;
  } specific{};
  // Bytes of `specific` that were present on the wire (decode) or are to be sent (encode):
  // the kernel accepts fewer than R and zero-fills the rest.
  uint16_t specific_size = 0;
};

// Sets `event`, `seq`, `vcpu` from the event and specific_size to its full R.
EventReply MakeEventReply(const Event& event, uint8_t action);
// hdr{KVMI_EVENT_REPLY, 16 + specific_size, seq} + vcpu hdr + kvmi_event_reply + specific.
void EncodeEventReply(const EventReply& reply, std::vector<uint8_t>* out);
// The kernel's validation (§6 "Reply validation (code)") against the event the vCPU waits for:
// hdr.size >= 16, zero vcpu-hdr and kvmi_event_reply padding, hdr.size - 16 <= R; a shorter
// specific part is zero-filled. seq lives in the header, not the payload: the caller sets
// reply->seq = hdr.seq and checks it, and the vCPU index, against the waiting vCPU.
DecodeStatus DecodeEventReply(ByteView payload, uint8_t pending_event, EventReply* reply);

}  // namespace kvmi

#endif  // KVMID_KERNEL_ABI_EVENTS_H_
