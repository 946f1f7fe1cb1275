#include "kernel/host/qemu_connector.h"

#include <pthread.h>
#include <sys/socket.h>

#include <ctime>

#include "spdlog/spdlog.h"

namespace kvmi::host {
namespace {

// How long FinishDetach waits for the connector thread to count the ended session.
constexpr std::chrono::seconds kSessionEndWait{5};
constexpr char kDetachedReason[] = "detached by the VM (KVM_INTROSPECTION_UNHOOK)";

const int64_t kProcessStartTime = static_cast<int64_t>(std::time(nullptr));

}  // namespace

QemuConnector::QemuConnector(VmIntrospection* engine, ConnectorConfig config,
                             GuestIdentity identity, std::function<bool()> guest_dead)
    : engine_(engine),
      config_(std::move(config)),
      identity_(std::move(identity)),
      guest_dead_(std::move(guest_dead)) {}

QemuConnector::~QemuConnector() { Stop(); }

void QemuConnector::Start() {
  if (thread_.joinable() || stopping()) return;
  if (config_.endpoint.path.empty() && config_.endpoint.family != Endpoint::Family::kVsock) return;
  thread_ = std::thread([this] { Loop(); });
}

void QemuConnector::Stop() {
  if (stop_.exchange(true)) return;
  // The thread may be between a handshake and the hook: keep ending sessions and shutting the
  // handshake socket until it has finished.
  if (thread_.joinable()) {
    for (;;) {
      engine_->EndSession("connector stopping");
      std::unique_lock<std::mutex> lock(mu_);
      if (handshake_fd_ >= 0) ::shutdown(handshake_fd_, SHUT_RDWR);
      cv_.notify_all();
      if (cv_.wait_for(lock, std::chrono::milliseconds(20), [&] { return done_; })) break;
    }
    thread_.join();
  }
  engine_->EndSession("connector stopping");
}

void QemuConnector::WakeWaiters() {
  std::lock_guard<std::mutex> lock(mu_);
  cv_.notify_all();
}

UniqueFd QemuConnector::ConnectAndHandshake(std::string* error) {
  absl::StatusOr<UniqueFd> connected = ConnectEndpoint(config_.endpoint);
  if (!connected.ok()) {
    *error = std::string(connected.status().message());
    return UniqueFd();
  }
  UniqueFd fd = std::move(*connected);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping()) return UniqueFd();
    handshake_fd_ = fd.get();
  }
  struct ClearHandshakeFd {
    QemuConnector* connector;
    ~ClearHandshakeFd() {
      std::lock_guard<std::mutex> lock(connector->mu_);
      connector->handshake_fd_ = -1;
    }
  } clear{this};

  QemuHello hello;
  if (config_.fill_identity) {
    // A deliberate improvement over v6 QEMU, which sends zeros here (kvmi-v7 fills them).
    hello.uuid = identity_.uuid;
    hello.name = identity_.name.substr(0, 63);
    hello.start_time = kProcessStartTime;
  }
  std::vector<uint8_t> bytes;
  EncodeQemuHello(hello, &bytes);
  auto deadline = Clock::now() + config_.handshake_timeout;
  IoResult io = WriteAll(fd.get(), bytes.data(), bytes.size(), deadline);
  if (!io.ok()) {
    *error = "sending qemu2introspector: " + io.ToString();
    return UniqueFd();
  }
  uint8_t answer[kIntrospectorHelloSize];
  io = ReadExact(fd.get(), answer, sizeof(answer), deadline);
  if (!io.ok()) {
    *error = "reading introspector2qemu: " + io.ToString();
    return UniqueFd();
  }
  IntrospectorHello reply;
  DecodeStatus status = DecodeIntrospectorHello(ByteView(answer, sizeof(answer)), &reply);
  if (!status.ok()) {
    *error = "bad introspector2qemu: " + status.ToString();
    return UniqueFd();
  }
  if (config_.cookie) {
    auto expected = CookieHash(ByteView(*config_.cookie));
    if (reply.cookie_hash != expected) {
      *error = "tool refused: cookie_hash is not SHA-1 of our cookie";
      return UniqueFd();
    }
  }
  return fd;
}

void QemuConnector::SleepInterruptibly(std::chrono::milliseconds duration) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, duration, [&] { return stopping(); });
}

void QemuConnector::Loop() {
  // The KVMI receive thread (as kvmi_recv in the kernel): named for profiles and benches.
  pthread_setname_np(pthread_self(), "kvmi-recv");
  uint64_t consecutive_failures = 0;
  while (!stopping() && !detached_.load() && !guest_dead_()) {
    std::string error;
    UniqueFd fd = ConnectAndHandshake(&error);
    bool start = false;
    if (fd && !stopping()) {
      // Checked and counted in one critical section with BeginDetach's flag: a detach either
      // comes first (no session) or finds this session counted, and then either FinishDetach's
      // EndSession finds it hooked or the hook below finds the flag.
      std::lock_guard<std::mutex> lock(mu_);
      start = !detached_.load();
      if (start) {
        ++sessions_started_;
        cv_.notify_all();
      }
    }
    if (start) {
      consecutive_failures = 0;
      std::string reason = engine_->RunSession(std::move(fd), [this] {
        // QEMU right after KVM_INTROSPECTION_HOOK: the COMMAND and EVENT ioctls.
        for (int32_t id : config_.allowed_commands) engine_->SetCommandAllowed(id, true);
        for (int32_t id : config_.allowed_events) engine_->SetEventAllowed(id, true);
        if (stopping()) {
          engine_->EndSession("connector stopping");
        } else if (detached_.load()) {
          engine_->EndSession(kDetachedReason);
        }
      });
      std::lock_guard<std::mutex> lock(mu_);
      ++sessions_ended_;
      last_end_reason_ = reason;
      cv_.notify_all();
    } else if (!fd && !stopping()) {
      handshake_failures_.fetch_add(1, std::memory_order_relaxed);
      // A tool that is not up yet is normal for a reconnecting client: log the first failure.
      if (consecutive_failures++ == 0) spdlog::warn("[{}] {}", identity_.name, error);
    }
    if (stopping() || detached_.load() || guest_dead_() || config_.reconnect_seconds <= 0) break;
    SleepInterruptibly(
        std::chrono::milliseconds(static_cast<int64_t>(config_.reconnect_seconds * 1000.0)));
  }
  std::lock_guard<std::mutex> lock(mu_);
  done_ = true;
  cv_.notify_all();
}

int QemuConnector::Detach(std::chrono::milliseconds grace) {
  int rc = BeginDetach();
  FinishDetach(rc == 0 ? Clock::now() + grace : Clock::now());
  return rc;
}

int QemuConnector::BeginDetach() {
  {
    std::lock_guard<std::mutex> lock(mu_);  // see Loop: no session starts after this
    detached_.store(true);
  }
  return engine_->RequestUnhook();
}

void QemuConnector::FinishDetach(Clock::time_point deadline) {
  engine_->WaitUnhooked(deadline);
  engine_->EndSession(kDetachedReason);
  // The ioctl returns with the session over: wait for the connector thread to count its end, so a
  // caller of Detach sees sessions_ended() include it. EndSession closes the socket, so this is
  // short; it is bounded all the same.
  std::unique_lock<std::mutex> lock(mu_);
  cv_.notify_all();  // as WakeWaiters: the guest's state changed
  if (!cv_.wait_until(lock, Clock::now() + kSessionEndWait,
                      [&] { return done_ || sessions_ended_ >= sessions_started_; })) {
    spdlog::warn("[{}] detach: the session had not ended {} s after KVM_INTROSPECTION_UNHOOK",
                 identity_.name, kSessionEndWait.count());
  }
}

bool QemuConnector::WaitHooked(Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_until(lock, deadline, [&] { return sessions_started_ > sessions_ended_; });
}

bool QemuConnector::WaitSessionsEnded(uint64_t count, Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_until(lock, deadline, [&] { return sessions_ended_ >= count; });
}

uint64_t QemuConnector::sessions_started() const {
  std::lock_guard<std::mutex> lock(mu_);
  return sessions_started_;
}

uint64_t QemuConnector::sessions_ended() const {
  std::lock_guard<std::mutex> lock(mu_);
  return sessions_ended_;
}

std::string QemuConnector::last_end_reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return last_end_reason_;
}

}  // namespace kvmi::host
