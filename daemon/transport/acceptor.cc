#include "daemon/transport/acceptor.h"

#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "kernel/transport/socket.h"

namespace kvmid {

Acceptor::Acceptor(EventLoop* loop, kvmi::UniqueFd listen_fd, std::string transport,
                   AcceptorOptions options, OnGuest on_guest)
    : loop_(loop),
      listen_fd_(std::move(listen_fd)),
      transport_(std::move(transport)),
      options_(std::move(options)),
      on_guest_(std::move(on_guest)) {}

Acceptor::~Acceptor() = default;

void Acceptor::Start() {
  int flags = ::fcntl(listen_fd_.get(), F_GETFL);
  ::fcntl(listen_fd_.get(), F_SETFL, flags | O_NONBLOCK);
  loop_->Watch(listen_fd_.get(), EPOLLIN, [this](uint32_t) { OnAcceptable(); });
}

void Acceptor::Stop() {
  if (listen_fd_) loop_->Unwatch(listen_fd_.get());
  listen_fd_.Reset();
  for (auto& [fd, pending] : pending_) {
    loop_->Unwatch(fd);
    loop_->Cancel(pending->timer);
  }
  pending_.clear();
}

absl::Status Acceptor::Authenticate(int fd, Pending* pending) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  if (addr.ss_family == AF_UNIX) {
    ucred cred{};
    socklen_t cred_len = sizeof(cred);
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) != 0) {
      return absl::ErrnoToStatus(errno, "SO_PEERCRED");
    }
    pending->peer = "uid " + std::to_string(cred.uid) + " pid " + std::to_string(cred.pid);
    pending->transport = "unix";
    if (!options_.allowed_uids.empty() &&
        std::find(options_.allowed_uids.begin(), options_.allowed_uids.end(), cred.uid) ==
            options_.allowed_uids.end()) {
      return absl::PermissionDeniedError("peer uid " + std::to_string(cred.uid) +
                                         " is not allowed");
    }
    return absl::OkStatus();
  }
  if (addr.ss_family == AF_VSOCK) {
    sockaddr_vm remote{};
    socklen_t remote_len = sizeof(remote);
    ::getpeername(fd, reinterpret_cast<sockaddr*>(&remote), &remote_len);
    pending->peer = "cid " + std::to_string(remote.svm_cid);
    pending->transport = "vsock:" + std::to_string(remote.svm_cid);
    if (!options_.allowed_cids.empty() &&
        std::find(options_.allowed_cids.begin(), options_.allowed_cids.end(), remote.svm_cid) ==
            options_.allowed_cids.end()) {
      return absl::PermissionDeniedError("peer cid " + std::to_string(remote.svm_cid) +
                                         " is not allowed");
    }
    return absl::OkStatus();
  }
  pending->peer = "unknown";
  pending->transport = transport_;
  return absl::OkStatus();
}

void Acceptor::OnAcceptable() {
  while (true) {
    int raw = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (raw < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        spdlog::warn("{} listener: accept: {}", transport_, std::strerror(errno));
      }
      return;
    }
    kvmi::UniqueFd fd(raw);
    stats_.accepted++;
    if (pending_.size() >= options_.max_concurrent_handshakes) {
      spdlog::warn("{} listener: {} handshakes in progress, refusing a connection", transport_,
                   pending_.size());
      stats_.rejected++;
      Metrics::CountHandshake(HandshakeResult::kBusy);
      continue;
    }
    auto pending = std::make_unique<Pending>();
    absl::Status allowed = Authenticate(fd.get(), pending.get());
    if (!allowed.ok()) {
      spdlog::warn("{} listener: connection refused: {}", transport_, std::string(allowed.message()));
      stats_.rejected++;
      Metrics::CountHandshake(HandshakeResult::kUnauthorized);
      continue;
    }
    pending->fd = std::move(fd);
    int key = pending->fd.get();
    pending->timer = loop_->RunAt(Clock::now() + options_.handshake_timeout, [this, key] {
      Reject(key, "handshake timed out", HandshakeResult::kTimeout);
    });
    loop_->Watch(key, EPOLLIN | EPOLLRDHUP, [this, key](uint32_t) { OnHandshakeReadable(key); });
    pending_.emplace(key, std::move(pending));
  }
}

void Acceptor::Reject(int fd, const std::string& why, HandshakeResult result) {
  auto it = pending_.find(fd);
  if (it == pending_.end()) return;
  spdlog::warn("{} handshake from {} rejected: {}", transport_, it->second->peer, why);
  loop_->Unwatch(fd);
  loop_->Cancel(it->second->timer);
  pending_.erase(it);  // closes the socket
  stats_.rejected++;
  Metrics::CountHandshake(result);
}

void Acceptor::OnHandshakeReadable(int fd) {
  auto it = pending_.find(fd);
  if (it == pending_.end()) return;
  Pending& p = *it->second;
  // Read only what the handshake needs: the struct announces its own size (§9; libkvmi's
  // bounds), and bytes beyond it belong to the KVMI stream.
  while (true) {
    size_t want = p.struct_size == 0 ? 4 : p.struct_size;
    if (p.buffer.size() >= want && p.struct_size != 0) break;
    size_t old = p.buffer.size();
    p.buffer.resize(want);
    size_t got = 0;
    kvmi::IoResult result = kvmi::TryRead(fd, p.buffer.data() + old, want - old, &got);
    p.buffer.resize(old + got);
    if (result.kind == kvmi::IoResult::kClosed) {
      return Reject(fd, "peer closed during the handshake");
    }
    if (!result.ok()) return Reject(fd, "read: " + result.ToString());
    if (got == 0) return;  // wait for more
    if (p.struct_size == 0 && p.buffer.size() >= 4) {
      kvmi::DecodeStatus s = kvmi::PeekQemuHelloSize(kvmi::ByteView(p.buffer), &p.struct_size);
      if (!s.ok()) return Reject(fd, s.ToString());
    }
  }
  kvmi::QemuHello hello;
  kvmi::DecodeStatus s = kvmi::DecodeQemuHello(kvmi::ByteView(p.buffer), &hello);
  if (!s.ok()) return Reject(fd, s.ToString());

  kvmi::IntrospectorHello answer;
  if (options_.cookie_hash) answer.cookie_hash = *options_.cookie_hash;
  std::vector<uint8_t> wire;
  kvmi::EncodeIntrospectorHello(answer, &wire);
  // 24 bytes into a fresh socket's empty send buffer: a short write here means the peer is
  // broken, not slow.
  size_t sent = 0;
  kvmi::IoResult written = kvmi::TryWrite(fd, wire.data(), wire.size(), &sent);
  if (!written.ok() || sent != wire.size()) {
    return Reject(fd, "could not send the answer: " +
                          (written.ok() ? std::string("socket buffer full") : written.ToString()));
  }

  AcceptedGuest guest;
  guest.identity.uuid = hello.uuid;
  guest.identity.name = hello.name;
  guest.identity.start_time = hello.start_time;
  guest.identity.transport = p.transport;
  spdlog::info("{} handshake from {}: vm {} {}", transport_, p.peer,
               hello.name.empty() ? "(unnamed)" : hello.name, kvmi::UuidToString(hello.uuid));
  loop_->Unwatch(fd);
  loop_->Cancel(p.timer);
  guest.fd = std::move(p.fd);
  pending_.erase(it);
  stats_.completed++;
  Metrics::CountHandshake(HandshakeResult::kCompleted);
  on_guest_(std::move(guest));
}

}  // namespace kvmid
