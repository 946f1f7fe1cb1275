// What every binary of the project sets before parsing its flags: the usage line, which flags
// --help lists (the ones defined under `flag_dirs`; Abseil's default only lists flags of a file
// named like the binary, so kvmid's printed "No flags matched"), and the --version text.
#ifndef KVMID_COMMON_PROGRAM_H_
#define KVMID_COMMON_PROGRAM_H_

#include <string>
#include <vector>

namespace kvmid {

// "kvmid 0.9.0 (KVMI v6)".
std::string VersionText(const std::string& program);

// Call once, before absl::ParseCommandLine. `flag_dirs`: source directories (as Bazel names
// them, e.g. "daemon/") whose flags --help and --helpfull list.
void SetUpProgram(const std::string& program, const std::string& usage,
                  std::vector<std::string> flag_dirs);

}  // namespace kvmid

#endif  // KVMID_COMMON_PROGRAM_H_
