// kvmid's core: listeners, I/O loops, the guest registry, policies and the verdict pipeline,
// started in order and torn down in reverse. This is the internal C++ API the gRPC surface
// calls; nothing here knows about gRPC.
#ifndef KVMID_DAEMON_KVMID_H_
#define KVMID_DAEMON_KVMID_H_

#include <absl/base/thread_annotations.h>
#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/io/event_loop.h"
#include "daemon/registry/registry.h"
#include "daemon/security/security_config.h"
#include "daemon/transport/acceptor.h"
#include "daemon/verdict/pipeline.h"
#include "daemon/verdict/policy.h"

namespace kvmid {

// The daemon's limits; checks and their error messages use these.
inline constexpr int kMaxIoThreads = 64;
// The nice value of the I/O threads (the guests' event path), by default: above every process
// started at nice 0, so that a local user's processes waking up do not preempt a thread that a
// guest's vCPU waits on (docs/PERFORMANCE.md, issue 10, measured the cost). The gRPC threads,
// which serve every client including a hostile one, keep the process's own value.
inline constexpr int kDefaultIoNice = -10;
inline constexpr int kDefaultIdleYields = 3;
inline constexpr int kMaxIdleYields = 64;
inline constexpr int kMinNice = -20;
inline constexpr int kMaxNice = 19;
inline constexpr uint32_t kMaxSocketMode = 0777;
// "0660" for a permission mode (error messages, logs).
std::string OctalMode(uint32_t mode);

// StreamEvents' heartbeat interval (a request's, and the configuration's default): 0 (none) or
// within these.
inline constexpr std::chrono::milliseconds kMinStreamHeartbeat{100};
inline constexpr std::chrono::milliseconds kMaxStreamHeartbeat{std::chrono::hours(1)};

struct DaemonConfig {
  // QEMU connects here (chardev socket path). Empty = no UNIX listener.
  std::string unix_socket = "/run/kvmid/kvmi.sock";
  uint32_t unix_socket_mode = 0660;
  std::string unix_socket_group;  // empty = keep the daemon's group
  std::optional<uint32_t> vsock_port;
  // Shared secret; its SHA-1 is sent as cookie_hash (kvmi-v7 QEMU checks it).
  std::string cookie_file;
  std::vector<uid_t> allowed_uids;
  std::vector<uint32_t> allowed_cids;
  int io_threads = 2;
  // The I/O threads' nice value (kMinNice..kMaxNice). Raising it needs CAP_SYS_NICE; without
  // it kvmid says so in a warning and the threads keep the process's value. A process already
  // at a lower (stronger) value than this keeps its value for them too.
  int io_nice = kDefaultIoNice;
  // EventLoop::SetIdleYields of every I/O thread (0..kMaxIdleYields): how often a thread that
  // exchanged events or verdicts with a remote handler gives up its CPU to the guests' threads
  // it woke, and takes their next events, before it sleeps (EventLoop::YieldBeforeSleep).
  int io_idle_yields = kDefaultIdleYields;
  std::chrono::milliseconds handshake_timeout{5000};
  std::chrono::milliseconds command_timeout{10000};
  // GuestSession::Options::consume_on_reply (a guest's event bytes leave its socket with the
  // reply); false only to measure without it (remote_verdict_bench --noconsume_on_reply).
  bool consume_on_reply = true;
  VerdictPipeline::Options verdicts;
  // StreamEvents: a quiet stream's heartbeat interval when the request names none (0: none).
  std::chrono::milliseconds stream_heartbeat{10000};
};

// A whole configuration: the file's settings (and, once merged, the flags'), as start-up and a
// reload use it.
struct LoadedConfig {
  DaemonConfig daemon;
  std::string api_socket = "/run/kvmid/api.sock";
  std::string api_tcp;
  std::optional<std::string> metrics_address;  // unset = the --metrics_address default
  // The API's transport security (daemon/security/credentials.h has the meaning and checks).
  uint32_t api_socket_mode = 0660;
  std::string api_socket_group;
  bool api_tcp_insecure_plaintext = false;
  std::string api_tls_cert, api_tls_key, api_tls_client_ca;
  uint32_t api_tls_refresh_seconds = 60;
  std::vector<std::shared_ptr<Rule>> rules;  // the configured policies
  std::map<std::string, std::map<std::string, std::string>> guest_labels;
  // The trust boundary: who may call what (authz), the resource limits, the audit log's path
  // (daemon/security/security_config.h). Without an `authz` section: UNIX uid 0 is admin.
  security::SecurityConfig security = security::DefaultSecurityConfig();
};

// Gives freed heap memory back to the kernel after big frees. glibc keeps freed chunks in its
// arenas (and raises its mmap threshold after large frees, so that the next large buffers come
// from the arenas too): after big policies are deleted or a big ListPolicies response is freed,
// RSS would stay at its peak. Freed() is cheap and never blocks; once the bytes reported since the
// last trim reach kMinBytes, a thread of its own calls malloc_trim(0), which walks every arena
// under its lock and madvises free pages away: never on a guest's loop thread or a gRPC thread.
// It runs kDelay after the request (what the caller is about to free, e.g. a response gRPC still
// sends, is gone by then) and at most once per kMinInterval, however many frees ask for it.
class MemoryTrimmer {
 public:
  static constexpr size_t kMinBytes = size_t{1} << 20;
  static constexpr std::chrono::milliseconds kDelay{100};
  static constexpr std::chrono::milliseconds kMinInterval{1000};

  MemoryTrimmer() = default;
  ~MemoryTrimmer();  // stops and joins the thread
  MemoryTrimmer(const MemoryTrimmer&) = delete;
  MemoryTrimmer& operator=(const MemoryTrimmer&) = delete;

  // `bytes` were freed (or are about to be).
  void Freed(size_t bytes);
  // Trims now, on the calling thread (tests; never from a loop thread).
  static void TrimNow();
  // How many trims the thread ran.
  uint64_t trims() const;

 private:
  void Run();
  // Until a trim is due (true) or the trimmer stops (false); `last`: when the last one ran.
  bool WaitForWork(std::chrono::steady_clock::time_point last);

  mutable Mutex mu_;
  CondVar cv_;
  size_t pending_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t trims_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread thread_ ABSL_GUARDED_BY(mu_);  // started by the first trim request
};

class Daemon {
 public:
  explicit Daemon(DaemonConfig config);
  ~Daemon();

  // Opens the listeners and starts the loops. The error's message is a sentence for the operator.
  absl::Status Start();
  // Unhooks every guest (releases hooks, answers what is pending), waits at most `grace`,
  // closes everything. Idempotent.
  void Shutdown(std::chrono::milliseconds grace = std::chrono::milliseconds(3000));

  Registry& registry() { return *registry_; }
  // The authorization rules in force; Reload swaps them whole (callers take one snapshot each).
  security::AuthorizerHolder& authorizer() { return authorizer_; }
  // The resource limits in force (a copy; Reload replaces them).
  security::Limits limits() const;
  // Replaces them (Reload does, with the configuration's; tests).
  void set_limits(const security::Limits& limits);
  PolicySet& policies() { return policies_; }
  // Returns memory to the kernel after big frees (deleted policies, big responses).
  MemoryTrimmer& memory_trimmer() { return trimmer_; }
  VerdictPipeline& pipeline() { return *pipeline_; }

  // Applies a configuration, at start and on SIGHUP, without touching a guest's connection, in
  // one step: the configured policies (config.rules) replace the previously configured ones as a
  // set, while policies applied through the API stay; deadlines and fallbacks apply to the next
  // events; guest labels are replaced. If a policy is invalid nothing changes (InvalidArgument).
  // Listener settings (sockets, threads, cookie, timeouts) need a restart: a change is logged,
  // not applied.
  //
  // The configuration owns the names it configures (docs/OPERATING.md "Policies through the API"):
  // a reload puts every configured policy back as the file has it. An API override of a configured
  // policy (ApplyPolicy with override_config) and an API deletion of one end there (logged, with
  // the override's etag); an API policy whose name the file now configures is replaced by the
  // file's and is no longer kept in the state file. A configured policy the file did not change
  // keeps its etag and counters.
  absl::Status Reload(const LoadedConfig& config);
  // Names of the configured policies (the last Reload's).
  std::set<std::string> configured_policies() const;

  // Policy changes take effect on every guest now (arming follows) and on later guests. These
  // two are for policies whose source is the configuration (file, flags, code): not persisted.
  absl::Status ApplyPolicy(std::shared_ptr<Rule> rule);
  bool RemovePolicy(const std::string& name);

  // Policies applied through the API ("API-owned"), checked against `precondition` (create vs
  // replace, etag, the configuration's protection: PolicySet::ApplyChecked). Each change is
  // handed to the persister (if set) BEFORE it takes effect: when persisting fails, nothing
  // changed and the error is returned (the client is told; its policy is not in effect). An
  // override of a configured policy is not persisted, nor is the deletion of one: both last
  // until the next reload or restart, which puts the configuration's version back. Errors:
  // InvalidArgument (bad rule), NotFound, AlreadyExists, FailedPrecondition, or the persister's
  // status. The policy limits in force (limits()) apply: the rule's name, description and origin
  // (its serialized policy) sizes, and the count of policies held (a new name beyond
  // max_policies is refused; a replacement adds none), checked and inserted in one step under
  // the policy set's lock: RESOURCE_EXHAUSTED naming the limit.
  absl::StatusOr<PolicyWrite> ApplyApiPolicy(std::shared_ptr<Rule> rule,
                                             const PolicyPrecondition& precondition);
  absl::StatusOr<PolicyWrite> RemoveApiPolicy(const std::string& name,
                                              const PolicyPrecondition& precondition);
  // Gets every API-owned policy, in application order, after each change (daemon/state). Set
  // after restoring the saved ones (those are applied with ApplyApiPolicy before it is set).
  using PolicyPersister =
      std::function<absl::Status(const std::vector<std::shared_ptr<const Rule>>& api_policies)>;
  void set_policy_persister(PolicyPersister persister);
  std::vector<std::shared_ptr<const Rule>> api_policies() const;

  // Arms `arming` as a lease of `owner` on every guest that `vms` selects (UUIDs or names; empty =
  // every guest), now and on guests that connect later.
  void SetClientArming(const OwnerId& owner, const std::vector<std::string>& vms,
                       const Arming& arming);
  // Everything `owner` holds, on every guest: leases, paused vCPUs, future arming.
  void ReleaseOwner(const OwnerId& owner);
  // True if `vms` (UUIDs or names; empty = all) selects `guest`.
  static bool Selects(const std::vector<std::string>& vms, const Guest& guest);

  // Where the UNIX listener is (for tests that use a temporary path).
  const std::string& unix_socket() const { return config_.unix_socket; }
  std::chrono::milliseconds stream_heartbeat() const { return config_.stream_heartbeat; }

 private:
  // Gives the I/O threads config_.io_nice (a warning when it cannot), unless the process runs at
  // a stronger value already: they keep that one.
  void SetIoNice();
  void OnGuestConnected(AcceptedGuest guest);
  void RearmAllGuests();

  DaemonConfig config_;
  MemoryTrimmer trimmer_;  // destroyed after the policies (its thread is joined)
  PolicySet policies_;
  std::unique_ptr<VerdictPipeline> pipeline_;
  std::unique_ptr<Registry> registry_;
  std::vector<std::unique_ptr<EventLoop>> loops_;  // set by Start, before any acceptor runs
  // The listeners and handshakes run on their own loop, never on a guest's: a flood of
  // connections costs their own thread, never the latency of the guests' events.
  std::unique_ptr<EventLoop> accept_loop_;  // set by Start, before any acceptor runs
  // Start, Shutdown and Reload (SIGHUP, any thread) meet here; after reload_mutex_ when both.
  mutable Mutex lifecycle_mutex_;
  std::vector<std::unique_ptr<Acceptor>> acceptors_ ABSL_GUARDED_BY(lifecycle_mutex_);
  bool started_ ABSL_GUARDED_BY(lifecycle_mutex_) = false;
  bool shut_down_ ABSL_GUARDED_BY(lifecycle_mutex_) = false;
  std::atomic<size_t> next_loop_{0};
  struct ClientArming {
    std::vector<std::string> vms;
    Arming arming;
  };
  mutable Mutex reload_mutex_;  // one reload at a time
  std::set<std::string> configured_policies_ ABSL_GUARDED_BY(reload_mutex_);
  security::AuthorizerHolder authorizer_;
  mutable Mutex limits_mutex_;
  security::Limits limits_ ABSL_GUARDED_BY(limits_mutex_);
  Mutex clients_mutex_;
  std::map<OwnerId, ClientArming> client_arming_ ABSL_GUARDED_BY(clients_mutex_);
  mutable Mutex api_policies_mutex_;  // held across persisting: API changes are serialized
  std::vector<std::shared_ptr<const Rule>> api_policies_ ABSL_GUARDED_BY(api_policies_mutex_);
  PolicyPersister persister_ ABSL_GUARDED_BY(api_policies_mutex_);
};

// A reload's policy count (docs/SECURITY.md "Limits"): the policies held after it -- the
// configured ones (`configured`, names) and every current one it does not remove (those applied
// through the API among them) -- must stay within the reload's own limits.max_policies; else
// RESOURCE_EXHAUSTED naming the limit, and Reload changes nothing (the running configuration
// stays).
absl::Status PolicyCountAfterReload(const std::vector<std::shared_ptr<const Rule>>& current,
                                    const std::set<std::string>& removed,
                                    const std::set<std::string>& configured,
                                    const security::Limits& limits);

// Reads the shared secret (the file's exact bytes) and returns SHA-1 of it.
absl::StatusOr<std::array<uint8_t, kvmi::kCookieHashSize>> LoadCookieHash(const std::string& path);

}  // namespace kvmid

#endif  // KVMID_DAEMON_KVMID_H_
