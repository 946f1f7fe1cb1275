// Helpers shared by the codec's tests and fuzz drivers: byte builders that take the uapi structs
// (whose layouts kvmi_layout_check.h pins to the ABI) as the independent oracle for wire bytes,
// and sample values with every field set to something distinctive.
#ifndef KVMID_KERNEL_ABI_TEST_UTIL_H_
#define KVMID_KERNEL_ABI_TEST_UTIL_H_

#include <cstdint>
#include <cstring>
#include <ostream>
#include <string>
#include <type_traits>
#include <vector>

#include "kernel/abi/bytes.h"
#include "kernel/abi/events.h"
#include "kernel/abi/status.h"
#include "kernel/uapi/kvmi.h"

namespace kvmi {

// gtest prints a failed EXPECT on DecodeStatus as "truncated: kvmi_event_pf", not raw bytes.
inline void PrintTo(const DecodeStatus& status, std::ostream* os) { *os << status.ToString(); }
inline void PrintTo(CodecError error, std::ostream* os) { *os << CodecErrorName(error); }

namespace testing {

using Bytes = std::vector<uint8_t>;

inline void AppendTo(Bytes* out, const Bytes& bytes) {
  out->insert(out->end(), bytes.begin(), bytes.end());
}
template <typename T>
void AppendTo(Bytes* out, const T& value) {
  static_assert(std::is_trivially_copyable_v<T>, "only wire structs can be concatenated");
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  out->insert(out->end(), p, p + sizeof(T));
}

// The raw bytes of each argument, in order: Cat(kvmi_vcpu_hdr{3, 0, 0}, kvmi_control_cr{...}).
template <typename... Parts>
Bytes Cat(const Parts&... parts) {
  Bytes out;
  (AppendTo(&out, parts), ...);
  return out;
}

// "02 00 10 00": failures show bytes the way §12 of the ABI writes them.
std::string Hex(ByteView bytes);
// Parses "02 00 10 00 | 01 ..." (spaces and '|' ignored); aborts the test binary on bad input.
Bytes FromHex(const std::string& text);

kvmi_msg_hdr HeaderOf(const Bytes& message);
ByteView PayloadOf(const Bytes& message);
// A message with a hand-made header (hdr.size is whatever the caller says, to lie on purpose).
Bytes Message(uint16_t id, uint16_t size, uint32_t seq, const Bytes& payload);
// Writes `value` over bytes [offset, offset + sizeof(T)) of *bytes (to corrupt one field).
template <typename T>
void Poke(Bytes* bytes, size_t offset, T value) {
  std::memcpy(bytes->data() + offset, &value, sizeof(T));
}

// Register state in which every field has a different non-zero value.
kvm_regs SampleRegs();
kvm_sregs SampleSregs();
// A valid event of the given id (0..11) on `vcpu`, every field distinctive (UNHOOK: vcpu 0 and
// arch all zero, as the ABI says).
Event SampleEvent(uint8_t id, uint16_t vcpu, uint32_t seq);
// A valid full-size reply to SampleEvent(id, ...) (id must have a reply).
EventReply SampleEventReply(const Event& event, uint8_t action);

// One valid wire encoding of every message type the codec knows, named for corpus files:
// every request, every reply (data and error), every event, every event reply.
struct NamedMessage {
  std::string name;
  Bytes wire;  // header + payload
};
std::vector<NamedMessage> AllValidMessages();

}  // namespace testing
}  // namespace kvmi

#endif  // KVMID_KERNEL_ABI_TEST_UTIL_H_
