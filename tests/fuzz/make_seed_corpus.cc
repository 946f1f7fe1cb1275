// Writes the seed corpora of the fuzz targets from valid encodings (kernel/abi/test_util.h):
//   make_seed_corpus <decoder dir> <handshake dir>
// The output is checked in under tests/fuzz/corpus/; rerun after changing the codec's samples:
//   bazel run //tests/fuzz:make_seed_corpus -- $PWD/tests/fuzz/corpus/{decoder,handshake}
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "kernel/abi/handshake.h"
#include "kernel/abi/test_util.h"

namespace {

void Write(const std::string& dir, const std::string& name, const std::vector<uint8_t>& bytes) {
  std::string path = dir + "/" + name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <decoder corpus dir> <handshake corpus dir>\n", argv[0]);
    return 2;
  }
  using kvmi::testing::AllValidMessages;
  std::vector<kvmi::testing::NamedMessage> messages = AllValidMessages();
  std::vector<uint8_t> all_kernel_bound = {0x00 | (63 << 1)};  // kernel-side limit, 64-byte reads
  std::vector<uint8_t> all_tool_bound = {0x01 | (63 << 1)};
  for (const auto& m : messages) {
    // Option byte: requests and event replies go to the kernel (4088 limit), the rest to the tool;
    // whole-message reads.
    bool to_kernel = m.name.rfind("request_", 0) == 0 || m.name.rfind("event_reply_", 0) == 0;
    std::vector<uint8_t> input = {static_cast<uint8_t>((to_kernel ? 0 : 1) | (127 << 1))};
    input.insert(input.end(), m.wire.begin(), m.wire.end());
    Write(argv[1], m.name, input);
    auto& stream = to_kernel ? all_kernel_bound : all_tool_bound;
    stream.insert(stream.end(), m.wire.begin(), m.wire.end());
  }
  // Whole conversations in one input, cut into 64-byte reads: many messages per read and
  // messages split across reads.
  Write(argv[1], "stream_to_kernel", all_kernel_bound);
  Write(argv[1], "stream_to_tool", all_tool_bound);

  kvmi::QemuHello hello;
  hello.uuid = {0x5a, 0x1c, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42};
  hello.start_time = 1565366447;
  hello.name = "guest-1";
  std::vector<uint8_t> bytes;
  kvmi::EncodeQemuHello(hello, &bytes);
  Write(argv[2], "qemu_hello_v7", bytes);
  kvmi::QemuHello v6;  // kvmi-v6 QEMU: uuid only
  v6.uuid = hello.uuid;
  bytes.clear();
  kvmi::EncodeQemuHello(v6, &bytes);
  Write(argv[2], "qemu_hello_v6", bytes);
  kvmi::IntrospectorHello reply;
  reply.cookie_hash = kvmi::CookieHash(kvmi::ByteView(std::string_view("secret")));
  bytes.clear();
  kvmi::EncodeIntrospectorHello(reply, &bytes);
  Write(argv[2], "introspector_hello", bytes);
  std::string uuid = kvmi::UuidToString(hello.uuid);
  Write(argv[2], "uuid_text", std::vector<uint8_t>(uuid.begin(), uuid.end()));
  std::printf("wrote %zu decoder seeds and 4 handshake seeds\n", messages.size() + 2);
  return 0;
}
