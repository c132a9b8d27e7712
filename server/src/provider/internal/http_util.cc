#include "server/src/provider/internal/http_util.h"

#include <arpa/inet.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <exception>
#include <optional>
#include <vector>

#include <boost/url/parse.hpp>
#include <boost/url/url_view.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace tb::provider::internal {
namespace {

namespace urls = boost::urls;

template <typename S>
std::string ToString(const S& s) {
  return std::string(s.data(), s.size());
}

// Host names we put on the wire (Host header, SNI, CONNECT) must be plain: a decoded reg-name
// with anything else could smuggle characters into a request line.
bool IsPlainHostName(absl::string_view host) {
  if (host.empty() || host.size() > 253) {
    return false;
  }
  for (char c : host) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_') {
      return false;
    }
  }
  return true;
}

// 1..65535; Boost.URL's port_number() does not reject larger values.
std::optional<uint16_t> ParsePort(absl::string_view text) {
  uint32_t port = 0;
  if (!absl::SimpleAtoi(text, &port) || port == 0 || port > 65535) {
    return std::nullopt;
  }
  return static_cast<uint16_t>(port);
}

// "[v6]" / "v6" for authorities.
std::string BracketIfV6(absl::string_view host) {
  return absl::StrContains(host, ':') ? absl::StrCat("[", host, "]") : std::string(host);
}

// An IP address in network byte order (4 or 16 bytes), or nullopt for a name.
struct IpAddress {
  int family = 0;
  std::array<unsigned char, 16> bytes{};
  size_t size() const { return family == AF_INET ? 4 : 16; }
};

std::optional<IpAddress> ParseIp(absl::string_view text) {
  const std::string s(text);
  IpAddress ip;
  if (inet_pton(AF_INET, s.c_str(), ip.bytes.data()) == 1) {
    ip.family = AF_INET;
    return ip;
  }
  if (inet_pton(AF_INET6, s.c_str(), ip.bytes.data()) == 1) {
    ip.family = AF_INET6;
    return ip;
  }
  return std::nullopt;
}

bool SameIp(const IpAddress& a, const IpAddress& b) {
  return a.family == b.family && std::memcmp(a.bytes.data(), b.bytes.data(), a.size()) == 0;
}

bool InNetwork(const IpAddress& ip, const IpAddress& net, int prefix) {
  if (ip.family != net.family || prefix < 0 || static_cast<size_t>(prefix) > ip.size() * 8) {
    return false;
  }
  const int full = prefix / 8;
  if (std::memcmp(ip.bytes.data(), net.bytes.data(), full) != 0) {
    return false;
  }
  const int rest = prefix % 8;
  if (rest == 0) {
    return true;
  }
  const unsigned char mask = static_cast<unsigned char>(0xff << (8 - rest));
  return (ip.bytes[full] & mask) == (net.bytes[full] & mask);
}

// Normalizes a host for matching: lower case, no brackets, no trailing dot.
std::string NormalizeHost(absl::string_view host) {
  host = absl::StripAsciiWhitespace(host);
  if (absl::StartsWith(host, "[") && absl::EndsWith(host, "]")) {
    host = host.substr(1, host.size() - 2);
  }
  absl::ConsumeSuffix(&host, ".");
  return absl::AsciiStrToLower(host);
}

// Splits "host:port", "[v6]:port", "[v6]", "v6" (several colons, no brackets: no port) and
// "host/prefix" entries of a NO_PROXY list. Returns false for an unusable port.
bool SplitEntry(absl::string_view entry, std::string* host, std::optional<uint16_t>* port) {
  absl::string_view port_text;
  if (absl::StartsWith(entry, "[")) {
    const size_t close = entry.find(']');
    if (close == absl::string_view::npos) {
      return false;
    }
    absl::string_view after = entry.substr(close + 1);
    // "[fd00::]/8": keep the prefix with the host.
    if (absl::ConsumePrefix(&after, ":")) {
      port_text = after;
      entry = entry.substr(0, close + 1);
    }
  } else if (std::count(entry.begin(), entry.end(), ':') == 1) {
    const size_t colon = entry.find(':');
    port_text = entry.substr(colon + 1);
    entry = entry.substr(0, colon);
  }
  if (!port_text.empty()) {
    *port = ParsePort(port_text);
    if (!*port) {
      return false;
    }
  }
  // Brackets around a CIDR's address: "[fd00::]/8".
  std::string h(entry);
  if (absl::StartsWith(h, "[")) {
    const size_t close = h.find(']');
    h = absl::StrCat(h.substr(1, close - 1), h.substr(close + 1));
  }
  *host = NormalizeHost(h);
  return true;
}

// The URL's host in lower case: an IP literal, or a plain DNS name; nullopt for anything else
// (registered names with odd characters, no host at all).
std::optional<std::string> LowerHost(const urls::url_view& u) {
  switch (u.host_type()) {
    case urls::host_type::ipv4:
    case urls::host_type::ipv6:
      return absl::AsciiStrToLower(ToString(u.host_address()));
    case urls::host_type::name: {
      std::string host = absl::AsciiStrToLower(ToString(u.host_address()));
      if (!IsPlainHostName(host)) {
        return std::nullopt;
      }
      return host;
    }
    default:
      return std::nullopt;
  }
}

}  // namespace

absl::StatusOr<ParsedUrl> ParseHttpUrl(absl::string_view url) {
  try {
    const urls::result<urls::url_view> r =
        urls::parse_uri(urls::string_view(url.data(), url.size()));
    if (r.has_error()) {
      return absl::InvalidArgumentError(
          absl::StrCat("not an absolute URL: ", ToString(r.error().message())));
    }
    const urls::url_view& u = *r;
    ParsedUrl out;
    if (u.scheme_id() == urls::scheme::https) {
      out.tls = true;
    } else if (u.scheme_id() != urls::scheme::http) {
      return absl::InvalidArgumentError(
          absl::StrCat("URL scheme must be http or https, got '", ToString(u.scheme()), "'"));
    }
    if (u.has_userinfo()) {
      return absl::InvalidArgumentError("URL must not carry userinfo");
    }
    std::optional<std::string> host = LowerHost(u);
    if (!host) {
      return absl::InvalidArgumentError("URL has no usable host name or IP address");
    }
    out.host = *std::move(host);
    const uint16_t default_port = out.tls ? 443 : 80;
    out.port = default_port;
    if (u.has_port() && !u.port().empty()) {
      const std::optional<uint16_t> port = ParsePort(ToString(u.port()));
      if (!port) {
        return absl::InvalidArgumentError("URL port must be 1 to 65535");
      }
      out.port = *port;
    }
    const std::string bracketed = BracketIfV6(out.host);
    out.authority = absl::StrCat(bracketed, ":", out.port);
    out.host_header = out.port == default_port ? bracketed : out.authority;
    // "https://host" and "https://host?x" have an empty path: the origin-form needs the "/".
    const std::string target = ToString(u.encoded_target());
    out.target = absl::StartsWith(target, "/") ? target : absl::StrCat("/", target);
    out.origin = absl::StrCat(out.tls ? "https://" : "http://", out.authority);
    return out;
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("URL parsing failed: ", e.what()));
  }
}

absl::StatusOr<ProxyConfig> ParseProxyUrl(absl::string_view url) {
  const absl::Status bad = absl::InvalidArgumentError(
      "https_proxy must be an http:// proxy URL: http://[user:password@]host[:port]");
  std::string full(absl::StripAsciiWhitespace(url));
  if (!absl::StrContains(full, "://")) {
    full = absl::StrCat("http://", full);
  }
  try {
    const urls::result<urls::url_view> r =
        urls::parse_uri(urls::string_view(full.data(), full.size()));
    if (r.has_error()) {
      return bad;
    }
    const urls::url_view& u = *r;
    if (u.scheme_id() != urls::scheme::http) {
      return absl::InvalidArgumentError(
          "https_proxy: only http:// proxies are supported (TLS runs inside the CONNECT tunnel)");
    }
    if ((!u.encoded_path().empty() && u.encoded_path() != "/") || u.has_query() ||
        u.has_fragment()) {
      return bad;
    }
    ProxyConfig out;
    std::optional<std::string> host = LowerHost(u);
    if (!host) {
      return bad;
    }
    out.host = *std::move(host);
    out.port = 80;
    if (u.has_port() && !u.port().empty()) {
      const std::optional<uint16_t> port = ParsePort(ToString(u.port()));
      if (!port) {
        return bad;
      }
      out.port = *port;
    }
    if (u.has_userinfo()) {
      out.authorization = absl::StrCat(
          "Basic ",
          absl::Base64Escape(absl::StrCat(ToString(u.user()), ":", ToString(u.password()))));
    }
    return out;
  } catch (const std::exception&) {
    return bad;
  }
}

bool BypassProxy(absl::string_view no_proxy, absl::string_view host_in, uint16_t port) {
  const std::string host = NormalizeHost(host_in);
  const std::optional<IpAddress> host_ip = ParseIp(host);
  for (absl::string_view raw : absl::StrSplit(no_proxy, ',')) {
    const absl::string_view entry = absl::StripAsciiWhitespace(raw);
    if (entry.empty()) {
      continue;
    }
    if (entry == "*") {
      return true;
    }
    std::string pattern;
    std::optional<uint16_t> entry_port;
    if (!SplitEntry(entry, &pattern, &entry_port) || pattern.empty()) {
      continue;
    }
    if (entry_port && *entry_port != port) {
      continue;
    }
    if (const size_t slash = pattern.find('/'); slash != std::string::npos) {
      int prefix = 0;
      const std::optional<IpAddress> net = ParseIp(pattern.substr(0, slash));
      if (host_ip && net && absl::SimpleAtoi(pattern.substr(slash + 1), &prefix) &&
          InNetwork(*host_ip, *net, prefix)) {
        return true;
      }
      continue;
    }
    if (const std::optional<IpAddress> ip = ParseIp(pattern); ip) {
      if (host_ip && SameIp(*host_ip, *ip)) {
        return true;
      }
      continue;
    }
    if (host_ip) {
      continue;  // a domain entry never matches an address by suffix
    }
    absl::string_view domain = pattern;
    if (!absl::ConsumePrefix(&domain, "*.")) {
      absl::ConsumePrefix(&domain, ".");
    }
    if (domain.empty()) {
      continue;
    }
    if (host == domain || absl::EndsWith(host, absl::StrCat(".", domain))) {
      return true;
    }
  }
  return false;
}

}  // namespace tb::provider::internal
