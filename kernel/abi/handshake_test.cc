// The QEMU <-> tool handshake of §9, both directions, and the bounds a tool must enforce on what
// an unauthenticated peer sends before anything else.
#include "kernel/abi/handshake.h"

#include <gtest/gtest.h>

#include <cstddef>
#include <cstring>
#include <string>

#include "kernel/abi/test_util.h"

namespace kvmi {
namespace {

using testing::Bytes;
using testing::Cat;
using testing::Hex;
using testing::Poke;

QemuHello SampleHello() {
  QemuHello hello;
  for (size_t i = 0; i < hello.uuid.size(); ++i) hello.uuid[i] = static_cast<uint8_t>(0xa0 + i);
  hello.start_time = 1565366447;
  hello.name = "guest-7.example";
  return hello;
}

Bytes Encode(const QemuHello& hello) {
  Bytes out;
  EncodeQemuHello(hello, &out);
  return out;
}

TEST(QemuHello, RoundTripWithTheAbiLayout) {
  QemuHello hello = SampleHello();
  Bytes bytes = Encode(hello);
  ASSERT_EQ(bytes.size(), 96u);

  kvmi_qemu2introspector wire{};
  wire.struct_size = 96;
  std::memcpy(wire.uuid, hello.uuid.data(), 16);
  wire.start_time = hello.start_time;
  std::memcpy(wire.name, hello.name.data(), hello.name.size());
  EXPECT_EQ(Hex(ByteView(bytes)), Hex(ByteView(Cat(wire))));

  QemuHello decoded;
  DecodeStatus status = DecodeQemuHello(ByteView(bytes), &decoded);
  ASSERT_TRUE(status.ok()) << status.ToString();
  EXPECT_EQ(decoded.struct_size, 96u);
  EXPECT_EQ(decoded.uuid, hello.uuid);
  EXPECT_EQ(decoded.start_time, hello.start_time);
  EXPECT_EQ(decoded.name, hello.name);
}

TEST(QemuHello, V6QemuSendsZerosAfterTheUuid) {
  kvmi_qemu2introspector wire{};
  wire.struct_size = 96;
  wire.uuid[15] = 1;
  QemuHello decoded;
  ASSERT_TRUE(DecodeQemuHello(ByteView(Cat(wire)), &decoded).ok());
  EXPECT_EQ(decoded.uuid[15], 1);
  EXPECT_EQ(decoded.start_time, 0);
  EXPECT_EQ(decoded.name, "");
}

TEST(QemuHello, PeekStructSizeBounds) {
  uint32_t size = 0;
  EXPECT_EQ(PeekQemuHelloSize(ByteView(Cat(uint32_t{31})), &size).error, CodecError::kBadValue);
  EXPECT_EQ(PeekQemuHelloSize(ByteView(Cat(uint32_t{0})), &size).error, CodecError::kBadValue);
  EXPECT_EQ(PeekQemuHelloSize(ByteView(Cat(uint32_t{65537})), &size).error, CodecError::kBadValue);
  EXPECT_EQ(PeekQemuHelloSize(ByteView(Cat(uint32_t{0xffffffff})), &size).error,
            CodecError::kBadValue);
  EXPECT_EQ(PeekQemuHelloSize(ByteView(Bytes{96, 0, 0}), &size).error, CodecError::kTruncated);
  for (uint32_t ok : {32u, 96u, 104u, 65536u}) {
    ASSERT_TRUE(PeekQemuHelloSize(ByteView(Cat(ok)), &size).ok()) << ok;
    EXPECT_EQ(size, ok);
  }
}

TEST(QemuHello, DecodeStructSizeBounds) {
  Bytes small = Encode(SampleHello());
  Poke<uint32_t>(&small, 0, 31);
  small.resize(31);
  QemuHello decoded;
  EXPECT_EQ(DecodeQemuHello(ByteView(small), &decoded).error, CodecError::kBadValue);

  Bytes huge = Encode(SampleHello());
  Poke<uint32_t>(&huge, 0, 65537);
  huge.resize(65537, 0);
  EXPECT_EQ(DecodeQemuHello(ByteView(huge), &decoded).error, CodecError::kBadValue);
}

TEST(QemuHello, ShortestAcceptedHelloLeavesTheRestZero) {
  // struct_size 32: struct_size, uuid, padding and start_time; no name.
  Bytes bytes = Encode(SampleHello());
  Poke<uint32_t>(&bytes, 0, 32);
  bytes.resize(32);
  QemuHello decoded;
  ASSERT_TRUE(DecodeQemuHello(ByteView(bytes), &decoded).ok());
  EXPECT_EQ(decoded.struct_size, 32u);
  EXPECT_EQ(decoded.uuid, SampleHello().uuid);
  EXPECT_EQ(decoded.start_time, SampleHello().start_time);
  EXPECT_EQ(decoded.name, "");
}

TEST(QemuHello, LongerHelloIsAcceptedAndTheTailIgnored) {
  // kvmi-v12 QEMU appends u64 max_gpa (104 bytes); a 64 KiB hello is the largest accepted.
  for (uint32_t size : {104u, 65536u}) {
    Bytes bytes = Encode(SampleHello());
    Poke<uint32_t>(&bytes, 0, size);
    bytes.resize(size, 0xee);
    QemuHello decoded;
    DecodeStatus status = DecodeQemuHello(ByteView(bytes), &decoded);
    ASSERT_TRUE(status.ok()) << size << ": " << status.ToString();
    EXPECT_EQ(decoded.name, SampleHello().name);
  }
}

TEST(QemuHello, FewerBytesThanStructSize) {
  Bytes bytes = Encode(SampleHello());
  bytes.resize(60);
  QemuHello decoded;
  EXPECT_EQ(DecodeQemuHello(ByteView(bytes), &decoded).error, CodecError::kTruncated);
  EXPECT_EQ(DecodeQemuHello(ByteView(Bytes{96, 0}), &decoded).error, CodecError::kTruncated);
}

TEST(QemuHello, NameStopsAtTheFirstNul) {
  Bytes bytes = Encode(SampleHello());
  std::memcpy(bytes.data() + offsetof(kvmi_qemu2introspector, name), "vm-1\0junk", 9);
  QemuHello decoded;
  ASSERT_TRUE(DecodeQemuHello(ByteView(bytes), &decoded).ok());
  EXPECT_EQ(decoded.name, "vm-1");
}

TEST(QemuHello, NameWithoutNulIsCutAt64) {
  Bytes bytes = Encode(SampleHello());
  std::memset(bytes.data() + offsetof(kvmi_qemu2introspector, name), 'x', 64);
  QemuHello decoded;
  ASSERT_TRUE(DecodeQemuHello(ByteView(bytes), &decoded).ok());
  EXPECT_EQ(decoded.name, std::string(64, 'x'));
}

TEST(QemuHello, NonPrintableNameIsRejected) {
  for (char bad : {'\x01', '\n', '\x1b', '\x7f', '\xc3'}) {
    Bytes bytes = Encode(SampleHello());
    bytes[offsetof(kvmi_qemu2introspector, name) + 3] = static_cast<uint8_t>(bad);
    QemuHello decoded;
    EXPECT_EQ(DecodeQemuHello(ByteView(bytes), &decoded).error, CodecError::kBadValue)
        << int{static_cast<uint8_t>(bad)};
  }
}

TEST(IntrospectorHello, RoundTripWithTheAbiLayout) {
  IntrospectorHello hello;
  for (size_t i = 0; i < hello.cookie_hash.size(); ++i) hello.cookie_hash[i] = uint8_t(i + 1);
  Bytes bytes;
  EncodeIntrospectorHello(hello, &bytes);
  kvmi_introspector2qemu wire{};
  wire.struct_size = 24;
  std::memcpy(wire.cookie_hash, hello.cookie_hash.data(), 20);
  EXPECT_EQ(Hex(ByteView(bytes)), Hex(ByteView(Cat(wire))));

  IntrospectorHello decoded;
  ASSERT_TRUE(DecodeIntrospectorHello(ByteView(bytes), &decoded).ok());
  EXPECT_EQ(decoded.struct_size, 24u);
  EXPECT_EQ(decoded.cookie_hash, hello.cookie_hash);
}

TEST(IntrospectorHello, Rejections) {
  IntrospectorHello decoded;
  Bytes bytes;
  EncodeIntrospectorHello(IntrospectorHello{}, &bytes);
  Bytes truncated(bytes.begin(), bytes.end() - 1);
  EXPECT_EQ(DecodeIntrospectorHello(ByteView(truncated), &decoded).error, CodecError::kTruncated);
  Bytes longer = bytes;
  longer.push_back(0);
  EXPECT_EQ(DecodeIntrospectorHello(ByteView(longer), &decoded).error, CodecError::kTrailingBytes);
  Bytes small = bytes;
  Poke<uint32_t>(&small, 0, 23);
  EXPECT_EQ(DecodeIntrospectorHello(ByteView(small), &decoded).error, CodecError::kBadValue);
}

TEST(CookieHash, IsSha1OfTheSecret) {
  // FIPS 180-1 test vector.
  auto hash = CookieHash(ByteView(std::string_view("abc")));
  EXPECT_EQ(Hex(ByteView(hash.data(), hash.size())),
            "A9 99 3E 36 47 06 81 6A BA 3E 25 71 78 50 C2 6C 9C D0 D8 9D");
}

TEST(Uuid, FormatAndParse) {
  Uuid uuid{};
  for (size_t i = 0; i < uuid.size(); ++i) uuid[i] = static_cast<uint8_t>(0x10 * i + 0xf);
  std::string text = UuidToString(uuid);
  EXPECT_EQ(text, "0f1f2f3f-4f5f-6f7f-8f9f-afbfcfdfefff");
  Uuid parsed{};
  ASSERT_TRUE(ParseUuid(text, &parsed));
  EXPECT_EQ(parsed, uuid);
  ASSERT_TRUE(ParseUuid("0F1F2F3F-4F5F-6F7F-8F9F-AFBFCFDFEFFF", &parsed));
  EXPECT_EQ(parsed, uuid);
}

TEST(Uuid, MalformedTextIsRejected) {
  Uuid parsed{};
  for (const char* bad :
       {"", "0f1f2f3f-4f5f-6f7f-8f9f-afbfcfdfeff", "0f1f2f3f-4f5f-6f7f-8f9f-afbfcfdfefff0",
        "0f1f2f3f4f5f-6f7f-8f9f-afbfcfdfefff-", "0f1f2f3f-4f5f-6f7f-8f9f-afbfcfdfefgf",
        "{0f1f2f3f-4f5f-6f7f-8f9f-afbfcfdfef}"}) {
    EXPECT_FALSE(ParseUuid(bad, &parsed)) << bad;
  }
}

}  // namespace
}  // namespace kvmi
