#include "daemon/startup/steps.h"

#include <spdlog/spdlog.h>

namespace kvmid {

void Steps::Add(std::string name, StartFn start, StopFn stop) {
  steps_.push_back(Step{std::move(name), std::move(start), std::move(stop)});
}

absl::Status Steps::Run() {
  while (started_ < steps_.size()) {
    Step& step = steps_[started_];
    spdlog::debug("start-up: {}", step.name);
    absl::Status status = step.start ? step.start() : absl::OkStatus();
    if (!status.ok()) {
      Teardown();
      return absl::Status(status.code(), step.name + ": " + std::string(status.message()));
    }
    ++started_;
  }
  return absl::OkStatus();
}

void Steps::Teardown() {
  while (started_ > 0) {
    Step& step = steps_[--started_];
    spdlog::debug("teardown: {}", step.name);
    if (step.stop) step.stop();
  }
}

std::vector<std::string> Steps::running() const {
  std::vector<std::string> names;
  for (size_t i = 0; i < started_; ++i) names.push_back(steps_[i].name);
  return names;
}

}  // namespace kvmid
