// Happens-before edges that ThreadSanitizer cannot see by itself, for code that hands work to an
// uninstrumented library (Debian's gRPC and Abseil are not built with -fsanitize=thread).
//
// gRPC orders an operation's start (our thread) before its completion (the thread in
// CompletionQueue::Next) with its own atomics and Abseil mutexes, which TSan does not see. The
// async server (daemon/api/async_reactor) marks the edge itself: the thread that starts an
// operation calls TsanHandOff(tag) before giving gRPC the tag, and the completion-queue thread
// calls TsanTakeOver(tag) when Next returns it.
//
// gRPC's header-only CallOpSet code is compiled into our instrumented objects. It runs while an
// operation starts (FillOps; serializing the message to send) and inside Next (FinalizeResult;
// parsing a received message into our buffer), on either side of the edge, so TSan would report
// the library's own bookkeeping. A TsanIgnored scope around those library calls keeps it from
// checking them. What that leaves unchecked:
// - gRPC runs server interceptors inside both; kvmid's own (OpenStreams', the API metrics') open
//   a TsanChecked scope, which lifts the ignore for their code;
// - a received message is parsed unchecked (the reactor's reads of it after the take-over are
//   checked);
// - a message to send is read by TsanReadMessage just before, so a writer racing with the send is
//   still caught, except in what libprotobuf copies itself (long strings and bytes, well-known
//   types): those are read by an uninstrumented module.
//
#ifndef KVMID_DAEMON_BASE_TSAN_H_
#define KVMID_DAEMON_BASE_TSAN_H_

// 1 in a TSan build: .bazelrc's tsan config defines it, since it hides TSan from the headers.
#ifndef KVMID_TSAN
#if defined(__SANITIZE_THREAD__)
#define KVMID_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KVMID_TSAN 1
#endif
#endif
#endif
#ifndef KVMID_TSAN
#define KVMID_TSAN 0
#endif

#if KVMID_TSAN
extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin();
void __tsan_ignore_thread_end();
}
#endif

namespace kvmid {

// What this thread wrote so far happens before whatever follows TsanTakeOver(tag) elsewhere.
inline void TsanHandOff(void* tag) {
#if KVMID_TSAN
  __tsan_release(tag);
#else
  (void)tag;
#endif
}

inline void TsanTakeOver(void* tag) {
#if KVMID_TSAN
  __tsan_acquire(tag);
#else
  (void)tag;
#endif
}

#if KVMID_TSAN
// How many TsanIgnored scopes this thread is in.
inline thread_local int tsan_ignored_depth = 0;
#endif

// Inside its scope, this thread's memory accesses are not checked (library code only).
class TsanIgnored {
 public:
  TsanIgnored() {
#if KVMID_TSAN
    if (tsan_ignored_depth++ == 0) __tsan_ignore_thread_begin();
#endif
  }
  ~TsanIgnored() {
#if KVMID_TSAN
    if (--tsan_ignored_depth == 0) __tsan_ignore_thread_end();
#endif
  }
  TsanIgnored(const TsanIgnored&) = delete;
  TsanIgnored& operator=(const TsanIgnored&) = delete;
};

// For our code that a library calls back inside a TsanIgnored scope (a gRPC interceptor): checked
// again inside its scope.
class TsanChecked {
 public:
  TsanChecked() {
#if KVMID_TSAN
    lifted_ = tsan_ignored_depth;
    tsan_ignored_depth = 0;
    if (lifted_ > 0) __tsan_ignore_thread_end();
#endif
  }
  ~TsanChecked() {
#if KVMID_TSAN
    if (lifted_ > 0) __tsan_ignore_thread_begin();
    tsan_ignored_depth = lifted_;
#endif
  }
  TsanChecked(const TsanChecked&) = delete;
  TsanChecked& operator=(const TsanChecked&) = delete;

#if KVMID_TSAN
 private:
  int lifted_ = 0;
#endif
};

// Reads `message` (a protobuf message) as its serialization does, so that TSan checks it for
// racing writers (but see above: not what libprotobuf itself copies).
template <typename Message>
inline void TsanReadMessage(const Message& message) {
#if KVMID_TSAN
  (void)message.SerializeAsString();
#else
  (void)message;
#endif
}

}  // namespace kvmid

#endif  // KVMID_DAEMON_BASE_TSAN_H_
