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

bool WarningLimiter::Allow(uint64_t* since_last) {
  ++pending_;
  ++total_;
  auto now = std::chrono::steady_clock::now();
  if (last_ && now - *last_ < interval_) return false;
  last_ = now;
  *since_last = pending_;
  pending_ = 0;
  return true;
}

Acceptor::Acceptor(EventLoop* loop, kvmi::UniqueFd listen_fd, std::string transport,
                   AcceptorOptions options, OnGuest on_guest)
    : loop_(loop),
      listen_fd_(std::move(listen_fd)),
      transport_(std::move(transport)),
      options_(std::move(options)),
      on_guest_(std::move(on_guest)),
      peer_slots_(security::Limit::kHandshakeSlotsPerPeer, options_.handshake_slots_per_peer) {}

Acceptor::~Acceptor() = default;

void Acceptor::Start() {
  int flags = ::fcntl(listen_fd_.get(), F_GETFL);
  ::fcntl(listen_fd_.get(), F_SETFL, flags | O_NONBLOCK);
  reserve_fd_.Reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  loop_->Watch(listen_fd_.get(), EPOLLIN, [this](uint32_t) { OnAcceptable(); });
}

void Acceptor::Stop() {
  loop_->Cancel(resume_timer_);
  if (listen_fd_ && resume_timer_ == 0) loop_->Unwatch(listen_fd_.get());
  resume_timer_ = 0;
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
    pending->peer_key = "uid " + std::to_string(cred.uid);
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
    pending->peer_key = pending->peer;
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
  pending->peer_key = "unknown";
  pending->transport = transport_;
  return absl::OkStatus();
}

void Acceptor::OnAcceptable() {
  while (true) {
    int raw = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (raw < 0) {
      int error = errno;
      if (error == EINTR || error == ECONNABORTED) continue;
      if (error == EAGAIN || error == EWOULDBLOCK) return;
      if (error == EMFILE || error == ENFILE || error == ENOBUFS || error == ENOMEM) {
        return PauseAtFdLimit(error);
      }
      uint64_t count = 0;
      if (fd_limit_warnings_.Allow(&count)) {
        spdlog::warn("{} listener: accept: {} ({} accept errors in the last {} s at most)",
                     transport_, std::strerror(error), count, kListenerWarningInterval.count());
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
      spdlog::warn("{} listener: connection refused: {}", transport_,
                   std::string(allowed.message()));
      stats_.rejected++;
      Metrics::CountHandshake(HandshakeResult::kUnauthorized);
      continue;
    }
    if (options_.peer_key_for_test) pending->peer_key = options_.peer_key_for_test(fd.get());
    // One peer may hold only its share of the handshake slots: a flood of connections from it is
    // closed here at once, and other peers' guests still hook.
    absl::StatusOr<security::KeyedSlots::Slot> slot =
        peer_slots_.Acquire(pending->peer_key, "peer");
    if (!slot.ok()) {
      stats_.rejected++;
      stats_.over_peer_limit++;
      Metrics::CountHandshake(HandshakeResult::kBusy);
      uint64_t count = 0;
      if (peer_limit_warnings_.Allow(&count)) {
        spdlog::warn(
            "{} listener: connection from {} closed: {} ({} such in the last {} s at most)",
            transport_, pending->peer, std::string(slot.status().message()), count,
            kListenerWarningInterval.count());
      }
      continue;
    }
    pending->slot = *std::move(slot);
    pending->fd = std::move(fd);
    int key = pending->fd.get();
    pending->timer = loop_->RunAt(Clock::now() + options_.handshake_timeout, [this, key] {
      Reject(key, "handshake timed out", HandshakeResult::kTimeout);
    });
    loop_->Watch(key, EPOLLIN | EPOLLRDHUP, [this, key](uint32_t) { OnHandshakeReadable(key); });
    pending_.emplace(key, std::move(pending));
  }
}

void Acceptor::PauseAtFdLimit(int error) {
  stats_.fd_limit_pauses++;
  // Shed the connection at the head of the backlog with the reserved descriptor, so that its
  // peer is told (it sees the close) instead of waiting in the backlog.
  if (reserve_fd_) {
    reserve_fd_.Reset();
    int shed = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (shed >= 0) ::close(shed);
    reserve_fd_.Reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  }
  uint64_t count = 0;
  if (fd_limit_warnings_.Allow(&count)) {
    spdlog::warn(
        "{} listener: accept: {}; shedding connections and pausing the listener {} ms each time "
        "({} times in the last {} s at most)",
        transport_, std::strerror(error), kAcceptPauseAtFdLimit.count(), count,
        kListenerWarningInterval.count());
  }
  // The listener stays readable while the limit holds: watching it now would spin the loop.
  loop_->Unwatch(listen_fd_.get());
  resume_timer_ = loop_->RunAt(Clock::now() + kAcceptPauseAtFdLimit, [this] {
    resume_timer_ = 0;
    if (!listen_fd_) return;
    if (!reserve_fd_) reserve_fd_.Reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    loop_->Watch(listen_fd_.get(), EPOLLIN, [this](uint32_t) { OnAcceptable(); });
  });
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
