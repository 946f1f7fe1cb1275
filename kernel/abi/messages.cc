#include "kernel/abi/messages.h"

#include <cstring>

namespace kvmi {
namespace {

using S = DecodeStatus;

// A fixed-size part of a request. The kernel's receive buffer is zeroed per message, so under
// kKernelZeroFill a short payload reads as zeros instead of failing (§1 "Kernel receive buffer").
template <typename T>
S ReadFixed(ByteReader& in, T* out, SizeRule rule, const char* field) {
  if (rule == SizeRule::kKernelZeroFill) {
    in.ReadZeroFilled(out);
    return S::Ok();
  }
  if (!in.Read(out)) return S::Fail(CodecError::kTruncated, field);
  return S::Ok();
}

// Fixed-size requests: extra bytes are an error for a strict reader, ignored by the kernel.
S ExpectEnd(const ByteReader& in, SizeRule rule, const char* field) {
  if (rule == SizeRule::kExact && in.remaining() != 0) {
    return S::Fail(CodecError::kTrailingBytes, field);
  }
  return S::Ok();
}

S ReadVcpuHdr(ByteReader& in, SizeRule rule, uint16_t* vcpu) {
  kvmi_vcpu_hdr hdr;
  S s = ReadFixed(in, &hdr, rule, "kvmi_vcpu_hdr");
  if (!s.ok()) return s;
  if (hdr.padding1 != 0 || hdr.padding2 != 0) {
    return S::Fail(CodecError::kNonZeroVcpuHdrPadding, "kvmi_vcpu_hdr.padding");
  }
  *vcpu = hdr.vcpu;
  return S::Ok();
}

void WriteVcpuHdr(ByteWriter& out, uint16_t vcpu) {
  kvmi_vcpu_hdr hdr{};
  hdr.vcpu = vcpu;
  out.Write(hdr);
}

// A variable-length part: `count` items of `item_size` bytes must be present (the kernel answers
// -KVM_EINVAL when hdr.size is smaller); more is trailing garbage for a strict reader. A count
// that could not fit one message (KVMI_MSG_SIZE after the fixed part already read) is rejected
// on its own, so the decoder does not depend on the framer having enforced the limit.
S CheckVariablePart(const ByteReader& in, size_t count, size_t item_size, SizeRule rule,
                    const char* field) {
  size_t max_count = (kMaxCommandPayload - in.position()) / item_size;
  if (count > max_count) return S::Fail(CodecError::kCountTooLarge, field);
  size_t needed = count * item_size;  // count <= 65535, item_size <= 16: no overflow
  if (in.remaining() < needed) return S::Fail(CodecError::kCountMismatch, field);
  if (rule == SizeRule::kExact && in.remaining() != needed) {
    return S::Fail(CodecError::kTrailingBytes, field);
  }
  return S::Ok();
}

#define KVMI_RETURN_IF_ERROR(expr)     \
  do {                                 \
    S status_ = (expr);                \
    if (!status_.ok()) return status_; \
  } while (0)

}  // namespace

DecodeStatus DecodeVcpuHdr(ByteView payload, uint16_t* vcpu) {
  ByteReader in(payload);
  return ReadVcpuHdr(in, SizeRule::kKernelZeroFill, vcpu);
}

// ---- requests with no payload ----------------------------------------------------------------

// T is a type: it cannot be parenthesized.
// NOLINTBEGIN(bugprone-macro-parentheses)
#define KVMI_EMPTY_REQUEST_CODEC(T)                                 \
  void EncodePayload(const T&, ByteWriter&) {}                      \
  DecodeStatus DecodePayload(ByteView payload, T*, SizeRule rule) { \
    ByteReader in(payload);                                         \
    return ExpectEnd(in, rule, #T);                                 \
  }
KVMI_EMPTY_REQUEST_CODEC(GetVersionRequest)
KVMI_EMPTY_REQUEST_CODEC(GetGuestInfoRequest)
KVMI_EMPTY_REQUEST_CODEC(GetMapTokenRequest)
#undef KVMI_EMPTY_REQUEST_CODEC
// NOLINTEND(bugprone-macro-parentheses)

// ---- CHECK_COMMAND / CHECK_EVENT -------------------------------------------------------------

void EncodePayload(const CheckCommandRequest& r, ByteWriter& out) {
  kvmi_check_command wire{};
  wire.id = r.id;
  out.Write(wire);
}
DecodeStatus DecodePayload(ByteView payload, CheckCommandRequest* r, SizeRule rule) {
  ByteReader in(payload);
  kvmi_check_command wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_check_command"));
  KVMI_RETURN_IF_ERROR(ExpectEnd(in, rule, "kvmi_check_command"));
  r->id = wire.id;
  if (wire.padding1 != 0 || wire.padding2 != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_check_command.padding");
  }
  return S::Ok();
}

void EncodePayload(const CheckEventRequest& r, ByteWriter& out) {
  kvmi_check_event wire{};
  wire.id = r.id;
  out.Write(wire);
}
DecodeStatus DecodePayload(ByteView payload, CheckEventRequest* r, SizeRule rule) {
  ByteReader in(payload);
  kvmi_check_event wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_check_event"));
  KVMI_RETURN_IF_ERROR(ExpectEnd(in, rule, "kvmi_check_event"));
  r->id = wire.id;
  if (wire.padding1 != 0 || wire.padding2 != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_check_event.padding");
  }
  return S::Ok();
}

// ---- vCPU commands whose request is only the vcpu hdr -----------------------------------------

// T is a type: it cannot be parenthesized.
// NOLINTBEGIN(bugprone-macro-parentheses)
#define KVMI_VCPU_ONLY_REQUEST_CODEC(T)                                          \
  void EncodePayload(const T& r, ByteWriter& out) { WriteVcpuHdr(out, r.vcpu); } \
  DecodeStatus DecodePayload(ByteView payload, T* r, SizeRule rule) {            \
    ByteReader in(payload);                                                      \
    KVMI_RETURN_IF_ERROR(ReadVcpuHdr(in, rule, &r->vcpu));                       \
    return ExpectEnd(in, rule, #T);                                              \
  }
KVMI_VCPU_ONLY_REQUEST_CODEC(GetVcpuInfoRequest)
KVMI_VCPU_ONLY_REQUEST_CODEC(GetXsaveRequest)
#undef KVMI_VCPU_ONLY_REQUEST_CODEC
// NOLINTEND(bugprone-macro-parentheses)

// ---- PAUSE_VCPU ---------------------------------------------------------------------------------

void EncodePayload(const PauseVcpuRequest& r, ByteWriter& out) {
  WriteVcpuHdr(out, r.vcpu);
  kvmi_pause_vcpu wire{};
  wire.wait = r.wait ? 1 : 0;
  out.Write(wire);
}
// The documented layout. (The v6 handler's overlay quirk, §5.6, is the host model's business.)
DecodeStatus DecodePayload(ByteView payload, PauseVcpuRequest* r, SizeRule rule) {
  ByteReader in(payload);
  KVMI_RETURN_IF_ERROR(ReadVcpuHdr(in, rule, &r->vcpu));
  kvmi_pause_vcpu wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_pause_vcpu"));
  KVMI_RETURN_IF_ERROR(ExpectEnd(in, rule, "kvmi_pause_vcpu"));
  r->wait = wire.wait != 0;
  if (wire.padding1 != 0 || wire.padding2 != 0 || wire.padding3 != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_pause_vcpu.padding");
  }
  return S::Ok();
}

// ---- CONTROL_VM_EVENTS / CONTROL_EVENTS ---------------------------------------------------------

void EncodePayload(const ControlVmEventsRequest& r, ByteWriter& out) {
  kvmi_control_vm_events wire{};
  wire.event_id = r.event_id;
  wire.enable = r.enable ? 1 : 0;
  out.Write(wire);
}
DecodeStatus DecodePayload(ByteView payload, ControlVmEventsRequest* r, SizeRule rule) {
  ByteReader in(payload);
  kvmi_control_vm_events wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_control_vm_events"));
  KVMI_RETURN_IF_ERROR(ExpectEnd(in, rule, "kvmi_control_vm_events"));
  r->event_id = wire.event_id;
  r->enable = wire.enable != 0;
  if (wire.padding1 != 0 || wire.padding2 != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_control_vm_events.padding");
  }
  return S::Ok();
}

void EncodePayload(const ControlEventsRequest& r, ByteWriter& out) {
  WriteVcpuHdr(out, r.vcpu);
  kvmi_control_events wire{};
  wire.event_id = r.event_id;
  wire.enable = r.enable ? 1 : 0;
  out.Write(wire);
}
DecodeStatus DecodePayload(ByteView payload, ControlEventsRequest* r, SizeRule rule) {
  ByteReader in(payload);
  KVMI_RETURN_IF_ERROR(ReadVcpuHdr(in, rule, &r->vcpu));
  kvmi_control_events wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_control_events"));
  KVMI_RETURN_IF_ERROR(ExpectEnd(in, rule, "kvmi_control_events"));
  r->event_id = wire.event_id;
  r->enable = wire.enable != 0;
  if (wire.padding1 != 0 || wire.padding2 != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_control_events.padding");
  }
  return S::Ok();
}

// ---- CONTROL_CR / CONTROL_MSR
// ---------------------------------------------------------------------

void EncodePayload(const ControlCrRequest& r, ByteWriter& out) {
  WriteVcpuHdr(out, r.vcpu);
  kvmi_control_cr wire{};
  wire.enable = r.enable ? 1 : 0;
  wire.cr = r.cr;
  out.Write(wire);
}
DecodeStatus DecodePayload(ByteView payload, ControlCrRequest* r, SizeRule rule) {
  ByteReader in(payload);
  KVMI_RETURN_IF_ERROR(ReadVcpuHdr(in, rule, &r->vcpu));
  kvmi_control_cr wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_control_cr"));
  KVMI_RETURN_IF_ERROR(ExpectEnd(in, rule, "kvmi_control_cr"));
  r->enable = wire.enable != 0;
  r->cr = wire.cr;
  if (wire.padding1 != 0 || wire.padding2 != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_control_cr.padding");
  }
  return S::Ok();
}

void EncodePayload(const ControlMsrRequest& r, ByteWriter& out) {
  WriteVcpuHdr(out, r.vcpu);
  kvmi_control_msr wire{};
  wire.enable = r.enable ? 1 : 0;
  wire.msr = r.msr;
  out.Write(wire);
}
DecodeStatus DecodePayload(ByteView payload, ControlMsrRequest* r, SizeRule rule) {
  ByteReader in(payload);
  KVMI_RETURN_IF_ERROR(ReadVcpuHdr(in, rule, &r->vcpu));
  kvmi_control_msr wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_control_msr"));
  KVMI_RETURN_IF_ERROR(ExpectEnd(in, rule, "kvmi_control_msr"));
  r->enable = wire.enable != 0;
  r->msr = wire.msr;
  if (wire.padding1 != 0 || wire.padding2 != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_control_msr.padding");
  }
  return S::Ok();
}

// ---- GET_REGISTERS / SET_REGISTERS
// -----------------------------------------------------------------

void EncodePayload(const GetRegistersRequest& r, ByteWriter& out) {
  WriteVcpuHdr(out, r.vcpu);
  kvmi_get_registers wire{};
  wire.nmsrs = static_cast<uint16_t>(r.msrs.size());
  out.Write(wire);
  for (uint32_t msr : r.msrs) out.Write(msr);
}
DecodeStatus DecodePayload(ByteView payload, GetRegistersRequest* r, SizeRule rule) {
  ByteReader in(payload);
  KVMI_RETURN_IF_ERROR(ReadVcpuHdr(in, rule, &r->vcpu));
  kvmi_get_registers wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_get_registers"));
  if (wire.padding1 != 0 || wire.padding2 != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_get_registers.padding");
  }
  KVMI_RETURN_IF_ERROR(
      CheckVariablePart(in, wire.nmsrs, sizeof(uint32_t), rule, "kvmi_get_registers.nmsrs"));
  r->msrs.resize(wire.nmsrs);
  for (uint32_t& msr : r->msrs) in.Read(&msr);
  return S::Ok();
}

void EncodePayload(const SetRegistersRequest& r, ByteWriter& out) {
  WriteVcpuHdr(out, r.vcpu);
  out.Write(r.regs);
}
DecodeStatus DecodePayload(ByteView payload, SetRegistersRequest* r, SizeRule rule) {
  ByteReader in(payload);
  KVMI_RETURN_IF_ERROR(ReadVcpuHdr(in, rule, &r->vcpu));
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &r->regs, rule, "kvm_regs"));
  return ExpectEnd(in, rule, "kvm_regs");
}

// ---- GET_CPUID / GET_MTRR_TYPE / INJECT_EXCEPTION
// ---------------------------------------------------

void EncodePayload(const GetCpuidRequest& r, ByteWriter& out) {
  WriteVcpuHdr(out, r.vcpu);
  kvmi_get_cpuid wire{r.function, r.index};
  out.Write(wire);
}
DecodeStatus DecodePayload(ByteView payload, GetCpuidRequest* r, SizeRule rule) {
  ByteReader in(payload);
  KVMI_RETURN_IF_ERROR(ReadVcpuHdr(in, rule, &r->vcpu));
  kvmi_get_cpuid wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_get_cpuid"));
  r->function = wire.function;
  r->index = wire.index;
  return ExpectEnd(in, rule, "kvmi_get_cpuid");
}

void EncodePayload(const GetMtrrTypeRequest& r, ByteWriter& out) {
  WriteVcpuHdr(out, r.vcpu);
  kvmi_get_mtrr_type wire{r.gpa};
  out.Write(wire);
}
DecodeStatus DecodePayload(ByteView payload, GetMtrrTypeRequest* r, SizeRule rule) {
  ByteReader in(payload);
  KVMI_RETURN_IF_ERROR(ReadVcpuHdr(in, rule, &r->vcpu));
  kvmi_get_mtrr_type wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_get_mtrr_type"));
  r->gpa = wire.gpa;
  return ExpectEnd(in, rule, "kvmi_get_mtrr_type");
}

void EncodePayload(const InjectExceptionRequest& r, ByteWriter& out) {
  WriteVcpuHdr(out, r.vcpu);
  kvmi_inject_exception wire{};
  wire.nr = r.nr;
  wire.has_error = r.has_error ? 1 : 0;
  wire.error_code = r.error_code;
  wire.address = r.address;
  out.Write(wire);
}
DecodeStatus DecodePayload(ByteView payload, InjectExceptionRequest* r, SizeRule rule) {
  ByteReader in(payload);
  KVMI_RETURN_IF_ERROR(ReadVcpuHdr(in, rule, &r->vcpu));
  kvmi_inject_exception wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_inject_exception"));
  KVMI_RETURN_IF_ERROR(ExpectEnd(in, rule, "kvmi_inject_exception"));
  r->nr = wire.nr;
  r->has_error = wire.has_error != 0;
  r->error_code = wire.error_code;
  r->address = wire.address;
  if (wire.padding != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_inject_exception.padding");
  }
  return S::Ok();
}

// ---- READ_PHYSICAL / WRITE_PHYSICAL
// -------------------------------------------------------------------

void EncodePayload(const ReadPhysicalRequest& r, ByteWriter& out) {
  kvmi_read_physical wire{r.gpa, r.size};
  out.Write(wire);
}
DecodeStatus DecodePayload(ByteView payload, ReadPhysicalRequest* r, SizeRule rule) {
  ByteReader in(payload);
  kvmi_read_physical wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_read_physical"));
  r->gpa = wire.gpa;
  r->size = wire.size;
  return ExpectEnd(in, rule, "kvmi_read_physical");
}

void EncodePayload(const WritePhysicalRequest& r, ByteWriter& out) {
  kvmi_write_physical wire{};
  wire.gpa = r.gpa;
  wire.size = r.size;
  out.Write(wire);
  out.WriteBytes(r.data);
}
// hdr.size < 16 + size is a CLOSE case for the kernel (§5.17): reported as kCountMismatch.
DecodeStatus DecodePayload(ByteView payload, WritePhysicalRequest* r, SizeRule rule) {
  ByteReader in(payload);
  kvmi_write_physical wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_write_physical"));
  r->gpa = wire.gpa;
  r->size = wire.size;
  if (wire.size > kMaxWritePhysicalData) {
    return S::Fail(CodecError::kCountTooLarge, "kvmi_write_physical.size");
  }
  if (wire.size > in.remaining()) {
    return S::Fail(CodecError::kCountMismatch, "kvmi_write_physical.size");
  }
  if (rule == SizeRule::kExact && wire.size != in.remaining()) {
    return S::Fail(CodecError::kTrailingBytes, "kvmi_write_physical.data");
  }
  in.ReadBytes(static_cast<size_t>(wire.size), &r->data);
  return S::Ok();
}

// ---- GET/SET_PAGE_ACCESS, GET/SET_PAGE_WRITE_BITMAP
// ------------------------------------------------------

namespace {

template <typename Wire>
void EncodeGpaList(uint16_t view, const std::vector<uint64_t>& gpas, ByteWriter& out) {
  Wire wire{};
  wire.view = view;
  wire.count = static_cast<uint16_t>(gpas.size());
  out.Write(wire);
  for (uint64_t gpa : gpas) out.Write(gpa);
}

template <typename Wire>
S DecodeGpaList(ByteView payload, SizeRule rule, const char* name, uint16_t* view,
                std::vector<uint64_t>* gpas) {
  ByteReader in(payload);
  Wire wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, name));
  *view = wire.view;
  if (wire.padding != 0) return S::Fail(CodecError::kNonZeroPadding, name);
  KVMI_RETURN_IF_ERROR(CheckVariablePart(in, wire.count, sizeof(uint64_t), rule, name));
  gpas->resize(wire.count);
  for (uint64_t& gpa : *gpas) in.Read(&gpa);
  return S::Ok();
}

}  // namespace

void EncodePayload(const GetPageAccessRequest& r, ByteWriter& out) {
  EncodeGpaList<kvmi_get_page_access>(r.view, r.gpas, out);
}
DecodeStatus DecodePayload(ByteView payload, GetPageAccessRequest* r, SizeRule rule) {
  return DecodeGpaList<kvmi_get_page_access>(payload, rule, "kvmi_get_page_access", &r->view,
                                             &r->gpas);
}

void EncodePayload(const GetPageWriteBitmapRequest& r, ByteWriter& out) {
  EncodeGpaList<kvmi_get_page_write_bitmap>(r.view, r.gpas, out);
}
DecodeStatus DecodePayload(ByteView payload, GetPageWriteBitmapRequest* r, SizeRule rule) {
  return DecodeGpaList<kvmi_get_page_write_bitmap>(payload, rule, "kvmi_get_page_write_bitmap",
                                                   &r->view, &r->gpas);
}

void EncodePayload(const SetPageAccessRequest& r, ByteWriter& out) {
  kvmi_set_page_access wire{};
  wire.view = r.view;
  wire.count = static_cast<uint16_t>(r.entries.size());
  out.Write(wire);
  for (const PageAccess& e : r.entries) {
    kvmi_page_access_entry entry{};
    entry.gpa = e.gpa;
    entry.access = e.access;
    out.Write(entry);
  }
}
// Entry padding is per entry for the kernel (it goes on with the next entry), so under
// kKernelZeroFill it is recorded in PageAccess::padding_ok rather than failing the message.
DecodeStatus DecodePayload(ByteView payload, SetPageAccessRequest* r, SizeRule rule) {
  ByteReader in(payload);
  kvmi_set_page_access wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_set_page_access"));
  r->view = wire.view;
  if (wire.padding != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_set_page_access.padding");
  }
  KVMI_RETURN_IF_ERROR(CheckVariablePart(in, wire.count, sizeof(kvmi_page_access_entry), rule,
                                         "kvmi_set_page_access.count"));
  r->entries.resize(wire.count);
  bool all_padding_ok = true;
  for (PageAccess& e : r->entries) {
    kvmi_page_access_entry entry;
    in.Read(&entry);
    e.gpa = entry.gpa;
    e.access = entry.access;
    e.padding_ok = entry.padding1 == 0 && entry.padding2 == 0 && entry.padding3 == 0;
    all_padding_ok = all_padding_ok && e.padding_ok;
  }
  if (rule == SizeRule::kExact && !all_padding_ok) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_page_access_entry.padding");
  }
  return S::Ok();
}

void EncodePayload(const SetPageWriteBitmapRequest& r, ByteWriter& out) {
  kvmi_set_page_write_bitmap wire{};
  wire.view = r.view;
  wire.count = static_cast<uint16_t>(r.entries.size());
  out.Write(wire);
  for (const PageWriteBitmap& e : r.entries) {
    kvmi_page_write_bitmap_entry entry{};
    entry.gpa = e.gpa;
    entry.bitmap = e.bitmap;
    out.Write(entry);
  }
}
// The v6 kernel does not check entry padding here (§5.25 "(code)"); a strict reader does.
DecodeStatus DecodePayload(ByteView payload, SetPageWriteBitmapRequest* r, SizeRule rule) {
  ByteReader in(payload);
  kvmi_set_page_write_bitmap wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_set_page_write_bitmap"));
  r->view = wire.view;
  if (wire.padding != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_set_page_write_bitmap.padding");
  }
  KVMI_RETURN_IF_ERROR(CheckVariablePart(in, wire.count, sizeof(kvmi_page_write_bitmap_entry), rule,
                                         "kvmi_set_page_write_bitmap.count"));
  r->entries.resize(wire.count);
  bool all_padding_ok = true;
  for (PageWriteBitmap& e : r->entries) {
    kvmi_page_write_bitmap_entry entry;
    in.Read(&entry);
    e.gpa = entry.gpa;
    e.bitmap = entry.bitmap;
    all_padding_ok = all_padding_ok && entry.padding == 0;
  }
  if (rule == SizeRule::kExact && !all_padding_ok) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_page_write_bitmap_entry.padding");
  }
  return S::Ok();
}

// ---- CONTROL_SPP / CONTROL_CMD_RESPONSE
// ------------------------------------------------------------------

void EncodePayload(const ControlSppRequest& r, ByteWriter& out) {
  kvmi_control_spp wire{};
  wire.enable = r.enable ? 1 : 0;
  out.Write(wire);
}
DecodeStatus DecodePayload(ByteView payload, ControlSppRequest* r, SizeRule rule) {
  ByteReader in(payload);
  kvmi_control_spp wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_control_spp"));
  KVMI_RETURN_IF_ERROR(ExpectEnd(in, rule, "kvmi_control_spp"));
  r->enable = wire.enable != 0;
  if (wire.padding1 != 0 || wire.padding2 != 0 || wire.padding3 != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_control_spp.padding");
  }
  return S::Ok();
}

void EncodePayload(const ControlCmdResponseRequest& r, ByteWriter& out) {
  kvmi_control_cmd_response wire{};
  wire.enable = r.enable ? 1 : 0;
  wire.now = r.now ? 1 : 0;
  out.Write(wire);
}
DecodeStatus DecodePayload(ByteView payload, ControlCmdResponseRequest* r, SizeRule rule) {
  ByteReader in(payload);
  kvmi_control_cmd_response wire;
  KVMI_RETURN_IF_ERROR(ReadFixed(in, &wire, rule, "kvmi_control_cmd_response"));
  KVMI_RETURN_IF_ERROR(ExpectEnd(in, rule, "kvmi_control_cmd_response"));
  r->enable = wire.enable != 0;
  r->now = wire.now == 1;  // the kernel tests `now == 1`, not `now != 0`
  if (wire.padding1 != 0 || wire.padding2 != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_control_cmd_response.padding");
  }
  return S::Ok();
}

// ---- replies
// ----------------------------------------------------------------------------------------------

DecodeStatus DecodeReply(const kvmi_msg_hdr& hdr, ByteView payload, Reply* reply) {
  if (payload.size() != hdr.size) return S::Fail(CodecError::kCountMismatch, "hdr.size");
  ByteReader in(payload);
  kvmi_error_code ec;
  if (!in.Read(&ec)) return S::Fail(CodecError::kTruncated, "kvmi_error_code");
  if (ec.padding != 0) return S::Fail(CodecError::kNonZeroPadding, "kvmi_error_code.padding");
  if (ec.err > 0) return S::Fail(CodecError::kBadValue, "kvmi_error_code.err");
  if (ec.err != 0 && in.remaining() != 0) {
    return S::Fail(CodecError::kTrailingBytes, "reply data after an error");
  }
  reply->id = hdr.id;
  reply->seq = hdr.seq;
  reply->err = ec.err;
  reply->data = in.Rest();
  return S::Ok();
}

void EncodeReply(uint16_t id, uint32_t seq, int32_t err, ByteView data, std::vector<uint8_t>* out) {
  ByteWriter w(out);
  size_t data_size = err == 0 ? data.size() : 0;
  kvmi_msg_hdr hdr{id, static_cast<uint16_t>(kErrorCodeSize + data_size), seq};
  w.Write(hdr);
  kvmi_error_code ec{err, 0};
  w.Write(ec);
  if (err == 0) w.WriteBytes(data);
}

namespace {

template <typename Wire>
S ReadExactly(ByteView data, Wire* wire, const char* field) {
  ByteReader in(data);
  if (!in.Read(wire)) return S::Fail(CodecError::kTruncated, field);
  if (in.remaining() != 0) return S::Fail(CodecError::kTrailingBytes, field);
  return S::Ok();
}

}  // namespace

void EncodeReplyData(const GetVersionReply& r, ByteWriter& out) {
  kvmi_get_version_reply wire{r.version, 0};
  out.Write(wire);
}
DecodeStatus DecodeReplyData(ByteView data, GetVersionReply* r) {
  kvmi_get_version_reply wire;
  KVMI_RETURN_IF_ERROR(ReadExactly(data, &wire, "kvmi_get_version_reply"));
  if (wire.padding != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_get_version_reply.padding");
  }
  r->version = wire.version;
  return S::Ok();
}

void EncodeReplyData(const GuestInfoReply& r, ByteWriter& out) {
  kvmi_get_guest_info_reply wire{};
  wire.vcpu_count = r.vcpu_count;
  out.Write(wire);
}
DecodeStatus DecodeReplyData(ByteView data, GuestInfoReply* r) {
  kvmi_get_guest_info_reply wire;
  KVMI_RETURN_IF_ERROR(ReadExactly(data, &wire, "kvmi_get_guest_info_reply"));
  if (wire.padding[0] != 0 || wire.padding[1] != 0 || wire.padding[2] != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_get_guest_info_reply.padding");
  }
  r->vcpu_count = wire.vcpu_count;
  return S::Ok();
}

void EncodeReplyData(const VcpuInfoReply& r, ByteWriter& out) {
  kvmi_get_vcpu_info_reply wire{r.tsc_speed};
  out.Write(wire);
}
DecodeStatus DecodeReplyData(ByteView data, VcpuInfoReply* r) {
  kvmi_get_vcpu_info_reply wire;
  KVMI_RETURN_IF_ERROR(ReadExactly(data, &wire, "kvmi_get_vcpu_info_reply"));
  r->tsc_speed = wire.tsc_speed;
  return S::Ok();
}

void EncodeReplyData(const RegistersReply& r, ByteWriter& out) {
  kvmi_get_registers_reply wire{};
  wire.mode = r.mode;
  wire.regs = r.regs;
  wire.sregs = r.sregs;
  wire.msrs.nmsrs = static_cast<uint32_t>(r.msrs.size());
  out.Write(wire);
  for (const kvm_msr_entry& e : r.msrs) out.Write(e);
}
DecodeStatus DecodeReplyData(ByteView data, size_t expected_msrs, RegistersReply* r) {
  ByteReader in(data);
  kvmi_get_registers_reply wire;
  if (!in.Read(&wire)) return S::Fail(CodecError::kTruncated, "kvmi_get_registers_reply");
  if (wire.padding != 0 || wire.msrs.pad != 0) {
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_get_registers_reply.padding");
  }
  if (wire.mode != 2 && wire.mode != 4 && wire.mode != 8) {
    return S::Fail(CodecError::kBadValue, "kvmi_get_registers_reply.mode");
  }
  // The kernel answers -KVM_ENOMEM instead of a reply above 4096 bytes (§5.12).
  if (expected_msrs > kMaxGetRegistersMsrs) {
    return S::Fail(CodecError::kCountTooLarge, "kvmi_get_registers_reply.msrs.nmsrs");
  }
  if (wire.msrs.nmsrs != expected_msrs) {
    return S::Fail(CodecError::kCountMismatch, "kvmi_get_registers_reply.msrs.nmsrs");
  }
  if (in.remaining() != expected_msrs * sizeof(kvm_msr_entry)) {
    return S::Fail(in.remaining() < expected_msrs * sizeof(kvm_msr_entry)
                       ? CodecError::kTruncated
                       : CodecError::kTrailingBytes,
                   "kvmi_get_registers_reply.msrs.entries");
  }
  r->mode = wire.mode;
  r->regs = wire.regs;
  r->sregs = wire.sregs;
  r->msrs.resize(expected_msrs);
  for (kvm_msr_entry& e : r->msrs) in.Read(&e);
  return S::Ok();
}

void EncodeReplyData(const CpuidReply& r, ByteWriter& out) {
  kvmi_get_cpuid_reply wire{r.eax, r.ebx, r.ecx, r.edx};
  out.Write(wire);
}
DecodeStatus DecodeReplyData(ByteView data, CpuidReply* r) {
  kvmi_get_cpuid_reply wire;
  KVMI_RETURN_IF_ERROR(ReadExactly(data, &wire, "kvmi_get_cpuid_reply"));
  r->eax = wire.eax;
  r->ebx = wire.ebx;
  r->ecx = wire.ecx;
  r->edx = wire.edx;
  return S::Ok();
}

void EncodeReplyData(const XsaveReply& r, ByteWriter& out) { out.WriteBytes(ByteView(r.region)); }
// The length comes from hdr.size (§5.15): any whole number of u32 up to a page is accepted.
DecodeStatus DecodeReplyData(ByteView data, XsaveReply* r) {
  if (data.empty() || data.size() % sizeof(uint32_t) != 0) {
    return S::Fail(CodecError::kBadValue, "kvmi_get_xsave_reply.region");
  }
  if (data.size() > KVMI_XSAVE_SIZE) {
    return S::Fail(CodecError::kTrailingBytes, "kvmi_get_xsave_reply.region");
  }
  r->region = data.ToVector();
  return S::Ok();
}

void EncodeReplyData(const ReadPhysicalReply& r, ByteWriter& out) { out.WriteBytes(r.data); }
DecodeStatus DecodeReplyData(ByteView data, size_t expected_size, ReadPhysicalReply* r) {
  if (data.size() != expected_size) {
    return S::Fail(
        data.size() < expected_size ? CodecError::kTruncated : CodecError::kTrailingBytes,
        "read_physical data");
  }
  r->data = data;
  return S::Ok();
}

void EncodeReplyData(const PageAccessReply& r, ByteWriter& out) {
  out.WriteBytes(ByteView(r.access));
}
DecodeStatus DecodeReplyData(ByteView data, size_t expected_count, PageAccessReply* r) {
  if (data.size() != expected_count) {
    return S::Fail(
        data.size() < expected_count ? CodecError::kTruncated : CodecError::kTrailingBytes,
        "kvmi_get_page_access_reply.access");
  }
  for (size_t i = 0; i < data.size(); ++i) {
    if ((data[i] & ~KVMI_PAGE_ACCESS_RWX) != 0) {
      return S::Fail(CodecError::kBadValue, "kvmi_get_page_access_reply.access");
    }
  }
  r->access = data.ToVector();
  return S::Ok();
}

void EncodeReplyData(const MapTokenReply& r, ByteWriter& out) { out.Write(r.token); }
DecodeStatus DecodeReplyData(ByteView data, MapTokenReply* r) {
  return ReadExactly(data, &r->token, "kvmi_get_map_token_reply");
}

void EncodeReplyData(const MtrrTypeReply& r, ByteWriter& out) {
  kvmi_get_mtrr_type_reply wire{};
  wire.type = r.type;
  out.Write(wire);
}
DecodeStatus DecodeReplyData(ByteView data, MtrrTypeReply* r) {
  kvmi_get_mtrr_type_reply wire;
  KVMI_RETURN_IF_ERROR(ReadExactly(data, &wire, "kvmi_get_mtrr_type_reply"));
  for (uint8_t b : wire.padding) {
    if (b != 0) return S::Fail(CodecError::kNonZeroPadding, "kvmi_get_mtrr_type_reply.padding");
  }
  r->type = wire.type;
  return S::Ok();
}

void EncodeReplyData(const PageWriteBitmapReply& r, ByteWriter& out) {
  for (uint32_t bitmap : r.bitmaps) out.Write(bitmap);
}
DecodeStatus DecodeReplyData(ByteView data, size_t expected_count, PageWriteBitmapReply* r) {
  if (data.size() != expected_count * sizeof(uint32_t)) {
    return S::Fail(data.size() < expected_count * sizeof(uint32_t) ? CodecError::kTruncated
                                                                   : CodecError::kTrailingBytes,
                   "kvmi_get_page_write_bitmap_reply.bitmap");
  }
  ByteReader in(data);
  r->bitmaps.resize(expected_count);
  for (uint32_t& bitmap : r->bitmaps) in.Read(&bitmap);
  return S::Ok();
}

DecodeStatus DecodeEmptyReplyData(ByteView data) {
  if (!data.empty()) return S::Fail(CodecError::kTrailingBytes, "reply data");
  return S::Ok();
}

// ---- batching
// ------------------------------------------------------------------------------------------------

BatchBuilder::BatchBuilder(std::vector<uint8_t>* out, uint32_t open_seq) : out_(out) {
  ControlCmdResponseRequest silence;
  silence.enable = false;
  silence.now = true;  // also suppresses the reply to this very command
  EncodeCommand(silence, open_seq, out_);
}

void BatchBuilder::Close(uint32_t close_seq) {
  // now = 1 so that replies are back on *before* this command is answered: with now = 0 it
  // would be answered under the old "replies off" state, i.e. not at all. (§5.2's "typical use"
  // writes now=0 yet says the last command is answered; the semantics in the same section, and
  // libkvmi's commit with now=wait, say otherwise. We follow the semantics.)
  ControlCmdResponseRequest restore;
  restore.enable = true;
  restore.now = true;
  EncodeCommand(restore, close_seq, out_);
}

}  // namespace kvmi
