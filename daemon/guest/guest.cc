#include "daemon/guest/guest.h"

#include <spdlog/spdlog.h>

#include <optional>

#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

constexpr size_t kMaxArmErrors = 16;  // recent arming failures a snapshot shows

const OwnerId kDaemonOwner = "daemon";

using DeltaCallback = std::function<void(const std::string& what, const CommandResult& result)>;

// How many completions SendDelta reports for the same arguments.
size_t DeltaCompletions(const ArmingDelta& delta, bool vm_wide, uint32_t first_vcpu,
                        uint32_t end_vcpu) {
  size_t n = 0;
  for (uint32_t v = first_vcpu; v < end_vcpu; ++v) {
    n += delta.ForVcpu(static_cast<uint16_t>(v)).size();
  }
  if (vm_wide) {
    n += delta.vm_events.size();
    n += (delta.page_access.size() + kvmi::kMaxSetPageAccessEntries - 1) /
         kvmi::kMaxSetPageAccessEntries;
  }
  return n;
}

// Sends the commands that carry out `delta`: VM-wide ones when `vm_wide`, per-vCPU ones for
// vCPUs [first_vcpu, end_vcpu). `done` runs once per command (per message for page access):
// DeltaCompletions(delta, vm_wide, first_vcpu, end_vcpu) times.
void SendDelta(const std::shared_ptr<GuestSession>& session, const ArmingDelta& delta, bool vm_wide,
               uint32_t first_vcpu, uint32_t end_vcpu, const DeltaCallback& done) {
  auto callback = [&done](std::string what) {
    return [done, what = std::move(what)](const CommandResult& r) { done(what, r); };
  };
  if (vm_wide) {
    for (auto [event, enable] : delta.vm_events) {
      kvmi::ControlVmEventsRequest request;
      request.event_id = event;
      request.enable = enable;
      session->Send(request, callback(std::string("CONTROL_VM_EVENTS ") + kvmi::EventName(event)));
    }
  }
  for (uint32_t v = first_vcpu; v < end_vcpu; ++v) {
    uint16_t vcpu = static_cast<uint16_t>(v);
    const VcpuArmingDelta vcpu_delta = delta.ForVcpu(vcpu);
    for (auto [event, enable] : vcpu_delta.events) {
      kvmi::ControlEventsRequest request;
      request.vcpu = vcpu;
      request.event_id = event;
      request.enable = enable;
      session->Send(request, callback(std::string("CONTROL_EVENTS ") + kvmi::EventName(event) +
                                      " vCPU " + std::to_string(vcpu)));
    }
    for (auto [cr, enable] : vcpu_delta.crs) {
      kvmi::ControlCrRequest request;
      request.vcpu = vcpu;
      request.cr = cr;
      request.enable = enable;
      session->Send(request,
                    callback("CONTROL_CR " + std::to_string(cr) + " vCPU " + std::to_string(vcpu)));
    }
    for (auto [msr, enable] : vcpu_delta.msrs) {
      kvmi::ControlMsrRequest request;
      request.vcpu = vcpu;
      request.msr = msr;
      request.enable = enable;
      session->Send(request, callback("CONTROL_MSR " + std::to_string(msr) + " vCPU " +
                                      std::to_string(vcpu)));
    }
  }
  if (vm_wide && !delta.page_access.empty()) {
    std::vector<kvmi::PageAccess> entries;
    entries.reserve(delta.page_access.size());
    for (auto [gfn, access] : delta.page_access) {
      kvmi::PageAccess entry;
      entry.gpa = gfn * KVMI_PAGE_SIZE;
      entry.access = access;
      entries.push_back(entry);
    }
    session->SetPageAccess(std::move(entries), [done](const std::vector<CommandResult>& per_message,
                                                      const std::vector<int32_t>&) {
      for (const CommandResult& r : per_message) done("SET_PAGE_ACCESS", r);
    });
  }
}

}  // namespace

const char* GuestStateName(GuestState state) {
  switch (state) {
    case GuestState::kHandshaking:
      return "handshaking";
    case GuestState::kHooked:
      return "hooked";
    case GuestState::kUnhooking:
      return "unhooking";
    case GuestState::kGone:
      return "gone";
  }
  return "?";
}

Guest::Guest(std::string key, GuestIdentity identity, GuestEventRouter* router,
             GuestStateListener* state_listener)
    : key_(std::move(key)),
      router_(router),
      state_listener_(state_listener),
      identity_(std::move(identity)) {}

void Guest::NotifyStateChanged() {
  if (state_listener_ != nullptr) state_listener_->GuestStateChanged(shared_from_this());
}

std::string Guest::log_name() const {
  MutexLock lock(&mutex_);
  return LogNameLocked();
}

std::string Guest::LogNameLocked() const {
  return "vm " + (identity_.name.empty() ? std::string("(unnamed)") : identity_.name) + " " +
         kvmi::UuidToString(identity_.uuid);
}

bool Guest::Attach(const std::shared_ptr<GuestSession>& session) {
  {
    MutexLock lock(&mutex_);
    if (session_ && !session_->closed()) return false;
    session_ = session;
    identity_ = session->identity();  // name/start time may change across a migration
    std::atomic_store(&view_, std::shared_ptr<const GuestView>());
    state_ = GuestState::kHandshaking;
    applied_ = Arming();  // the kernel forgot everything when the previous session ended
    connections_++;
  }
  NotifyStateChanged();
  auto self = shared_from_this();
  Probe::Start(session, [self, session](absl::StatusOr<HostCapabilities> probed) {
    self->OnProbed(session, std::move(probed));
  });
  return true;
}

GuestIdentity Guest::identity() const {
  MutexLock lock(&mutex_);
  return identity_;
}

std::shared_ptr<GuestSession> Guest::session() const {
  MutexLock lock(&mutex_);
  return session_;
}

GuestState Guest::state() const {
  MutexLock lock(&mutex_);
  return state_;
}

uint32_t Guest::vcpu_count() const {
  MutexLock lock(&mutex_);
  return host_.vcpu_count;
}

bool Guest::EventAllowed(uint8_t event) const {
  MutexLock lock(&mutex_);
  return (host_.allowed_events & (1u << event)) != 0;
}

GuestSnapshot Guest::Snapshot() const {
  MutexLock lock(&mutex_);
  GuestSnapshot s;
  s.identity = identity_;
  s.key = key_;
  s.state = state_;
  s.kvmi_version = host_.kvmi_version;
  s.vcpu_count = host_.vcpu_count;
  s.allowed_commands = host_.allowed_commands;
  s.allowed_events = host_.allowed_events;
  s.connections = connections_;
  s.events = events_.load();
  s.fallbacks = fallbacks_.load();
  s.leases = leases_.by_owner();
  s.applied = applied_;
  s.arm_errors = arm_errors_;
  for (const auto& [vcpu, hold] : held_) s.paused_vcpus[vcpu] = hold.owner;
  s.arming_in_flight = arming_in_flight_.load();
  return s;
}

void Guest::OnProbed(const std::shared_ptr<GuestSession>& session,
                     absl::StatusOr<HostCapabilities> probed) {
  if (!probed.ok()) {
    session->Close(std::string(probed.status().message()));
    return;
  }
  {
    MutexLock lock(&mutex_);
    if (session_ != session) return;  // superseded meanwhile
    host_ = *probed;
    state_ = GuestState::kHooked;
    // Hooked and the daemon's own lease decided in one step: whoever sees kHooked also sees
    // that lease, in flight until the host acknowledges it (ApplyArming below sends it).
    // The daemon itself wants to know about new vCPUs (to arm them) and about UNHOOK requests
    // (to let QEMU migrate or snapshot promptly).
    Arming own;
    for (uint8_t event : {KVMI_EVENT_CREATE_VCPU, KVMI_EVENT_UNHOOK}) {
      if ((probed->allowed_events & (1u << event)) != 0) own.vm_events.insert(event);
    }
    leases_.Set(kDaemonOwner, own);
    arming_in_flight_++;
  }
  spdlog::info("{}: hooked: KVMI v{}, {} vCPUs, {} commands and {} events allowed",
               session->log_name(), probed->kvmi_version, probed->vcpu_count,
               __builtin_popcount(probed->allowed_commands),
               __builtin_popcount(probed->allowed_events));
  NotifyStateChanged();
  // The daemon's lease is sent with whatever the policies add.
  router_->GuestHooked(shared_from_this());
  ApplyArming();
}

void Guest::ChangeLeases(const std::function<bool(Leases*)>& change, ArmedCallback armed) {
  {
    MutexLock lock(&mutex_);
    if (!change(&leases_)) {
      if (armed) armed({});
      return;
    }
    arming_in_flight_++;  // this decision, until ApplyArming has turned it into commands
  }
  ApplyArming(std::move(armed));
}

void Guest::SetLease(const OwnerId& owner, Arming arming) {
  ChangeLeases([&](Leases* leases) {
    leases->Set(owner, std::move(arming));
    return true;
  });
}

void Guest::AddLease(const OwnerId& owner, const Arming& arming) {
  ChangeLeases([&](Leases* leases) {
    leases->Add(owner, arming);
    return true;
  });
}

Arming Guest::UpdateLease(const OwnerId& owner, const std::function<void(Arming*)>& change,
                          ArmedCallback armed) {
  Arming lease;
  ChangeLeases(
      [&](Leases* leases) {
        auto it = leases->by_owner().find(owner);
        if (it != leases->by_owner().end()) lease = it->second;
        change(&lease);
        leases->Set(owner, lease);
        return true;
      },
      std::move(armed));
  return lease;
}

void Guest::ReleaseLease(const OwnerId& owner) {
  ChangeLeases([&](Leases* leases) { return leases->Release(owner); });
}

void Guest::RecordArmError(const std::string& what) {
  spdlog::warn("{}: arming: {}", log_name(), what);
  MutexLock lock(&mutex_);
  if (arm_errors_.size() >= kMaxArmErrors) arm_errors_.erase(arm_errors_.begin());
  arm_errors_.push_back(what);
}

void Guest::ApplyArming(ArmedCallback armed) {
  std::shared_ptr<GuestSession> session = this->session();
  if (!session) {
    arming_in_flight_--;  // the caller's decision: nothing to send
    // Armed when the guest (re)connects; nothing to acknowledge now.
    if (armed) armed({"the guest is not connected (armed when it reconnects)"});
    return;
  }
  auto self = shared_from_this();
  // Computed and sent on the session's loop thread, so two changes can never reach the wire in
  // the opposite order from the one they were decided in.
  session->loop()->RunInLoop(
      [self, session, armed = std::move(armed)] { self->ApplyArmingInLoop(session, armed); });
}

void Guest::ApplyArmingInLoop(const std::shared_ptr<GuestSession>& session,
                              const ArmedCallback& armed) {
  ArmingDelta delta;
  uint32_t vcpus = 0;
  bool live;
  {
    MutexLock lock(&mutex_);
    live = session_ == session && state_ == GuestState::kHooked;
    if (live) {
      Arming wanted = leases_.Effective();
      delta = Diff(applied_, wanted);
      applied_ = std::move(wanted);
      vcpus = host_.vcpu_count;
    }
  }
  // The caller's decision (one count) is replaced by the commands it turns into, if any, so
  // the count never drops to zero between a lease change and the host's acknowledgement; it
  // is settled before `armed` runs, so whoever `armed` wakes sees it.
  if (!live) {
    arming_in_flight_--;
    if (armed) armed({"the guest is not hooked (armed when it is)"});
    return;
  }
  // Counted before sending: "applied" above is what was decided, this says when the host
  // has acknowledged it. Completions run on this loop thread, one per command.
  const size_t commands = DeltaCompletions(delta, /*vm_wide=*/true, 0, vcpus);
  arming_in_flight_ += commands;
  arming_in_flight_--;  // the caller's count, replaced by the commands
  if (commands == 0) {  // nothing changed (or per-vCPU changes and no vCPU yet)
    if (armed) armed({});
    return;
  }
  struct Progress {
    size_t remaining;
    std::vector<std::string> errors;
  };
  auto progress = std::make_shared<Progress>(Progress{commands, {}});
  auto self = shared_from_this();
  SendDelta(session, delta, /*vm_wide=*/true, 0, vcpus,
            [self, progress, armed](const std::string& what, const CommandResult& r) {
              self->arming_in_flight_--;
              if (!r.ok()) {
                self->RecordArmError(what + ": " + r.ToString());
                progress->errors.push_back(what + ": " + r.ToString());
              }
              if (--progress->remaining == 0 && armed) armed(std::move(progress->errors));
            });
}

void Guest::SetPages(const OwnerId& owner, std::vector<std::pair<uint64_t, uint8_t>> pages,
                     bool all_or_nothing, PagesCallback done) {
  std::shared_ptr<GuestSession> session = this->session();
  if (!session) {
    done(std::vector<int32_t>(pages.size(), -KVM_EAGAIN), false);
    return;
  }
  auto self = shared_from_this();
  // In flight, like a lease change, until every step has answered (roll back included).
  arming_in_flight_++;
  done = [self, done = std::move(done)](std::vector<int32_t> errors, bool rolled_back) {
    self->arming_in_flight_--;
    done(std::move(errors), rolled_back);
  };
  auto change = std::make_shared<PageAccessChange>(owner, std::move(pages), all_or_nothing);
  // On the loop thread, like ApplyArming: the two never interleave on the wire.
  session->loop()->RunInLoop([self, session, change, done = std::move(done)] {
    self->SetPagesInLoop(session, change, done);
  });
}

void Guest::SetPagesInLoop(const std::shared_ptr<GuestSession>& session,
                           const std::shared_ptr<PageAccessChange>& change,
                           const PagesCallback& done) {
  {
    MutexLock lock(&mutex_);
    change->Plan(&leases_, &applied_);
  }
  if (change->entries().empty()) {
    done(change->errors(), false);
    return;
  }
  auto self = shared_from_this();
  change->Send(session,
               [self, session, change, done] { self->OnPagesAnswered(session, change, done); });
}

void Guest::OnPagesAnswered(const std::shared_ptr<GuestSession>& session,
                            const std::shared_ptr<PageAccessChange>& change,
                            const PagesCallback& done) {
  if (!change->failed()) {
    done(change->errors(), false);
    return;
  }
  std::vector<kvmi::PageAccess> undo;
  {
    MutexLock lock(&mutex_);
    undo = change->RollBack(&leases_, &applied_);
  }
  if (undo.empty()) {
    done(change->errors(), change->rolled_back());
    return;
  }
  auto self = shared_from_this();
  PageAccessChange::SendUndo(session, std::move(undo),
                             [self, change, done](const std::vector<std::string>& failures) {
                               for (const std::string& failure : failures) {
                                 self->RecordArmError("SET_PAGE_ACCESS rollback: " + failure);
                               }
                               done(change->errors(), true);
                             });
}

void Guest::ArmNewVcpu(uint16_t vcpu) {
  std::shared_ptr<GuestSession> session;
  ArmingDelta delta;
  {
    MutexLock lock(&mutex_);
    if (vcpu >= host_.vcpu_count) host_.vcpu_count = vcpu + 1u;
    session = session_;
    // The new vCPU gets what every other vCPU already has.
    delta = Diff(Arming(), applied_);
  }
  if (!session) return;
  auto self = shared_from_this();
  arming_in_flight_ += DeltaCompletions(delta, /*vm_wide=*/false, vcpu, vcpu + 1u);
  SendDelta(session, delta, /*vm_wide=*/false, vcpu, vcpu + 1u,
            [self](const std::string& what, const CommandResult& r) {
              self->arming_in_flight_--;
              if (!r.ok()) self->RecordArmError(what + " (new vCPU): " + r.ToString());
            });
}

void Guest::Unhook(const std::string& why, const std::function<void()>& done) {
  std::shared_ptr<GuestSession> session;
  Arming applied;
  uint32_t vcpus = 0;
  {
    MutexLock lock(&mutex_);
    session = session_;
    if (!session || session->closed()) {
      if (done) session ? session->loop()->Post(done) : done();
      return;
    }
    state_ = GuestState::kUnhooking;
    applied = std::move(applied_);
    applied_ = Arming();
    vcpus = host_.vcpu_count;
  }
  NotifyStateChanged();
  spdlog::info("{}: unhooking: {}", session->log_name(), why);
  // Disarm everything we armed, then close once the host has acknowledged all of it: the
  // kernel would restore page access at session end anyway, but intercepts left enabled would
  // cost the guest exits until then. Leases stay, to re-arm if the guest comes back.
  ArmingDelta delta = Diff(applied, Arming());
  auto remaining = std::make_shared<std::atomic<size_t>>(1);
  auto finish = [session, remaining, why, done] {
    if (--*remaining > 0) return;
    session->Close("unhooked: " + why);
    if (done) done();
  };
  // Counted before anything is sent: a reply may come back before SendDelta returns.
  *remaining += DeltaCompletions(delta, /*vm_wide=*/true, 0, vcpus);
  SendDelta(session, delta, /*vm_wide=*/true, 0, vcpus,
            [finish](const std::string&, const CommandResult&) { finish(); });
  session->loop()->RunInLoop(finish);  // drops the initial count
}

void Guest::Pause(const OwnerId& owner, uint16_t vcpu,
                  const std::function<void(CommandResult)>& paused) {
  std::shared_ptr<GuestSession> session = this->session();
  if (!session || state() != GuestState::kHooked) {
    paused(CommandResult::Closed("the guest is not hooked"));
    return;
  }
  {
    MutexLock lock(&mutex_);
    pause_requests_[vcpu].push_back(PauseRequest{owner, paused});
  }
  kvmi::PauseVcpuRequest request;
  request.vcpu = vcpu;
  auto self = shared_from_this();
  session->Send(request, [self, vcpu, owner](CommandResult r) {
    if (r.ok()) return;  // `paused` runs when the event arrives
    self->OnPauseFailed(owner, vcpu, std::move(r));
  });
}

void Guest::OnPauseFailed(const OwnerId& owner, uint16_t vcpu, CommandResult result) {
  std::function<void(CommandResult)> paused;
  {
    MutexLock lock(&mutex_);
    auto& queue = pause_requests_[vcpu];
    for (auto it = queue.begin(); it != queue.end(); ++it) {
      if (it->owner == owner) {
        paused = std::move(it->paused);
        queue.erase(it);
        break;
      }
    }
  }
  if (paused) paused(std::move(result));
}

uint64_t Guest::PausedEventId(uint16_t vcpu) const {
  MutexLock lock(&mutex_);
  auto it = held_.find(vcpu);
  return it == held_.end() ? 0 : it->second.event_id;
}

bool Guest::HasPauseRequest(uint16_t vcpu) const {
  MutexLock lock(&mutex_);
  auto it = pause_requests_.find(vcpu);
  return it != pause_requests_.end() && !it->second.empty();
}

bool Guest::HoldPause(uint16_t vcpu, std::unique_ptr<HeldEvent> hold, uint64_t event_id) {
  std::function<void(CommandResult)> paused;
  std::unique_ptr<HeldEvent> stale;
  {
    MutexLock lock(&mutex_);
    auto it = pause_requests_.find(vcpu);
    if (it == pause_requests_.end() || it->second.empty()) return false;
    PauseRequest request = std::move(it->second.front());
    it->second.pop_front();
    // Its owner went away before the vCPU stopped: nobody holds it, it continues at once.
    if (request.owner.empty()) return false;
    // One vCPU has at most one outstanding event (the session closes on a second), so a hold
    // still here is of a pause answered since without the guest being told: the pause deadline's
    // fallback. This pause replaces it (before, it was reported paused and let go at once).
    auto it_held = held_.find(vcpu);
    if (it_held != held_.end()) stale = std::move(it_held->second.event);
    held_[vcpu] = Hold{request.owner, std::move(hold), event_id};
    paused = std::move(request.paused);
  }
  stale.reset();  // outside the lock; its event was answered, so this answers nothing
  if (paused) paused(CommandResult::Ok());
  return true;
}

bool Guest::Resume(const OwnerId& owner, uint16_t vcpu) {
  std::unique_ptr<HeldEvent> event;
  {
    MutexLock lock(&mutex_);
    auto it = held_.find(vcpu);
    if (it == held_.end() || it->second.owner != owner) return false;
    event = std::move(it->second.event);
    held_.erase(it);
  }
  event->Release("resume:" + owner);
  return true;
}

void Guest::ReleaseOwner(const OwnerId& owner) {
  std::vector<std::unique_ptr<HeldEvent>> released;
  std::vector<std::function<void(CommandResult)>> cancelled;
  {
    MutexLock lock(&mutex_);
    for (auto it = held_.begin(); it != held_.end();) {
      if (it->second.owner == owner) {
        released.push_back(std::move(it->second.event));
        it = held_.erase(it);
      } else {
        ++it;
      }
    }
    // Pauses asked for and not yet in effect: each PAUSE_VCPU command still brings its event
    // (the queue stays in step with the host), but no one holds the vCPU when it comes.
    for (auto& [vcpu, queue] : pause_requests_) {
      for (PauseRequest& request : queue) {
        if (request.owner != owner) continue;
        request.owner.clear();
        if (request.paused) cancelled.push_back(std::move(request.paused));
        request.paused = nullptr;
      }
    }
  }
  for (auto& event : released) event->Release("owner gone:" + owner);
  for (auto& paused : cancelled) {
    paused(CommandResult::Closed("the pause's owner went away"));
  }
  ReleaseLease(owner);
}

void Guest::OnEvent(const std::shared_ptr<GuestSession>& session, const kvmi::Event& event) {
  events_++;
  if (event.id() == KVMI_EVENT_CREATE_VCPU) ArmNewVcpu(event.vcpu());
  router_->RouteEvent(shared_from_this(), session, event);
  if (event.id() == KVMI_EVENT_UNHOOK) Unhook("the host sent KVMI_EVENT_UNHOOK");
}

void Guest::OnClosed(const std::shared_ptr<GuestSession>& session, const std::string& reason) {
  auto self = shared_from_this();  // a gone guest may be forgotten by the registry meanwhile
  std::map<uint16_t, Hold> held;
  std::map<uint16_t, std::deque<PauseRequest>> requests;
  bool gone = false;
  {
    MutexLock lock(&mutex_);
    if (session_ == session) {
      gone = true;
      session_.reset();
      state_ = GuestState::kGone;
      applied_ = Arming();
      held.swap(held_);  // the kernel let those vCPUs go (§7.6)
      requests.swap(pause_requests_);
    }
  }
  for (auto& [vcpu, queue] : requests) {
    for (auto& request : queue) {
      if (request.paused) request.paused(CommandResult::Closed(reason));
    }
  }
  held.clear();
  if (gone) NotifyStateChanged();
  router_->SessionEnded(shared_from_this(), session);
}

}  // namespace kvmid
