// The project's version, printed by --version of kvmid, kvmi-sim and kvmi-vmm.
#ifndef KVMID_COMMON_VERSION_H_
#define KVMID_COMMON_VERSION_H_

namespace kvmid {

inline constexpr char kVersion[] = "0.9.0";
// The KVMI ABI the binaries speak.
inline constexpr char kKvmiAbi[] = "KVMI v6";

}  // namespace kvmid

#endif  // KVMID_COMMON_VERSION_H_
