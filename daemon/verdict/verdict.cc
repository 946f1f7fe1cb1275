#include "daemon/verdict/verdict.h"

namespace kvmid {

kvmi::EventReply MakeReply(const kvmi::Event& event, const Verdict& verdict) {
  kvmi::EventReply reply = kvmi::MakeEventReply(event, verdict.action);
  switch (event.id()) {
    case KVMI_EVENT_CR:
      if (verdict.keep_old) {
        reply.specific.cr.new_val = event.specific.cr.old_value;
      } else if (verdict.new_value) {
        reply.specific.cr.new_val = *verdict.new_value;
      }
      break;
    case KVMI_EVENT_MSR:
      if (verdict.keep_old) {
        reply.specific.msr.new_val = event.specific.msr.old_value;
      } else if (verdict.new_value) {
        reply.specific.msr.new_val = *verdict.new_value;
      }
      break;
    case KVMI_EVENT_PF:
      if (verdict.pf) reply.specific.pf = *verdict.pf;
      break;
    default:
      break;
  }
  return reply;
}

}  // namespace kvmid
