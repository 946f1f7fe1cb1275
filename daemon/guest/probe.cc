#include "daemon/guest/probe.h"

#include <absl/status/status.h>
#include <spdlog/spdlog.h>

#include "kernel/abi/protocol.h"

namespace kvmid {

constexpr int Probe::kMaxAttempts;
constexpr std::chrono::milliseconds Probe::kRetryDelay;

std::optional<absl::StatusOr<HostCapabilities>> Probe::Decide(const Answers& answers, int attempt) {
  if (answers.transport_failed) {
    return absl::StatusOr<HostCapabilities>(
        absl::UnavailableError("probe failed: " + answers.failure));
  }
  if (answers.version < KVMI_VERSION) {
    return absl::StatusOr<HostCapabilities>(
        absl::FailedPreconditionError("unsupported KVMI version"));
  }
  if (answers.guest_info_err == -KVM_EPERM && attempt < kMaxAttempts) return std::nullopt;
  if (answers.guest_info_err != 0) {
    return absl::StatusOr<HostCapabilities>(
        absl::PermissionDeniedError("the host does not allow GET_GUEST_INFO"));
  }
  HostCapabilities capabilities = answers.capabilities;
  capabilities.kvmi_version = answers.version;
  return absl::StatusOr<HostCapabilities>(capabilities);
}

void Probe::Start(const std::shared_ptr<GuestSession>& session, Done done) {
  Round(session, 1, std::make_shared<const Done>(std::move(done)));
}

void Probe::Round(const std::shared_ptr<GuestSession>& session, int attempt,
                  const std::shared_ptr<const Done>& done) {
  struct RoundState {
    size_t remaining = 0;
    Answers answers;
  };
  auto state = std::make_shared<RoundState>();
  // Every reply runs on the loop thread, so the state needs no lock.
  auto finish = [session, state, attempt, done] {
    if (--state->remaining > 0) return;
    const Answers& a = state->answers;
    std::optional<absl::StatusOr<HostCapabilities>> outcome = Decide(a, attempt);
    if (!outcome) {
      session->loop()->RunAt(Clock::now() + kRetryDelay,
                             [session, attempt, done] { Round(session, attempt + 1, done); });
      return;
    }
    if (!a.transport_failed && a.version < KVMI_VERSION) {
      spdlog::warn("{}: KVMI version {} is not supported", session->log_name(), a.version);
    } else if (!a.transport_failed && a.guest_info_err != 0) {
      spdlog::warn("{}: GET_GUEST_INFO answered {}", session->log_name(),
                   kvmi::ErrorName(a.guest_info_err));
    }
    (*done)(*std::move(outcome));
  };
  // True if `r` is a KVMI answer (success or a kernel error); else records the failure.
  auto answered = [state](const CommandResult& r) {
    if (r.status == CommandResult::Status::kOk || r.status == CommandResult::Status::kKvmiError) {
      return true;
    }
    if (!state->answers.transport_failed) {
      state->answers.transport_failed = true;
      state->answers.failure = r.ToString();
    }
    return false;
  };

  state->remaining = 2 + (KVMI_NEXT_AVAILABLE_COMMAND - KVMI_FIRST_COMMAND) + KVMI_NUM_EVENTS;
  session->Send(kvmi::GetVersionRequest{}, [state, finish, answered](const CommandResult& r) {
    kvmi::GetVersionReply reply;
    if (answered(r) && r.ok() && kvmi::DecodeReplyData(kvmi::ByteView(r.data), &reply).ok()) {
      state->answers.version = reply.version;
    }
    finish();
  });
  session->Send(kvmi::GetGuestInfoRequest{}, [state, finish, answered](const CommandResult& r) {
    if (answered(r)) {
      kvmi::GuestInfoReply reply;
      if (r.ok() && kvmi::DecodeReplyData(kvmi::ByteView(r.data), &reply).ok()) {
        state->answers.capabilities.vcpu_count = reply.vcpu_count;
      } else {
        state->answers.guest_info_err = r.ok() ? -KVM_EINVAL : r.err;
      }
    }
    finish();
  });
  for (uint16_t id = KVMI_FIRST_COMMAND; id < KVMI_NEXT_AVAILABLE_COMMAND; ++id) {
    kvmi::CheckCommandRequest request;
    request.id = id;
    session->Send(request, [state, finish, answered, id](const CommandResult& r) {
      if (answered(r) && r.ok()) state->answers.capabilities.allowed_commands |= 1u << id;
      finish();
    });
  }
  for (uint8_t id = 0; id < KVMI_NUM_EVENTS; ++id) {
    kvmi::CheckEventRequest request;
    request.id = id;
    session->Send(request, [state, finish, answered, id](const CommandResult& r) {
      if (answered(r) && r.ok()) {
        state->answers.capabilities.allowed_events |= static_cast<uint16_t>(1u << id);
      }
      finish();
    });
  }
}

}  // namespace kvmid
