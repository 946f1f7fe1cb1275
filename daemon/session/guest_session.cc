#include "daemon/session/guest_session.h"

#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "kernel/abi/protocol.h"
#include "kernel/transport/socket.h"

namespace kvmid {
namespace {

constexpr auto kSweepPeriod = std::chrono::milliseconds(100);
// At most this many read bytes stay in the socket (consume_on_reply): the peer's send buffer
// also counts the kernel's overhead per message (about 1 KiB for a small one), and it must never
// fill while a reply is due. Held bytes are events only (one per waiting vCPU), so this is a bound
// for hosts with many vCPUs waiting at once.
constexpr size_t kMaxUnconsumed = 16 * 1024;

// Patches the seq of the message that starts at `offset` in `buffer`.
void PatchSeq(std::vector<uint8_t>* buffer, size_t offset, uint32_t seq) {
  std::memcpy(buffer->data() + offset + offsetof(kvmi_msg_hdr, seq), &seq, sizeof(seq));
}

kvmi_msg_hdr HeaderAt(const std::vector<uint8_t>& buffer, size_t offset) {
  kvmi_msg_hdr hdr;
  std::memcpy(&hdr, buffer.data() + offset, sizeof(hdr));
  return hdr;
}

}  // namespace

std::string CommandResult::ToString() const {
  switch (status) {
    case Status::kOk:
      return "ok";
    case Status::kKvmiError:
      return std::string("kvmi error ") + kvmi::ErrorName(err) + " (" + std::to_string(err) + ")";
    case Status::kInvalid:
      return "invalid: " + message;
    case Status::kClosed:
      return "session closed" + (message.empty() ? "" : ": " + message);
    case Status::kTimeout:
      return "timed out";
    case Status::kProtocolError:
      return "protocol error: " + message;
    case Status::kNotWaiting:
      return "not sent: " + message;
  }
  return "unknown";
}

GuestSession::GuestSession(EventLoop* loop, kvmi::UniqueFd fd, GuestIdentity identity,
                           Listener* listener, Options options)
    : loop_(loop),
      fd_(std::move(fd)),
      identity_(std::move(identity)),
      listener_(listener),
      options_(options),
      framer_(kvmi::kMaxReplyPayload) {
  log_name_ = "vm " + (identity_.name.empty() ? std::string("(unnamed)") : identity_.name) + " " +
              kvmi::UuidToString(identity_.uuid);
}

GuestSession::~GuestSession() = default;

void GuestSession::Start(const std::vector<uint8_t>& early_bytes) {
  if (closed_) return;  // closed before it started (e.g. the first write failed)
  started_ = true;
  auto self = shared_from_this();
  if (options_.consume_on_reply && kvmi::EnablePeekOffset(fd_.get())) peeking_ = true;
  loop_->Watch(fd_.get(), WatchedEvents(false),
               [self](uint32_t events) { self->OnReadable(events); });
  sweep_timer_ = loop_->RunAt(Clock::now() + kSweepPeriod, [self] { self->SweepTimeouts(); });
  if (!early_bytes.empty()) {
    framer_.Append(kvmi::ByteView(early_bytes));
    ProcessFrames();
  }
}

void GuestSession::SendEncoded(std::vector<uint8_t> message, CommandCallback done,
                               std::optional<uint16_t> only_while_waiting, uint64_t for_event) {
  if (message.size() < kvmi::kHdrSize ||
      message.size() - kvmi::kHdrSize > kvmi::kMaxCommandPayload) {
    // Never put on the wire what the v6 kernel would CLOSE the session for.
    CommandResult r = CommandResult::Invalid(
        "message payload " +
        std::to_string(message.size() - std::min(message.size(), kvmi::kHdrSize)) +
        " bytes exceeds KVMI_MSG_SIZE (" + std::to_string(kvmi::kMaxCommandPayload) + ")");
    loop_->RunInLoop([done = std::move(done), r = std::move(r)]() mutable { done(std::move(r)); });
    return;
  }
  auto self = shared_from_this();
  loop_->RunInLoop([self, message = std::move(message), done = std::move(done), only_while_waiting,
                    for_event]() mutable {
    if (self->closed_) {
      done(CommandResult::Closed());
      return;
    }
    bool waiting = true;
    // Set when it waits, but with another event than `for_event`: that event's id (0: one kvmid
    // answers itself, no id noted).
    std::optional<uint64_t> waits_for;
    std::string failure;
    {
      // Checked and written under one lock: a reply written meanwhile from another thread
      // cannot slip in between (the vCPU would have left the event).
      MutexLock lock(&self->write_mu_);
      if (only_while_waiting) {
        uint16_t vcpu = *only_while_waiting;
        MutexLock pending_lock(&self->pending_mu_);
        waiting = vcpu < self->pending_events_.size() && self->pending_events_[vcpu].waiting;
        if (waiting && for_event != 0 && self->pending_events_[vcpu].event_id != for_event) {
          waiting = false;
          waits_for = self->pending_events_[vcpu].event_id;
        }
      }
      if (waiting) {
        uint32_t seq = self->NextSeq();
        PatchSeq(&message, 0, seq);
        kvmi_msg_hdr hdr = HeaderAt(message, 0);
        self->pending_.emplace(
            seq,
            PendingCommand{hdr.id, Clock::now() + self->options_.command_timeout, std::move(done)});
        self->counters_.commands++;
        self->out_.insert(self->out_.end(), message.begin(), message.end());
        failure = self->FlushWritesLocked();
      }
    }
    if (!waiting) {
      const std::string vcpu = "vCPU " + std::to_string(*only_while_waiting);
      CommandResult not_waiting = CommandResult::NotWaiting(
          for_event == 0
              ? vcpu + " has no event pending"
              : vcpu + " does not wait for event " + std::to_string(for_event) + " (" +
                    (!waits_for        ? "no event pending"
                     : *waits_for == 0 ? "it waits for an event kvmid answers itself"
                                       : "it waits for event " + std::to_string(*waits_for)) +
                    ")");
      // `done` was moved only when the vCPU was waiting (clang-tidy cannot tell).
      done(std::move(not_waiting));  // NOLINT(bugprone-use-after-move)
      return;
    }
    if (!failure.empty()) self->CloseInLoop(failure);
  });
}

void GuestSession::ReplyToEvent(const kvmi::EventReply& reply,
                                std::vector<std::vector<uint8_t>> batched,
                                std::function<void(bool)> done) {
  // Several verdicts read at once (a HandOff): the loop, at io_nice, writes them, woken once for
  // all. A single one goes to the loop too while it is awake anyway (a Post then costs no
  // wake-up, and the loop's writes are not preempted by the threads they wake); to a sleeping
  // loop it is written here (the latency path: no wake-up). Batched commands take seqs and
  // pending-command entries, which belong to the loop.
  const bool hand_off =
      !loop_->InLoopThread() &&
      (EventLoop::HandingOff() || (options_.reply_on_awake_loop && loop_->Awake()));
  if (!hand_off && batched.empty()) {
    WriteReply(reply, done);
    return;
  }
  auto self = shared_from_this();
  EventLoop::Task task = [self, reply, batched = std::move(batched),
                          done = std::move(done)]() mutable {
    if (batched.empty()) {
      self->WriteReply(reply, done);
    } else {
      self->ReplyWithBatchInLoop(reply, std::move(batched), done);
    }
  };
  if (hand_off) {
    loop_->PostHandedOff(std::move(task));
  } else {
    loop_->RunInLoop(std::move(task));
  }
}

void GuestSession::WriteReply(const kvmi::EventReply& reply,
                              const std::function<void(bool)>& done) {
  // The hot path, from any thread: a policy's verdict on the loop, a remote verdict on the thread
  // that received it (no loop wake-up). `done` (observers) runs before the lock is let go: the
  // vCPU's next event is observed when its reply is written, under this lock, so never before
  // this one. (The loop registers that event under pending_mu_ alone: it does not wait here.)
  std::string failure;
  {
    MutexLock lock(&write_mu_);
    bool sent = TakePendingEventLocked(reply);
    if (sent) {
      kvmi::EncodeEventReply(reply, &out_);  // straight into the outgoing buffer
      counters_.event_replies++;
      failure = FlushWritesLocked();
    }
    if (done) done(sent);
  }
  if (!failure.empty()) Close(failure);  // inline on the loop thread, else posted
}

void GuestSession::ReplyWithBatchInLoop(const kvmi::EventReply& reply,
                                        std::vector<std::vector<uint8_t>> batched,
                                        const std::function<void(bool)>& done) {
  bool sent;
  std::string failure;
  {
    MutexLock lock(&write_mu_);
    sent = TakePendingEventLocked(reply);
    if (sent) {
      // One write: CMD_RESPONSE(off, now) + commands + event reply + CMD_RESPONSE(on, now).
      // Only the closing command is answered; its callback surfaces a dropped-batch failure.
      std::vector<uint8_t> wire;
      kvmi::BatchBuilder batch(&wire, NextSeq());
      for (std::vector<uint8_t>& message : batched) {
        if (message.size() < kvmi::kHdrSize) continue;
        PatchSeq(&message, 0, NextSeq());
        batch.AddEncoded(kvmi::ByteView(message));
      }
      std::vector<uint8_t> event_reply;
      kvmi::EncodeEventReply(reply, &event_reply);
      batch.AddEncoded(kvmi::ByteView(event_reply));
      uint32_t close_seq = NextSeq();
      batch.Close(close_seq);
      std::string name = log_name_;
      pending_.emplace(
          close_seq,
          PendingCommand{KVMI_CONTROL_CMD_RESPONSE, Clock::now() + options_.command_timeout,
                         [name](const CommandResult& r) {
                           if (!r.ok()) {
                             spdlog::warn("{}: batched event reply: {}", name, r.ToString());
                           }
                         }});
      out_.insert(out_.end(), wire.begin(), wire.end());
      counters_.event_replies++;
      failure = FlushWritesLocked();
    }
  }
  if (!failure.empty()) CloseInLoop(failure);
  if (done) done(sent);  // false: answered already (e.g. by the fallback), or gone
}

void GuestSession::NoteEventId(uint16_t vcpu, uint32_t seq, uint64_t event_id) {
  MutexLock lock(&pending_mu_);
  if (vcpu >= pending_events_.size()) return;
  PendingEvent& pending = pending_events_[vcpu];
  if (pending.waiting && pending.seq == seq) pending.event_id = event_id;
}

bool GuestSession::TakePendingEventLocked(const kvmi::EventReply& reply) {
  MutexLock lock(&pending_mu_);
  if (closed_ || reply.vcpu >= pending_events_.size()) return false;
  PendingEvent& pending = pending_events_[reply.vcpu];
  if (!pending.waiting || pending.seq != reply.seq) return false;
  pending.waiting = false;
  waiting_vcpus_--;
  return true;
}

void GuestSession::Close(const std::string& reason) {
  auto self = shared_from_this();
  loop_->RunInLoop([self, reason] { self->CloseInLoop(reason); });
}

void GuestSession::CloseInLoop(const std::string& reason) {
  if (closed_.exchange(true)) return;
  spdlog::info("{}: session closed: {}", log_name_, reason);
  if (started_) loop_->Unwatch(fd_.get());
  loop_->Cancel(sweep_timer_);
  {
    MutexLock lock(&write_mu_);  // no writer holds the descriptor now
    ::shutdown(fd_.get(), SHUT_RDWR);
    fd_.Reset();
    MutexLock pending_lock(&pending_mu_);
    pending_events_.clear();
  }
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& [seq, command] : pending) {
    command.done(CommandResult::Closed(reason));
  }
  listener_->OnClosed(shared_from_this(), reason);
}

void GuestSession::FlushWrites() {
  std::string failure;
  {
    MutexLock lock(&write_mu_);
    flush_posted_ = false;
    if (closed_) return;
    failure = FlushWritesLocked();
  }
  if (!failure.empty()) CloseInLoop(failure);
}

std::string GuestSession::FlushWritesLocked() {
  if (out_sent_ < out_.size()) {
    // The peer's thread blocked in recv() is woken by this consume, and the write below follows
    // at once: most often it finds the reply there, instead of being woken a second time.
    std::string failure = ConsumePeeked();
    if (!failure.empty()) return failure;
  }
  while (out_sent_ < out_.size()) {
    size_t sent = 0;
    kvmi::IoResult result =
        kvmi::TryWrite(fd_.get(), out_.data() + out_sent_, out_.size() - out_sent_, &sent);
    out_sent_ += sent;
    if (!result.ok()) return "write failed: " + result.ToString();
    if (out_sent_ < out_.size()) {
      // The socket is full: the loop finishes the write when it drains (EPOLLOUT).
      if (loop_->InLoopThread()) {
        if (!want_write_) {
          want_write_ = true;
          loop_->Modify(fd_.get(), WatchedEvents(true));
        }
      } else if (!flush_posted_) {
        flush_posted_ = true;
        auto self = shared_from_this();
        loop_->Post([self] { self->FlushWrites(); });
      }
      return "";
    }
  }
  out_.clear();
  out_sent_ = 0;
  if (want_write_ && loop_->InLoopThread()) {
    want_write_ = false;
    loop_->Modify(fd_.get(), WatchedEvents(false));
  }
  return "";
}

uint32_t GuestSession::WatchedEvents(bool write) const {
  // Peeked bytes stay readable: level-triggered, the loop would wake until they are consumed.
  return EPOLLIN | EPOLLRDHUP | (write ? EPOLLOUT : 0) | (peeking_ ? EPOLLET : 0);
}

std::string GuestSession::ConsumePeeked() {
  if (unconsumed_.load(std::memory_order_relaxed) == 0) return "";  // every plain-read write
  // consuming_ covers the time between the exchange and the recv: until the recv, the bytes are
  // still at the head of the socket, and a plain read by the loop would take them a second time.
  consuming_++;
  size_t n = unconsumed_.exchange(0);
  kvmi::IoResult result = n == 0 ? kvmi::IoResult::Ok() : kvmi::Consume(fd_.get(), n);
  consuming_--;
  return result.ok() ? "" : "read failed: " + result.ToString();
}

void GuestSession::OnReadable(uint32_t epoll_events) {
  if (closed_) return;
  if ((epoll_events & EPOLLOUT) != 0) FlushWrites();
  // Drain the socket (level-triggered, or edge-triggered when peeking: every byte there is read
  // before the loop waits again), then frame.
  held_events_only_ = true;
  while (!closed_) {
    uint8_t* tail = framer_.WritableTail(kSessionReadChunk);
    size_t got = 0;
    // Peek only where a reply is likely to come later (the last read left a vCPU waiting): an
    // event a policy answers at once is taken off with one recv(), as without consume_on_reply.
    // A plain read must not start while peeked bytes are still at the head: unconsumed_ is zero
    // and no consume is under way (loaded in that order; only the loop adds to unconsumed_).
    const bool peek = peeking_ && (peek_next_ || unconsumed_.load() != 0 || consuming_.load() != 0);
    kvmi::IoResult result = peek ? kvmi::TryPeek(fd_.get(), tail, framer_.writable_size(), &got)
                                 : kvmi::TryRead(fd_.get(), tail, framer_.writable_size(), &got);
    if (result.kind == kvmi::IoResult::kClosed) {
      ProcessFrames();  // what arrived before the close still counts
      CloseInLoop("peer closed the connection");
      return;
    }
    if (!result.ok()) {
      CloseInLoop("read failed: " + result.ToString());
      return;
    }
    if (got == 0) break;  // drained
    framer_.Commit(got);
    if (peek) unconsumed_ += got;  // before the frames go out: a reply consumes them
    // A short read drained the socket, unless it hung up: then read on to the end (edge-triggered,
    // the hang-up is reported once, with this wake-up; a later one brings a new edge).
    if (got < kSessionReadChunk && (epoll_events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) == 0) {
      break;
    }
  }
  ProcessFrames();
  // Bytes stay in the socket only while a vCPU waits for a reply that will consume them, only
  // if they are events that wait (command replies, say of a pipelined WritePhysical, are taken
  // at once: nothing else would take them while the commands go on), and at most kMaxUnconsumed.
  // (Held bytes never outlive the wait: the vCPU's reply is written after it stops waiting, and
  // that write takes them, or this check sees no vCPU waiting and takes them here.)
  const bool waiting = waiting_vcpus_.load() != 0;
  peek_next_ = waiting;
  if (peeking_ && !closed_ &&
      (!waiting || !held_events_only_ || unconsumed_.load() > kMaxUnconsumed)) {
    std::string failure = ConsumePeeked();
    if (!failure.empty()) CloseInLoop(failure);
  }
}

void GuestSession::ProcessFrames() {
  kvmi::Frame frame;
  kvmi::DecodeStatus status;
  while (!closed_) {
    auto result = framer_.Next(&frame, &status);
    if (result == kvmi::MessageFramer::Result::kNeedMore) break;
    if (result == kvmi::MessageFramer::Result::kError) {
      spdlog::warn("{}: malformed stream from the host: {}", log_name_, status.ToString());
      CloseInLoop("protocol error: " + status.ToString());
      return;
    }
    OnMessage(frame);
  }
}

void GuestSession::OnMessage(const kvmi::Frame& frame) {
  if (frame.hdr.id == KVMI_EVENT) {
    OnEventMessage(frame);
  } else {
    held_events_only_ = false;
    OnReply(frame);
  }
}

void GuestSession::OnEventMessage(const kvmi::Frame& frame) {
  kvmi::Event event;
  kvmi::DecodeStatus status = kvmi::DecodeEvent(frame.hdr, frame.payload, &event);
  if (!status.ok()) {
    spdlog::warn("{}: malformed event (seq {}): {}", log_name_, frame.hdr.seq, status.ToString());
    CloseInLoop("protocol error: event: " + status.ToString());
    return;
  }
  counters_.events++;
  const kvmi::EventInfo* info = kvmi::FindEvent(event.id());
  if (!info->has_reply) held_events_only_ = false;
  if (info->has_reply) {
    // §7.3: at most one outstanding event per vCPU. A second one means the peer is not a v6
    // kernel we understand; answering either would be guesswork.
    PendingEvent unanswered;
    {
      // Not write_mu_: a reply being written from another thread holds that across its send.
      MutexLock lock(&pending_mu_);
      if (event.vcpu() >= pending_events_.size()) pending_events_.resize(event.vcpu() + 1u);
      PendingEvent& pending = pending_events_[event.vcpu()];
      if (pending.waiting) {
        unanswered = pending;
      } else {
        pending = PendingEvent{true, event.seq, event.id()};
        waiting_vcpus_++;
      }
    }
    if (unanswered.waiting) {
      spdlog::warn("{}: vCPU {} sent {} (seq {}) while {} (seq {}) is unanswered", log_name_,
                   event.vcpu(), kvmi::EventName(event.id()), event.seq,
                   kvmi::EventName(unanswered.event), unanswered.seq);
      CloseInLoop("protocol error: two outstanding events on one vCPU");
      return;
    }
  }
  listener_->OnEvent(shared_from_this(), event);
}

void GuestSession::OnReply(const kvmi::Frame& frame) {
  if (frame.hdr.id == KVMI_EVENT_REPLY) {
    // The kernel answers an event reply only when it rejected it (bad vCPU index, §6); its seq
    // is the event's, not one of ours.
    spdlog::warn("{}: the host rejected an event reply (seq {})", log_name_, frame.hdr.seq);
    return;
  }
  auto it = pending_.find(frame.hdr.seq);
  if (it == pending_.end()) {
    if (frame.hdr.seq == 0 || frame.hdr.seq >= next_seq_) {
      // A seq this session never used: the kernel only ever echoes ours (§1), so the peer is not
      // a KVMI host that stays in step with us.
      spdlog::warn("{}: reply {} carries seq {}, never sent", log_name_,
                   kvmi::CommandName(frame.hdr.id), frame.hdr.seq);
      CloseInLoop("protocol error: reply with a seq that was never sent");
      return;
    }
    // A seq of ours that nobody waits for: the late reply of a command that timed out, or a
    // host that answered a command sent with replies disabled (a v6 kernel decides that when it
    // receives the command, §5.2; a host that decides later answers batched SET_REGISTERS). The
    // framer already took the whole message by its size: skip it and stay in step.
    counters_.unexpected_replies.fetch_add(1, std::memory_order_relaxed);
    if (!unexpected_reply_logged_) {
      unexpected_reply_logged_ = true;
      spdlog::warn(
          "{}: reply {} seq {} ({} bytes) answers no pending command (timed out, or sent with "
          "replies disabled): skipped; further ones are only counted",
          log_name_, kvmi::CommandName(frame.hdr.id), frame.hdr.seq, frame.payload.size());
    }
    return;
  }
  if (it->second.id != frame.hdr.id) {
    spdlog::warn("{}: reply seq {} has id {}, request was {}", log_name_, frame.hdr.seq,
                 frame.hdr.id, kvmi::CommandName(it->second.id));
    CloseInLoop("protocol error: reply id does not match its request");
    return;
  }
  PendingCommand command = std::move(it->second);
  pending_.erase(it);
  kvmi::Reply reply;
  kvmi::DecodeStatus status = kvmi::DecodeReply(frame.hdr, frame.payload, &reply);
  if (!status.ok()) {
    command.done(CommandResult::ProtocolError(status.ToString()));
    CloseInLoop("protocol error: reply: " + status.ToString());
    return;
  }
  if (reply.err != 0) {
    counters_.command_errors++;
    command.done(CommandResult::KvmiError(reply.err));
    return;
  }
  command.done(CommandResult::Ok(reply.data.ToVector()));
}

void GuestSession::SweepTimeouts() {
  if (closed_) return;
  Clock::time_point now = Clock::now();
  std::vector<CommandCallback> expired;
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (it->second.deadline <= now) {
      spdlog::warn("{}: {} (seq {}) got no reply in time", log_name_,
                   kvmi::CommandName(it->second.id), it->first);
      expired.push_back(std::move(it->second.done));
      it = pending_.erase(it);
    } else {
      ++it;
    }
  }
  for (CommandCallback& done : expired) done(CommandResult::Timeout());
  auto self = shared_from_this();
  sweep_timer_ = loop_->RunAt(now + kSweepPeriod, [self] { self->SweepTimeouts(); });
}

// ---- splitting helpers ------------------------------------------------------------------------

namespace {

std::string TransferSizeError() {
  return "size must be 1.." + std::to_string(kMaxPhysicalTransfer >> 20) + " MiB without wrapping";
}

// Joins the results of N pipelined pieces; the first failure wins.
struct Gather {
  size_t remaining;
  CommandResult first_failure;
  bool failed = false;
  std::vector<std::vector<uint8_t>> pieces;
};

}  // namespace

void GuestSession::ReadPhysical(uint64_t gpa, uint64_t size, ReadCallback done) {
  if (size == 0 || size > kMaxPhysicalTransfer || gpa + size < gpa) {
    loop_->RunInLoop(
        [done = std::move(done)] { done(CommandResult::Invalid(TransferSizeError())); });
    return;
  }
  // READ_PHYSICAL may not cross a 4 KiB page (the kernel CLOSEs): one message per page piece.
  std::vector<std::pair<uint64_t, uint64_t>> pieces;
  for (uint64_t at = gpa, left = size; left > 0;) {
    uint64_t in_page = KVMI_PAGE_SIZE - (at % KVMI_PAGE_SIZE);
    uint64_t n = std::min(left, in_page);
    pieces.emplace_back(at, n);
    at += n;
    left -= n;
  }
  auto gather = std::make_shared<Gather>();
  gather->remaining = pieces.size();
  gather->pieces.resize(pieces.size());
  auto shared_done = std::make_shared<ReadCallback>(std::move(done));
  for (size_t i = 0; i < pieces.size(); ++i) {
    kvmi::ReadPhysicalRequest request;
    request.gpa = pieces[i].first;
    request.size = pieces[i].second;
    uint64_t expected = request.size;
    Send(request, [gather, shared_done, i, expected](CommandResult r) {
      if (r.ok() && r.data.size() != expected) {
        r = CommandResult::ProtocolError("short READ_PHYSICAL reply");
      }
      if (!r.ok() && !gather->failed) {
        gather->failed = true;
        gather->first_failure = std::move(r);
      } else if (r.ok()) {
        gather->pieces[i] = std::move(r.data);
      }
      if (--gather->remaining > 0) return;
      if (gather->failed) {
        (*shared_done)(std::move(gather->first_failure));
        return;
      }
      std::vector<uint8_t> all;
      for (auto& piece : gather->pieces) all.insert(all.end(), piece.begin(), piece.end());
      (*shared_done)(CommandResult::Ok(std::move(all)));
    });
  }
}

void GuestSession::WritePhysical(uint64_t gpa, std::vector<uint8_t> data, CommandCallback done) {
  if (data.empty() || data.size() > kMaxPhysicalTransfer || gpa + data.size() < gpa) {
    loop_->RunInLoop(
        [done = std::move(done)] { done(CommandResult::Invalid(TransferSizeError())); });
    return;
  }
  // Per message: within one page and at most 4072 data bytes (4088 - 16).
  std::vector<std::pair<uint64_t, size_t>> pieces;  // gpa, offset into data
  std::vector<size_t> lengths;
  for (size_t offset = 0; offset < data.size();) {
    uint64_t at = gpa + offset;
    size_t n = std::min<size_t>({data.size() - offset,
                                 static_cast<size_t>(KVMI_PAGE_SIZE - (at % KVMI_PAGE_SIZE)),
                                 kvmi::kMaxWritePhysicalData});
    pieces.emplace_back(at, offset);
    lengths.push_back(n);
    offset += n;
  }
  auto gather = std::make_shared<Gather>();
  gather->remaining = pieces.size();
  auto shared_done = std::make_shared<CommandCallback>(std::move(done));
  for (size_t i = 0; i < pieces.size(); ++i) {
    kvmi::WritePhysicalRequest request;
    request.gpa = pieces[i].first;
    request.size = lengths[i];
    request.data = kvmi::ByteView(data.data() + pieces[i].second, lengths[i]);
    Send(request, [gather, shared_done](CommandResult r) {
      if (!r.ok() && !gather->failed) {
        gather->failed = true;
        gather->first_failure = std::move(r);
      }
      if (--gather->remaining > 0) return;
      (*shared_done)(gather->failed ? std::move(gather->first_failure) : CommandResult::Ok());
    });
  }
}

void GuestSession::SetPageAccess(std::vector<kvmi::PageAccess> entries, PageAccessCallback done) {
  if (entries.empty()) {
    loop_->RunInLoop([done = std::move(done)] { done({}, {}); });
    return;
  }
  size_t messages =
      (entries.size() + kvmi::kMaxSetPageAccessEntries - 1) / kvmi::kMaxSetPageAccessEntries;
  struct State {
    size_t remaining;
    std::vector<CommandResult> per_message;
    std::vector<int32_t> per_entry;
    PageAccessCallback done;
  };
  auto state = std::make_shared<State>();
  state->remaining = messages;
  state->per_message.resize(messages);
  state->per_entry.resize(entries.size());
  state->done = std::move(done);
  for (size_t m = 0; m < messages; ++m) {
    size_t first = m * kvmi::kMaxSetPageAccessEntries;
    size_t last = std::min(entries.size(), first + kvmi::kMaxSetPageAccessEntries);
    kvmi::SetPageAccessRequest request;
    request.entries.assign(entries.begin() + first, entries.begin() + last);
    Send(request, [state, m, first, last](CommandResult r) {
      int32_t err = r.status == CommandResult::Status::kKvmiError ? r.err
                    : r.ok()                                      ? 0
                                                                  : -KVM_EINVAL;
      for (size_t i = first; i < last; ++i) state->per_entry[i] = err;
      state->per_message[m] = std::move(r);
      if (--state->remaining > 0) return;
      state->done(std::move(state->per_message), std::move(state->per_entry));
    });
  }
}

void GuestSession::GetPageAccess(std::vector<uint64_t> gpas, GetPageAccessCallback done) {
  if (gpas.empty()) {
    loop_->RunInLoop([done = std::move(done)] {
      done(CommandResult::Invalid("GET_PAGE_ACCESS needs at least one address"), {});
    });
    return;
  }
  constexpr size_t kPiece = kvmi::kMaxGetPageAccessGpas;
  struct State {
    size_t remaining;
    std::vector<uint8_t> access;           // one per GPA, filled piece by piece
    std::optional<CommandResult> failure;  // the first piece that failed, in piece order
    size_t failed_piece = SIZE_MAX;
    GetPageAccessCallback done;
  };
  auto state = std::make_shared<State>();
  const size_t pieces = (gpas.size() + kPiece - 1) / kPiece;
  state->remaining = pieces;
  state->access.resize(gpas.size());
  state->done = std::move(done);
  // Every reply callback runs on the loop thread: `state` needs no lock.
  for (size_t p = 0; p < pieces; ++p) {
    const size_t first = p * kPiece;
    const size_t last = std::min(gpas.size(), first + kPiece);
    kvmi::GetPageAccessRequest request;
    request.gpas.assign(gpas.begin() + first, gpas.begin() + last);
    Send(request, [state, p, first, count = last - first](CommandResult r) {
      if (r.ok()) {
        kvmi::PageAccessReply reply;
        kvmi::DecodeStatus decoded = kvmi::DecodeReplyData(kvmi::ByteView(r.data), count, &reply);
        if (decoded.ok()) {
          std::copy(reply.access.begin(), reply.access.end(), state->access.begin() + first);
        } else {
          r = CommandResult::ProtocolError("GET_PAGE_ACCESS reply: " + decoded.ToString());
        }
      }
      if (!r.ok() && p < state->failed_piece) {
        state->failed_piece = p;
        state->failure = std::move(r);
      }
      if (--state->remaining > 0) return;
      if (state->failure) {
        state->done(std::move(*state->failure), {});
      } else {
        state->done(CommandResult::Ok(), std::move(state->access));
      }
    });
  }
}

}  // namespace kvmid
