// Stream-socket helpers for KVMI endpoints (AF_UNIX and AF_VSOCK), in the style of libkvmi: every
// socket operation goes through a few functions that handle poll, deadlines, EINTR and EAGAIN, so
// callers only see "done", "timed out", "peer closed" or an errno.
#ifndef KVMID_KERNEL_TRANSPORT_SOCKET_H_
#define KVMID_KERNEL_TRANSPORT_SOCKET_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
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
// Parses the textual form; on failure returns nullopt and sets *error to a sentence for the user.
std::optional<Endpoint> ParseEndpoint(const std::string& text, std::string* error);

// Each returns a valid fd, or an invalid one with *error set to a human-readable reason (paths
// longer than sun_path, AF_VSOCK missing on this machine, ...). Sockets are blocking and
// close-on-exec.
UniqueFd ConnectEndpoint(const Endpoint& endpoint, std::string* error);
UniqueFd ConnectUnix(const std::string& path, std::string* error);
UniqueFd ConnectVsock(uint32_t cid, uint32_t port, std::string* error);
// Removes a stale socket file first. backlog defaults to SOMAXCONN.
UniqueFd ListenEndpoint(const Endpoint& endpoint, std::string* error);
UniqueFd ListenUnix(const std::string& path, std::string* error);
UniqueFd ListenVsock(uint32_t port, std::string* error);
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

}  // namespace kvmi

#endif  // KVMID_KERNEL_TRANSPORT_SOCKET_H_
