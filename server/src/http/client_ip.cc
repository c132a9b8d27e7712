#include "server/src/http/client_ip.h"

#include <arpa/inet.h>

#include <algorithm>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace tb::http {
namespace {

// Bounds the work one request can cause: a proxy chain longer than this is not plausible.
constexpr size_t kMaxForwardedEntries = 32;

constexpr std::array<uint8_t, 12> kV4MappedPrefix = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

bool IsTokenChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
         absl::string_view("!#$%&'*+-.^_`|~").find(c) != absl::string_view::npos;
}

bool EqualsIgnoreCase(absl::string_view a, absl::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return absl::ascii_tolower(static_cast<unsigned char>(x)) ==
                  absl::ascii_tolower(static_cast<unsigned char>(y));
         });
}

absl::string_view Trim(absl::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) {
    s.remove_suffix(1);
  }
  return s;
}

// One X-Forwarded-For entry: "192.0.2.1", "192.0.2.1:443", "2001:db8::1", "[2001:db8::1]" or
// "[2001:db8::1]:443". Anything else ("unknown", obfuscated identifiers) is nullopt.
std::optional<IpAddress> ParseForwardedEntry(absl::string_view entry) {
  if (!entry.empty() && entry.front() == '[') {
    const size_t close = entry.find(']');
    if (close == absl::string_view::npos) {
      return std::nullopt;
    }
    absl::StatusOr<IpAddress> ip = ParseIpAddress(entry.substr(1, close - 1));
    if (!ip.ok() || !ip->v6) {
      return std::nullopt;
    }
    return *ip;
  }
  if (std::count(entry.begin(), entry.end(), ':') == 1) {  // IPv4 with a port
    entry = entry.substr(0, entry.find(':'));
  }
  absl::StatusOr<IpAddress> ip = ParseIpAddress(entry);
  if (!ip.ok()) {
    return std::nullopt;
  }
  return *ip;
}

}  // namespace

std::string IpAddress::ToString() const {
  char buf[INET6_ADDRSTRLEN] = {};
  if (inet_ntop(v6 ? AF_INET6 : AF_INET, bytes.data(), buf, sizeof(buf)) == nullptr) {
    return "";
  }
  return buf;
}

absl::StatusOr<IpAddress> ParseIpAddress(absl::string_view text) {
  if (const size_t zone = text.find('%'); zone != absl::string_view::npos) {
    text = text.substr(0, zone);
  }
  if (text.empty() || text.size() >= INET6_ADDRSTRLEN) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not an IP address"));
  }
  const std::string s(text);
  IpAddress ip;
  if (inet_pton(AF_INET, s.c_str(), ip.bytes.data()) == 1) {
    return ip;
  }
  if (inet_pton(AF_INET6, s.c_str(), ip.bytes.data()) == 1) {
    if (std::equal(kV4MappedPrefix.begin(), kV4MappedPrefix.end(), ip.bytes.begin())) {
      IpAddress v4;
      std::copy(ip.bytes.begin() + 12, ip.bytes.end(), v4.bytes.begin());
      return v4;
    }
    ip.v6 = true;
    return ip;
  }
  return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not an IP address"));
}

bool IpRange::Contains(const IpAddress& ip) const {
  if (ip.v6 != base.v6) {
    return false;
  }
  const int full = prefix_len / 8;
  if (!std::equal(base.bytes.begin(), base.bytes.begin() + full, ip.bytes.begin())) {
    return false;
  }
  const int rest = prefix_len % 8;
  if (rest == 0) {
    return true;
  }
  const auto mask = static_cast<uint8_t>(0xff << (8 - rest));
  return (ip.bytes[full] & mask) == base.bytes[full];
}

absl::StatusOr<IpRange> ParseIpRange(absl::string_view text) {
  const absl::string_view trimmed = Trim(text);
  const size_t slash = trimmed.find('/');
  const absl::string_view address = trimmed.substr(0, slash);
  if (address.find('%') != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("trusted proxy '", text, "': a zone is not allowed in a range"));
  }
  absl::StatusOr<IpAddress> ip = ParseIpAddress(address);
  if (!ip.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("trusted proxy '", text, "' is not an IP address or CIDR range"));
  }
  IpRange range;
  range.base = *ip;
  range.prefix_len = ip->bits();
  if (slash != absl::string_view::npos) {
    const absl::string_view len = trimmed.substr(slash + 1);
    if (len.empty() || len.size() > 3 ||
        !std::all_of(len.begin(), len.end(),
                     [](char c) { return absl::ascii_isdigit(static_cast<unsigned char>(c)); }) ||
        !absl::SimpleAtoi(len, &range.prefix_len) || range.prefix_len > ip->bits()) {
      return absl::InvalidArgumentError(
          absl::StrCat("trusted proxy '", text, "': the prefix length must be 0 to ", ip->bits()));
    }
    // A typo check, not a nicety: "10.0.0.1/8" trusts all of 10/8 when "10.0.0.1/32" was meant.
    // (An IPv4-mapped IPv6 base became IPv4 above, so its prefix would count the wrong bits.)
    if (address.find(':') != absl::string_view::npos && !ip->v6) {
      return absl::InvalidArgumentError(
          absl::StrCat("trusted proxy '", text, "': write an IPv4-mapped range as an IPv4 range"));
    }
  }
  IpRange masked = range;
  masked.base.bytes = {};
  std::copy(ip->bytes.begin(), ip->bytes.begin() + range.prefix_len / 8, masked.base.bytes.begin());
  if (const int rest = range.prefix_len % 8; rest != 0) {
    masked.base.bytes[range.prefix_len / 8] =
        ip->bytes[range.prefix_len / 8] & static_cast<uint8_t>(0xff << (8 - rest));
  }
  if (masked.base != range.base) {
    return absl::InvalidArgumentError(absl::StrCat("trusted proxy '", text,
                                                   "' has host bits set; the range is ",
                                                   masked.base.ToString(), "/", range.prefix_len));
  }
  return masked;
}

absl::StatusOr<ClientIpResolver> ClientIpResolver::Create(const ClientIpOptions& options) {
  ClientIpResolver r;
  r.header_ = options.trusted_proxy_header;
  if (!r.header_.empty() && !std::all_of(r.header_.begin(), r.header_.end(), IsTokenChar)) {
    return absl::InvalidArgumentError(
        absl::StrCat("trusted proxy header '", r.header_, "' is not an HTTP field name"));
  }
  for (const std::string& entry : options.trusted_proxies) {
    absl::StatusOr<IpRange> range = ParseIpRange(entry);
    if (!range.ok()) {
      return range.status();
    }
    r.trusted_.push_back(*range);
  }
  return r;
}

bool ClientIpResolver::IsTrustedProxy(const IpAddress& ip) const {
  return std::any_of(trusted_.begin(), trusted_.end(),
                     [&](const IpRange& range) { return range.Contains(ip); });
}

std::optional<IpAddress> ClientIpResolver::Resolve(const HttpRequest& req) const {
  absl::StatusOr<IpAddress> peer = ParseIpAddress(req.remote_address);
  if (!peer.ok()) {
    return std::nullopt;
  }
  if (header_.empty() || !IsTrustedProxy(*peer)) {
    return *peer;
  }
  // Repeated fields are one list, in order (RFC 9110 5.3).
  std::vector<absl::string_view> entries;
  for (const auto& [name, value] : req.headers) {
    if (EqualsIgnoreCase(name, header_)) {
      for (absl::string_view e : absl::StrSplit(value, ',')) {
        entries.push_back(Trim(e));
      }
    }
  }
  // Right to left: each entry was written by the hop to its right, so everything up to the first
  // untrusted address was written by proxies we trust; what lies left of it, the client wrote.
  IpAddress nearest = *peer;
  size_t examined = 0;
  for (auto it = entries.rbegin(); it != entries.rend() && examined < kMaxForwardedEntries;
       ++it, ++examined) {
    std::optional<IpAddress> hop = ParseForwardedEntry(*it);
    if (!hop) {
      return nearest;
    }
    if (!IsTrustedProxy(*hop)) {
      return *hop;
    }
    nearest = *hop;
  }
  return nearest;
}

}  // namespace tb::http
