#include "server/src/core/connection.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace tb::core {

absl::string_view ConnectionStatusName(ConnectionStatus s) {
  switch (s) {
    case ConnectionStatus::kPending:
      return "pending";
    case ConnectionStatus::kActive:
      return "active";
    case ConnectionStatus::kNeedsReauth:
      return "needs_reauth";
    case ConnectionStatus::kRevoked:
      return "revoked";
  }
  return "unknown";
}

std::optional<ConnectionStatus> ParseConnectionStatus(absl::string_view name) {
  for (ConnectionStatus s : {ConnectionStatus::kPending, ConnectionStatus::kActive,
                             ConnectionStatus::kNeedsReauth, ConnectionStatus::kRevoked}) {
    if (name == ConnectionStatusName(s)) {
      return s;
    }
  }
  return std::nullopt;
}

absl::string_view ReasonName(Reason r) {
  switch (r) {
    case Reason::kNone:
      return "";
    case Reason::kNotConnected:
      return "NOT_CONNECTED";
    case Reason::kNeedsReauth:
      return "NEEDS_REAUTH";
    case Reason::kRotationLost:
      return "ROTATION_LOST";
    case Reason::kRevoked:
      return "REVOKED";
    case Reason::kNotRefreshable:
      return "NOT_REFRESHABLE";
    case Reason::kProviderMisconfigured:
      return "PROVIDER_MISCONFIGURED";
  }
  return "";
}

absl::Time Grant::ValidUntil() const {
  absl::Time until = absl::InfiniteFuture();
  if (expires_at) {
    until = std::min(until, *expires_at);
  }
  if (refresh_at) {
    until = std::min(until, *refresh_at);
  }
  return until;
}

absl::Status ValidateConnectionId(absl::string_view id) {
  constexpr size_t kMaxLen = 128;
  const auto bad = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat("connection id must be 1 to ", kMaxLen,
                     " characters of A-Z a-z 0-9 . _ : - and start with a letter or digit"));
  };
  if (id.empty() || id.size() > kMaxLen || !absl::ascii_isalnum(id.front())) {
    return bad();
  }
  for (char c : id) {
    if (!absl::ascii_isalnum(c) && c != '.' && c != '_' && c != ':' && c != '-') {
      return bad();
    }
  }
  return absl::OkStatus();
}

}  // namespace tb::core
