#include "kernel/sim/test_tool.h"

#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <climits>
#include <cstring>

#include "spdlog/spdlog.h"

namespace kvmi::sim {

ToolConnection::ToolConnection(UniqueFd fd) : fd_(std::move(fd)) {}

bool ToolConnection::Handshake(QemuHello* hello, const std::string& cookie,
                               const std::optional<std::array<uint8_t, 20>>& hash_override) {
  auto deadline = Clock::now() + kDefaultTimeout;
  uint8_t first4[4];
  if (!ReadExact(fd_.get(), first4, sizeof(first4), deadline).ok()) return false;
  uint32_t struct_size = 0;
  if (!PeekQemuHelloSize(ByteView(first4, 4), &struct_size).ok()) return false;
  std::vector<uint8_t> bytes(struct_size);
  std::memcpy(bytes.data(), first4, 4);
  if (!ReadExact(fd_.get(), bytes.data() + 4, struct_size - 4, deadline).ok()) return false;
  QemuHello decoded;
  if (!DecodeQemuHello(ByteView(bytes), &decoded).ok()) return false;
  if (hello != nullptr) *hello = decoded;
  IntrospectorHello answer;
  answer.cookie_hash = hash_override ? *hash_override : CookieHash(ByteView(cookie));
  std::vector<uint8_t> out;
  EncodeIntrospectorHello(answer, &out);
  return WriteAll(fd_.get(), out.data(), out.size(), deadline).ok();
}

bool ToolConnection::SendRaw(const std::vector<uint8_t>& bytes) {
  return WriteAll(fd_.get(), bytes.data(), bytes.size(), Clock::now() + kDefaultTimeout).ok();
}

std::optional<RawMessage> ToolConnection::ReadMessage(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    Frame frame;
    DecodeStatus status;
    MessageFramer::Result result = framer_.Next(&frame, &status);
    if (result == MessageFramer::Result::kMessage) {
      RawMessage m;
      m.hdr = frame.hdr;
      m.payload = frame.payload.ToVector();
      m.wire.resize(kHdrSize);
      std::memcpy(m.wire.data(), &m.hdr, kHdrSize);
      m.wire.insert(m.wire.end(), m.payload.begin(), m.payload.end());
      return m;
    }
    if (result == MessageFramer::Result::kError || closed_) return std::nullopt;
    size_t got = 0;
    constexpr size_t kChunk = 16 * 1024;
    IoResult io = ReadSome(fd_.get(), framer_.WritableTail(kChunk), kChunk, &got, deadline);
    if (io.kind == IoResult::kClosed || io.kind == IoResult::kError) closed_ = true;
    if (!io.ok()) return std::nullopt;
    framer_.Commit(got);
  }
}

std::optional<RawMessage> ToolConnection::WaitReply(uint16_t id, uint32_t seq,
                                                    std::chrono::milliseconds timeout) {
  for (auto it = queued_.begin(); it != queued_.end(); ++it) {
    if (it->hdr.id == id && it->hdr.seq == seq) {
      RawMessage m = std::move(*it);
      queued_.erase(it);
      return m;
    }
  }
  auto deadline = Clock::now() + timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return std::nullopt;
    std::optional<RawMessage> m = ReadMessage(left);
    if (!m) return std::nullopt;
    if (m->hdr.id == id && m->hdr.seq == seq) return m;
    queued_.push_back(std::move(*m));
  }
}

int32_t ToolConnection::ErrorOf(const std::optional<RawMessage>& reply) {
  if (!reply) return INT32_MIN;
  Reply decoded;
  if (!DecodeReply(reply->hdr, ByteView(reply->payload), &decoded).ok()) return INT32_MIN;
  return decoded.err;
}

ByteView ToolConnection::DataOf(const RawMessage& reply) {
  return ByteView(reply.payload).subview(kErrorCodeSize);
}

std::optional<Event> ToolConnection::WaitEvent(std::chrono::milliseconds timeout) {
  for (auto it = queued_.begin(); it != queued_.end(); ++it) {
    if (it->hdr.id == KVMI_EVENT) {
      Event event;
      bool ok = DecodeEvent(it->hdr, ByteView(it->payload), &event).ok();
      queued_.erase(it);
      if (!ok) return std::nullopt;
      return event;
    }
  }
  auto deadline = Clock::now() + timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return std::nullopt;
    std::optional<RawMessage> m = ReadMessage(left);
    if (!m) return std::nullopt;
    if (m->hdr.id != KVMI_EVENT) {
      queued_.push_back(std::move(*m));
      continue;
    }
    Event event;
    if (!DecodeEvent(m->hdr, ByteView(m->payload), &event).ok()) return std::nullopt;
    return event;
  }
}

bool ToolConnection::ReplyEvent(const EventReply& reply) {
  std::vector<uint8_t> bytes;
  EncodeEventReply(reply, &bytes);
  return SendRaw(bytes);
}

bool ToolConnection::WaitClosed(std::chrono::milliseconds timeout) {
  if (!queued_.empty()) return false;
  std::optional<RawMessage> m = ReadMessage(timeout);
  if (m) {
    queued_.push_back(std::move(*m));
    return false;
  }
  return closed_;
}

bool ToolConnection::ExpectSilence(std::chrono::milliseconds quiet) {
  if (!queued_.empty()) return false;
  std::optional<RawMessage> m = ReadMessage(quiet);
  if (m) {
    queued_.push_back(std::move(*m));
    return false;
  }
  return !closed_;
}

// ---- listener
// ------------------------------------------------------------------------------------

ToolListener::ToolListener() {
  char dir[] = "/tmp/kvmi-tool-XXXXXX";
  if (::mkdtemp(dir) == nullptr) return;
  dir_ = dir;
  path_ = dir_ + "/tool.sock";
  absl::StatusOr<UniqueFd> listening = ListenUnix(path_);
  if (listening.ok()) {
    fd_ = std::move(*listening);
  } else {
    spdlog::error("test tool: {}", std::string(listening.status().message()));
  }
}

ToolListener::~ToolListener() {
  fd_.Reset();
  if (!path_.empty()) ::unlink(path_.c_str());
  if (!dir_.empty()) ::rmdir(dir_.c_str());
}

Endpoint ToolListener::endpoint() const {
  Endpoint ep;
  ep.family = Endpoint::Family::kUnix;
  ep.path = path_;
  return ep;
}

std::unique_ptr<ToolConnection> ToolListener::Accept(std::chrono::milliseconds timeout) {
  UniqueFd conn;
  if (!kvmi::Accept(fd_.get(), Clock::now() + timeout, &conn).ok()) return nullptr;
  return std::make_unique<ToolConnection>(std::move(conn));
}

std::unique_ptr<ToolConnection> ToolListener::AcceptAndHandshake(std::chrono::milliseconds timeout,
                                                                 QemuHello* hello,
                                                                 const std::string& cookie) {
  auto conn = Accept(timeout);
  if (!conn || !conn->Handshake(hello, cookie)) return nullptr;
  return conn;
}

// ---- auto tool
// -----------------------------------------------------------------------------------

AutoTool::AutoTool(std::string socket_path, AutoToolOptions options)
    : path_(std::move(socket_path)), options_(std::move(options)) {}

AutoTool::~AutoTool() { Stop(); }

bool AutoTool::Start(std::string* error) {
  absl::StatusOr<UniqueFd> listening = ListenUnix(path_);
  if (!listening.ok()) {
    *error = std::string(listening.status().message());
    return false;
  }
  listen_fd_ = std::move(*listening);
  acceptor_ = std::thread([this] { AcceptLoop(); });
  return true;
}

void AutoTool::Stop() {
  if (stop_.exchange(true)) return;
  if (listen_fd_) ::shutdown(listen_fd_.get(), SHUT_RDWR);
  if (acceptor_.joinable()) acceptor_.join();
  std::vector<std::thread> servers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int fd : conn_fds_) ::shutdown(fd, SHUT_RDWR);
    servers.swap(servers_);
  }
  for (auto& t : servers) t.join();
  listen_fd_.Reset();
  ::unlink(path_.c_str());
}

void AutoTool::AcceptLoop() {
  while (!stop_.load()) {
    UniqueFd conn;
    IoResult io =
        kvmi::Accept(listen_fd_.get(), Clock::now() + std::chrono::milliseconds(200), &conn);
    if (io.kind == IoResult::kTimeout) continue;
    if (!io.ok()) break;
    auto tool_conn = std::make_unique<ToolConnection>(std::move(conn));
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_.load()) break;
    conn_fds_.push_back(tool_conn->fd());
    servers_.emplace_back(
        [this, c = tool_conn.release()] { Serve(std::unique_ptr<ToolConnection>(c)); });
  }
}

void AutoTool::Serve(std::unique_ptr<ToolConnection> conn) {
  if (!conn->Handshake(nullptr, options_.cookie)) {
    errors_.fetch_add(1);
    return;
  }
  connections_.fetch_add(1);
  auto fail = [&](const char* what) {
    if (!stop_.load()) {
      errors_.fetch_add(1);
      spdlog::warn("auto tool: {}", what);
    }
  };
  auto info = conn->Call(GetGuestInfoRequest{});
  GuestInfoReply guest;
  if (ToolConnection::ErrorOf(info) != 0 ||
      !DecodeReplyData(ToolConnection::DataOf(*info), &guest).ok()) {
    return fail("GET_GUEST_INFO failed");
  }
  // vCPU ids are 16 bits on the wire: a count beyond them would never end a 16-bit loop.
  if (guest.vcpu_count > 0x10000u) return fail("GET_GUEST_INFO: more vCPUs than 16-bit ids");
  for (uint32_t index = 0; index < guest.vcpu_count; ++index) {
    const auto v = static_cast<uint16_t>(index);
    for (uint8_t e : options_.events) {
      ControlEventsRequest req;
      req.vcpu = v;
      req.event_id = e;
      req.enable = true;
      if (ToolConnection::ErrorOf(conn->Call(req)) != 0) return fail("CONTROL_EVENTS failed");
    }
    for (uint32_t cr : {0u, 3u, 4u}) {
      if (ToolConnection::ErrorOf(conn->Call(ControlCrRequest{v, cr, true})) != 0) {
        return fail("CONTROL_CR failed");
      }
    }
    for (uint32_t msr : {0xc0000082u, 0x174u, 0x175u, 0x176u, 0xc0000081u}) {
      if (ToolConnection::ErrorOf(conn->Call(ControlMsrRequest{v, msr, true})) != 0) {
        return fail("CONTROL_MSR failed");
      }
    }
  }
  if (options_.restrict_pages > 0) {
    SetPageAccessRequest req;
    for (uint32_t p = 0; p < options_.restrict_pages && p < kMaxSetPageAccessEntries; ++p) {
      req.entries.push_back(PageAccess{options_.restrict_gpa + p * uint64_t{4096},
                                       KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X});
    }
    if (ToolConnection::ErrorOf(conn->Call(req)) != 0) return fail("SET_PAGE_ACCESS failed");
  }
  while (!stop_.load()) {
    std::optional<Event> event = conn->WaitEvent(std::chrono::milliseconds(500));
    if (!event) {
      if (conn->WaitClosed(std::chrono::milliseconds(0))) return;  // the VM went away
      continue;
    }
    if (event->id() == KVMI_EVENT_UNHOOK) return;  // detach: close the socket
    if (!conn->Continue(*event)) return;
    events_.fetch_add(1, std::memory_order_relaxed);
  }
}

}  // namespace kvmi::sim
