#include "daemon/api/api_test_fixture.h"

namespace kvmid {

ScriptedHost::Responder RichResponder() {
  auto defaults = std::make_shared<ScriptedHost>();
  return [defaults](const ReceivedMessage& m) {
    std::vector<uint8_t> out;
    if (m.hdr.id == KVMI_GET_REGISTERS) {
      kvmi::GetRegistersRequest request;
      kvmi::DecodePayload(kvmi::ByteView(m.payload), &request);
      kvmi::RegistersReply reply;
      reply.mode = 8;
      reply.regs.rip = 0xffffffff81001234;
      reply.sregs.cr3 = 0x1000 * (request.vcpu + 1);
      for (uint32_t index : request.msrs)
        reply.msrs.push_back(kvm_msr_entry{index, 0, index + 1ull});
      std::vector<uint8_t> data;
      kvmi::ByteWriter w(&data);
      kvmi::EncodeReplyData(reply, w);
      kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(data), &out);
      return std::optional<std::vector<uint8_t>>(out);
    }
    if (m.hdr.id == KVMI_GET_CPUID || m.hdr.id == KVMI_GET_XSAVE ||
        m.hdr.id == KVMI_GET_MTRR_TYPE) {
      std::vector<uint8_t> data;
      kvmi::ByteWriter w(&data);
      if (m.hdr.id == KVMI_GET_CPUID) {
        kvmi::GetCpuidRequest request;
        kvmi::DecodePayload(kvmi::ByteView(m.payload), &request);
        kvmi::EncodeReplyData(
            kvmi::CpuidReply{request.function, 0x756e6547, 0x6c65746e, 0x49656e69}, w);
      } else if (m.hdr.id == KVMI_GET_XSAVE) {
        kvmi::EncodeReplyData(kvmi::XsaveReply{std::vector<uint8_t>(4096, 0x5a)}, w);
      } else {
        kvmi::EncodeReplyData(kvmi::MtrrTypeReply{6}, w);
      }
      kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(data), &out);
      return std::optional<std::vector<uint8_t>>(out);
    }
    if (m.hdr.id == KVMI_GET_PAGE_ACCESS) {
      kvmi::GetPageAccessRequest request;
      kvmi::DecodePayload(kvmi::ByteView(m.payload), &request);
      std::vector<uint8_t> data(request.gpas.size(), KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X);
      kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(data), &out);
      return std::optional<std::vector<uint8_t>>(out);
    }
    if (m.hdr.id == KVMI_SET_PAGE_ACCESS) {
      kvmi::SetPageAccessRequest request;
      kvmi::DecodePayload(kvmi::ByteView(m.payload), &request);
      for (const kvmi::PageAccess& e : request.entries) {
        if (e.gpa == 0xbad000) {  // the v6 kernel reports the (last) failing entry's error
          kvmi::EncodeReply(m.hdr.id, m.hdr.seq, -KVM_EINVAL, {}, &out);
          return std::optional<std::vector<uint8_t>>(out);
        }
      }
    }
    if (m.hdr.id == KVMI_READ_PHYSICAL) {
      kvmi::ReadPhysicalRequest request;
      kvmi::DecodePayload(kvmi::ByteView(m.payload), &request);
      if (request.gpa == 0xbad000) {
        kvmi::EncodeReply(m.hdr.id, m.hdr.seq, -KVM_EINVAL, {}, &out);
        return std::optional<std::vector<uint8_t>>(out);
      }
    }
    return std::optional<std::vector<uint8_t>>(defaults->DefaultReply(m));
  };
}

std::ostream& operator<<(std::ostream& os, const Control& c) {
  return os << "{vcpu " << c.vcpu << ", " << c.what << (c.enable ? " on}" : " off}");
}

std::vector<Control> TakeControls(ScriptedHost* host, uint16_t id, size_t count) {
  std::vector<Control> out;
  while (out.size() < count) {
    auto m = host->WaitForId(id);
    if (!m) break;
    if (id == KVMI_CONTROL_EVENTS) {
      kvmi::ControlEventsRequest r;
      EXPECT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &r).ok());
      out.push_back({r.vcpu, r.event_id, r.enable});
    } else if (id == KVMI_CONTROL_CR) {
      kvmi::ControlCrRequest r;
      EXPECT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &r).ok());
      out.push_back({r.vcpu, r.cr, r.enable});
    } else if (id == KVMI_CONTROL_MSR) {
      kvmi::ControlMsrRequest r;
      EXPECT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &r).ok());
      out.push_back({r.vcpu, r.msr, r.enable});
    } else if (id == KVMI_CONTROL_VM_EVENTS) {
      kvmi::ControlVmEventsRequest r;
      EXPECT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &r).ok());
      out.push_back({0, r.event_id, r.enable});
    }
  }
  return out;
}

}  // namespace kvmid
