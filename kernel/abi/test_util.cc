#include "kernel/abi/test_util.h"

#include <cctype>
#include <cstdio>
#include <cstdlib>

#include "kernel/abi/messages.h"
#include "kernel/abi/protocol.h"

namespace kvmi {
namespace testing {

std::string Hex(ByteView bytes) {
  std::string out;
  char buf[4];
  for (size_t i = 0; i < bytes.size(); ++i) {
    std::snprintf(buf, sizeof(buf), i == 0 ? "%02X" : " %02X", bytes[i]);
    out += buf;
  }
  return out;
}

Bytes FromHex(const std::string& text) {
  Bytes out;
  int high = -1;
  for (char c : text) {
    if (c == ' ' || c == '|' || c == '\n') continue;
    if (!std::isxdigit(static_cast<unsigned char>(c))) {
      std::fprintf(stderr, "FromHex: bad character '%c' in \"%s\"\n", c, text.c_str());
      std::abort();
    }
    int nibble =
        std::isdigit(static_cast<unsigned char>(c)) ? c - '0' : (std::tolower(c) - 'a' + 10);
    if (high < 0) {
      high = nibble;
    } else {
      out.push_back(static_cast<uint8_t>(high << 4 | nibble));
      high = -1;
    }
  }
  if (high >= 0) {
    std::fprintf(stderr, "FromHex: odd number of digits in \"%s\"\n", text.c_str());
    std::abort();
  }
  return out;
}

kvmi_msg_hdr HeaderOf(const Bytes& message) {
  kvmi_msg_hdr hdr{};
  if (message.size() >= sizeof(hdr)) std::memcpy(&hdr, message.data(), sizeof(hdr));
  return hdr;
}

ByteView PayloadOf(const Bytes& message) { return ByteView(message).subview(kHdrSize); }

Bytes Message(uint16_t id, uint16_t size, uint32_t seq, const Bytes& payload) {
  Bytes out = Cat(kvmi_msg_hdr{id, size, seq});
  AppendTo(&out, payload);
  return out;
}

kvm_regs SampleRegs() {
  kvm_regs regs{};
  __u64* fields = &regs.rax;  // kvm_regs is 18 consecutive u64 (§4.3)
  for (int i = 0; i < 18; ++i) fields[i] = 0x1111111100000000ull * (i + 1) + i;
  regs.rflags = 0x246;
  return regs;
}

kvm_sregs SampleSregs() {
  kvm_sregs sregs{};
  kvm_segment* segments[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs,
                             &sregs.gs, &sregs.ss, &sregs.tr, &sregs.ldt};
  uint16_t selector = 0x08;
  for (kvm_segment* s : segments) {
    s->base = 0xffff800000000000ull + selector;
    s->limit = 0xfffff;
    s->selector = selector;
    s->type = 0xb;
    s->present = 1;
    s->s = 1;
    s->g = 1;
    selector += 8;
  }
  sregs.cs.l = 1;  // 64-bit code segment: mode 8
  sregs.gdt = kvm_dtable{0xfffffe0000001000ull, 0x7f, {0, 0, 0}};
  sregs.idt = kvm_dtable{0xfffffe0000000000ull, 0xfff, {0, 0, 0}};
  sregs.cr0 = 0x80050033;
  sregs.cr2 = 0x7ffdeadbe000;
  sregs.cr3 = 0x1234000;
  sregs.cr4 = 0x3706f0;
  sregs.cr8 = 1;
  sregs.efer = 0xd01;
  sregs.apic_base = 0xfee00900;
  sregs.interrupt_bitmap[1] = 0x10;
  return sregs;
}

Event SampleEvent(uint8_t id, uint16_t vcpu, uint32_t seq) {
  Event event;
  event.seq = seq;
  event.common.size = sizeof(kvmi_event);
  event.common.event = id;
  if (id == KVMI_EVENT_UNHOOK) return event;  // vcpu 0, arch all zero
  event.common.vcpu = vcpu;
  event.common.arch.mode = 8;
  event.common.arch.regs = SampleRegs();
  event.common.arch.sregs = SampleSregs();
  auto& msrs = event.common.arch.msrs;
  msrs.sysenter_cs = 0x10;
  msrs.sysenter_esp = 0xfffffe0000002000ull;
  msrs.sysenter_eip = 0xffffffff81a00000ull;
  msrs.efer = 0xd01;
  msrs.star = 0x23001000000000ull;
  msrs.lstar = 0xffffffff81c00080ull;
  msrs.cstar = 0xffffffff81c00180ull;
  msrs.pat = 0x407050600070106ull;
  msrs.shadow_gs = 0xffff88807fc00000ull;
  switch (id) {
    case KVMI_EVENT_CR:
      event.specific.cr = kvmi_event_cr{3, {0, 0, 0}, 0x1234000, 0x5678000};
      break;
    case KVMI_EVENT_MSR:
      event.specific.msr = kvmi_event_msr{0xc0000082u, 0, 0xffffffff81c00080ull, 0x4141414141ull};
      break;
    case KVMI_EVENT_BREAKPOINT:
      event.specific.breakpoint = kvmi_event_breakpoint{0x1000cc, 1, {0, 0, 0, 0, 0, 0, 0}};
      break;
    case KVMI_EVENT_PF:
      event.specific.pf =
          kvmi_event_pf{0xffffc90000001234ull, 0x7f001234, KVMI_PAGE_ACCESS_W, 0, 0, 0};
      break;
    case KVMI_EVENT_TRAP:
      event.specific.trap = kvmi_event_trap{14, KVMI_TRAP_TYPE_HARD_EXCEPTION, 2, 0, 0xdead000};
      break;
    case KVMI_EVENT_DESCRIPTOR:
      event.specific.descriptor = kvmi_event_descriptor{KVMI_DESC_IDTR, 1, {0, 0, 0, 0, 0, 0}};
      break;
    default:
      break;  // no specific data
  }
  return event;
}

EventReply SampleEventReply(const Event& event, uint8_t action) {
  EventReply reply = MakeEventReply(event, action);
  switch (event.id()) {
    case KVMI_EVENT_CR:
      reply.specific.cr.new_val = event.specific.cr.old_value;  // cancel the write
      break;
    case KVMI_EVENT_MSR:
      reply.specific.msr.new_val = 0x5151515151ull;
      break;
    case KVMI_EVENT_PF: {
      kvmi_event_pf_reply& pf = reply.specific.pf;
      pf.ctx_addr = event.specific.pf.gva;
      pf.ctx_size = 16;
      pf.singlestep = 1;
      pf.rep_complete = 1;
      for (int i = 0; i < KVMI_CTX_DATA_SIZE; ++i) pf.ctx_data[i] = static_cast<uint8_t>(i);
      break;
    }
    default:
      break;
  }
  return reply;
}

namespace {

template <typename Request>
void AddRequest(const char* name, const Request& request, uint32_t seq,
                std::vector<NamedMessage>* out) {
  NamedMessage m{std::string("request_") + name, {}};
  EncodeCommand(request, seq, &m.wire);
  out->push_back(std::move(m));
}

template <typename ReplyData>
void AddReply(const char* name, uint16_t id, const ReplyData& data, uint32_t seq,
              std::vector<NamedMessage>* out) {
  Bytes encoded;
  ByteWriter w(&encoded);
  EncodeReplyData(data, w);
  NamedMessage m{std::string("reply_") + name, {}};
  EncodeReply(id, seq, 0, ByteView(encoded), &m.wire);
  out->push_back(std::move(m));
}

}  // namespace

std::vector<NamedMessage> AllValidMessages() {
  std::vector<NamedMessage> out;
  uint32_t seq = 1;
  AddRequest("get_version", GetVersionRequest{}, seq++, &out);
  AddRequest("check_command", CheckCommandRequest{KVMI_GET_REGISTERS}, seq++, &out);
  AddRequest("check_event", CheckEventRequest{KVMI_EVENT_PF}, seq++, &out);
  AddRequest("get_guest_info", GetGuestInfoRequest{}, seq++, &out);
  AddRequest("get_vcpu_info", GetVcpuInfoRequest{1}, seq++, &out);
  AddRequest("pause_vcpu", PauseVcpuRequest{2, true}, seq++, &out);
  AddRequest("control_vm_events", ControlVmEventsRequest{KVMI_EVENT_CREATE_VCPU, true}, seq++,
             &out);
  AddRequest("control_events", ControlEventsRequest{1, KVMI_EVENT_PF, true}, seq++, &out);
  AddRequest("control_cr", ControlCrRequest{1, 3, true}, seq++, &out);
  AddRequest("control_msr", ControlMsrRequest{1, 0xc0000082u, true}, seq++, &out);
  AddRequest("get_registers", GetRegistersRequest{1, {0xc0000080u, 0x174, 0x175}}, seq++, &out);
  AddRequest("set_registers", SetRegistersRequest{1, SampleRegs()}, seq++, &out);
  AddRequest("get_cpuid", GetCpuidRequest{1, 0x7, 0}, seq++, &out);
  AddRequest("get_xsave", GetXsaveRequest{1}, seq++, &out);
  AddRequest("read_physical", ReadPhysicalRequest{0x1000, 64}, seq++, &out);
  static const uint8_t kData[8] = {0xcc, 0x90, 0x90, 0x90, 0xc3, 0, 1, 2};
  AddRequest("write_physical", WritePhysicalRequest{0x2000, 8, ByteView(kData, 8)}, seq++, &out);
  AddRequest("inject_exception", InjectExceptionRequest{1, 14, true, 2, 0xdead000}, seq++, &out);
  AddRequest("get_page_access", GetPageAccessRequest{0, {0x1000, 0x2000}}, seq++, &out);
  AddRequest("set_page_access",
             SetPageAccessRequest{
                 0, {{0x1000, KVMI_PAGE_ACCESS_R, true}, {0x3000, KVMI_PAGE_ACCESS_RWX, true}}},
             seq++, &out);
  AddRequest("get_map_token", GetMapTokenRequest{}, seq++, &out);
  AddRequest("get_mtrr_type", GetMtrrTypeRequest{1, 0xfee00000}, seq++, &out);
  AddRequest("control_spp", ControlSppRequest{true}, seq++, &out);
  AddRequest("get_page_write_bitmap", GetPageWriteBitmapRequest{0, {0x1000}}, seq++, &out);
  AddRequest("set_page_write_bitmap", SetPageWriteBitmapRequest{0, {{0x1000, 0xffff0000u}}}, seq++,
             &out);
  AddRequest("control_cmd_response", ControlCmdResponseRequest{false, true}, seq++, &out);

  AddReply("get_version", KVMI_GET_VERSION, GetVersionReply{KVMI_VERSION}, 1, &out);
  AddReply("get_guest_info", KVMI_GET_GUEST_INFO, GuestInfoReply{4}, 4, &out);
  AddReply("get_vcpu_info", KVMI_GET_VCPU_INFO, VcpuInfoReply{2400000000ull}, 5, &out);
  RegistersReply registers{8,
                           SampleRegs(),
                           SampleSregs(),
                           {kvm_msr_entry{0xc0000080u, 0, 0xd01}, kvm_msr_entry{0x174, 0, 0x10},
                            kvm_msr_entry{0x175, 0, 0x2000}}};
  AddReply("get_registers", KVMI_GET_REGISTERS, registers, 11, &out);
  AddReply("get_cpuid", KVMI_GET_CPUID, CpuidReply{1, 2, 3, 4}, 13, &out);
  XsaveReply xsave;
  xsave.region.assign(KVMI_XSAVE_SIZE, 0);
  for (size_t i = 0; i < xsave.region.size(); i += 7) xsave.region[i] = static_cast<uint8_t>(i);
  AddReply("get_xsave", KVMI_GET_XSAVE, xsave, 14, &out);
  Bytes memory(64, 0x5a);
  AddReply("read_physical", KVMI_READ_PHYSICAL, ReadPhysicalReply{ByteView(memory)}, 15, &out);
  AddReply("get_page_access", KVMI_GET_PAGE_ACCESS, PageAccessReply{{1, 7}}, 18, &out);
  MapTokenReply token;
  for (int i = 0; i < 4; ++i) token.token.token[i] = 0x0123456789abcdefull * (i + 1);
  AddReply("get_map_token", KVMI_GET_MAP_TOKEN, token, 20, &out);
  AddReply("get_mtrr_type", KVMI_GET_MTRR_TYPE, MtrrTypeReply{6}, 21, &out);
  AddReply("get_page_write_bitmap", KVMI_GET_PAGE_WRITE_BITMAP, PageWriteBitmapReply{{0xffff}}, 23,
           &out);
  NamedMessage ok{"reply_control_events_ok", {}};
  EncodeReply(KVMI_CONTROL_EVENTS, 8, 0, ByteView(), &ok.wire);
  out.push_back(std::move(ok));
  NamedMessage unsupported{"reply_control_ve_eopnotsupp", {}};
  EncodeReply(KVMI_CONTROL_VE, 7, -KVM_EOPNOTSUPP, ByteView(), &unsupported.wire);
  out.push_back(std::move(unsupported));

  for (uint8_t id = 0; id < KVMI_NUM_EVENTS; ++id) {
    Event event = SampleEvent(id, 1, 100 + id);
    NamedMessage m{std::string("event_") + EventName(id), {}};
    EncodeEvent(event, &m.wire);
    out.push_back(std::move(m));
    if (id == KVMI_EVENT_UNHOOK) continue;  // never replied
    NamedMessage r{std::string("event_reply_") + EventName(id), {}};
    EncodeEventReply(SampleEventReply(event, KVMI_EVENT_ACTION_CONTINUE), &r.wire);
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace testing
}  // namespace kvmi
