#include "daemon/testing/scripted_host.h"

#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "kernel/abi/protocol.h"
#include "kernel/transport/socket.h"

namespace kvmid::testing {

kvmi::UniqueFd ScriptedHost::Connect() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
  fd_.Reset(fds[0]);
  reader_ = std::thread([this] { ReadLoop(); });
  return kvmi::UniqueFd(fds[1]);
}

void ScriptedHost::Adopt(kvmi::UniqueFd fd) {
  fd_ = std::move(fd);
  reader_ = std::thread([this] { ReadLoop(); });
}

ScriptedHost::~ScriptedHost() {
  Close();
  if (reader_.joinable()) reader_.join();
}

void ScriptedHost::set_responder(Responder responder) {
  MutexLock lock(&mutex_);
  responder_ = std::move(responder);
}

void ScriptedHost::SendRaw(const std::vector<uint8_t>& bytes) {
  MutexLock lock(&write_mutex_);
  // A daemon that went away is a test's own finding (it sees the close); nothing to report here.
  (void)kvmi::WriteAll(fd_.get(), bytes.data(), bytes.size());
}

void ScriptedHost::SendEvent(const kvmi::Event& event) {
  std::vector<uint8_t> wire;
  kvmi::EncodeEvent(event, &wire);
  SendRaw(wire);
}

void ScriptedHost::Close() {
  if (fd_) ::shutdown(fd_.get(), SHUT_RDWR);
}

std::vector<uint8_t> ScriptedHost::DefaultReply(const ReceivedMessage& m) const {
  std::vector<uint8_t> out;
  std::vector<uint8_t> data;
  kvmi::ByteWriter w(&data);
  switch (m.hdr.id) {
    case KVMI_GET_VERSION:
      kvmi::EncodeReplyData(kvmi::GetVersionReply{KVMI_VERSION}, w);
      break;
    case KVMI_GET_GUEST_INFO:
      kvmi::EncodeReplyData(kvmi::GuestInfoReply{vcpus_}, w);
      break;
    case KVMI_READ_PHYSICAL: {
      kvmi::ReadPhysicalRequest r;
      kvmi::DecodePayload(kvmi::ByteView(m.payload), &r);
      // Each byte is the low byte of its own address: reassembly order is checkable.
      for (uint64_t i = 0; i < r.size; ++i) data.push_back(static_cast<uint8_t>(r.gpa + i));
      break;
    }
    case KVMI_GET_PAGE_WRITE_BITMAP: {
      kvmi::GetPageWriteBitmapRequest r;
      kvmi::DecodePayload(kvmi::ByteView(m.payload), &r);
      // Page n of the request: bitmap n + 1 (order is checkable).
      kvmi::PageWriteBitmapReply reply;
      for (size_t i = 0; i < r.gpas.size(); ++i) reply.bitmaps.push_back(i + 1);
      kvmi::EncodeReplyData(reply, w);
      break;
    }
    default:
      break;
  }
  kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(data), &out);
  return out;
}

void ScriptedHost::ReadLoop() {
  kvmi::MessageFramer framer(kvmi::kMaxCommandPayload);
  while (true) {
    uint8_t* tail = framer.WritableTail(8192);
    size_t got = 0;
    if (!kvmi::ReadSome(fd_.get(), tail, framer.writable_size(), &got).ok()) break;
    framer.Commit(got);
    const int unread = UnreadBySession();
    kvmi::Frame frame;
    kvmi::DecodeStatus status;
    while (framer.Next(&frame, &status) == kvmi::MessageFramer::Result::kMessage) {
      ReceivedMessage m{frame.hdr, frame.payload.ToVector(), unread};
      std::optional<std::vector<uint8_t>> reply;
      if (m.hdr.id != KVMI_EVENT_REPLY) {
        Responder responder;
        {
          MutexLock lock(&mutex_);
          responder = responder_;
        }
        reply = responder ? responder(m) : std::optional<std::vector<uint8_t>>(DefaultReply(m));
      }
      {
        MutexLock lock(&mutex_);
        received_.push_back(m);
        received_total_++;
      }
      cv_.SignalAll();
      if (reply) SendRaw(*reply);
    }
  }
  MutexLock lock(&mutex_);
  closed_ = true;
  cv_.SignalAll();
}

std::optional<ReceivedMessage> ScriptedHost::WaitFor(
    const std::function<bool(const ReceivedMessage&)>& pred, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  MutexLock lock(&mutex_);
  while (true) {
    for (auto it = received_.begin(); it != received_.end(); ++it) {
      if (pred(*it)) {
        ReceivedMessage found = std::move(*it);
        received_.erase(it);
        return found;
      }
    }
    if (!cv_.WaitUntil(&mutex_, deadline)) return std::nullopt;
  }
}

std::optional<ReceivedMessage> ScriptedHost::WaitForId(uint16_t id,
                                                       std::chrono::milliseconds timeout) {
  return WaitFor([id](const ReceivedMessage& m) { return m.hdr.id == id; }, timeout);
}

bool ScriptedHost::WaitClosed(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  MutexLock lock(&mutex_);
  while (!closed_) {
    if (!cv_.WaitUntil(&mutex_, deadline)) return closed_;
  }
  return true;
}

int ScriptedHost::UnreadBySession() {
  int n = -1;
  if (::ioctl(fd_.get(), SIOCOUTQ, &n) != 0) return -1;
  return n;
}

size_t ScriptedHost::received_count() {
  MutexLock lock(&mutex_);
  return received_total_;
}

kvmi::Event MakeTestEvent(uint8_t id, uint16_t vcpu, uint32_t seq) {
  kvmi::Event e;
  e.seq = seq;
  e.common.size = sizeof(kvmi_event);
  e.common.vcpu = vcpu;
  e.common.event = id;
  e.common.arch.mode = id == KVMI_EVENT_UNHOOK ? 0 : 8;
  return e;
}

}  // namespace kvmid::testing

namespace kvmid::testing {

kvmi::UniqueFd ConnectAsQemu(const std::string& path, const kvmi::QemuHello& hello,
                             kvmi::IntrospectorHello* answer) {
  absl::StatusOr<kvmi::UniqueFd> connected = kvmi::ConnectUnix(path);
  if (!connected.ok()) return {};
  kvmi::UniqueFd fd = std::move(*connected);
  std::vector<uint8_t> wire;
  kvmi::EncodeQemuHello(hello, &wire);
  auto deadline = kvmi::Clock::now() + std::chrono::seconds(5);
  if (!kvmi::WriteAll(fd.get(), wire.data(), wire.size(), deadline).ok()) return {};
  std::vector<uint8_t> reply(kvmi::kIntrospectorHelloSize);
  if (!kvmi::ReadExact(fd.get(), reply.data(), reply.size(), deadline).ok()) return {};
  if (!kvmi::DecodeIntrospectorHello(kvmi::ByteView(reply), answer).ok()) return {};
  return fd;
}

}  // namespace kvmid::testing
