#ifndef TB_TESTS_FAKES_FAKE_PROVIDER_CLIENT_H_
#define TB_TESTS_FAKES_FAKE_PROVIDER_CLIENT_H_

#include <deque>
#include <string>
#include <vector>

#include "server/src/common/mutex.h"
#include "server/src/core/provider_client.h"
#include "server/src/core/random.h"

namespace tb::testing {

// A scriptable core::ProviderClient for unit tests of one class. Integration tests use the real
// HTTPS client against tests/fake_provider instead. Thread-safe.
class FakeProviderClient final : public core::ProviderClient {
 public:
  struct ExchangeCall {
    std::string provider;
    std::string connection_id;
    std::string code;
    std::string verifier;
    std::string redirect_uri;
  };

  // Queues the result of the next ExchangeCode / Refresh; with none queued they fail UNAVAILABLE.
  void NextExchangeReturns(absl::StatusOr<core::Grant> result) {
    MutexLock lock(&mu_);
    exchanges_.push_back(std::move(result));
  }
  void NextRefreshReturns(absl::StatusOr<core::Grant> result) {
    MutexLock lock(&mu_);
    refreshes_.push_back(std::move(result));
  }
  // Queues the result of the next Revoke; with none queued it succeeds.
  void NextRevokeReturns(absl::Status status) {
    MutexLock lock(&mu_);
    revokes_.push_back(std::move(status));
  }

  absl::StatusOr<core::Grant> ExchangeCode(const core::ProviderSpec& spec,
                                           const core::Connection& connection, const AuthCode& code,
                                           const PkceVerifier& verifier,
                                           const std::string& redirect_uri, absl::Time) override {
    MutexLock lock(&mu_);
    exchange_calls_.push_back({spec.name, connection.id, std::string(code.Reveal()),
                               std::string(verifier.Reveal()), redirect_uri});
    return Pop(exchanges_);
  }
  absl::StatusOr<core::Grant> Refresh(const core::ProviderSpec& spec, const core::Connection&,
                                      absl::Time) override {
    MutexLock lock(&mu_);
    refresh_client_ids_.push_back(spec.client_id);
    refresh_started_.SignalAll();
    while (hold_refreshes_) {
      released_.Wait(&mu_);
    }
    return Pop(refreshes_);
  }

  // While held, Refresh calls block (a slow provider) until ReleaseRefreshes().
  void HoldRefreshes() {
    MutexLock lock(&mu_);
    hold_refreshes_ = true;
  }
  void ReleaseRefreshes() {
    MutexLock lock(&mu_);
    hold_refreshes_ = false;
    released_.SignalAll();
  }
  // Blocks until at least `n` Refresh calls have started.
  void AwaitRefreshCalls(int n) {
    MutexLock lock(&mu_);
    while (static_cast<int>(refresh_client_ids_.size()) < n) {
      refresh_started_.Wait(&mu_);
    }
  }
  absl::Status Revoke(const core::ProviderSpec&, const core::Connection& connection,
                      absl::Time) override {
    MutexLock lock(&mu_);
    revoked_.push_back(connection.grant ? std::string(connection.grant->access_token.Reveal())
                                        : std::string());
    if (revokes_.empty()) {
      return absl::OkStatus();
    }
    absl::Status s = std::move(revokes_.front());
    revokes_.pop_front();
    return s;
  }

  std::vector<ExchangeCall> exchange_calls() const {
    MutexLock lock(&mu_);
    return exchange_calls_;
  }
  int refresh_calls() const {
    MutexLock lock(&mu_);
    return static_cast<int>(refresh_client_ids_.size());
  }
  // The client id of the spec each Refresh call was given, in order.
  std::vector<std::string> refresh_client_ids() const {
    MutexLock lock(&mu_);
    return refresh_client_ids_;
  }
  // Access tokens of the grants Revoke was called with, in order.
  std::vector<std::string> revoked() const {
    MutexLock lock(&mu_);
    return revoked_;
  }

 private:
  static absl::StatusOr<core::Grant> Pop(std::deque<absl::StatusOr<core::Grant>>& q) {
    if (q.empty()) {
      return absl::UnavailableError("fake provider: nothing scripted");
    }
    absl::StatusOr<core::Grant> r = std::move(q.front());
    q.pop_front();
    return r;
  }

  mutable Mutex mu_;
  std::deque<absl::StatusOr<core::Grant>> exchanges_ ABSL_GUARDED_BY(mu_);
  std::deque<absl::StatusOr<core::Grant>> refreshes_ ABSL_GUARDED_BY(mu_);
  std::deque<absl::Status> revokes_ ABSL_GUARDED_BY(mu_);
  std::vector<ExchangeCall> exchange_calls_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> refresh_client_ids_ ABSL_GUARDED_BY(mu_);  // one per Refresh call
  bool hold_refreshes_ ABSL_GUARDED_BY(mu_) = false;
  CondVar released_;
  CondVar refresh_started_;
  std::vector<std::string> revoked_ ABSL_GUARDED_BY(mu_);
};

// Random bytes from a fixed sequence (repeated), for vectors like RFC 7636 Appendix B.
class FixedRandom final : public core::Random {
 public:
  explicit FixedRandom(std::vector<uint8_t> bytes) : bytes_(std::move(bytes)) {}
  void Fill(absl::Span<uint8_t> out) override {
    MutexLock lock(&mu_);
    for (uint8_t& b : out) {
      b = bytes_[next_++ % bytes_.size()];
    }
  }

 private:
  Mutex mu_;
  const std::vector<uint8_t> bytes_;
  size_t next_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tb::testing

#endif  // TB_TESTS_FAKES_FAKE_PROVIDER_CLIENT_H_
