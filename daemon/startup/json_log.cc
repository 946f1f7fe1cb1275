#include "daemon/startup/json_log.h"

#include <cctype>
#include <cstdio>

namespace kvmid {
namespace {

constexpr size_t kUuidLength = 36;  // 8-4-4-4-12 hex digits

bool IsUuid(std::string_view text) {
  if (text.size() != kUuidLength) return false;
  for (size_t i = 0; i < text.size(); ++i) {
    bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash ? text[i] != '-' : !std::isxdigit(static_cast<unsigned char>(text[i]))) return false;
  }
  return true;
}

void Append(spdlog::memory_buf_t& dest, std::string_view text) {
  dest.append(text.data(), text.data() + text.size());
}

// %J: "msg":"...", and the guest's fields when the line names one.
class JsonMessageFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    std::string_view line(msg.payload.data(), msg.payload.size());
    Append(dest, "\"msg\":\"");
    Append(dest, JsonEscape(line));
    Append(dest, "\"");
    std::string name, uuid;
    if (FindGuestInLine(line, &name, &uuid)) {
      Append(dest, ",\"vm_name\":\"");
      Append(dest, JsonEscape(name));
      Append(dest, "\",\"vm_uuid\":\"");
      Append(dest, uuid);
      Append(dest, "\"");
    }
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<JsonMessageFlag>();
  }
};

}  // namespace

std::string JsonEscape(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 8);
  for (char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof(escaped), "\\u%04x", static_cast<unsigned>(c));
          out += escaped;
        } else {
          out += c;
        }
    }
  }
  return out;
}

bool FindGuestInLine(std::string_view line, std::string* name, std::string* uuid) {
  for (size_t at = line.find("vm "); at != std::string_view::npos; at = line.find("vm ", at + 1)) {
    if (at > 0 && line[at - 1] != ' ') continue;  // "vm" as a word
    size_t name_start = at + 3;
    size_t name_end = line.find(' ', name_start);
    if (name_end == std::string_view::npos || name_end == name_start) continue;
    std::string_view candidate = line.substr(name_end + 1, kUuidLength);
    if (!IsUuid(candidate)) continue;
    *name = std::string(line.substr(name_start, name_end - name_start));
    *uuid = std::string(candidate);
    return true;
  }
  return false;
}

std::unique_ptr<spdlog::formatter> JsonLogFormatter() {
  auto formatter = std::make_unique<spdlog::pattern_formatter>();
  formatter->add_flag<JsonMessageFlag>('J').set_pattern(
      R"({"time":"%Y-%m-%dT%H:%M:%S.%e%z","level":"%l",%J})");
  return formatter;
}

}  // namespace kvmid
