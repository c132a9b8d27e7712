#include "server/src/core/connection.h"

#include "gtest/gtest.h"
#include "server/src/core/errors.h"

namespace tb::core {
namespace {

TEST(ConnectionTest, ValidUntilIsTheEarlierOfExpiryAndRefreshAt) {
  Grant g;
  EXPECT_EQ(g.ValidUntil(), absl::InfiniteFuture());
  g.expires_at = absl::FromUnixSeconds(2000);
  EXPECT_EQ(g.ValidUntil(), absl::FromUnixSeconds(2000));
  g.refresh_at = absl::FromUnixSeconds(1500);
  EXPECT_EQ(g.ValidUntil(), absl::FromUnixSeconds(1500));
  g.refresh_at = absl::FromUnixSeconds(2500);
  EXPECT_EQ(g.ValidUntil(), absl::FromUnixSeconds(2000));
}

TEST(ConnectionTest, CopiesOwnTheirRefreshIntent) {
  // refresh_intent lives on the heap (BoxedOptional) but must keep std::optional's semantics.
  Connection a;
  EXPECT_FALSE(a.refresh_intent.has_value());
  a.refresh_intent = RefreshIntent{7, "fp", absl::FromUnixSeconds(10)};
  Connection b = a;
  ASSERT_TRUE(b.refresh_intent);
  EXPECT_EQ(b.refresh_intent, a.refresh_intent);
  b.refresh_intent->generation = 8;  // a deep copy: a is untouched
  EXPECT_EQ(a.refresh_intent->generation, 7u);
  EXPECT_FALSE(b.refresh_intent == a.refresh_intent);
  a = b;
  EXPECT_EQ(a.refresh_intent->generation, 8u);
  b.refresh_intent.reset();
  EXPECT_FALSE(b.refresh_intent.has_value());
  EXPECT_TRUE(a.refresh_intent.has_value());
  EXPECT_FALSE(a.refresh_intent == b.refresh_intent);
  Connection moved = std::move(a);
  EXPECT_EQ((*moved.refresh_intent).refresh_token_fingerprint, "fp");
}

TEST(ConnectionTest, RarelySetFieldsKeepValueSemanticsAndStayOutOfLine) {
  // last_error, data_loss and to_revoke live on the heap only while set (RarelySet).
  static_assert(sizeof(RarelySet<std::string>) == sizeof(void*));
  static_assert(sizeof(RarelySet<std::vector<Grant>>) == sizeof(void*));
  Connection a;
  EXPECT_TRUE(a.last_error.empty());
  EXPECT_EQ(a.last_error.get(), "");
  EXPECT_TRUE(a.to_revoke.empty());
  EXPECT_EQ(a.to_revoke.size(), 0u);
  a.last_error = "provider answered 503";
  a.data_loss = std::string("wrong key");
  Grant g;
  g.generation = 3;
  a.to_revoke.mutable_value().push_back(g);

  Connection b = a;  // a deep copy
  EXPECT_EQ(b.last_error.get(), "provider answered 503");
  EXPECT_EQ(b.data_loss.get(), "wrong key");
  ASSERT_EQ(b.to_revoke.size(), 1u);
  b.to_revoke.mutable_value()[0].generation = 4;
  b.last_error.mutable_value() += "!";
  EXPECT_EQ(a.to_revoke.get()[0].generation, 3u);
  EXPECT_EQ(a.last_error.get(), "provider answered 503");
  EXPECT_FALSE(a.last_error == b.last_error);

  a = b;
  EXPECT_EQ(a.to_revoke.get()[0].generation, 4u);
  EXPECT_TRUE(a.last_error == b.last_error);
  uint64_t sum = 0;
  for (const Grant& owed : a.to_revoke) {
    sum += owed.generation;
  }
  EXPECT_EQ(sum, 4u);

  // Empty is the same as unset, whichever way it got empty.
  b.last_error = "";
  EXPECT_TRUE(b.last_error.empty());
  EXPECT_TRUE(b.last_error == Connection().last_error);
  b.to_revoke.mutable_value().clear();
  EXPECT_TRUE(b.to_revoke.empty());
  b.data_loss.clear();
  EXPECT_TRUE(b.data_loss.empty());

  Connection moved = std::move(a);
  EXPECT_EQ(moved.data_loss.get(), "wrong key");
}

TEST(ConnectionTest, StatusErrorForEachLifecycleState) {
  Connection c;
  c.status = ConnectionStatus::kPending;
  EXPECT_EQ(StatusErrorFor(c).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ReasonOf(StatusErrorFor(c)), Reason::kNotConnected);

  c.status = ConnectionStatus::kNeedsReauth;
  c.reason = Reason::kNeedsReauth;
  EXPECT_EQ(ReasonOf(StatusErrorFor(c)), Reason::kNeedsReauth);
  c.reason = Reason::kRotationLost;
  EXPECT_EQ(StatusErrorFor(c).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ReasonOf(StatusErrorFor(c)), Reason::kRotationLost);

  c.status = ConnectionStatus::kRevoked;
  EXPECT_EQ(StatusErrorFor(c).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ReasonOf(StatusErrorFor(c)), Reason::kRevoked);

  c.status = ConnectionStatus::kActive;
  EXPECT_TRUE(StatusErrorFor(c).ok());
}

TEST(ConnectionTest, ReasonRoundTripsThroughStatusPayload) {
  for (Reason r : {Reason::kNotConnected, Reason::kNeedsReauth, Reason::kRotationLost,
                   Reason::kRevoked, Reason::kNotRefreshable, Reason::kProviderMisconfigured}) {
    const absl::Status s = ReasonError(absl::StatusCode::kFailedPrecondition, r, "x");
    EXPECT_EQ(ReasonOf(s), r) << ReasonName(r);
  }
  EXPECT_EQ(ReasonOf(absl::NotFoundError("x")), std::nullopt);
}

TEST(ConnectionTest, StatusNamesRoundTrip) {
  for (ConnectionStatus s : {ConnectionStatus::kPending, ConnectionStatus::kActive,
                             ConnectionStatus::kNeedsReauth, ConnectionStatus::kRevoked}) {
    EXPECT_EQ(ParseConnectionStatus(ConnectionStatusName(s)), s);
  }
  EXPECT_EQ(ParseConnectionStatus("gone"), std::nullopt);
}

TEST(ConnectionTest, ConnectionIdValidation) {
  EXPECT_TRUE(ValidateConnectionId("acme").ok());
  EXPECT_TRUE(ValidateConnectionId("acme-eu.support:2_b").ok());
  EXPECT_EQ(ValidateConnectionId("").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateConnectionId("-acme").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateConnectionId("ac me").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateConnectionId("a/b").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateConnectionId(std::string(129, 'a')).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ValidateConnectionId(std::string(128, 'a')).ok());
}

}  // namespace
}  // namespace tb::core
