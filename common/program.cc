#include "common/program.h"

#include <absl/flags/usage.h>
#include <absl/flags/usage_config.h>
#include <absl/strings/match.h>
#include <absl/synchronization/mutex.h>
#include <stdlib.h>

#include "common/version.h"

namespace kvmid {

std::string VersionText(const std::string& program) {
  return program + " " + kVersion + " (" + kKvmiAbi + ")\n";
}

void UseReleaseAbslMutexes() {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

void UseGrpcPollEngine() { ::setenv("GRPC_POLL_STRATEGY", "poll", /*overwrite=*/0); }

void SetUpProgram(const std::string& program, const std::string& usage,
                  const std::vector<std::string>& flag_dirs) {
  UseReleaseAbslMutexes();
  UseGrpcPollEngine();
  absl::SetProgramUsageMessage(usage);
  absl::FlagsUsageConfig config;
  auto ours = [flag_dirs](absl::string_view file) {
    for (const std::string& dir : flag_dirs) {
      if (absl::StartsWith(file, dir) || absl::StrContains(file, "/" + dir)) return true;
    }
    return false;
  };
  config.contains_helpshort_flags = ours;
  config.contains_help_flags = ours;
  config.contains_helppackage_flags = ours;
  config.version_string = [program] { return VersionText(program); };
  absl::SetFlagsUsageConfig(config);
}

}  // namespace kvmid
