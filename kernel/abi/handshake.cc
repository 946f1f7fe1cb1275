#include "kernel/abi/handshake.h"

#include <openssl/sha.h>

#include <cstdio>
#include <cstring>

namespace kvmi {
namespace {
using S = DecodeStatus;
}  // namespace

void EncodeQemuHello(const QemuHello& hello, std::vector<uint8_t>* out) {
  kvmi_qemu2introspector wire{};
  wire.struct_size = hello.struct_size;
  std::memcpy(wire.uuid, hello.uuid.data(), sizeof(wire.uuid));
  wire.start_time = hello.start_time;
  // Always NUL-terminated: at most 63 name bytes go on the wire.
  std::strncpy(wire.name, hello.name.c_str(), sizeof(wire.name) - 1);
  ByteWriter(out).Write(wire);
}

DecodeStatus PeekQemuHelloSize(ByteView first4, uint32_t* struct_size) {
  ByteReader in(first4);
  uint32_t size;
  if (!in.Read(&size)) return S::Fail(CodecError::kTruncated, "kvmi_qemu2introspector.struct_size");
  if (size < kQemuHelloMinSize || size > kQemuHelloMaxSize) {
    return S::Fail(CodecError::kBadValue, "kvmi_qemu2introspector.struct_size");
  }
  *struct_size = size;
  return S::Ok();
}

DecodeStatus DecodeQemuHello(ByteView bytes, QemuHello* hello) {
  uint32_t struct_size;
  S s = PeekQemuHelloSize(bytes, &struct_size);
  if (!s.ok()) return s;
  if (bytes.size() < struct_size) {
    return S::Fail(CodecError::kTruncated, "kvmi_qemu2introspector");
  }
  if (bytes.size() > struct_size) {
    return S::Fail(CodecError::kTrailingBytes, "kvmi_qemu2introspector");
  }
  // A shorter (older) structure leaves the fields it lacks zero; a longer (newer, e.g.
  // kvmi-v12's max_gpa) one has its extra bytes ignored.
  kvmi_qemu2introspector wire{};
  std::memcpy(&wire, bytes.data(), struct_size < sizeof(wire) ? struct_size : sizeof(wire));
  if (wire.padding != 0)
    return S::Fail(CodecError::kNonZeroPadding, "kvmi_qemu2introspector.padding");
  size_t name_len = strnlen(wire.name, sizeof(wire.name));
  for (size_t i = 0; i < name_len; ++i) {
    unsigned char c = static_cast<unsigned char>(wire.name[i]);
    // The name ends up in log lines and API responses: printable ASCII only.
    if (c < 0x20 || c > 0x7e) return S::Fail(CodecError::kBadValue, "kvmi_qemu2introspector.name");
  }
  hello->struct_size = struct_size;
  std::memcpy(hello->uuid.data(), wire.uuid, sizeof(wire.uuid));
  hello->start_time = wire.start_time;
  hello->name.assign(wire.name, name_len);
  return S::Ok();
}

void EncodeIntrospectorHello(const IntrospectorHello& hello, std::vector<uint8_t>* out) {
  kvmi_introspector2qemu wire{};
  wire.struct_size = hello.struct_size;
  std::memcpy(wire.cookie_hash, hello.cookie_hash.data(), sizeof(wire.cookie_hash));
  ByteWriter(out).Write(wire);
}

DecodeStatus DecodeIntrospectorHello(ByteView bytes, IntrospectorHello* hello) {
  ByteReader in(bytes);
  kvmi_introspector2qemu wire;
  if (!in.Read(&wire)) return S::Fail(CodecError::kTruncated, "kvmi_introspector2qemu");
  if (in.remaining() != 0) return S::Fail(CodecError::kTrailingBytes, "kvmi_introspector2qemu");
  if (wire.struct_size < kIntrospectorHelloSize) {
    return S::Fail(CodecError::kBadValue, "kvmi_introspector2qemu.struct_size");
  }
  hello->struct_size = wire.struct_size;
  std::memcpy(hello->cookie_hash.data(), wire.cookie_hash, sizeof(wire.cookie_hash));
  return S::Ok();
}

std::array<uint8_t, kCookieHashSize> CookieHash(ByteView secret) {
  static_assert(kCookieHashSize == SHA_DIGEST_LENGTH, "cookie_hash is a SHA-1 digest");
  std::array<uint8_t, kCookieHashSize> digest{};
  SHA1(secret.data(), secret.size(), digest.data());
  return digest;
}

std::string UuidToString(const Uuid& uuid) {
  // By hand, not snprintf: this runs for every event a stream or a handler receives.
  static constexpr char kHex[] = "0123456789abcdef";
  std::string text(36, '-');
  size_t at = 0;
  for (size_t i = 0; i < uuid.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) ++at;  // the dashes of 8-4-4-4-12
    text[at++] = kHex[uuid[i] >> 4];
    text[at++] = kHex[uuid[i] & 0xf];
  }
  return text;
}

bool ParseUuid(const std::string& text, Uuid* uuid) {
  if (text.size() != 36) return false;
  size_t byte = 0;
  for (size_t i = 0; i < text.size();) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (text[i] != '-') return false;
      ++i;
      continue;
    }
    auto nibble = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    int hi = nibble(text[i]);
    int lo = i + 1 < text.size() ? nibble(text[i + 1]) : -1;
    if (hi < 0 || lo < 0 || byte >= uuid->size()) return false;
    (*uuid)[byte++] = static_cast<uint8_t>(hi << 4 | lo);
    i += 2;
  }
  return byte == uuid->size();
}

}  // namespace kvmi
