// One guest's KVMI session, tool side: reads whole messages off the socket, matches command
// replies to their requests, hands events to a Listener, and writes event replies. Commands are
// pipelined (any number in flight; matched by seq, and the reply id must echo the request id).
//
// Threading: the session runs on its EventLoop: reading, commands, timeouts, closing. Public
// methods may be called from any thread; callbacks run on the loop thread, except ReplyToEvent's
// `done`. One exception to "the loop writes": a plain event reply from another thread (a remote
// verdict arriving on a gRPC thread) is written by that thread, under write_mu_, when the loop
// sleeps: a hand-off would add a thread wake-up to the verdict. While the loop is awake anyway
// (EventLoop::Awake), and for several verdicts read at once (an EventLoop::HandOff scope: one
// wake-up for all), the loop writes: its thread (io_nice) is not preempted by the guests' threads
// its writes wake.
#ifndef KVMID_DAEMON_SESSION_GUEST_SESSION_H_
#define KVMID_DAEMON_SESSION_GUEST_SESSION_H_

#include <absl/base/thread_annotations.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/io/event_loop.h"
#include "kernel/abi/events.h"
#include "kernel/abi/framing.h"
#include "kernel/abi/handshake.h"
#include "kernel/abi/messages.h"
#include "kernel/transport/unique_fd.h"

namespace kvmid {

// The session's limits (error messages are built from them).
// Bytes taken off the socket per read; a full read means more may be waiting.
inline constexpr size_t kSessionReadChunk = 16 * 1024;
// The most READ_PHYSICAL / WRITE_PHYSICAL moves in one call (split into page-sized messages).
inline constexpr uint64_t kMaxPhysicalTransfer = uint64_t{64} << 20;

// Who the guest is, from the handshake.
struct GuestIdentity {
  kvmi::Uuid uuid{};
  std::string name;
  int64_t start_time = 0;
  std::string transport;  // "unix" or "vsock:<cid>"
};

struct CommandResult {
  enum class Status : uint8_t {
    kOk,             // err == 0, data is the reply data
    kKvmiError,      // the kernel answered err < 0 (name: kvmi::ErrorName(err))
    kInvalid,        // refused before it reached the guest (too large, bad argument)
    kClosed,         // the session ended before the reply
    kTimeout,        // no reply within the command timeout
    kProtocolError,  // the reply was malformed (the session is closed)
    kNotWaiting,     // sent only while the vCPU waits for an event reply, and it did not
  };
  Status status = Status::kOk;
  int32_t err = 0;
  std::vector<uint8_t> data;
  std::string message;  // human-readable detail for kInvalid/kProtocolError

  // One factory per outcome; nothing else builds a CommandResult field by field.
  static CommandResult Ok(std::vector<uint8_t> data = {}) {
    return {Status::kOk, 0, std::move(data), {}};
  }
  static CommandResult KvmiError(int32_t err) { return {Status::kKvmiError, err, {}, {}}; }
  static CommandResult Invalid(std::string message) {
    return {Status::kInvalid, 0, {}, std::move(message)};
  }
  static CommandResult Closed(std::string message = {}) {
    return {Status::kClosed, 0, {}, std::move(message)};
  }
  static CommandResult Timeout() { return {Status::kTimeout, 0, {}, {}}; }
  static CommandResult ProtocolError(std::string message) {
    return {Status::kProtocolError, 0, {}, std::move(message)};
  }
  static CommandResult NotWaiting(std::string message) {
    return {Status::kNotWaiting, 0, {}, std::move(message)};
  }

  bool ok() const { return status == Status::kOk; }
  std::string ToString() const;
};
using CommandCallback = std::function<void(CommandResult)>;

class GuestSession : public std::enable_shared_from_this<GuestSession> {
 public:
  class Listener {
   public:
    virtual ~Listener() = default;
    // A decoded, validated event. Blocking events must eventually get ReplyToEvent (or the
    // session must close); the session itself never answers for the listener.
    virtual void OnEvent(const std::shared_ptr<GuestSession>& session,
                         const kvmi::Event& event) = 0;
    // Called once, on the loop thread, after the socket is closed.
    virtual void OnClosed(const std::shared_ptr<GuestSession>& session,
                          const std::string& reason) = 0;
  };

  struct Options {
    std::chrono::milliseconds command_timeout{10000};
    // On a UNIX socket: the bytes of an event that waits stay in the socket until its reply (or
    // anything else) is written, so the host's receive thread is woken once per event, not twice
    // (see OnReadable). False: every read takes the bytes at once.
    bool consume_on_reply = true;
    // A single event reply from another thread goes to the loop while it is awake anyway
    // (EventLoop::Awake: no wake-up to pay, and the loop writes at io_nice). False: that thread
    // always writes it (tests that need that path whatever the loop is doing).
    bool reply_on_awake_loop = true;
  };

  GuestSession(EventLoop* loop, kvmi::UniqueFd fd, GuestIdentity identity, Listener* listener,
               Options options);
  ~GuestSession();

  // Loop thread: begins reading. Bytes already read during the handshake are fed first.
  void Start(const std::vector<uint8_t>& early_bytes = {});

  // Any thread. Sends one command; `done` runs on the loop thread with the reply.
  template <typename Request>
  void Send(const Request& request, CommandCallback done) {
    std::vector<uint8_t> message;
    kvmi::EncodeCommand(request, 0, &message);  // seq patched on the loop thread
    SendEncoded(std::move(message), std::move(done));
  }
  // Same, for an already encoded message (any seq; it is replaced). With `only_while_waiting`,
  // the command goes out only if that vCPU waits for an event reply when the loop sends it (else
  // `done` gets kNotWaiting): the v6 kernel silently drops SET_REGISTERS outside an event
  // (§5.13), and a check made from another thread first would race with the event's reply. With
  // `for_event` too (non-zero), only if the event it waits for is that one (NoteEventId): a
  // command meant for one exit never lands on the vCPU's next one.
  void SendEncoded(std::vector<uint8_t> message, CommandCallback done,
                   std::optional<uint16_t> only_while_waiting = std::nullopt,
                   uint64_t for_event = 0);
  template <typename Request>
  void SendWhileVcpuWaits(uint16_t vcpu, const Request& request, CommandCallback done,
                          uint64_t for_event = 0) {
    std::vector<uint8_t> message;
    kvmi::EncodeCommand(request, 0, &message);
    SendEncoded(std::move(message), std::move(done), vcpu, for_event);
  }
  // Loop thread, from the listener's OnEvent: the daemon-wide id (VerdictPipeline's event_id) of
  // the event `vcpu` now waits with (`seq`), before anyone outside can know it; nothing if that
  // vCPU no longer waits for it.
  void NoteEventId(uint16_t vcpu, uint32_t seq, uint64_t event_id) ABSL_LOCKS_EXCLUDED(pending_mu_);

  // Convenience for the v6 limits (§1): split into per-page / per-message pieces, pipelined.
  using ReadCallback = std::function<void(CommandResult result)>;  // result.data = the bytes
  void ReadPhysical(uint64_t gpa, uint64_t size, ReadCallback done);
  void WritePhysical(uint64_t gpa, std::vector<uint8_t> data, CommandCallback done);
  // Per-entry results in order (err per entry is the err of the message carrying it).
  using PageAccessCallback = std::function<void(std::vector<CommandResult> per_message,
                                                std::vector<int32_t> per_entry_err)>;
  void SetPageAccess(std::vector<kvmi::PageAccess> entries, PageAccessCallback done);
  // GET_PAGE_ACCESS for any number of GPAs: pieces of at most kvmi::kMaxGetPageAccessGpas (what
  // fits one message), pipelined. `done` runs once, on the loop thread: Ok with one access mask
  // per GPA in request order, or the first failing piece's result (and no masks).
  using GetPageAccessCallback =
      std::function<void(CommandResult result, std::vector<uint8_t> access)>;
  void GetPageAccess(std::vector<uint64_t> gpas, GetPageAccessCallback done);

  // Any thread. Answers the pending event of reply.vcpu if its seq is still pending; commands in
  // `batched` (encoded, e.g. SET_REGISTERS) go out first in the same write, inside
  // CONTROL_CMD_RESPONSE brackets (§5.2). Returns via `done(true)` if this reply was the one
  // sent, `done(false)` if the event was already answered or the session is gone. Without
  // `batched`, while the loop sleeps, the reply is written from the calling thread and `done`
  // runs there, under the write lock: the vCPU's next event may be taken in meanwhile, but its
  // reply, and so its observers, wait for this one (observers see one vCPU's events in order;
  // `done` must not call back into this session); with it, inside an EventLoop::HandOff scope, or
  // while the loop is awake, both happen on the loop thread (still under the write lock).
  void ReplyToEvent(const kvmi::EventReply& reply, std::vector<std::vector<uint8_t>> batched,
                    std::function<void(bool sent)> done = nullptr);

  // Any thread. Ends the session (pending commands fail with kClosed).
  void Close(const std::string& reason);

  const GuestIdentity& identity() const { return identity_; }
  EventLoop* loop() const { return loop_; }
  bool closed() const { return closed_.load(); }
  // Log prefix: "vm <name> <uuid>".
  const std::string& log_name() const { return log_name_; }

  struct Counters {
    std::atomic<uint64_t> events{0};
    std::atomic<uint64_t> event_replies{0};
    std::atomic<uint64_t> commands{0};
    std::atomic<uint64_t> command_errors{0};
    // Replies that no command waits for (a command of ours already answered or timed out, or one
    // sent with replies disabled that the host answered anyway, issue 13): skipped by their size.
    std::atomic<uint64_t> unexpected_replies{0};
  };
  const Counters& counters() const { return counters_; }

 private:
  struct PendingCommand {
    uint16_t id;
    Clock::time_point deadline;
    CommandCallback done;
  };
  struct PendingEvent {
    bool waiting = false;
    uint32_t seq = 0;
    uint8_t event = 0;
    uint64_t event_id = 0;  // NoteEventId's; 0 until then
  };

  void OnReadable(uint32_t epoll_events);
  void ProcessFrames();
  void WriteReply(const kvmi::EventReply& reply, const std::function<void(bool)>& done);
  void ReplyWithBatchInLoop(const kvmi::EventReply& reply,
                            std::vector<std::vector<uint8_t>> batched,
                            const std::function<void(bool)>& done);
  // Any thread, with write_mu_ held (the reply it allows is written under that lock); takes
  // pending_mu_. True (and the vCPU no longer waits) if `reply` answers the event its vCPU waits
  // for.
  bool TakePendingEventLocked(const kvmi::EventReply& reply)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_) ABSL_LOCKS_EXCLUDED(pending_mu_);
  // Writes what out_ holds. A full socket is left to the loop (EPOLLOUT); a failed write returns
  // its reason (the caller closes the session, outside the lock).
  std::string FlushWritesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  // Takes every byte peeked so far off the socket (the loop, or a writer under write_mu_, which
  // also keeps the descriptor open); a failure's reason, else empty.
  std::string ConsumePeeked();
  uint32_t WatchedEvents(bool write) const;
  void OnMessage(const kvmi::Frame& frame);
  void OnReply(const kvmi::Frame& frame);
  void OnEventMessage(const kvmi::Frame& frame);
  void FlushWrites();  // loop thread
  void SweepTimeouts();
  void CloseInLoop(const std::string& reason);
  uint32_t NextSeq() { return next_seq_++; }

  EventLoop* loop_;
  // Written (closed) only on the loop thread under write_mu_; so the loop reads it without the
  // lock and other threads read it with the lock (clang cannot express "either").
  kvmi::UniqueFd fd_;
  GuestIdentity identity_;
  std::string log_name_;
  Listener* listener_;
  Options options_;

  // Loop-thread state (thread confinement: the analysis cannot check it; NextSeq also runs under
  // write_mu_ from the loop).
  kvmi::MessageFramer framer_;
  uint32_t next_seq_ = 1;
  std::unordered_map<uint32_t, PendingCommand> pending_;
  EventLoop::TimerId sweep_timer_ = 0;
  bool started_ = false;
  bool unexpected_reply_logged_ = false;  // the first one is logged, the rest only counted
  // consume_on_reply in effect (set before the loop watches the socket, then only read): reads
  // peek (SO_PEEK_OFF), the socket is watched edge-triggered, and unconsumed_ counts the bytes
  // read but still in the socket.
  std::atomic<bool> peeking_{false};
  std::atomic<size_t> unconsumed_{0};
  std::atomic<int> consuming_{0};  // ConsumePeeked calls under way (any thread)
  bool peek_next_ = true;          // loop thread: the last read left a vCPU waiting for a reply
  bool held_events_only_ = true;   // loop thread: this read brought only events that now wait

  // The write side: any thread (see the threading note above). The socket itself is closed
  // under this lock too, so a writer never sees a recycled descriptor.
  Mutex write_mu_;
  std::vector<uint8_t> out_ ABSL_GUARDED_BY(write_mu_);
  size_t out_sent_ ABSL_GUARDED_BY(write_mu_) = 0;
  bool want_write_ ABSL_GUARDED_BY(write_mu_) = false;    // EPOLLOUT requested (the loop sets it)
  bool flush_posted_ ABSL_GUARDED_BY(write_mu_) = false;  // an off-loop writer asked the loop
  // Which vCPUs wait for a reply, indexed by vCPU (grown on demand: the event path allocates
  // nothing to track it). A lock of its own, taken inside write_mu_ by writers and alone by the
  // loop when an event arrives (and when the pipeline notes its id): a remote verdict's writer
  // holds write_mu_ across its send() (whose wake-up of the guest is most of its cost on a VM) and
  // the observers, and the loop takes in that vCPU's or another's next event meanwhile without
  // waiting for it. (The loop's own writes, a policy's reply or a command, still take write_mu_ and
  // wait.)
  Mutex pending_mu_ ABSL_ACQUIRED_AFTER(write_mu_);
  std::vector<PendingEvent> pending_events_ ABSL_GUARDED_BY(pending_mu_);
  // How many of them wait (written under pending_mu_; the loop reads it after a read to decide
  // whether to keep the bytes in the socket).
  std::atomic<uint32_t> waiting_vcpus_{0};
  std::atomic<bool> closed_{false};
  Counters counters_;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_SESSION_GUEST_SESSION_H_
