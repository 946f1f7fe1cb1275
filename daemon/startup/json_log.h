// --log_format=json: one JSON object per log line, for log pipelines:
//
//   {"time":"2026-12-05T09:12:16.123+00:00","level":"info","msg":"vm web-1 1b4e28ba-...: hooked",
//    "vm_name":"web-1","vm_uuid":"1b4e28ba-2fa1-11d2-883f-0016d3cca427"}
//
// vm_name and vm_uuid are there when the line is about a guest: kvmid names a guest as
// "vm <name> <uuid>" in every such line (GuestSession::log_name, the handshake line).
#ifndef KVMID_DAEMON_STARTUP_JSON_LOG_H_
#define KVMID_DAEMON_STARTUP_JSON_LOG_H_

#include <spdlog/pattern_formatter.h>

#include <memory>
#include <string>
#include <string_view>

namespace kvmid {

// `text` as the inside of a JSON string (quotes, backslashes and control characters escaped).
std::string JsonEscape(std::string_view text);

// Finds the first "vm <name> <uuid>" in a log line; false if there is none.
bool FindGuestInLine(std::string_view line, std::string* name, std::string* uuid);

// The formatter of --log_format=json (for spdlog::set_formatter or a sink).
std::unique_ptr<spdlog::formatter> JsonLogFormatter();

}  // namespace kvmid

#endif  // KVMID_DAEMON_STARTUP_JSON_LOG_H_
