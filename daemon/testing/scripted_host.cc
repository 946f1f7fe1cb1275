#include "daemon/testing/scripted_host.h"

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
  std::lock_guard<std::mutex> lock(mutex_);
  responder_ = std::move(responder);
}

void ScriptedHost::SendRaw(const std::vector<uint8_t>& bytes) {
  std::lock_guard<std::mutex> lock(write_mutex_);
  size_t sent = 0;
  while (sent < bytes.size()) {
    ssize_t n = ::send(fd_.get(), bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return;
    sent += static_cast<size_t>(n);
  }
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
    ssize_t n = ::recv(fd_.get(), tail, framer.writable_size(), 0);
    if (n <= 0) break;
    framer.Commit(static_cast<size_t>(n));
    kvmi::Frame frame;
    kvmi::DecodeStatus status;
    while (framer.Next(&frame, &status) == kvmi::MessageFramer::Result::kMessage) {
      ReceivedMessage m{frame.hdr, frame.payload.ToVector()};
      std::optional<std::vector<uint8_t>> reply;
      if (m.hdr.id != KVMI_EVENT_REPLY) {
        Responder responder;
        {
          std::lock_guard<std::mutex> lock(mutex_);
          responder = responder_;
        }
        reply = responder ? responder(m) : std::optional<std::vector<uint8_t>>(DefaultReply(m));
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        received_.push_back(m);
        received_total_++;
      }
      cv_.notify_all();
      if (reply) SendRaw(*reply);
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  closed_ = true;
  cv_.notify_all();
}

std::optional<ReceivedMessage> ScriptedHost::WaitFor(
    std::function<bool(const ReceivedMessage&)> pred, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  std::optional<ReceivedMessage> found;
  cv_.wait_for(lock, timeout, [&] {
    for (auto it = received_.begin(); it != received_.end(); ++it) {
      if (pred(*it)) {
        found = std::move(*it);
        received_.erase(it);
        return true;
      }
    }
    return false;
  });
  return found;
}

std::optional<ReceivedMessage> ScriptedHost::WaitForId(uint16_t id,
                                                       std::chrono::milliseconds timeout) {
  return WaitFor([id](const ReceivedMessage& m) { return m.hdr.id == id; }, timeout);
}

bool ScriptedHost::WaitClosed(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  return cv_.wait_for(lock, timeout, [&] { return closed_; });
}

size_t ScriptedHost::received_count() {
  std::lock_guard<std::mutex> lock(mutex_);
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
  std::string error;
  kvmi::UniqueFd fd = kvmi::ConnectUnix(path, &error);
  if (!fd) return fd;
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
