#include "daemon/kvmid.h"

#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <grp.h>
#include <malloc.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "daemon/security/unix_listener.h"
#include "kernel/transport/socket.h"

namespace kvmid {

std::string OctalMode(uint32_t mode) {
  char text[16];
  std::snprintf(text, sizeof(text), "0%o", mode);
  return text;
}

absl::StatusOr<std::array<uint8_t, kvmi::kCookieHashSize>> LoadCookieHash(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::ErrnoToStatus(errno, "cannot read cookie file " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  // The file's exact bytes, as QEMU's `-object secret,file=` reads them (a trailing newline is
  // part of the secret: write it with printf, not echo).
  std::string secret = buffer.str();
  if (secret.empty()) return absl::InvalidArgumentError("cookie file " + path + " is empty");
  return kvmi::CookieHash(kvmi::ByteView(secret));
}

MemoryTrimmer::~MemoryTrimmer() {
  std::thread thread;
  {
    MutexLock lock(&mu_);
    stopping_ = true;
    cv_.SignalAll();
    thread = std::move(thread_);
  }
  if (thread.joinable()) thread.join();
}

void MemoryTrimmer::Freed(size_t bytes) {
  MutexLock lock(&mu_);
  if (stopping_) return;
  pending_bytes_ += bytes;
  if (pending_bytes_ < kMinBytes) return;
  if (!thread_.joinable()) {
    thread_ = std::thread([this] { Run(); });
  } else {
    cv_.Signal();
  }
}

void MemoryTrimmer::TrimNow() { ::malloc_trim(0); }

uint64_t MemoryTrimmer::trims() const {
  MutexLock lock(&mu_);
  return trims_;
}

bool MemoryTrimmer::WaitForWork(std::chrono::steady_clock::time_point last) {
  MutexLock lock(&mu_);
  while (!stopping_ && pending_bytes_ < kMinBytes) cv_.Wait(&mu_);
  // Rate limit, and let the caller's buffers go first.
  const auto due = std::max(std::chrono::steady_clock::now() + kDelay, last + kMinInterval);
  while (!stopping_ && cv_.WaitUntil(&mu_, due)) {
  }
  if (stopping_) return false;
  pending_bytes_ = 0;
  return true;
}

void MemoryTrimmer::Run() {
  std::chrono::steady_clock::time_point last{};
  while (WaitForWork(last)) {
    TrimNow();
    last = std::chrono::steady_clock::now();
    MutexLock lock(&mu_);
    ++trims_;
  }
}

Daemon::Daemon(DaemonConfig config) : config_(std::move(config)) {
  pipeline_ = std::make_unique<VerdictPipeline>(&policies_, config_.verdicts);
  registry_ = std::make_unique<Registry>(pipeline_.get());
  pipeline_->set_on_guest_hooked([this](const std::shared_ptr<Guest>& guest) {
    MutexLock lock(&clients_mutex_);
    for (const auto& [owner, client] : client_arming_) {
      if (Selects(client.vms, *guest)) guest->SetLease(owner, client.arming);
    }
  });
}

bool Daemon::Selects(const std::vector<std::string>& vms, const Guest& guest) {
  if (vms.empty()) return true;
  GuestIdentity identity = guest.identity();
  std::string uuid = kvmi::UuidToString(identity.uuid);
  for (const std::string& vm : vms) {
    kvmi::Uuid parsed;
    if (vm == identity.name || vm == guest.key() ||
        (kvmi::ParseUuid(vm, &parsed) && kvmi::UuidToString(parsed) == uuid)) {
      return true;
    }
  }
  return false;
}

void Daemon::SetClientArming(const OwnerId& owner, const std::vector<std::string>& vms,
                             const Arming& arming) {
  {
    MutexLock lock(&clients_mutex_);
    client_arming_[owner] = ClientArming{vms, arming};
  }
  for (const auto& guest : registry_->List()) {
    if (Selects(vms, *guest)) guest->SetLease(owner, arming);
  }
}

void Daemon::ReleaseOwner(const OwnerId& owner) {
  {
    MutexLock lock(&clients_mutex_);
    client_arming_.erase(owner);
  }
  for (const auto& guest : registry_->List()) guest->ReleaseOwner(owner);
}

Daemon::~Daemon() { Shutdown(std::chrono::milliseconds(0)); }

absl::Status Daemon::Start() {
  if (config_.io_threads < 1 || config_.io_threads > kMaxIoThreads) {
    return absl::InvalidArgumentError("io_threads must be 1.." + std::to_string(kMaxIoThreads));
  }
  AcceptorOptions options;
  options.handshake_timeout = config_.handshake_timeout;
  options.allowed_uids = config_.allowed_uids;
  options.allowed_cids = config_.allowed_cids;
  options.handshake_slots_per_peer = limits().handshake_slots_per_peer;
  if (!config_.cookie_file.empty()) {
    absl::StatusOr<std::array<uint8_t, kvmi::kCookieHashSize>> hash =
        LoadCookieHash(config_.cookie_file);
    if (!hash.ok()) return hash.status();
    options.cookie_hash = *hash;
  }

  std::vector<std::pair<kvmi::UniqueFd, std::string>> listeners;
  if (!config_.unix_socket.empty()) {
    // Created with its final mode and group (a private directory, then rename): no umask window
    // in which the socket is reachable with the default mode.
    absl::StatusOr<security::BoundUnixSocket> bound =
        security::BindUnixSocketWithFinalMode(config_.unix_socket, config_.unix_socket_mode,
                                              config_.unix_socket_group, "unix_socket", SOMAXCONN);
    if (!bound.ok()) {
      return absl::Status(bound.status().code(), "cannot listen on " + config_.unix_socket + ": " +
                                                     std::string(bound.status().message()));
    }
    kvmi::UniqueFd fd = std::move(bound->fd);
    listeners.emplace_back(std::move(fd), "unix");
  }
  if (config_.vsock_port) {
    absl::StatusOr<kvmi::UniqueFd> fd = kvmi::ListenVsock(*config_.vsock_port);
    if (!fd.ok()) {
      return absl::Status(fd.status().code(), "cannot listen on vsock port " +
                                                  std::to_string(*config_.vsock_port) + ": " +
                                                  std::string(fd.status().message()));
    }
    listeners.emplace_back(*std::move(fd), "vsock");
  }
  if (listeners.empty()) {
    return absl::InvalidArgumentError("no listener configured (unix socket or vsock port)");
  }

  for (int i = 0; i < config_.io_threads; ++i) {
    loops_.push_back(std::make_unique<EventLoop>());
    loops_.back()->SetIdleYields(config_.io_idle_yields);
    loops_.back()->Start(("kvmid-io-" + std::to_string(i)).c_str());
  }
  SetIoNice();
  accept_loop_ = std::make_unique<EventLoop>();
  accept_loop_->Start("kvmid-accept");
  MutexLock lock(&lifecycle_mutex_);
  for (auto& [fd, transport] : listeners) {
    acceptors_.push_back(std::make_unique<Acceptor>(
        accept_loop_.get(), std::move(fd), transport, options,
        [this](AcceptedGuest guest) { OnGuestConnected(std::move(guest)); }));
    Acceptor* acceptor = acceptors_.back().get();
    accept_loop_->RunInLoop([acceptor] { acceptor->Start(); });
  }
  started_ = true;
  spdlog::info("kvmid listening on {}{}", config_.unix_socket,
               config_.vsock_port ? " and vsock port " + std::to_string(*config_.vsock_port) : "");
  return absl::OkStatus();
}

void Daemon::SetIoNice() {
  // The value every other thread inherits (they are started from this one): the I/O threads never
  // rank below the threads that serve clients, so a process that already runs stronger than
  // io_nice (a unit's Nice=-15) leaves them at its value.
  errno = 0;
  const int process_nice = ::getpriority(PRIO_PROCESS, 0);
  if (errno == 0 && process_nice < config_.io_nice) {
    // Expected with the default and a unit that sets Nice= lower; a value asked for on purpose
    // that is not applied deserves a warning.
    const auto level =
        config_.io_nice == kDefaultIoNice ? spdlog::level::info : spdlog::level::warn;
    spdlog::log(level,
                "io_nice: the process runs at nice {}, stronger than io_nice {}: the {} I/O "
                "threads keep {}, never below the threads that serve clients",
                process_nice, config_.io_nice, loops_.size(), process_nice);
    return;
  }
  size_t set = 0;
  absl::Status first_error;
  for (const auto& loop : loops_) {
    absl::Status status = loop->SetNice(config_.io_nice);
    if (status.ok()) {
      ++set;
    } else if (first_error.ok()) {
      first_error = status;
    }
  }
  if (first_error.ok()) {
    spdlog::info("io_nice: {} I/O threads at nice {}", loops_.size(), config_.io_nice);
    return;
  }
  absl::StatusOr<int> mine = loops_.back()->Nice();
  spdlog::warn("io_nice: {} of {} I/O threads at nice {}, the others at {}: {}", set, loops_.size(),
               config_.io_nice, mine.ok() ? std::to_string(*mine) : "(unknown)",
               std::string(first_error.message()));
}

void Daemon::OnGuestConnected(AcceptedGuest accepted) {
  EventLoop* loop = loops_[next_loop_++ % loops_.size()].get();
  GuestSession::Options options;
  options.command_timeout = config_.command_timeout;
  options.consume_on_reply = config_.consume_on_reply;
  // The guest object outlives its sessions (the registry keeps it), so it can be the session's
  // listener from the first byte on.
  std::shared_ptr<Guest> guest = registry_->FindOrCreate(accepted.identity);
  auto session = std::make_shared<GuestSession>(loop, std::move(accepted.fd), accepted.identity,
                                                guest.get(), options);
  if (!registry_->Attach(guest, session)) {
    session->Close("another live connection holds this guest");
    return;
  }
  loop->RunInLoop([session, early = std::move(accepted.early_bytes)] { session->Start(early); });
}

absl::Status PolicyCountAfterReload(const std::vector<std::shared_ptr<const Rule>>& current,
                                    const std::set<std::string>& removed,
                                    const std::set<std::string>& configured,
                                    const security::Limits& limits) {
  std::set<std::string> after = configured;
  for (const auto& rule : current) {
    if (removed.count(rule->name) == 0) after.insert(rule->name);
  }
  if (after.size() <= limits.max_policies) return absl::OkStatus();
  return security::Exhausted(
      security::Limit::kMaxPolicies, limits,
      absl::StrCat("reload: ", configured.size(), " configured policies and the ones applied ",
                   "through the API would make ", after.size(),
                   " policies (delete API policies or raise the limit)"));
}

absl::Status Daemon::Reload(const LoadedConfig& config) {
  MutexLock lock(&reload_mutex_);
  std::set<std::string> names;
  for (const auto& rule : config.rules) names.insert(rule->name);
  std::set<std::string> removed;
  for (const std::string& name : configured_policies_) {
    if (names.count(name) == 0) removed.insert(name);
  }
  {
    // Serialized with ApplyApiPolicy: the count below is the count the reload leaves.
    MutexLock api_lock(&api_policies_mutex_);
    absl::Status within =
        PolicyCountAfterReload(*policies_.rules(), removed, names, config.security.limits);
    if (!within.ok()) return within;
    // API policies whose names the file now configures: the file's version replaces them, and
    // they leave the state file first (if that fails, the reload changes nothing).
    std::vector<std::shared_ptr<const Rule>> kept;
    std::vector<std::string> displaced;
    for (const auto& rule : api_policies_) {
      if (names.count(rule->name) > 0) {
        displaced.push_back(rule->name);
      } else {
        kept.push_back(rule);
      }
    }
    if (!displaced.empty() && persister_) {
      absl::Status persisted = persister_(kept);
      if (!persisted.ok()) {
        return absl::Status(
            persisted.code(),
            absl::StrCat("reload: API policies the configuration now names (",
                         absl::StrJoin(displaced, ", "),
                         ") could not be dropped from the saved state: ", persisted.message()));
      }
    }
    const PolicySet::Snapshot before = policies_.rules();
    std::string error = policies_.ReplaceConfigured(removed, config.rules);
    if (!error.empty()) {
      if (!displaced.empty() && persister_) {
        absl::Status restored = persister_(api_policies_);
        if (!restored.ok()) {
          spdlog::error("reload refused, but the saved API policies could not be restored: {}",
                        std::string(restored.message()));
        }
      }
      return absl::InvalidArgumentError(error);
    }
    api_policies_ = std::move(kept);
    for (const std::string& name : displaced) {
      spdlog::warn(
          "reload: policy {} was applied through the API; the configuration now defines it, "
          "so the configuration's version is in force and the API's is no longer saved",
          name);
    }
    for (const auto& rule : *before) {
      if (rule->overrides_config) {
        spdlog::warn(
            "reload: the API override of configured policy {} (etag {}) ends; the "
            "configuration's version is in force again",
            rule->name, rule->etag);
      }
    }
    for (const std::string& name : configured_policies_) {
      if (names.count(name) > 0 && std::none_of(before->begin(), before->end(),
                                                [&](const auto& r) { return r->name == name; })) {
        spdlog::warn("reload: configured policy {}, deleted through the API, is in force again",
                     name);
      }
    }
  }
  configured_policies_ = std::move(names);
  pipeline_->SetDeadlines(config.daemon.verdicts.deadlines);
  pipeline_->ReplaceGuestLabels(config.guest_labels);
  if (config.security.authorizer) authorizer_.Set(config.security.authorizer);
  set_limits(config.security.limits);
  bool started = false;
  {
    MutexLock lifecycle(&lifecycle_mutex_);
    started = started_;
    for (auto& acceptor : acceptors_) {
      acceptor->SetHandshakeSlotsPerPeer(config.security.limits.handshake_slots_per_peer);
    }
  }
  RearmAllGuests();
  const DaemonConfig& next = config.daemon;
  if (started &&
      (next.unix_socket != config_.unix_socket || next.vsock_port != config_.vsock_port ||
       next.io_threads != config_.io_threads || next.io_nice != config_.io_nice ||
       next.io_idle_yields != config_.io_idle_yields || next.cookie_file != config_.cookie_file ||
       next.allowed_uids != config_.allowed_uids || next.allowed_cids != config_.allowed_cids)) {
    spdlog::warn(
        "reload: listener settings (sockets, io_threads, io_nice, io_idle_yields, cookie, allowed "
        "peers) changed; they take effect at the next restart");
  }
  return absl::OkStatus();
}

security::Limits Daemon::limits() const {
  MutexLock lock(&limits_mutex_);
  return limits_;
}

void Daemon::set_limits(const security::Limits& limits) {
  {
    MutexLock lock(&limits_mutex_);
    limits_ = limits;
  }
  registry_->SetGoneGuestBounds(std::chrono::seconds(limits.gone_guest_retention_seconds),
                                limits.max_gone_guests);
}

std::set<std::string> Daemon::configured_policies() const {
  MutexLock lock(&reload_mutex_);
  return configured_policies_;
}

absl::Status Daemon::ApplyPolicy(std::shared_ptr<Rule> rule) {
  std::string error = policies_.Apply(std::move(rule));
  if (!error.empty()) return absl::InvalidArgumentError(error);
  RearmAllGuests();
  return absl::OkStatus();
}

bool Daemon::RemovePolicy(const std::string& name) {
  bool removed = policies_.Remove(name);
  if (removed) RearmAllGuests();
  return removed;
}

absl::StatusOr<PolicyWrite> Daemon::ApplyApiPolicy(std::shared_ptr<Rule> rule,
                                                   const PolicyPrecondition& precondition) {
  MutexLock lock(&api_policies_mutex_);
  {
    // Validated apart first (the rule is not shared yet): a rule that cannot be applied is never
    // persisted.
    PolicySet scratch;
    std::string error = scratch.Apply(rule);
    if (!error.empty()) return absl::InvalidArgumentError(error);
  }
  const security::Limits limits = this->limits();
  absl::Status within =
      security::CheckPolicySizes(rule->name, rule->description.size(), rule->origin.size(), limits);
  if (!within.ok()) return within;
  const std::string name = rule->name;
  // Create or replace, the etag, the configuration's protection: before persisting; checked
  // again where the rule goes in (ApplyChecked), with the count.
  absl::Status allowed = policies_.CheckWrite(name, precondition, /*deleting=*/false);
  if (!allowed.ok()) return allowed;
  auto admit = [&limits, &name](size_t count_without_it) {
    return security::CheckPolicyCount(name, limits, count_without_it);
  };
  const std::shared_ptr<const Rule> current = policies_.Find(name);
  {
    // Before persisting; checked again where the rule goes in (ApplyChecked, below), since a
    // reload may add configured policies meanwhile.
    const auto rules = policies_.rules();
    within = admit(rules->size() - (current != nullptr ? 1 : 0));
    if (!within.ok()) return within;
  }
  // An override of a configured policy is not saved: it lasts until the next reload or restart.
  const bool overrides = current != nullptr && current->config_owned();
  std::vector<std::shared_ptr<const Rule>> next = api_policies_;
  if (!overrides) {
    auto it =
        std::find_if(next.begin(), next.end(), [&](const auto& r) { return r->name == name; });
    if (it != next.end()) {
      *it = rule;
    } else {
      next.push_back(rule);
    }
    if (persister_) {
      absl::Status persisted = persister_(next);
      if (!persisted.ok()) {
        return absl::Status(persisted.code(), "policy " + name +
                                                  " not applied: it could not be persisted: " +
                                                  std::string(persisted.message()));
      }
    }
  }
  absl::StatusOr<PolicyWrite> applied =
      policies_.ApplyChecked(std::move(rule), precondition, admit);
  if (!applied.ok()) {
    // Refused by the count (a reload added policies since the check above): what is persisted
    // goes back to what is in effect.
    if (persister_ && !overrides) {
      absl::Status restored = persister_(api_policies_);
      if (!restored.ok()) {
        spdlog::error("policy {} refused, but the saved API policies could not be restored: {}",
                      name, std::string(restored.message()));
      }
    }
    if (applied.status().code() == absl::StatusCode::kInvalidArgument) {
      return absl::InternalError(applied.status().message());  // validated above: not expected
    }
    return applied.status();
  }
  api_policies_ = std::move(next);
  RearmAllGuests();
  return applied;
}

absl::StatusOr<PolicyWrite> Daemon::RemoveApiPolicy(const std::string& name,
                                                    const PolicyPrecondition& precondition) {
  MutexLock lock(&api_policies_mutex_);
  absl::Status allowed = policies_.CheckWrite(name, precondition, /*deleting=*/true);
  if (!allowed.ok()) return allowed;
  std::vector<std::shared_ptr<const Rule>> next = api_policies_;
  auto it = std::find_if(next.begin(), next.end(), [&](const auto& r) { return r->name == name; });
  const bool saved = it != next.end();
  if (saved) {
    next.erase(it);
    if (persister_) {
      absl::Status persisted = persister_(next);
      if (!persisted.ok()) {
        return absl::Status(persisted.code(), "policy " + name +
                                                  " not deleted: it could not be persisted: " +
                                                  std::string(persisted.message()));
      }
    }
  }
  absl::StatusOr<PolicyWrite> removed = policies_.RemoveChecked(name, precondition);
  if (!removed.ok()) {
    // Only a configuration-path change since the check above (ApplyPolicy/RemovePolicy).
    if (persister_ && saved) {
      absl::Status restored = persister_(api_policies_);
      if (!restored.ok()) {
        spdlog::error("policy {} not deleted, but the saved API policies could not be restored: {}",
                      name, std::string(restored.message()));
      }
    }
    return removed.status();
  }
  api_policies_ = std::move(next);
  RearmAllGuests();
  trimmer_.Freed(removed->previous->origin.size() + removed->previous->description.size());
  return removed;
}

void Daemon::set_policy_persister(PolicyPersister persister) {
  MutexLock lock(&api_policies_mutex_);
  persister_ = std::move(persister);
}

std::vector<std::shared_ptr<const Rule>> Daemon::api_policies() const {
  MutexLock lock(&api_policies_mutex_);
  return api_policies_;
}

void Daemon::RearmAllGuests() {
  for (const auto& guest : registry_->List()) {
    if (guest->state() == GuestState::kHooked) pipeline_->ArmPolicies(guest);
  }
}

void Daemon::Shutdown(std::chrono::milliseconds grace) {
  {
    MutexLock lock(&lifecycle_mutex_);
    if (!started_ || shut_down_) return;
    shut_down_ = true;
    for (auto& acceptor : acceptors_) {
      Acceptor* a = acceptor.get();
      accept_loop_->RunInLoop([a] { a->Stop(); });
    }
  }
  // Unhook every live guest: disarm, then close. Wait for all of them, at most `grace`; the
  // wait state is shared so that late completions after the grace period touch nothing freed.
  struct Wait {
    Mutex mutex;
    CondVar cv;
    size_t remaining ABSL_GUARDED_BY(mutex) = 0;
  };
  auto wait = std::make_shared<Wait>();
  for (const auto& guest : registry_->List()) {
    if (!guest->session()) continue;
    {
      MutexLock lock(&wait->mutex);
      ++wait->remaining;
    }
    guest->Unhook("kvmid is shutting down", [wait] {
      MutexLock lock(&wait->mutex);
      if (--wait->remaining == 0) wait->cv.SignalAll();
    });
  }
  {
    MutexLock lock(&wait->mutex);
    const auto deadline = std::chrono::steady_clock::now() + grace;
    while (wait->remaining > 0) {
      if (!wait->cv.WaitUntil(&wait->mutex, deadline)) break;
    }
  }
  for (const auto& guest : registry_->List()) {
    if (auto session = guest->session()) session->Close("kvmid stopped");
  }
  accept_loop_->Stop();
  for (auto& loop : loops_) loop->Stop();
  if (!config_.unix_socket.empty()) ::unlink(config_.unix_socket.c_str());
}

}  // namespace kvmid
