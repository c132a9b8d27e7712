#ifndef TB_TESTS_INTEGRATION_STORE_STORE_TEST_SUPPORT_H_
#define TB_TESTS_INTEGRATION_STORE_STORE_TEST_SUPPORT_H_

// What the store tests share: keys and ciphers (the real AesGcmCipher), a cipher decorator
// with hooks, temporary directories, fully populated records and field-by-field comparisons.

#include <openssl/sha.h>
#include <stdlib.h>

#include <atomic>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/src/common/mutex.h"
#include "server/src/core/cipher.h"
#include "server/src/core/connection.h"
#include "server/src/core/flow_store.h"
#include "server/src/crypto/aes_gcm_cipher.h"
#include "server/src/crypto/key_ring.h"
#include "tests/support/test_secrets.h"

namespace tb::store::testing {

// An encryption key: an id and 32 bytes derived from a fresh test secret.
struct TestKey {
  std::string id;
  KeyMaterial bytes;
};

inline TestKey NewKey(std::string id) {
  const std::string seed = tb::testing::NewTestSecret(absl::StrCat("store-key-", id));
  std::string key(SHA256_DIGEST_LENGTH, '\0');
  SHA256(reinterpret_cast<const unsigned char*>(seed.data()), seed.size(),
         reinterpret_cast<unsigned char*>(key.data()));
  return TestKey{std::move(id), KeyMaterial(std::move(key))};
}

// AesGcmCipher over `keys`, oldest first (the last one seals).
inline std::unique_ptr<core::Cipher> MakeCipher(const std::vector<TestKey>& keys) {
  std::vector<std::pair<std::string, KeyMaterial>> pairs;
  for (const TestKey& k : keys) {
    pairs.emplace_back(k.id, k.bytes);
  }
  absl::StatusOr<crypto::KeyRing> ring = crypto::KeyRing::FromKeys(std::move(pairs));
  EXPECT_TRUE(ring.ok()) << ring.status();
  if (!ring.ok()) {
    return nullptr;
  }
  return std::make_unique<crypto::AesGcmCipher>(*std::move(ring));
}

// Forwards to another cipher; `before_seal`, when set, runs once, at the start of the next
// Seal (outside any lock of the store's, since stores seal outside their locks or call it
// only from the calling thread). Thread-safe as long as the hook is set before use.
class HookedCipher final : public core::Cipher {
 public:
  explicit HookedCipher(const core::Cipher& inner) : inner_(inner) {}

  void RunOnceBeforeNextSeal(std::function<void()> hook) {
    hook_ = std::move(hook);
    armed_.store(true);
  }
  // Transforms every plaintext before it is sealed (to plant fields of a newer release).
  void TransformPlaintext(std::function<std::string(absl::string_view)> f) {
    transform_ = std::move(f);
  }
  // The plaintext of the last Seal.
  std::string last_sealed_plaintext() const {
    MutexLock lock(&mu_);
    return last_plaintext_;
  }

  absl::StatusOr<core::Sealed> Seal(absl::string_view plaintext,
                                    absl::string_view associated_data) const override {
    if (armed_.exchange(false)) {
      hook_();
    }
    std::string p = transform_ ? transform_(plaintext) : std::string(plaintext);
    {
      MutexLock lock(&mu_);
      last_plaintext_ = p;
    }
    return inner_.Seal(p, associated_data);
  }
  absl::StatusOr<std::string> Open(const core::Sealed& sealed,
                                   absl::string_view associated_data) const override {
    return inner_.Open(sealed, associated_data);
  }
  std::string current_key_id() const override { return inner_.current_key_id(); }
  std::vector<std::string> key_ids() const override { return inner_.key_ids(); }
  absl::StatusOr<std::string> KeyCheck(absl::string_view key_id) const override {
    return inner_.KeyCheck(key_id);
  }

 private:
  const core::Cipher& inner_;
  std::function<void()> hook_;
  std::function<std::string(absl::string_view)> transform_;
  mutable std::atomic<bool> armed_{false};
  mutable Mutex mu_;
  mutable std::string last_plaintext_ ABSL_GUARDED_BY(mu_);
};

// A fresh directory under the test's temporary directory, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = absl::StrCat(::testing::TempDir(), "/tb-store-XXXXXX");
    if (mkdtemp(tmpl.data()) == nullptr) {
      ADD_FAILURE() << "mkdtemp failed";
    }
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Microsecond-exact times: what the durable stores keep.
inline absl::Time T(int64_t seconds_after_epoch_base) {
  return absl::FromUnixMicros(1'700'000'000'000'000 + seconds_after_epoch_base * 1'000'000 +
                              123'456);
}

inline core::Grant FullGrant(uint64_t generation, absl::string_view label) {
  core::Grant g;
  g.access_token = AccessToken(tb::testing::NewTestSecret(absl::StrCat(label, "-access")));
  g.token_type = "Bearer";
  g.scopes = {"read", "write", "tickets:read"};
  g.refresh_token = RefreshToken(tb::testing::NewTestSecret(absl::StrCat(label, "-refresh")));
  g.issued_at = T(10);
  g.expires_at = T(1810);
  g.refresh_at = T(910);
  g.refresh_token_expires_at = T(30 * 86400);
  g.provider_token_id = absl::StrCat("token-id-", generation);
  g.generation = generation;
  return g;
}

// Every field of a connection set, including grants awaiting revocation and an intent.
inline core::Connection FullConnection(const core::ConnectionId& id) {
  core::Connection c;
  c.id = id;
  c.provider = "zendesk";
  c.params = {{"subdomain", "acme"}, {"region", "eu"}};
  c.status = core::ConnectionStatus::kActive;
  c.reason = core::Reason::kNone;
  c.last_error = "refresh failed once: provider answered 503";
  c.grant = FullGrant(7, id);
  core::RefreshIntent intent;
  intent.generation = 7;
  intent.refresh_token_fingerprint = Fingerprint(c.grant->refresh_token->Reveal());
  intent.recorded_at = T(900);
  c.refresh_intent = intent;
  c.to_revoke = {FullGrant(5, absl::StrCat(id, "-old5")), FullGrant(6, absl::StrCat(id, "-old6"))};
  c.to_revoke.mutable_value()[1].refresh_token.reset();
  c.to_revoke.mutable_value()[1].expires_at.reset();
  c.revision = 0;
  c.created_at = T(0);
  c.updated_at = T(905);
  return c;
}

// A connection as CreatePending makes it: no grant, no intent.
inline core::Connection PendingConnection(const core::ConnectionId& id) {
  core::Connection c;
  c.id = id;
  c.provider = "zendesk-chat";
  c.params = {{"subdomain", "beta"}};
  c.status = core::ConnectionStatus::kPending;
  c.reason = core::Reason::kNotConnected;
  c.created_at = c.updated_at = T(1);
  return c;
}

inline core::LinkRecord FullLink(const std::string& link_id) {
  core::LinkRecord r;
  r.link.id = link_id;
  r.link.connection_id = "acme";
  r.link.provider = "zendesk";
  r.link.params = {{"subdomain", "acme"}};
  r.link.expires_at = T(3600);
  r.link.reconnect = true;
  return r;
}

inline core::PendingAuthorization FullAuthorization(absl::Time expires_at) {
  core::PendingAuthorization a;
  a.state = OAuthState(tb::testing::NewTestSecret("state"));
  a.browser_binding = OAuthState(tb::testing::NewTestSecret("binding"));
  a.verifier = PkceVerifier(tb::testing::NewTestSecret("verifier"));
  a.link_id = "link-1";
  a.connection_id = "acme";
  a.provider = "zendesk";
  a.params = {{"subdomain", "acme"}};
  a.reconnect = true;
  a.redirect_uri = "https://broker.example.com/oauth/callback";
  a.expires_at = expires_at;
  return a;
}

inline void ExpectSameGrant(const core::Grant& a, const core::Grant& b) {
  EXPECT_EQ(a.access_token.Reveal(), b.access_token.Reveal());
  EXPECT_EQ(a.token_type, b.token_type);
  EXPECT_EQ(a.scopes, b.scopes);
  ASSERT_EQ(a.refresh_token.has_value(), b.refresh_token.has_value());
  if (a.refresh_token) {
    EXPECT_EQ(a.refresh_token->Reveal(), b.refresh_token->Reveal());
  }
  EXPECT_EQ(a.issued_at, b.issued_at);
  EXPECT_EQ(a.expires_at, b.expires_at);
  EXPECT_EQ(a.refresh_at, b.refresh_at);
  EXPECT_EQ(a.refresh_token_expires_at, b.refresh_token_expires_at);
  EXPECT_EQ(a.provider_token_id, b.provider_token_id);
  EXPECT_EQ(a.generation, b.generation);
}

inline void ExpectSameConnection(const core::Connection& a, const core::Connection& b) {
  EXPECT_EQ(a.id, b.id);
  EXPECT_EQ(a.provider, b.provider);
  EXPECT_EQ(a.params, b.params);
  EXPECT_EQ(a.status, b.status);
  EXPECT_EQ(a.reason, b.reason);
  EXPECT_EQ(a.last_error.get(), b.last_error.get());
  ASSERT_EQ(a.grant.has_value(), b.grant.has_value());
  if (a.grant) {
    ExpectSameGrant(*a.grant, *b.grant);
  }
  EXPECT_EQ(a.refresh_intent, b.refresh_intent);
  ASSERT_EQ(a.to_revoke.size(), b.to_revoke.size());
  for (size_t i = 0; i < a.to_revoke.size(); ++i) {
    ExpectSameGrant(a.to_revoke.get()[i], b.to_revoke.get()[i]);
  }
  EXPECT_EQ(a.data_loss.get(), b.data_loss.get());
  EXPECT_EQ(a.revision, b.revision);
  EXPECT_EQ(a.created_at, b.created_at);
  EXPECT_EQ(a.updated_at, b.updated_at);
}

inline void ExpectSameLink(const core::LinkRecord& a, const core::LinkRecord& b) {
  EXPECT_EQ(a.link.id, b.link.id);
  EXPECT_EQ(a.link.connection_id, b.link.connection_id);
  EXPECT_EQ(a.link.provider, b.link.provider);
  EXPECT_EQ(a.link.params, b.link.params);
  EXPECT_EQ(a.link.expires_at, b.link.expires_at);
  EXPECT_EQ(a.link.reconnect, b.link.reconnect);
  EXPECT_EQ(a.revoked, b.revoked);
  EXPECT_EQ(a.used_at, b.used_at);
}

inline void ExpectSameAuthorization(const core::PendingAuthorization& a,
                                    const core::PendingAuthorization& b) {
  EXPECT_EQ(a.state.Reveal(), b.state.Reveal());
  EXPECT_EQ(a.browser_binding.Reveal(), b.browser_binding.Reveal());
  EXPECT_EQ(a.verifier.Reveal(), b.verifier.Reveal());
  EXPECT_EQ(a.link_id, b.link_id);
  EXPECT_EQ(a.connection_id, b.connection_id);
  EXPECT_EQ(a.provider, b.provider);
  EXPECT_EQ(a.params, b.params);
  EXPECT_EQ(a.reconnect, b.reconnect);
  EXPECT_EQ(a.redirect_uri, b.redirect_uri);
  EXPECT_EQ(a.expires_at, b.expires_at);
}

}  // namespace tb::store::testing

#endif  // TB_TESTS_INTEGRATION_STORE_STORE_TEST_SUPPORT_H_
