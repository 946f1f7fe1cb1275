// TranslateAddress end to end: the real daemon and API server, simulated guests with real page
// tables in every paging mode (kernel/sim page_tables), over real sockets. Thousands of random
// addresses per mode must translate as the guests' own page-table builder says, through a vCPU's
// registers and through explicit address spaces, cached and uncached; a process switch changes
// the answer; kvmid's own WritePhysical to a page table drops what the cache knew.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <future>
#include <random>

#include "daemon/api/server.h"
#include "daemon/kvmid.h"
#include "daemon/testing/wait.h"
#include "kernel/sim/fleet.h"
#include "proto/kvmi/v1/introspection.grpc.pb.h"

namespace kvmid {
namespace {

namespace sim = ::kvmi::sim;
using testing::WaitUntil;

kvmi::v1::PagingMode ProtoMode(sim::PagingMode mode) {
  switch (mode) {
    case sim::PagingMode::k32Bit:
      return kvmi::v1::PAGING_MODE_32BIT;
    case sim::PagingMode::kPae:
      return kvmi::v1::PAGING_MODE_PAE;
    case sim::PagingMode::k4Level:
      return kvmi::v1::PAGING_MODE_4LEVEL;
    case sim::PagingMode::k5Level:
      return kvmi::v1::PAGING_MODE_5LEVEL;
  }
  return kvmi::v1::PAGING_MODE_UNSPECIFIED;
}

class TranslateE2eTest : public ::testing::TestWithParam<sim::PagingMode> {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/kvmid-vmem-XXXXXX";
    dir_ = mkdtemp(dir_template);
    DaemonConfig config;
    config.unix_socket = dir_ + "/kvmi.sock";
    daemon_ = std::make_unique<Daemon>(config);
    ASSERT_TRUE(daemon_->Start().ok());
    api_ = std::make_unique<ApiServer>(daemon_.get(), /*history=*/4);
    security::ApiListenOptions listen;
    listen.unix_socket = dir_ + "/api.sock";
    ASSERT_TRUE(api_->Start(listen).ok());
    stub_ = kvmi::v1::Introspection::NewStub(
        grpc::CreateChannel("unix:" + dir_ + "/api.sock", grpc::InsecureChannelCredentials()));

    sim::FleetConfig fleet;
    fleet.vms = 1;
    fleet.guest.vcpus = 2;
    fleet.guest.memory_bytes = 64ull << 20;
    fleet.guest.paging = sim::PagingConfig{GetParam(), 4};
    fleet.connector.endpoint.family = kvmi::Endpoint::Family::kUnix;
    fleet.connector.endpoint.path = config.unix_socket;
    fleet.connector.reconnect_seconds = 0.2;
    fleet.name_prefix = "vmem-";
    fleet_ = std::make_unique<sim::Fleet>(fleet);
    fleet_->Start();
    ASSERT_TRUE(WaitUntil([&] {
      auto g = daemon_->registry().Lookup("vmem-0000");
      return g && g->state() == GuestState::kHooked;
    }));
  }
  void TearDown() override {
    if (fleet_) fleet_->Stop();
    api_.reset();
    daemon_.reset();
    ::unlink((dir_ + "/kvmi.sock").c_str());
    ::unlink((dir_ + "/api.sock").c_str());
    ::rmdir(dir_.c_str());
  }

  sim::SimGuest& guest() { return fleet_->vm(0).guest(); }
  const sim::PageTableBuilder& tables() { return *guest().page_tables(); }

  grpc::Status Translate(const kvmi::v1::TranslateAddressRequest& request,
                         kvmi::v1::TranslateAddressResponse* response) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return stub_->TranslateAddress(&ctx, request, response);
  }
  kvmi::v1::TranslateAddressRequest ByVcpu(uint32_t vcpu, uint64_t gva, bool no_cache = false) {
    kvmi::v1::TranslateAddressRequest r;
    r.set_vm("vmem-0000");
    r.set_vcpu(vcpu);
    r.set_gva(gva);
    r.set_no_cache(no_cache);
    return r;
  }
  kvmi::v1::TranslateAddressRequest BySpace(uint64_t cr3, uint64_t gva) {
    kvmi::v1::TranslateAddressRequest r;
    r.set_vm("vmem-0000");
    r.mutable_address_space()->set_cr3(cr3);
    r.mutable_address_space()->set_mode(ProtoMode(GetParam()));
    r.mutable_address_space()->set_nxe(GetParam() != sim::PagingMode::k32Bit);
    r.mutable_address_space()->set_pse(GetParam() == sim::PagingMode::k32Bit);
    r.set_gva(gva);
    return r;
  }
  uint64_t RandomAddress(uint64_t cr3, std::mt19937_64& rng, int i) {
    uint64_t gva = (i % 4 == 0) ? rng() : tables().MappedAddress(cr3, rng());
    switch (GetParam()) {
      case sim::PagingMode::k32Bit:
      case sim::PagingMode::kPae:
        return gva & 0xffffffffull;
      case sim::PagingMode::k4Level:
        return static_cast<uint64_t>(static_cast<int64_t>(gva << 16) >> 16);
      case sim::PagingMode::k5Level:
        return static_cast<uint64_t>(static_cast<int64_t>(gva << 7) >> 7);
    }
    return gva;
  }
  void ExpectOracle(uint64_t cr3, uint64_t gva, const kvmi::v1::TranslateAddressResponse& got) {
    sim::ExpectedTranslation want = tables().Expect(cr3, gva);
    ASSERT_EQ(got.present(), want.present) << std::hex << "gva 0x" << gva << " cr3 0x" << cr3;
    if (!want.present) return;
    EXPECT_EQ(got.gpa(), want.gpa) << std::hex << "gva 0x" << gva;
    EXPECT_EQ(got.page_size(), want.page_size) << std::hex << "gva 0x" << gva;
    EXPECT_EQ(got.writable(), want.writable) << std::hex << "gva 0x" << gva;
    EXPECT_EQ(got.user(), want.user) << std::hex << "gva 0x" << gva;
    EXPECT_EQ(got.executable(), want.executable) << std::hex << "gva 0x" << gva;
  }
  kvmi::sim::OpResult Run(uint16_t vcpu, const kvmi::sim::Op& op) {
    auto future = fleet_->vm(0).Execute(vcpu, op);
    if (future.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
      ADD_FAILURE() << "guest operation did not complete";
      return {};
    }
    return future.get();
  }

  std::string dir_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<ApiServer> api_;
  std::unique_ptr<kvmi::v1::Introspection::Stub> stub_;
  std::unique_ptr<sim::Fleet> fleet_;
};

TEST_P(TranslateE2eTest, RandomAddressesMatchTheGuestsOwnPageTables) {
  std::mt19937_64 rng(5);
  int present = 0;
  // Explicit address spaces: every process.
  for (uint64_t cr3 : guest().process_roots()) {
    for (int i = 0; i < 300; ++i) {
      uint64_t gva = RandomAddress(cr3, rng, i);
      kvmi::v1::TranslateAddressResponse got;
      grpc::Status s = Translate(BySpace(cr3, gva), &got);
      ASSERT_TRUE(s.ok()) << s.error_message();
      ExpectOracle(cr3, gva, got);
      present += got.present();
    }
  }
  // Through each vCPU's own registers (vCPU i runs process i).
  for (uint32_t vcpu = 0; vcpu < 2; ++vcpu) {
    uint64_t cr3 = guest().Snapshot(vcpu).sregs.cr3;
    for (int i = 0; i < 300; ++i) {
      uint64_t gva = RandomAddress(cr3, rng, i);
      kvmi::v1::TranslateAddressResponse got;
      grpc::Status s = Translate(ByVcpu(vcpu, gva), &got);
      ASSERT_TRUE(s.ok()) << s.error_message();
      EXPECT_EQ(got.cr3(), cr3);
      EXPECT_EQ(got.mode(), ProtoMode(GetParam()));
      ExpectOracle(cr3, gva, got);
      present += got.present();
    }
  }
  EXPECT_GT(present, 1000);
}

TEST_P(TranslateE2eTest, CachedAndUncachedAnswersAgree) {
  std::mt19937_64 rng(11);
  uint64_t cr3 = guest().Snapshot(1).sregs.cr3;
  int cached = 0;
  for (int i = 0; i < 200; ++i) {
    uint64_t gva = tables().MappedAddress(cr3, rng());
    kvmi::v1::TranslateAddressResponse first, second, uncached;
    ASSERT_TRUE(Translate(ByVcpu(1, gva), &first).ok());
    ASSERT_TRUE(Translate(ByVcpu(1, gva), &second).ok());
    ASSERT_TRUE(Translate(ByVcpu(1, gva, /*no_cache=*/true), &uncached).ok());
    EXPECT_FALSE(uncached.cached());
    cached += second.cached();
    for (const auto* r : {&second, &uncached}) {
      EXPECT_EQ(r->present(), first.present());
      EXPECT_EQ(r->gpa(), first.gpa());
      EXPECT_EQ(r->page_size(), first.page_size());
      EXPECT_EQ(r->writable(), first.writable());
      EXPECT_EQ(r->executable(), first.executable());
    }
    ExpectOracle(cr3, gva, uncached);
  }
  EXPECT_GT(cached, 100);  // present answers are cached (within the time to live)
}

TEST_P(TranslateE2eTest, AProcessSwitchChangesTheAnswer) {
  const auto& roots = guest().process_roots();
  kvmi::v1::TranslateAddressResponse before, after;
  ASSERT_TRUE(Translate(ByVcpu(0, sim::kUserCodeGva + 0x10), &before).ok());
  ExpectOracle(roots[0], sim::kUserCodeGva + 0x10, before);
  kvmi::sim::Op op;
  op.kind = kvmi::sim::OpKind::kWriteCr3;
  op.value = roots[2];
  op.explicit_value = true;
  ASSERT_TRUE(Run(0, op).executed);
  ASSERT_TRUE(Translate(ByVcpu(0, sim::kUserCodeGva + 0x10), &after).ok());
  EXPECT_EQ(after.cr3(), roots[2]);
  ExpectOracle(roots[2], sim::kUserCodeGva + 0x10, after);
  EXPECT_NE(after.gpa(), before.gpa());
}

TEST_P(TranslateE2eTest, KvmidsOwnWriteToAPageTableDropsTheCachedAnswer) {
  uint64_t cr3 = guest().Snapshot(0).sregs.cr3;
  const uint64_t gva = sim::kUserDataGva + 0x2000;
  kvmi::v1::TranslateAddressResponse first;
  ASSERT_TRUE(Translate(ByVcpu(0, gva), &first).ok());
  ASSERT_TRUE(first.present());
  ASSERT_FALSE(first.entry_addresses().empty());
  const uint64_t pte = first.entry_addresses(first.entry_addresses_size() - 1);
  // Point the leaf somewhere else through the API: the next answer is a fresh walk.
  uint64_t entry = first.entry();
  uint64_t moved = (entry & ~0xfffff000ull) | 0x3000000ull;  // frame 48 MiB, same flags
  kvmi::v1::WritePhysicalRequest write;
  write.set_vm("vmem-0000");
  write.set_gpa(pte);
  unsigned bytes = GetParam() == sim::PagingMode::k32Bit ? 4 : 8;
  write.set_data(std::string(reinterpret_cast<const char*>(&moved), bytes));
  kvmi::v1::WritePhysicalResponse written;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub_->WritePhysical(&ctx, write, &written).ok());
  kvmi::v1::TranslateAddressResponse second;
  ASSERT_TRUE(Translate(ByVcpu(0, gva), &second).ok());
  EXPECT_FALSE(second.cached());
  EXPECT_EQ(second.gpa(), 0x3000000ull + (gva & 0xfff));
  (void)cr3;
}

TEST_P(TranslateE2eTest, ReadVirtualAcrossANotPresentPageReportsExactlyThatPage) {
  const bool wide =
      GetParam() == sim::PagingMode::k4Level || GetParam() == sim::PagingMode::k5Level;
  const uint64_t stack = wide ? 0x7ffffffde000ull : 0xbffdc000ull;  // sim_guest.cc's layout
  uint64_t cr3 = guest().Snapshot(0).sregs.cr3;
  ASSERT_FALSE(tables().Expect(cr3, stack - 0x1000).present);  // the swapped-out page
  // Known bytes in the two stack pages, written where the oracle says they are.
  std::string pattern(0x2000, 0);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<char>(i * 7 + 3);
  for (uint64_t off = 0; off < 0x2000; off += 0x1000) {
    sim::ExpectedTranslation page = tables().Expect(cr3, stack + off);
    ASSERT_TRUE(page.present);
    ASSERT_TRUE(guest().WritePhysical(page.gpa, pattern.data() + off, 0x1000));
  }
  kvmi::v1::ReadVirtualRequest request;
  request.set_vm("vmem-0000");
  request.set_vcpu(0);
  request.set_gva(stack - 0x800);
  request.set_size(0x2000);
  kvmi::v1::ReadVirtualResponse response;
  grpc::ClientContext ctx;
  grpc::Status s = stub_->ReadVirtual(&ctx, request, &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(response.data().size(), 0x2000u);
  ASSERT_EQ(response.pages_size(), 3);
  EXPECT_FALSE(response.complete());
  EXPECT_EQ(response.pages(0).gva(), stack - 0x800);
  EXPECT_EQ(response.pages(0).size(), 0x800u);
  EXPECT_FALSE(response.pages(0).read());
  EXPECT_THAT(response.pages(0).why(), ::testing::HasSubstr("not present at PTE"));
  EXPECT_EQ(response.data().substr(0, 0x800), std::string(0x800, '\0'));
  for (int i : {1, 2}) {
    EXPECT_TRUE(response.pages(i).read()) << i << ": " << response.pages(i).why();
  }
  EXPECT_EQ(response.pages(1).size(), 0x1000u);
  EXPECT_EQ(response.pages(2).size(), 0x800u);
  EXPECT_EQ(response.data().substr(0x800), pattern.substr(0, 0x1800));
  // A range that wraps or is too long is refused.
  request.set_size(0);
  grpc::ClientContext ctx2;
  EXPECT_EQ(stub_->ReadVirtual(&ctx2, request, &response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

// The stack layout of sim_guest.cc: 4 pages, a swapped-out page below them.
uint64_t StackGva(sim::PagingMode mode) {
  const bool wide = mode == sim::PagingMode::k4Level || mode == sim::PagingMode::k5Level;
  return wide ? 0x7ffffffde000ull : 0xbffdc000ull;
}

TEST_P(TranslateE2eTest, ReadVirtualStreamAcrossANotPresentPageReportsExactlyThatPage) {
  const uint64_t stack = StackGva(GetParam());
  uint64_t cr3 = guest().Snapshot(0).sregs.cr3;
  ASSERT_FALSE(tables().Expect(cr3, stack - 0x1000).present);
  std::string pattern(0x3000, 0);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<char>(i * 13 + 1);
  for (uint64_t off = 0; off < 0x3000; off += 0x1000) {
    sim::ExpectedTranslation page = tables().Expect(cr3, stack + off);
    ASSERT_TRUE(page.present);
    ASSERT_TRUE(guest().WritePhysical(page.gpa, pattern.data() + off, 0x1000));
  }
  // Three 4 KiB chunks from the middle of the swapped-out page.
  kvmi::v1::ReadVirtualStreamRequest request;
  request.set_vm("vmem-0000");
  request.set_vcpu(0);
  request.set_gva(stack - 0x800);
  request.set_size(0x3000);
  request.set_chunk_bytes(0x1000);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto reader = stub_->ReadVirtualStream(&ctx, request);
  std::vector<kvmi::v1::ReadVirtualStreamResponse> chunks;
  kvmi::v1::ReadVirtualStreamResponse chunk;
  while (reader->Read(&chunk)) chunks.push_back(chunk);
  grpc::Status s = reader->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(chunks.size(), 3u);
  std::string data;
  for (size_t i = 0; i < chunks.size(); ++i) {
    EXPECT_EQ(chunks[i].gva(), stack - 0x800 + i * 0x1000);
    EXPECT_EQ(chunks[i].size(), 0x1000u);
    EXPECT_EQ(chunks[i].data().size(), 0x1000u);
    EXPECT_EQ(chunks[i].cr3(), cr3);
    EXPECT_EQ(chunks[i].mode(), ProtoMode(GetParam()));
    data += chunks[i].data();
  }
  // Exactly the swapped-out page's piece is named, in the first chunk only.
  EXPECT_FALSE(chunks[0].complete());
  ASSERT_EQ(chunks[0].unread_size(), 1);
  EXPECT_EQ(chunks[0].unread(0).gva(), stack - 0x800);
  EXPECT_EQ(chunks[0].unread(0).size(), 0x800u);
  EXPECT_THAT(chunks[0].unread(0).why(), ::testing::HasSubstr("not present at PTE"));
  EXPECT_TRUE(chunks[1].complete());
  EXPECT_TRUE(chunks[2].complete());
  EXPECT_EQ(data.substr(0, 0x800), std::string(0x800, '\0'));
  EXPECT_EQ(data.substr(0x800), pattern.substr(0, 0x2800));
}

TEST_P(TranslateE2eTest, ABigStreamedVirtualReadMatchesTheOracle) {
  // The direct map: all of the guest's 64 MiB in 64-bit modes (one 1 GiB page); in the 32-bit
  // modes 16 large pages (64 MiB of 4 MiB pages, 32 MiB of PAE's 2 MiB pages).
  const bool wide =
      GetParam() == sim::PagingMode::k4Level || GetParam() == sim::PagingMode::k5Level;
  const uint64_t base = wide ? sim::kDirectMapGva : sim::kDirectMapGva32;
  const uint64_t size = wide ? (64ull << 20) : 16 * sim::PageSizes(GetParam())[1];
  std::mt19937_64 rng(99);
  for (int i = 0; i < 64; ++i) {  // known bytes scattered over the range (the rest: tables, 0s)
    uint64_t gpa = (rng() % (size >> 12)) << 12;
    if (gpa >= sim::kPageTableArea && gpa < sim::kPageTableAreaEnd) continue;  // keep the tables
    uint64_t words[512];
    for (uint64_t& w : words) w = rng();
    ASSERT_TRUE(guest().WritePhysical(gpa, words, sizeof(words)));
  }
  kvmi::v1::ReadVirtualStreamRequest request;
  request.set_vm("vmem-0000");
  request.set_vcpu(1);
  request.set_gva(base);
  request.set_size(size);
  request.set_chunk_bytes(1 << 20);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto reader = stub_->ReadVirtualStream(&ctx, request);
  std::vector<uint8_t> want(1 << 20);
  uint64_t at = 0;
  kvmi::v1::ReadVirtualStreamResponse chunk;
  while (reader->Read(&chunk)) {
    ASSERT_EQ(chunk.gva(), base + at);
    ASSERT_TRUE(chunk.complete()) << chunk.unread(0).why();
    ASSERT_EQ(chunk.data().size(), chunk.size());
    for (uint64_t page = 0; page < chunk.size(); page += 0x1000) {  // the sim reads by page
      ASSERT_TRUE(guest().ReadPhysical(at + page, want.data() + page,
                                       std::min<uint64_t>(0x1000, chunk.size() - page)));
    }
    ASSERT_EQ(0, std::memcmp(chunk.data().data(), want.data(), chunk.size()))
        << std::hex << "gva 0x" << chunk.gva();
    at += chunk.size();
  }
  grpc::Status s = reader->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(at, size);
}

TEST_P(TranslateE2eTest, WriteVirtualRoundTrip) {
  uint64_t cr3 = guest().Snapshot(0).sregs.cr3;
  auto write = [&](uint64_t gva, const std::string& data, bool require_writable,
                   kvmi::v1::WriteVirtualResponse* response) {
    kvmi::v1::WriteVirtualRequest request;
    request.set_vm("vmem-0000");
    request.set_vcpu(0);
    request.set_gva(gva);
    request.set_data(data);
    request.set_require_writable(require_writable);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return stub_->WriteVirtual(&ctx, request, response);
  };
  auto physical = [&](uint64_t gva, size_t n) {
    sim::ExpectedTranslation t = tables().Expect(cr3, gva);
    EXPECT_TRUE(t.present);
    std::string out(n, '\0');
    EXPECT_TRUE(guest().ReadPhysical(t.gpa, out.data(), n));
    return out;
  };
  // Across the boundary of two writable data pages (whose frames are not adjacent in general).
  const uint64_t data_gva = sim::kUserDataGva + 0x1000 - 5;
  kvmi::v1::WriteVirtualResponse r;
  grpc::Status s = write(data_gva, "0123456789", false, &r);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(r.written());
  EXPECT_EQ(r.bytes_written(), 10u);
  ASSERT_EQ(r.pages_size(), 2);
  EXPECT_TRUE(r.pages(0).writable() && r.pages(1).writable());
  EXPECT_EQ(r.pages(0).gpa(), tables().Expect(cr3, data_gva).gpa);
  EXPECT_EQ(physical(data_gva, 5), "01234");
  EXPECT_EQ(physical(data_gva + 5, 5), "56789");
  // Code is read-only: written anyway (as a debugger does), reported as not writable...
  const uint64_t code = sim::kUserCodeGva + 0x10;
  ASSERT_TRUE(write(code, "\xcc", false, &r).ok());
  EXPECT_TRUE(r.written());
  EXPECT_FALSE(r.pages(0).writable());
  EXPECT_EQ(physical(code, 1), "\xcc");
  // ... or refused with require_writable: nothing written.
  kvmi::v1::WriteVirtualResponse refused;
  ASSERT_TRUE(write(code - 1, "\x90\x90", true, &refused).ok());
  EXPECT_FALSE(refused.written());
  EXPECT_EQ(refused.bytes_written(), 0u);
  EXPECT_EQ(refused.pages(0).why(), "read-only");
  EXPECT_EQ(physical(code, 1), "\xcc");
  // A range reaching the swapped-out page below the stack: nothing written, that page named.
  const uint64_t stack = StackGva(GetParam());
  const std::string before = physical(stack, 4);
  kvmi::v1::WriteVirtualResponse partial;
  ASSERT_TRUE(write(stack - 4, "ABCDEFGH", false, &partial).ok());
  EXPECT_FALSE(partial.written());
  EXPECT_EQ(partial.bytes_written(), 0u);
  ASSERT_EQ(partial.pages_size(), 2);
  EXPECT_THAT(partial.pages(0).why(), ::testing::HasSubstr("not present at PTE"));
  EXPECT_THAT(partial.pages(1).why(), ::testing::HasSubstr("another page"));
  EXPECT_EQ(physical(stack, 4), before);
  // Bad requests name their field.
  s = write(code, "", false, &r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), ::testing::HasSubstr("data"));
}

TEST_P(TranslateE2eTest, BadRequestsAreRefusedWithTheirField) {
  kvmi::v1::TranslateAddressRequest none;
  none.set_vm("vmem-0000");
  kvmi::v1::TranslateAddressResponse r;
  grpc::Status s = Translate(none, &r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), ::testing::HasSubstr("vcpu or an address_space"));
  s = Translate(ByVcpu(7, 0), &r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  kvmi::v1::TranslateAddressRequest no_mode = BySpace(0x1000, 0);
  no_mode.mutable_address_space()->set_mode(kvmi::v1::PAGING_MODE_UNSPECIFIED);
  s = Translate(no_mode, &r);
  EXPECT_THAT(s.error_message(), ::testing::HasSubstr("address_space.mode"));
  // A CR3 outside guest RAM: the guest's error, naming the level.
  s = Translate(BySpace(0x7000000, 0x1000), &r);  // 112 MiB: beyond its 64 MiB
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.error_message(), ::testing::HasSubstr("reading the"));
}

INSTANTIATE_TEST_SUITE_P(Modes, TranslateE2eTest,
                         ::testing::Values(sim::PagingMode::k32Bit, sim::PagingMode::kPae,
                                           sim::PagingMode::k4Level, sim::PagingMode::k5Level),
                         [](const auto& info) { return sim::PagingModeName(info.param); });

}  // namespace
}  // namespace kvmid
