#ifndef TB_OAUTH_EVENTS_H_
#define TB_OAUTH_EVENTS_H_

#include <functional>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "server/src/core/connection.h"

namespace tb::oauth {

// Things that happened in the background or in a flow (a refresh that failed, a revocation the
// provider refused, a rotation lost), for the log, audit and metrics: the domain does not log
// itself (STYLE.md, layering rule); main wires this to spdlog. `status` is OK for successes.
// Never carries a secret. Called outside any lock; must not block. May be empty.
using EventSink = std::function<void(absl::string_view event, const core::ConnectionId& id,
                                     const absl::Status& status)>;

}  // namespace tb::oauth

#endif  // TB_OAUTH_EVENTS_H_
