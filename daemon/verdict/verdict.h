// A verdict: how kvmid answers one blocking event, whoever decided it.
#ifndef KVMID_DAEMON_VERDICT_VERDICT_H_
#define KVMID_DAEMON_VERDICT_VERDICT_H_

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "kernel/abi/events.h"
#include "kernel/uapi/kvmi.h"

namespace kvmid {

struct Verdict {
  uint8_t action = KVMI_EVENT_ACTION_CONTINUE;
  // CR/MSR events with CONTINUE: the value to write. Unset = the value the guest asked for.
  std::optional<uint64_t> new_value;
  // CR/MSR events: write back the old value (the guest's write has no effect). Wins over
  // new_value.
  bool keep_old = false;
  // Registers to set before the reply takes effect (SET_REGISTERS, batched in the same write).
  std::optional<kvm_regs> registers;
  // PF events: custom input / singlestep / rep_complete.
  std::optional<kvmi_event_pf_reply> pf;
  // Who decided: "policy:<rule>", "handler:<id>", "fallback:<why>", "daemon".
  std::string decided_by;

  static Verdict Continue(std::string by) {
    Verdict v;
    v.decided_by = std::move(by);
    return v;
  }
};

// The event reply (wire form) that carries out `verdict` for `event`.
kvmi::EventReply MakeReply(const kvmi::Event& event, const Verdict& verdict);

// Per event type: how long a handler may take, and what happens when it does not answer.
struct EventDeadline {
  std::chrono::milliseconds deadline{1000};
  uint8_t fallback_action = KVMI_EVENT_ACTION_CONTINUE;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_VERDICT_VERDICT_H_
