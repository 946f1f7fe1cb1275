// The QEMU <-> tool handshake of the KVM-VMI/qemu kvmi-v6 branch (§9): QEMU connects and sends
// a 96-byte kvmi_qemu2introspector, the tool answers with a 24-byte kvmi_introspector2qemu.
#ifndef KVMID_KERNEL_ABI_HANDSHAKE_H_
#define KVMID_KERNEL_ABI_HANDSHAKE_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "kernel/abi/bytes.h"
#include "kernel/abi/status.h"
#include "kernel/uapi/kvmi.h"

namespace kvmi {

inline constexpr size_t kQemuHelloSize = sizeof(kvmi_qemu2introspector);          // 96
inline constexpr size_t kIntrospectorHelloSize = sizeof(kvmi_introspector2qemu);  // 24
// What a tool accepts as struct_size (libkvmi's bounds): at least up to the uuid, at most 64 KiB;
// bytes past the 96 this code knows are read and discarded.
inline constexpr size_t kQemuHelloMinSize = 32;
inline constexpr size_t kQemuHelloMaxSize = 64 * 1024;
inline constexpr size_t kCookieHashSize = 20;

using Uuid = std::array<uint8_t, 16>;

struct QemuHello {
  uint32_t struct_size = kQemuHelloSize;
  Uuid uuid{};
  int64_t start_time = 0;  // seconds since the epoch; 0 when QEMU does not say (kvmi-v6)
  std::string name;        // up to 63 bytes; bytes from the first NUL on are dropped
};

// Always 96 bytes, struct_size as given (tests may lie on purpose).
void EncodeQemuHello(const QemuHello& hello, std::vector<uint8_t>* out);
// Reads the first struct_size bytes QEMU sent (caller reads struct_size first with
// PeekQemuHelloSize, then exactly that many bytes). Fields beyond struct_size stay zero.
// Rejects struct_size outside [32, 64 KiB], a name with no NUL in 64 bytes is cut at 64,
// non-printable name bytes are rejected (kBadValue: the name goes into logs and APIs).
DecodeStatus DecodeQemuHello(ByteView bytes, QemuHello* hello);
// Reads struct_size from the first 4 bytes and checks its bounds.
DecodeStatus PeekQemuHelloSize(ByteView first4, uint32_t* struct_size);

struct IntrospectorHello {
  uint32_t struct_size = kIntrospectorHelloSize;
  std::array<uint8_t, kCookieHashSize> cookie_hash{};
};

void EncodeIntrospectorHello(const IntrospectorHello& hello, std::vector<uint8_t>* out);
// QEMU side: exactly 24 bytes; struct_size must be >= 24 (kvmi-v7 QEMU's check).
DecodeStatus DecodeIntrospectorHello(ByteView bytes, IntrospectorHello* hello);

// SHA-1 of the shared secret, as kvmi-v7 QEMU checks it.
std::array<uint8_t, kCookieHashSize> CookieHash(ByteView secret);

std::string UuidToString(const Uuid& uuid);           // 8-4-4-4-12 lower-case hex
bool ParseUuid(const std::string& text, Uuid* uuid);  // same format; false if malformed

}  // namespace kvmi

#endif  // KVMID_KERNEL_ABI_HANDSHAKE_H_
