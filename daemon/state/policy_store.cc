#include "daemon/state/policy_store.h"

#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/strip.h>
#include <absl/time/clock.h>
#include <absl/time/time.h>
#include <fcntl.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <set>

#include "daemon/config/policy_convert.h"
#include "daemon/state/policy_state.pb.h"

namespace kvmid {
namespace {

constexpr char kHeaderPrefix[] = "# kvmid policy state: format ";

std::string Errno() { return std::strerror(errno); }

class ErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    // Lines count from the header line (line 1), as an editor shows them.
    if (first_.empty()) first_ = absl::StrCat("line ", line + 2, ":", column + 1, ": ", message);
  }
  const std::string& first() const { return first_; }

 private:
  std::string first_;
};

// mkdir -p with `mode` for what it creates.
absl::Status MakeDirs(const std::string& dir, mode_t mode) {
  std::string partial;
  for (size_t pos = 0; pos != std::string::npos;) {
    pos = dir.find('/', pos + 1);
    partial = dir.substr(0, pos);
    if (partial.empty()) continue;
    if (::mkdir(partial.c_str(), mode) != 0 && errno != EEXIST) {
      return absl::UnavailableError(
          absl::StrCat("cannot create state directory ", partial, ": ", Errno()));
    }
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::UnavailableError(absl::StrCat("state directory ", dir, " is not a directory"));
  }
  return absl::OkStatus();
}

absl::Status WriteAll(int fd, absl::string_view data, const std::string& path) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::UnavailableError(absl::StrCat("cannot write ", path, ": ", Errno()));
    data.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

// The header line's fields; false if it is not one.
bool ParseHeader(absl::string_view line, uint32_t* format, uint32_t* crc, uint64_t* length) {
  if (!absl::ConsumePrefix(&line, kHeaderPrefix)) return false;
  size_t comma = line.find(", crc32c 0x");
  if (comma == absl::string_view::npos || !absl::SimpleAtoi(line.substr(0, comma), format)) {
    return false;
  }
  line.remove_prefix(comma + std::strlen(", crc32c 0x"));
  size_t next = line.find(", ");
  if (next != 8 || !absl::SimpleHexAtoi(line.substr(0, 8), crc)) return false;
  line.remove_prefix(next + 2);
  return absl::ConsumeSuffix(&line, " bytes") && absl::SimpleAtoi(line, length);
}

}  // namespace

absl::StatusOr<StateRecovery> ParseStateRecovery(absl::string_view text) {
  if (text.empty() || text == "fail") return StateRecovery::kFail;
  if (text == "quarantine") return StateRecovery::kQuarantine;
  return absl::InvalidArgumentError(
      absl::StrCat("--state_recover must be fail or quarantine, not '", text, "'"));
}

uint32_t Crc32c(absl::string_view data) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0x82F63B78u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char byte : data) crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

std::string EncodePolicyState(const std::vector<kvmi::v1::Policy>& policies) {
  state::PolicyState message;
  for (const kvmi::v1::Policy& p : policies) *message.add_policies() = p;
  std::string body;
  google::protobuf::TextFormat::PrintToString(message, &body);
  return absl::StrFormat("%s%u, crc32c 0x%08x, %u bytes\n", kHeaderPrefix, kPolicyStateFormat,
                         Crc32c(body), body.size()) +
         body;
}

PolicyStore::PolicyStore(std::string dir)
    : dir_(std::move(dir)), path_(dir_ + "/" + kPolicyStateFileName) {}

absl::StatusOr<std::vector<kvmi::v1::Policy>> PolicyStore::Load() const {
  auto bad = [this](absl::string_view what) {
    return absl::DataLossError(absl::StrCat("state file ", path_, ": ", what));
  };
  int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return std::vector<kvmi::v1::Policy>{};  // first start
    return absl::UnavailableError(absl::StrCat("state file ", path_, ": cannot open: ", Errno()));
  }
  std::string content;
  char buffer[65536];
  for (;;) {
    ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      std::string error = Errno();
      ::close(fd);
      return absl::UnavailableError(absl::StrCat("state file ", path_, ": cannot read: ", error));
    }
    if (n == 0) break;
    content.append(buffer, static_cast<size_t>(n));
    if (content.size() > kMaxPolicyStateBytes) {
      ::close(fd);
      return bad(absl::StrCat("larger than ", kMaxPolicyStateBytes, " bytes"));
    }
  }
  ::close(fd);

  size_t newline = content.find('\n');
  if (newline == std::string::npos) {
    return bad(content.empty() ? "empty (no header line)" : "no header line");
  }
  uint32_t format = 0, crc = 0;
  uint64_t length = 0;
  if (!ParseHeader(absl::string_view(content).substr(0, newline), &format, &crc, &length)) {
    return bad(absl::StrCat("line 1 is not a kvmid policy state header (\"", kHeaderPrefix,
                            "N, crc32c 0xXXXXXXXX, N bytes\")"));
  }
  if (format != kPolicyStateFormat) {
    return bad(absl::StrCat("format ", format, " is not one this kvmid reads (", kPolicyStateFormat,
                            "); written by another kvmid version?"));
  }
  absl::string_view body = absl::string_view(content).substr(newline + 1);
  if (body.size() != length) {
    return bad(absl::StrCat("the header says ", length, " bytes, the file holds ", body.size(),
                            " (torn or edited)"));
  }
  uint32_t actual = Crc32c(body);
  if (actual != crc) {
    return bad(
        absl::StrFormat("checksum mismatch (header 0x%08x, content 0x%08x): edited or "
                        "damaged",
                        crc, actual));
  }
  state::PolicyState message;
  google::protobuf::TextFormat::Parser parser;
  ErrorCollector errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(std::string(body), &message)) {
    return bad(errors.first().empty() ? "cannot parse" : errors.first());
  }
  if (static_cast<size_t>(message.policies_size()) > kMaxPersistedPolicies) {
    return bad(absl::StrCat(message.policies_size(), " policies, more than the limit of ",
                            kMaxPersistedPolicies));
  }
  std::vector<kvmi::v1::Policy> policies;
  std::set<std::string> names;
  for (int i = 0; i < message.policies_size(); ++i) {
    const kvmi::v1::Policy& p = message.policies(i);
    absl::StatusOr<std::shared_ptr<Rule>> rule = PolicyToRule(p);
    if (!rule.ok()) {
      return bad(absl::StrCat("policies[", i, "] (", p.name(), "): ", rule.status().message()));
    }
    if (!names.insert(p.name()).second) {
      return bad(absl::StrCat("policies[", i, "]: the name '", p.name(), "' appears twice"));
    }
    policies.push_back(p);
  }
  return policies;
}

absl::Status PolicyStore::Save(const std::vector<kvmi::v1::Policy>& policies) {
  MutexLock lock(&save_mutex_);
  if (policies.size() > kMaxPersistedPolicies) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "at most ", kMaxPersistedPolicies, " policies are persisted; ", policies.size(), " asked"));
  }
  std::string content = EncodePolicyState(policies);
  if (content.size() > kMaxPolicyStateBytes) {
    return absl::ResourceExhaustedError(absl::StrCat("the state would take ", content.size(),
                                                     " bytes, more than ", kMaxPolicyStateBytes));
  }
  absl::Status dir = MakeDirs(dir_, 0700);
  if (!dir.ok()) return dir;
  const std::string tmp = path_ + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("cannot create ", tmp, ": ", Errno()));
  absl::Status written = WriteAll(fd, content, tmp);
  if (written.ok() && ::fsync(fd) != 0) {
    written = absl::UnavailableError(absl::StrCat("cannot fsync ", tmp, ": ", Errno()));
  }
  if (::close(fd) != 0 && written.ok()) {
    written = absl::UnavailableError(absl::StrCat("cannot close ", tmp, ": ", Errno()));
  }
  if (written.ok() && ::rename(tmp.c_str(), path_.c_str()) != 0) {
    written =
        absl::UnavailableError(absl::StrCat("cannot rename ", tmp, " to ", path_, ": ", Errno()));
  }
  if (!written.ok()) {
    ::unlink(tmp.c_str());
    return written;
  }
  int dir_fd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) {
    return absl::UnavailableError(absl::StrCat("cannot open ", dir_, " to fsync it: ", Errno()));
  }
  absl::Status synced = absl::OkStatus();
  if (::fsync(dir_fd) != 0) {
    synced = absl::UnavailableError(absl::StrCat("cannot fsync ", dir_, ": ", Errno()));
  }
  ::close(dir_fd);
  return synced;
}

absl::StatusOr<std::string> PolicyStore::Quarantine() {
  MutexLock lock(&save_mutex_);
  std::string aside = absl::StrCat(
      path_, ".corrupt-", absl::FormatTime("%Y%m%dT%H%M%E6SZ", absl::Now(), absl::UTCTimeZone()));
  if (::rename(path_.c_str(), aside.c_str()) != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot move state file ", path_, " aside to ", aside, ": ", Errno()));
  }
  return aside;
}

absl::Status RestorePolicies(Daemon* daemon, PolicyStore* store, StateRecovery recovery) {
  absl::StatusOr<std::vector<kvmi::v1::Policy>> loaded = store->Load();
  if (!loaded.ok()) {
    if (recovery != StateRecovery::kQuarantine) {
      return absl::Status(
          loaded.status().code(),
          absl::StrCat(loaded.status().message(),
                       ". Repair or remove it, or start once with --state_recover=quarantine to "
                       "move it aside and start with no API policies (docs/OPERATING.md)"));
    }
    absl::StatusOr<std::string> aside = store->Quarantine();
    if (!aside.ok()) {
      return absl::Status(aside.status().code(),
                          absl::StrCat(loaded.status().message(), "; ", aside.status().message()));
    }
    spdlog::error("{}; --state_recover=quarantine: moved it to {}, starting with no API policies",
                  std::string(loaded.status().message()), *aside);
    loaded = std::vector<kvmi::v1::Policy>{};
  }
  // The configuration owns the names it configures (Daemon::Reload): a saved policy of such a
  // name (an older kvmid saved overrides; or the file configures it since) is not restored.
  const std::set<std::string> configured = daemon->configured_policies();
  PolicyPrecondition restore;
  restore.allow_replace = true;
  size_t skipped = 0;
  for (const kvmi::v1::Policy& policy : *loaded) {
    if (configured.count(policy.name()) > 0) {
      spdlog::warn("state file {}: policy {} is not restored: the configuration defines it",
                   store->path(), policy.name());
      ++skipped;
      continue;
    }
    absl::StatusOr<std::shared_ptr<Rule>> rule = PolicyToRule(policy);  // validated by Load
    if (!rule.ok()) {
      return absl::DataLossError(
          absl::StrCat("state file ", store->path(), ": ", rule.status().message()));
    }
    (*rule)->origin = policy.SerializeAsString();
    absl::StatusOr<PolicyWrite> applied = daemon->ApplyApiPolicy(*std::move(rule), restore);
    if (!applied.ok()) {
      return absl::Status(applied.status().code(),
                          absl::StrCat("state file ", store->path(), ": policy ", policy.name(),
                                       ": ", applied.status().message()));
    }
  }
  if (loaded->size() > skipped) {
    const size_t restored = loaded->size() - skipped;
    spdlog::info("restored {} API polic{} from {}", restored, restored == 1 ? "y" : "ies",
                 store->path());
  }
  daemon->set_policy_persister(
      [store](const std::vector<std::shared_ptr<const Rule>>& rules) -> absl::Status {
        std::vector<kvmi::v1::Policy> policies;
        policies.reserve(rules.size());
        for (const auto& rule : rules) {
          kvmi::v1::Policy policy;
          // What the client sent, exactly, when known; else the rule as a policy.
          if (rule->origin.empty() || !policy.ParseFromString(rule->origin)) {
            policy = RuleToPolicy(*rule);
          }
          policies.push_back(std::move(policy));
        }
        return store->Save(policies);
      });
  return absl::OkStatus();
}

}  // namespace kvmid
