#include "daemon/api/attach.h"

#include <spdlog/spdlog.h>

#include <cctype>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include "daemon/api/attach_outbox.h"
#include "daemon/api/convert.h"
#include "daemon/api/guest_commands.h"
#include "daemon/api/limits.h"
#include "daemon/api/stream_limits.h"
#include "daemon/base/mutex.h"
#include "daemon/config/policy_convert.h"
#include "kernel/abi/protocol.h"

namespace kvmid::api {

using grpc::Status;
using grpc::StatusCode;

namespace {

bool ValidHandlerId(const std::string& id) {
  if (id.empty() || id.size() > kMaxHandlerIdLength) return false;
  for (char c : id) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return false;
    }
  }
  return true;
}

}  // namespace

Status ParseClaim(const kvmi::v1::Claim& claim, const security::Limits& limits,
                  HandlerClaim* handler_claim, Arming* arming) {
  if (!ValidHandlerId(claim.handler_id())) {
    return InvalidArgument("claim.handler_id", "1-" + std::to_string(kMaxHandlerIdLength) +
                                                   " characters from [A-Za-z0-9._-]");
  }
  handler_claim->vms.assign(claim.vms().begin(), claim.vms().end());
  for (int i = 0; i < claim.events_size(); ++i) {
    uint8_t id;
    if (!FromEventType(claim.events(i), &id) || !kvmi::FindEvent(id)->has_reply) {
      return InvalidArgument("claim.events[" + std::to_string(i) + "]",
                             "not a blocking event type");
    }
    handler_claim->events.insert(id);
  }
  if (claim.deadline_ms() > limits.max_attach_deadline_ms) {
    return ToStatus(
        security::Exhausted(security::Limit::kMaxAttachDeadlineMs, limits,
                            "claim.deadline_ms is " + std::to_string(claim.deadline_ms()) + " ms"));
  }
  handler_claim->deadline = std::chrono::milliseconds(claim.deadline_ms());
  if (claim.has_context()) {
    Status context =
        ContextDemandFromProto(claim.context(), "claim.context", &handler_claim->context);
    if (!context.ok()) return context;
  }
  handler_claim->max_held = static_cast<uint32_t>(limits.max_held_events_per_handler);
  if (claim.max_batch() > kMaxEventBatch) {  // the stream's outbox uses it (SetMaxBatch)
    return InvalidArgument("claim.max_batch",
                           "at most " + std::to_string(kMaxEventBatch) + " events per message");
  }
  switch (claim.fallback()) {
    case kvmi::v1::ACTION_UNSPECIFIED:
      break;
    case kvmi::v1::ACTION_CONTINUE:
      handler_claim->fallback_action = KVMI_EVENT_ACTION_CONTINUE;
      break;
    case kvmi::v1::ACTION_CRASH:
      handler_claim->fallback_action = KVMI_EVENT_ACTION_CRASH;
      break;
    default:
      return InvalidArgument("claim.fallback", "CONTINUE or CRASH");
  }
  for (int i = 0; i < claim.arm_events_size(); ++i) {
    uint8_t id;
    if (!FromEventType(claim.arm_events(i), &id) || kvmi::FindEvent(id)->vm_event ||
        id == KVMI_EVENT_PAUSE_VCPU) {
      return InvalidArgument("claim.arm_events[" + std::to_string(i) + "]",
                             "not an event enabled per vCPU");
    }
    arming->vcpu_events.insert(id);
  }
  for (uint32_t cr : claim.arm_crs()) {
    if (!kvmi::IsControllableCr(cr))
      return InvalidArgument("claim.arm_crs", kvmi::kControllableCrs);
    arming->crs.insert(cr);
  }
  for (uint32_t msr : claim.arm_msrs()) {
    if (!kvmi::IsControllableMsr(msr)) {
      return InvalidArgument("claim.arm_msrs", kvmi::kControllableMsrs);
    }
    arming->msrs.insert(msr);
  }
  return Status::OK;
}

namespace {

// How long a read deferred after a handler's last verdict waits for the stream's next write
// before it starts anyway: the most a message sent then (a command, a half-close) waits to be
// read when kvmid has nothing to write. gRPC's alarms round up to the millisecond.
std::atomic<int64_t> read_deferral_us{1000};

// One Attach stream. Inline commands block (they wait for the guest), so they run in order on a
// thread of their own, started with the first command.
//
// Ending: a client that half-closes gets the results of the commands it sent, then OK; a
// cancelled or broken stream drops what is queued and runs no further command. Either way the
// handler stops at once (its events fall back) and OnDone releases everything the stream owned.
class AttachReactor final : public AttachStream {
 public:
  AttachReactor(Daemon* daemon, grpc::ServerContextBase* context,
                std::atomic<uint64_t>* next_stream, AttachCommandRunner run_command,
                std::shared_ptr<AttachGuard> guard, const CallContext* call)
      : daemon_(daemon),
        context_(context),
        next_stream_(next_stream),
        run_command_(std::move(run_command)),
        guard_(std::move(guard)),
        call_(call) {
    outbox_ = std::make_shared<AttachOutbox>(
        [this](const kvmi::v1::AttachResponse* message) { Write(message); },
        [this](const Status& status) { Finish(status); });
  }

  // The stream's place among its identity's streams (streams_per_identity), until OnDone.
  void Hold(StreamLimits::Admission admission) { admission_ = std::move(admission); }

  void Begin(const Status& admitted) {
    if (!admitted.ok()) {
      stopping_ = true;
      outbox_->RequestFinish(admitted, /*drain=*/false);
      return;
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed (or the stream broke: OnCancel follows)
      StopHandler();
      FinishAfterCommands();
      return;
    }
    if (stopping_) return;
    if (reader_handler_ == nullptr) {
      if (!request_.has_claim()) {
        return Stop(InvalidArgument("claim", "the first message must be a Claim"));
      }
      Status s = Claim(request_.claim());
      if (!s.ok()) return Stop(s);
    } else if (request_.has_verdict() || request_.has_verdicts()) {
      const auto& verdicts = request_.verdicts().verdicts();
      if (verdicts.size() > kMaxVerdictBatch) {
        return Stop(InvalidArgument(
            "verdicts.verdicts",
            "at most " + std::to_string(kMaxVerdictBatch) + " verdicts per message"));
      }
      // The handler's last held event answered: its next message is no verdict kvmid waits for,
      // so the next read starts with the stream's next write (or OnAlarm), and gRPC's window
      // update for this message goes out with that write instead of alone (designs 8 and 10 in
      // docs/PERFORMANCE.md: one send and one handler wake-up less). No read can start before
      // DeferRead, so request_ is still this message while it is answered.
      const uint64_t writes = writes_.load();
      bool holds_none = false;
      if (request_.has_verdict()) {
        holds_none = AnswerVerdict(request_.verdict());
      } else {
        // Several verdicts: the guests' loops write them (HandOff), each loop woken once when the
        // last verdict of the message was taken (each is checked and answered in turn first), and
        // before the deferral: their replies bring the next events.
        std::optional<EventLoop::HandOff> hand_off;
        if (verdicts.size() > 1) hand_off.emplace();
        for (const kvmi::v1::Verdict& verdict : verdicts) holds_none = AnswerVerdict(verdict);
      }
      if (holds_none) {
        DeferRead(writes);
        return;
      }
    } else if (request_.has_command()) {
      QueueCommand(std::move(*request_.mutable_command()));
    } else if (request_.has_claim()) {
      return Stop(InvalidArgument("claim", "a stream claims once, in its first message"));
    } else {  // nothing this kvmid knows (a newer client's field): said, not silently dropped
      return Stop(InvalidArgument(
          "message", "an AttachRequest sets one of claim, verdict, verdicts or command"));
    }
    ReadMore();
  }

  void OnWriteDone(bool ok) override {
    outbox_->OnWriteDone(ok);
    if (!ok) {  // the stream broke: end it as if cancelled
      Stop(Status::CANCELLED);
      return;
    }
    // Reads paused on a full backlog resume once the client took some of it.
    if (!stopping_ && read_paused_ && !outbox_->Congested() && read_paused_.exchange(false)) {
      StartRead(&request_);
    }
  }

  // The deferred read's bound: it starts now if no write started it. alarm_armed_ is cleared
  // first, so a deferral set from now on arms an alarm of its own.
  void OnAlarm() override {
    alarm_armed_ = false;
    if (!stopping_ && read_deferred_.exchange(false)) ReadMore();
  }

  void OnCancel() override { Stop(Status::CANCELLED); }

  void OnDone() override {
    StopHandler();
    if (!owner_.empty()) daemon_->ReleaseOwner(owner_);
    StopCommands();
    std::thread runner;
    {
      MutexLock lock(&commands_mu_);
      runner = std::move(command_runner_);
    }
    if (runner.joinable()) {
      // The command in progress ends with its guest's reply or kvmid's command timeout: joined on
      // a thread of its own, not on the completion-queue thread that runs OnDone (every stream's
      // reactions share those). The call, whose context the command reads, stays until then.
      std::function<void()> end_call = KeepCallAfterDone();
      std::thread([this, runner = std::move(runner), end_call]() mutable {
        runner.join();
        // It may have armed, restricted or paused for the stream after the release above.
        daemon_->ReleaseOwner(owner_);
        Released();
        end_call();
      }).detach();
      return;
    }
    Released();
  }

 private:
  // The stream's last release; deletes the reactor.
  void Released() {
    if (!owner_.empty()) spdlog::info("{} detached", owner_);
    admission_.Release();
    delete this;
  }

  Status Claim(const kvmi::v1::Claim& claim) {
    HandlerClaim handler_claim;
    Arming arming;
    Status s = ParseClaim(claim, daemon_->limits(), &handler_claim, &arming);
    if (!s.ok()) {
      // A deadline over limits.max_attach_deadline_ms is a limit's refusal: audited like every
      // other (rate limited; other parse errors are the client's and are not).
      if (call_ != nullptr) call_->AuditLimitRefusal(s);
      return s;
    }
    absl::StatusOr<EventFields> fields = CompileEventMask(claim.field_mask(), "claim.field_mask");
    if (!fields.ok()) return ToStatus(fields.status());
    if (guard_) {  // the claimed guests within the caller's scope, a CRASH fallback by an admin,
                   // event context (guest memory) by an operator
      s = guard_->AdmitClaim(claim);
      if (!s.ok()) return s;
    }
    // The handler's events carry the context it asked for, and none it did not ask for (another
    // consumer's demand), whatever its field mask says about "context".
    const EventFields event_fields = handler_claim.context.empty()
                                         ? fields->Without(kvmi::v1::Event::kContextFieldNumber)
                                         : fields->With(kvmi::v1::Event::kContextFieldNumber);
    owner_ = "client:" + claim.handler_id() + "#" + std::to_string((*next_stream_)++);
    // Claimed is queued first (events of the new registration queue behind it) and written once
    // the handler is registered and its arming requested: a client that has read Claimed gets
    // every event it claimed from then on.
    kvmi::v1::AttachResponse claimed;
    claimed.mutable_claimed()->set_owner(owner_);
    outbox_->Send(std::move(claimed));
    outbox_->SetMaxBatch(claim.max_batch());
    auto handler = std::make_shared<StreamHandler>(claim.handler_id(), outbox_, event_fields);
    reader_handler_ = handler.get();
    {
      MutexLock lock(&handler_mu_);
      handler_ = handler;
      registration_ = daemon_->pipeline().RegisterHandler(handler, handler_claim);
    }
    daemon_->SetClientArming(owner_, handler_claim.vms, arming);
    outbox_->Release();
    spdlog::info(
        "{} attached: {} event types, {} guests selected", owner_, handler_claim.events.size(),
        handler_claim.vms.empty() ? std::string("all") : std::to_string(handler_claim.vms.size()));
    return Status::OK;
  }

  // A verdict that CRASHes its guest needs admin there: refused, the event keeps waiting for
  // another verdict or its deadline (then its fallback). Other verdicts go straight through.
  // Returns whether the handler holds no event now.
  bool AnswerVerdict(const kvmi::v1::Verdict& verdict) {
    if (guard_ && verdict.action() == kvmi::v1::ACTION_CRASH) {
      // Not pending: Answer says so.
      if (std::shared_ptr<Guest> guest = reader_handler_->GuestOf(verdict.event_id())) {
        Status admitted = guard_->AdmitCrashVerdict(verdict, *guest);
        if (!admitted.ok()) {
          kvmi::v1::AttachResponse refused;
          refused.mutable_error()->set_event_id(verdict.event_id());
          refused.mutable_error()->set_message(admitted.error_message());
          outbox_->Send(std::move(refused));
          return false;
        }
      }
    }
    return reader_handler_->Answer(verdict);
  }

  // Every message the stream writes goes through here (the outbox's StartWrite). A read the last
  // verdict deferred starts with it. The call cannot end before the write does: the outbox holds
  // its write token (no Finish) until OnWriteDone.
  void Write(const kvmi::v1::AttachResponse* message) {
    writes_.fetch_add(1);
    if (read_deferred_.exchange(false) && !stopping_) {
      if (!outbox_->Congested()) return StartWriteThenRead(message, &request_);
      read_paused_ = true;  // this write's OnWriteDone resumes reading once there is room
    }
    StartWrite(message);
  }

  // Called after the verdict was answered, on the thread of its read (the read still counts:
  // the call lives). `writes_before`: writes_ before the answer. A write that started in between
  // (the guest's next event, quick) found no deferral, so the read starts now instead of waiting
  // for the alarm. Once read_deferred_ is set a loop thread's Write may start the next read, whose
  // OnReadDone may then run beside the end of this one: from here on only atomics (and ReadMore,
  // when this thread took the deferral back) are touched, never request_.
  void DeferRead(uint64_t writes_before) {
    read_deferred_ = true;
    if (writes_.load() != writes_before) {
      if (read_deferred_.exchange(false)) ReadMore();
      return;
    }
    if (!alarm_armed_.exchange(true)) {
      StartAlarm(std::chrono::microseconds(read_deferral_us.load(std::memory_order_relaxed)));
    }
  }

  void ReadMore() {
    if (outbox_->Congested()) {
      read_paused_ = true;
      // The backlog may have drained between the check and the flag: re-check.
      if (outbox_->Congested() || !read_paused_.exchange(false)) return;
    }
    StartRead(&request_);
  }

  // Ends the stream now: no more events or commands, what is queued is dropped.
  void Stop(const Status& status) {
    stopping_ = true;
    StopHandler();
    StopCommands();
    outbox_->RequestFinish(status, /*drain=*/false);
  }

  // No more events for this stream: unanswered ones fall back now.
  void StopHandler() {
    std::shared_ptr<StreamHandler> handler;
    {
      MutexLock lock(&handler_mu_);
      registration_.Reset();
      handler = handler_;
    }
    if (handler) handler->Close();
  }

  void QueueCommand(kvmi::v1::Command command) {
    {
      MutexLock lock(&commands_mu_);
      if (commands_.size() < kMaxQueuedCommands) {
        commands_.push_back(std::move(command));
        if (!command_runner_.joinable()) command_runner_ = std::thread([this] { RunCommands(); });
        commands_cv_.Signal();
        return;
      }
    }
    outbox_->Send(CommandResultMessage(
        command.id(),
        Status(StatusCode::RESOURCE_EXHAUSTED, "more than " + std::to_string(kMaxQueuedCommands) +
                                                   " commands waiting on this stream")));
  }

  // Half-close: finish once every command read so far has its result queued.
  void FinishAfterCommands() {
    {
      MutexLock lock(&commands_mu_);
      if (command_runner_.joinable()) {
        finish_when_idle_ = true;
        commands_cv_.SignalAll();
        return;
      }
    }
    outbox_->RequestFinish(Status::OK, /*drain=*/true);
  }

  void StopCommands() {
    MutexLock lock(&commands_mu_);
    commands_stopped_ = true;
    commands_.clear();
    commands_cv_.SignalAll();
  }

  // The command thread: until stopped, or half-closed with nothing left.
  void RunCommands() {
    while (true) {
      kvmi::v1::Command command;
      {
        MutexLock lock(&commands_mu_);
        while (!commands_stopped_ && !finish_when_idle_ && commands_.empty()) {
          commands_cv_.Wait(&commands_mu_);
        }
        if (commands_stopped_) return;
        if (commands_.empty()) {  // half-closed and every command answered
          MutexUnlock unlock(&commands_mu_);
          outbox_->RequestFinish(Status::OK, /*drain=*/true);
          return;
        }
        command = std::move(commands_.front());
        commands_.pop_front();
      }
      // A client that does not read its results holds the next command back.
      if (!outbox_->WaitForRoom()) return;
      outbox_->Send(run_command_(context_, owner_, command));
    }
  }

  Daemon* const daemon_;
  grpc::ServerContextBase* const context_;
  std::atomic<uint64_t>* const next_stream_;
  const AttachCommandRunner run_command_;
  const std::shared_ptr<AttachGuard> guard_;  // null: no checks past the RPC's
  const CallContext* const call_;             // the caller, for audits of refusals; null in tests
  kvmi::v1::AttachRequest request_;           // the read in flight (one at a time)
  std::shared_ptr<AttachOutbox> outbox_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> read_paused_{false};
  // The next read waits for the next write (DeferRead); alarm_armed_: an alarm is in flight,
  // which bounds the wait to read_deferral_us.
  std::atomic<bool> read_deferred_{false};
  std::atomic<bool> alarm_armed_{false};
  std::atomic<uint64_t> writes_{0};
  // Set by the claim, before any command can run; then read-only (the command thread and OnDone
  // read it after the claim's read callback).
  OwnerId owner_;
  // The claim's handler as the read callbacks see it: reads are serialised by gRPC (one at a
  // time) and only they set it, so they use it without a lock.
  StreamHandler* reader_handler_ = nullptr;
  // The same handler and its registration for StopHandler, which may run on another thread
  // (OnCancel, OnDone) while a read callback claims.
  Mutex handler_mu_;
  std::shared_ptr<StreamHandler> handler_ ABSL_GUARDED_BY(handler_mu_);
  VerdictPipeline::Registration registration_ ABSL_GUARDED_BY(handler_mu_);
  Mutex commands_mu_;
  CondVar commands_cv_;
  std::deque<kvmi::v1::Command> commands_ ABSL_GUARDED_BY(commands_mu_);
  bool commands_stopped_ ABSL_GUARDED_BY(commands_mu_) = false;
  bool finish_when_idle_ ABSL_GUARDED_BY(commands_mu_) = false;
  std::thread command_runner_ ABSL_GUARDED_BY(commands_mu_);
  StreamLimits::Admission admission_;  // set before the stream starts; released by OnDone
};

}  // namespace

AttachStream* StartAttach(Daemon* daemon, grpc::ServerContextBase* context,
                          std::atomic<uint64_t>* next_stream, AttachCommandRunner run_command,
                          const Status& admitted, std::shared_ptr<AttachGuard> guard,
                          StreamLimits* limits, const CallContext* call) {
  auto* reactor = new AttachReactor(daemon, context, next_stream, std::move(run_command),
                                    std::move(guard), call);
  Status status = admitted;
  if (status.ok() && limits != nullptr && call != nullptr) {
    StreamLimits::Admission admission;
    status = limits->Admit(*call, daemon->limits(), /*charge_budget=*/false, &admission);
    if (!status.ok()) call->AuditLimitRefusal(status);
    reactor->Hold(std::move(admission));
  }
  reactor->Begin(status);
  return reactor;
}

void SetAttachReadDeferralForTesting(std::chrono::microseconds deferral) {
  read_deferral_us.store(deferral.count(), std::memory_order_relaxed);
}

}  // namespace kvmid::api
