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
// the library's own bookkeeping. TsanIgnoreBegin/End around those library calls keep it from
// checking them; TsanReadMessage reads a message to send in full just before, so a writer racing
// with the send is still caught. Everything our own code does stays checked.
//
// Outside a TSan build these are empty inline functions.
#ifndef KVMID_DAEMON_BASE_TSAN_H_
#define KVMID_DAEMON_BASE_TSAN_H_

#ifndef KVMID_TSAN  // .bazelrc's tsan config defines it
#if defined(__SANITIZE_THREAD__)
#define KVMID_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KVMID_TSAN 1
#endif
#endif
#endif

#ifdef KVMID_TSAN
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
#ifdef KVMID_TSAN
  __tsan_release(tag);
#else
  (void)tag;
#endif
}

inline void TsanTakeOver(void* tag) {
#ifdef KVMID_TSAN
  __tsan_acquire(tag);
#else
  (void)tag;
#endif
}

// This thread's memory accesses are not checked until TsanIgnoreEnd (library code only).
inline void TsanIgnoreBegin() {
#ifdef KVMID_TSAN
  __tsan_ignore_thread_begin();
#endif
}

inline void TsanIgnoreEnd() {
#ifdef KVMID_TSAN
  __tsan_ignore_thread_end();
#endif
}

// Reads every field of `message` (a protobuf message), so that TSan checks it for racing writers.
template <typename Message>
inline void TsanReadMessage(const Message& message) {
#ifdef KVMID_TSAN
  (void)message.SerializeAsString();
#else
  (void)message;
#endif
}

}  // namespace kvmid

#endif  // KVMID_DAEMON_BASE_TSAN_H_
