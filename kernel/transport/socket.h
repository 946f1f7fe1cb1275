// Stream-socket helpers for KVMI endpoints (AF_UNIX and AF_VSOCK), in the style of libkvmi: every
// socket operation goes through a few functions that handle poll, deadlines, EINTR and EAGAIN, so
// callers only see "done", "timed out", "peer closed" or an errno.
#ifndef KVMID_KERNEL_TRANSPORT_SOCKET_H_
#define KVMID_KERNEL_TRANSPORT_SOCKET_H_

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

#include "kernel/transport/unique_fd.h"

namespace kvmi {

using Clock = std::chrono::steady_clock;
// No deadline: wait until the operation completes or the socket is shut down.
inline constexpr Clock::time_point kNoDeadline = Clock::time_point::max();

// The outcome of a socket operation. `error` is an errno value when kind == kError.
struct IoResult {
  enum Kind : uint8_t { kOk, kTimeout, kClosed, kError };
  Kind kind = kOk;
  int error = 0;

  bool ok() const { return kind == kOk; }
  static IoResult Ok() { return {}; }
  std::string ToString() const;
};

// A parsed endpoint: "unix:/path/to/sock" or "vsock:CID:PORT".
struct Endpoint {
  enum class Family : uint8_t { kUnix, kVsock };
  Family family = Family::kUnix;
  std::string path;   // kUnix
  uint32_t cid = 0;   // kVsock
  uint32_t port = 0;  // kVsock

  std::string ToString() const;
};
// Parses the textual form; InvalidArgument names what is wrong.
absl::StatusOr<Endpoint> ParseEndpoint(const std::string& text);

// Each returns a valid fd, or a status whose message is a sentence for the user (paths longer
// than sun_path, AF_VSOCK missing on this machine, errno text, ...). Sockets are blocking and
// close-on-exec.
absl::StatusOr<UniqueFd> ConnectEndpoint(const Endpoint& endpoint);
absl::StatusOr<UniqueFd> ConnectUnix(const std::string& path);
absl::StatusOr<UniqueFd> ConnectVsock(uint32_t cid, uint32_t port);
// Removes a socket file already at `path` first (the caller makes sure it is stale, e.g. by
// holding the instance lock). The backlog is SOMAXCONN.
absl::StatusOr<UniqueFd> ListenEndpoint(const Endpoint& endpoint);
absl::StatusOr<UniqueFd> ListenUnix(const std::string& path);
absl::StatusOr<UniqueFd> ListenVsock(uint32_t port);
// Waits for a connection until `deadline`.
IoResult Accept(int listen_fd, Clock::time_point deadline, UniqueFd* out);

// Reads exactly n bytes. kClosed if the peer closed first (even after a partial read).
IoResult ReadExact(int fd, void* buf, size_t n, Clock::time_point deadline = kNoDeadline);
// Reads at most n (> 0) bytes, waiting for at least one; *got is the count. With kNoDeadline
// on a blocking socket this is a plain blocking recv().
IoResult ReadSome(int fd, void* buf, size_t n, size_t* got,
                  Clock::time_point deadline = kNoDeadline);
// Writes all n bytes (MSG_NOSIGNAL: a dead peer is kClosed, never SIGPIPE).
IoResult WriteAll(int fd, const void* buf, size_t n, Clock::time_point deadline = kNoDeadline);
// Waits until fd is readable (or hung up). kOk when readable.
IoResult WaitReadable(int fd, Clock::time_point deadline);

// For sockets served by an event loop: one attempt each, never waiting (MSG_DONTWAIT), EINTR
// retried. TryRead: kOk with *got > 0 bytes, or *got == 0 when nothing is there yet; kClosed when
// the peer closed (error 0) or reset the connection. TryWrite (MSG_NOSIGNAL): kOk with *sent
// bytes written, possibly fewer than n (0 when the socket buffer is full: wait for EPOLLOUT);
// kClosed for a dead peer.
IoResult TryRead(int fd, void* buf, size_t n, size_t* got);
IoResult TryWrite(int fd, const void* buf, size_t n, size_t* sent);

// Reading without taking the bytes off a UNIX stream socket, for a reader that lets the peer's
// send buffer go only when it answers (the peer's thread blocked in recv() is woken whenever its
// sent bytes are freed, so freeing them just before a reply makes that one wake-up, not two).
// EnablePeekOffset turns on SO_PEEK_OFF for a UNIX socket (false, with errno, for any other).
// TryPeek then reads like TryRead with MSG_PEEK, each peek continuing where the last ended;
// Consume(n) takes n bytes already peeked off the head of the socket (the kernel moves the peek
// offset back by n: a peek and a consume from two threads stay in step).
bool EnablePeekOffset(int fd);
IoResult TryPeek(int fd, void* buf, size_t n, size_t* got);
IoResult Consume(int fd, size_t n);

}  // namespace kvmi

#endif  // KVMID_KERNEL_TRANSPORT_SOCKET_H_
