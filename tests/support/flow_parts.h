#ifndef TB_TESTS_SUPPORT_FLOW_PARTS_H_
#define TB_TESTS_SUPPORT_FLOW_PARTS_H_

#include <memory>

#include "server/src/common/work_pool.h"
#include "server/src/crypto/openssl_digest.h"
#include "server/src/crypto/openssl_random.h"
#include "server/src/oauth/authorization_flow.h"
#include "server/src/oauth/refresher.h"
#include "server/src/store/in_memory_flow_store.h"
#include "tests/fakes/fake_provider_client.h"
#include "tests/support/test_secrets.h"

namespace tb::testing {

// An AuthorizationFlow over in-memory parts and a scriptable provider client, plus a work
// pool, for tests that serve gRPC but do not exercise the provider. `providers` may be filled
// before the first link is minted.
struct FlowParts {
  FlowParts(const Clock& clock, oauth::Broker& broker)
      : revoker({}, providers, clock, broker, provider),
        flow(Options(), providers, clock, random, digest, store, provider, broker, revoker),
        refresher({}, providers, clock, broker, provider, revoker, run_blocking()) {}

  static oauth::FlowOptions Options() {
    oauth::FlowOptions o;
    o.link_key = KeyMaterial(NewTestSecret("link-key"));
    return o;
  }
  RunBlocking run_blocking() {
    return [this](std::function<void()> task) { pool.Post(std::move(task)); };
  }

  core::ProviderDirectory providers;
  crypto::OpenSslRandom random;
  crypto::OpenSslDigest digest;
  store::InMemoryFlowStore store;
  FakeProviderClient provider;
  oauth::Revoker revoker;
  oauth::AuthorizationFlow flow;
  oauth::Refresher refresher;
  WorkPool pool{2, "test-work"};  // last: destroyed (drained) first, while all else lives
};

// Broker options under which `parts`' refresher follows every change, as main wires it (waiting
// GetTokens are woken by it). `parts` may be a member constructed after the broker: it is first
// used on the first change.
inline oauth::BrokerOptions TrackedBy(FlowParts* parts) {
  oauth::BrokerOptions o;
  o.on_change = [parts](const auto& c, const auto& id) { parts->refresher.Track(c, id); };
  return o;
}

}  // namespace tb::testing

#endif  // TB_TESTS_SUPPORT_FLOW_PARTS_H_
