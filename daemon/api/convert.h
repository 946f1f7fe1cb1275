// Conversions between kvmi.v1 messages and kvmid's internal types, and the ONE place where an
// internal outcome (CommandResult, absl::Status) becomes a grpc::Status. Nothing here talks to a
// guest or keeps state.
#ifndef KVMID_DAEMON_API_CONVERT_H_
#define KVMID_DAEMON_API_CONVERT_H_

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <google/protobuf/field_mask.pb.h>
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <map>
#include <string>

#include "daemon/kvmid.h"
#include "proto/kvmi/v1/introspection.pb.h"

namespace kvmid {

kvmi::v1::VM ToProto(const GuestSnapshot& snapshot,
                     const std::map<std::string, std::string>& labels);
// The Event fields a stream builds: a FieldMask compiled once per stream (bit n: the field
// numbered n), so that the conversion of each event only tests bits.
class EventFields {
 public:
  // Every field.
  EventFields() = default;
  bool Has(int field_number) const { return (bits_ >> field_number) & 1; }
  bool all() const { return bits_ == ~uint64_t{0}; }
  // These fields and `field_number` (< 64) too, or without it.
  EventFields With(int field_number) const {
    EventFields out = *this;
    out.bits_ |= uint64_t{1} << field_number;
    return out;
  }
  EventFields Without(int field_number) const {
    EventFields out = *this;
    out.bits_ &= ~(uint64_t{1} << field_number);
    return out;
  }

 private:
  friend absl::StatusOr<EventFields> CompileEventMask(const google::protobuf::FieldMask& mask,
                                                      const std::string& field);
  uint64_t bits_ = ~uint64_t{0};
};
// `mask` (paths: top-level Event field names, or "detail" for the detail oneof) compiled; no path:
// every field. Event.id is always in. INVALID_ARGUMENT "<field>: '<path>' ..." for a path that
// is not a top-level Event field.
absl::StatusOr<EventFields> CompileEventMask(const google::protobuf::FieldMask& mask,
                                             const std::string& field);

// An event as the API shows it: with the guest's UUID, name and labels (its cached view), the
// node, the time; only the fields in `fields` are built.
kvmi::v1::Event ToProto(const ObservedEvent& observed, bool include_registers,
                        const EventFields& fields = EventFields());
kvmi::v1::Lease ToProto(const OwnerId& owner, const Arming& arming);
kvmi::v1::VcpuLease ToProto(uint16_t vcpu, const VcpuArming& arming);
// The register block of an event or a GET_REGISTERS reply.
kvmi::v1::Registers RegistersToProto(const kvm_regs& regs, const kvm_sregs& sregs);
// The general registers of a Registers message (control-register fields are not settable).
kvm_regs RegistersFromProto(const kvmi::v1::Registers& registers);
// A client's verdict for `event`, checked against what the event accepts; INVALID_ARGUMENT
// naming the field otherwise.
absl::Status FromProto(const kvmi::v1::Verdict& in, const kvmi::Event& event, Verdict* out);

// Event context (issue 15): a ContextRequest as a demand, each field at most
// vmem::kMaxContextBytes (else INVALID_ARGUMENT naming `field`.rip_bytes and the limit).
grpc::Status ContextDemandFromProto(const kvmi::v1::ContextRequest& request,
                                    const std::string& field, vmem::ContextDemand* out);
// The blocks read with an event, one field per kind.
void ContextToProto(const vmem::CapturedContext& context, kvmi::v1::EventContext* out);

// INVALID_ARGUMENT "<field>: <why>".
grpc::Status InvalidArgument(const std::string& field, const std::string& why);
// The status of a call whose client went away (or whose deadline passed) while it waited.
grpc::Status Cancelled();
// A command result as a gRPC status; KVMI errors keep their name ("KVM_EPERM").
grpc::Status ToStatus(const CommandResult& result, const std::string& what);
// An internal status as a gRPC status (same code, same message).
grpc::Status ToStatus(const absl::Status& status);

}  // namespace kvmid

#endif  // KVMID_DAEMON_API_CONVERT_H_
