// libFuzzer target for what an unauthenticated peer sends first: the QEMU hello (struct_size
// peek, then the hello itself), the introspector hello QEMU reads back, and UUID text from the
// API. Anything accepted must re-encode to an equal value.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernel/abi/handshake.h"

namespace {

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "handshake_fuzzer: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvmi;
  ByteView input(data, size);

  uint32_t struct_size = 0;
  if (PeekQemuHelloSize(input.subview(0, 4), &struct_size).ok()) {
    if (struct_size < kQemuHelloMinSize || struct_size > kQemuHelloMaxSize) {
      Fail("peek accepted an out-of-bounds struct_size");
    }
  }
  QemuHello hello;
  if (DecodeQemuHello(input, &hello).ok()) {
    if (hello.name.size() > 64) Fail("name longer than its field");
    std::vector<uint8_t> encoded;
    EncodeQemuHello(hello, &encoded);
    if (encoded.size() != kQemuHelloSize) Fail("hello does not encode to 96 bytes");
    // Encoding is always 96 bytes; a peer that claimed struct_size <= 96 sends only that many.
    // The encoder keeps a NUL, so a 64-byte name comes back as 63.
    if (hello.struct_size <= kQemuHelloSize) {
      QemuHello again;
      if (!DecodeQemuHello(ByteView(encoded).subview(0, hello.struct_size), &again).ok()) {
        Fail("re-encoded hello rejected");
      }
      if (again.uuid != hello.uuid || again.name != hello.name.substr(0, 63) ||
          again.start_time != hello.start_time) {
        Fail("hello does not round-trip");
      }
    }
  }

  IntrospectorHello reply;
  if (DecodeIntrospectorHello(input, &reply).ok()) {
    std::vector<uint8_t> encoded;
    EncodeIntrospectorHello(reply, &encoded);
    if (encoded.size() != size || std::memcmp(encoded.data(), data, size) != 0) {
      Fail("introspector hello does not re-encode to itself");
    }
  }

  std::string text(reinterpret_cast<const char*>(data), size);
  Uuid uuid{};
  if (ParseUuid(text, &uuid)) {
    Uuid again{};
    if (!ParseUuid(UuidToString(uuid), &again) || again != uuid) Fail("uuid does not round-trip");
  }
  return 0;
}
