// libFuzzer target: connect links (core::VerifyLink, core::SignLink).
//
// Each input is used three ways:
//   1. as a link token, verified with the fixed key. Only SignLink with that key can produce an
//      accepted token, so an accepted token must be exactly what SignLink makes of the link it
//      decodes to (no second spelling of a signed link), and must fail under any other key.
//   2. as a payload signed with the key (what a future format, or a bug in SignLink, could
//      sign): the strict parser behind the signature check runs on arbitrary bytes. Whatever it
//      accepts must survive SignLink/VerifyLink unchanged.
//   3. as the fields of a link (FuzzedDataProvider): SignLink then VerifyLink must give the same
//      link back, expired links must be FAILED_PRECONDITION, and a flipped byte anywhere in the
//      token must be refused.
//   4. as a return URL (CheckReturnUrl against a fixed allow-list, and as an allow-list entry).
// Every refusal must be INVALID_ARGUMENT (kLinkInvalid) or FAILED_PRECONDITION (kLinkExpired).

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/core/connect_link.h"
#include "server/src/core/errors.h"
#include "server/src/crypto/openssl_digest.h"

namespace {

using tb::core::ConnectLink;
using tb::core::FlowErrorKind;

// The key the seed corpus was signed with (tests/fuzz/corpus/fuzz_connect_link/README).
constexpr absl::string_view kKey = "fuzz-link-key-0123456789abcdefghijklmnopqrstuvwxyz";
constexpr absl::string_view kOtherKey = "fuzz-link-key-0123456789abcdefghijklmnopqrstuvwxyZ";
// Seeds expire in 2030; "now" is November 2023.
const absl::Time kNow = absl::FromUnixSeconds(1'700'000'000);

void Fail(const char* what, absl::string_view detail = "") {
  std::fprintf(stderr, "fuzz_connect_link: property violated: %s %.*s\n", what,
               static_cast<int>(detail.size()), detail.data());
  std::abort();
}

bool SameLink(const ConnectLink& a, const ConnectLink& b) {
  return a.id == b.id && a.connection_id == b.connection_id && a.provider == b.provider &&
         a.params == b.params && a.expires_at == b.expires_at && a.reconnect == b.reconnect &&
         a.return_url == b.return_url;
}

// A refusal: INVALID_ARGUMENT with kLinkInvalid, or FAILED_PRECONDITION with kLinkExpired.
void CheckRefusal(const absl::Status& s) {
  const std::optional<FlowErrorKind> kind = tb::core::FlowErrorOf(s);
  const bool invalid =
      s.code() == absl::StatusCode::kInvalidArgument && kind == FlowErrorKind::kLinkInvalid;
  const bool expired =
      s.code() == absl::StatusCode::kFailedPrecondition && kind == FlowErrorKind::kLinkExpired;
  if (!invalid && !expired) {
    Fail("unexpected refusal", s.ToString());
  }
}

struct Env {
  tb::crypto::OpenSslDigest digest;
  tb::KeyMaterial key{std::string(kKey)};
  tb::KeyMaterial other_key{std::string(kOtherKey)};
};

void VerifyToken(const Env& env, absl::string_view token) {
  absl::StatusOr<ConnectLink> link = tb::core::VerifyLink(token, env.key, env.digest, kNow);
  if (!link.ok()) {
    CheckRefusal(link.status());
    return;
  }
  if (tb::core::SignLink(*link, env.key, env.digest) != token) {
    Fail("accepted a token that SignLink did not make", token);
  }
  if (tb::core::VerifyLink(token, env.other_key, env.digest, kNow).ok()) {
    Fail("a token verified under another key", token);
  }
  if (kNow >= link->expires_at) {
    Fail("accepted an expired link");
  }
}

void VerifySignedPayload(const Env& env, absl::string_view payload) {
  const std::string token =
      absl::StrCat(absl::WebSafeBase64Escape(payload), ".",
                   absl::WebSafeBase64Escape(env.digest.HmacSha256(env.key.Reveal(), payload)));
  absl::StatusOr<ConnectLink> link = tb::core::VerifyLink(token, env.key, env.digest, kNow);
  if (!link.ok()) {
    CheckRefusal(link.status());
    return;
  }
  const std::string again = tb::core::SignLink(*link, env.key, env.digest);
  absl::StatusOr<ConnectLink> back = tb::core::VerifyLink(again, env.key, env.digest, kNow);
  if (!back.ok() || !SameLink(*link, *back)) {
    Fail("a link accepted from a signed payload does not survive SignLink/VerifyLink");
  }
}

void RoundTrip(const Env& env, const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  ConnectLink link;
  link.id = in.ConsumeRandomLengthString(64);
  link.connection_id = in.ConsumeRandomLengthString(128);
  link.provider = in.ConsumeRandomLengthString(64);
  link.expires_at = absl::FromUnixSeconds(in.ConsumeIntegral<int64_t>());
  link.reconnect = in.ConsumeBool();
  if (in.ConsumeBool()) {
    link.return_url = in.ConsumeRandomLengthString(256);
  }
  const int params = in.ConsumeIntegralInRange(0, 8);
  for (int i = 0; i < params; ++i) {
    std::string k = in.ConsumeRandomLengthString(32);
    link.params[k] = in.ConsumeRandomLengthString(64);
  }
  const std::string token = tb::core::SignLink(link, env.key, env.digest);
  absl::StatusOr<ConnectLink> back = tb::core::VerifyLink(token, env.key, env.digest, kNow);
  if (token.size() > 4096) {
    // Longer than VerifyLink reads: refused whatever it holds.
    if (back.ok()) {
      Fail("accepted a token longer than 4096 bytes");
    }
    CheckRefusal(back.status());
    return;
  }
  if (kNow >= link.expires_at) {
    if (back.ok() || back.status().code() != absl::StatusCode::kFailedPrecondition ||
        tb::core::FlowErrorOf(back.status()) != FlowErrorKind::kLinkExpired) {
      Fail("an expired link was not kLinkExpired", back.status().ToString());
    }
  } else if (!back.ok() || !SameLink(link, *back)) {
    Fail("SignLink/VerifyLink round trip changed the link", back.status().ToString());
  }
  if (tb::core::VerifyLink(token, env.other_key, env.digest, kNow).status().code() !=
      absl::StatusCode::kInvalidArgument) {
    Fail("a link signed with one key was not INVALID_ARGUMENT under another");
  }
  // Tampering: one byte changed anywhere (where from the rest of the input) must be refused.
  if (!token.empty() && in.remaining_bytes() > 0) {
    std::string tampered = token;
    const size_t at = in.ConsumeIntegralInRange<size_t>(0, tampered.size() - 1);
    const char c = static_cast<char>(in.ConsumeIntegralInRange<int>(1, 255));
    tampered[at] = static_cast<char>(tampered[at] ^ c);
    absl::StatusOr<ConnectLink> t = tb::core::VerifyLink(tampered, env.key, env.digest, kNow);
    if (t.ok()) {
      Fail("accepted a tampered token", tampered);
    }
    CheckRefusal(t.status());
  }
}

// Return URLs (CheckReturnUrl): whatever passes the allow-list stays on an allowed origin and
// under an allowed path, as a browser would read it.
void CheckReturnUrl(absl::string_view url) {
  static const std::vector<std::string> kAllow = {"https://app.example.com/settings/",
                                                  "http://127.0.0.1:3000/done"};
  const absl::Status s = tb::core::CheckReturnUrl(url, kAllow);
  if (!s.ok()) {
    if (s.code() != absl::StatusCode::kInvalidArgument) {
      Fail("CheckReturnUrl error is not INVALID_ARGUMENT", s.ToString());
    }
  } else {
    // Read the URL as a browser would: scheme, host, port (leading zeros and default ports
    // normalized), then the path up to '?' or '#'.
    const std::string lower = absl::AsciiStrToLower(url);
    const size_t sep = lower.find("://");
    const std::string scheme = lower.substr(0, sep);
    const absl::string_view rest = absl::string_view(lower).substr(sep + 3);
    const absl::string_view authority = rest.substr(0, rest.find_first_of("/?#"));
    const absl::string_view tail = rest.substr(authority.size());
    const absl::string_view path = tail.substr(0, tail.find_first_of("?#"));
    const size_t colon = authority.rfind(':');
    const bool has_port = colon != absl::string_view::npos && authority.back() != ']';
    const absl::string_view host = has_port ? authority.substr(0, colon) : authority;
    int port = scheme == "https" ? 443 : 80;
    if (has_port && !absl::SimpleAtoi(authority.substr(colon + 1), &port)) {
      Fail("CheckReturnUrl allowed a port that is not a number", url);
    }
    const auto under = [&](absl::string_view prefix) {
      return absl::StartsWith(path, prefix) &&
             (absl::EndsWith(prefix, "/") || path.size() == prefix.size() ||
              path[prefix.size()] == '/');
    };
    const bool allowed =
        (scheme == "https" && host == "app.example.com" && port == 443 && under("/settings/")) ||
        (scheme == "http" && host == "127.0.0.1" && port == 3000 &&
         (path.empty() ? false : under("/done")));
    if (!allowed) {
      Fail("CheckReturnUrl allowed a URL outside the allow-list", url);
    }
    for (const char c : url) {
      const auto u = static_cast<unsigned char>(c);
      if (u <= 0x20 || u >= 0x7f || c == '\\') {
        Fail("CheckReturnUrl allowed a byte browsers drop or rewrite", url);
      }
    }
    const absl::string_view after_scheme = url.substr(url.find("://") + 3);
    if (after_scheme.substr(0, after_scheme.find_first_of("/?#")).find('@') !=
        absl::string_view::npos) {
      Fail("CheckReturnUrl allowed userinfo", url);
    }
  }
  // The input as an allow-list entry: an entry that validates allows itself.
  const std::vector<std::string> entry = {std::string(url)};
  if (tb::core::ValidateReturnUrlAllowlist(entry).ok() &&
      !tb::core::CheckReturnUrl(url, entry).ok()) {
    Fail("a valid allow-list entry does not allow itself", url);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Env* const env = new Env();
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  VerifyToken(*env, input);
  VerifySignedPayload(*env, input);
  RoundTrip(*env, data, size);
  CheckReturnUrl(input);
  return 0;
}
