#include "server/src/store/record_codec.h"

#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "tests/integration/store/store_test_support.h"
#include "tokenbroker/storage/v1/records.pb.h"

namespace tb::store::testing {
namespace {

namespace pb = ::tokenbroker::storage::v1;

class RecordCodecTest : public ::testing::Test {
 protected:
  TestKey k1_ = NewKey("k1");
  TestKey k2_ = NewKey("k2");
  std::unique_ptr<core::Cipher> cipher_ = MakeCipher({k1_});
};

TEST_F(RecordCodecTest, ConnectionRoundTripsThroughARow) {
  core::Connection c = FullConnection("acme");
  c.revision = 4;
  absl::StatusOr<ConnectionRow> row = EncodeConnection(c, *cipher_);
  ASSERT_TRUE(row.ok()) << row.status();
  EXPECT_EQ(row->id, "acme");
  EXPECT_EQ(row->provider, "zendesk");
  EXPECT_EQ(row->status, 1);
  EXPECT_EQ(row->generation, 7u);
  EXPECT_EQ(row->revision, 4u);
  EXPECT_EQ(row->refresh_at_unix_ms, absl::ToUnixMillis(*c.grant->refresh_at));
  EXPECT_EQ(row->updated_at_unix_ms, absl::ToUnixMillis(c.updated_at));
  EXPECT_EQ(row->sealed.key_id, "k1");

  absl::StatusOr<core::Connection> back = DecodeConnection(*row, *cipher_);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameConnection(*back, c);
}

TEST_F(RecordCodecTest, NoSecretIsInThePlaintextParts) {
  const core::Connection c = FullConnection("acme");
  absl::StatusOr<ConnectionRow> row = EncodeConnection(c, *cipher_);
  ASSERT_TRUE(row.ok()) << row.status();
  std::vector<std::string> secrets = {std::string(c.grant->access_token.Reveal()),
                                      std::string(c.grant->refresh_token->Reveal())};
  for (const core::Grant& g : c.to_revoke) {
    secrets.emplace_back(g.access_token.Reveal());
  }
  for (const std::string& s : secrets) {
    EXPECT_FALSE(absl::StrContains(row->meta, s));
    EXPECT_FALSE(absl::StrContains(row->sealed.ciphertext, s));
  }
}

TEST_F(RecordCodecTest, ABlobMovedToAnotherConnectionDoesNotOpen) {
  absl::StatusOr<ConnectionRow> a = EncodeConnection(FullConnection("a"), *cipher_);
  absl::StatusOr<ConnectionRow> b = EncodeConnection(FullConnection("b"), *cipher_);
  ASSERT_TRUE(a.ok() && b.ok());
  ConnectionRow moved = *a;
  moved.sealed = b->sealed;
  absl::StatusOr<core::Connection> c = DecodeConnection(moved, *cipher_);
  ASSERT_TRUE(c.ok()) << c.status();  // the metadata is fine: only the secrets are lost
  EXPECT_FALSE(c->data_loss.empty());
  EXPECT_EQ(c->id, "a");
  EXPECT_EQ(c->provider, "zendesk");
  ASSERT_TRUE(c->grant.has_value());
  EXPECT_TRUE(c->grant->access_token.empty());
  EXPECT_TRUE(c->to_revoke.empty());
}

TEST_F(RecordCodecTest, AnEditedGenerationDoesNotOpen) {
  absl::StatusOr<ConnectionRow> row = EncodeConnection(FullConnection("a"), *cipher_);
  ASSERT_TRUE(row.ok());
  pb::ConnectionMeta meta;
  ASSERT_TRUE(meta.ParseFromString(row->meta));
  meta.mutable_grant()->set_generation(99);
  row->meta = meta.SerializeAsString();
  absl::StatusOr<core::Connection> c = DecodeConnection(*row, *cipher_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->data_loss.empty());
}

TEST_F(RecordCodecTest, ABlobUnderAnUnknownKeyIsDataLossForThatConnection) {
  absl::StatusOr<ConnectionRow> row = EncodeConnection(FullConnection("a"), *MakeCipher({k2_}));
  ASSERT_TRUE(row.ok());
  absl::StatusOr<core::Connection> c = DecodeConnection(*row, *cipher_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(absl::StrContains(c->data_loss.get(), "k2"));
}

TEST_F(RecordCodecTest, UnreadableMetadataIsDataLossAndStillNamesTheConnection) {
  absl::StatusOr<ConnectionRow> row = EncodeConnection(FullConnection("a"), *cipher_);
  ASSERT_TRUE(row.ok());
  row->meta = std::string("\xff\xff\xff\xff", 4);
  absl::StatusOr<core::Connection> c = DecodeConnection(*row, *cipher_);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kDataLoss);
  const core::Connection u = UnreadableConnection(*row, c.status());
  EXPECT_EQ(u.id, "a");
  EXPECT_EQ(u.provider, "zendesk");
  EXPECT_EQ(u.status, core::ConnectionStatus::kActive);
  EXPECT_EQ(u.generation(), 7u);
  EXPECT_FALSE(u.data_loss.empty());
}

TEST_F(RecordCodecTest, AnUnknownStatusIsUnreadableMetadata) {
  absl::StatusOr<ConnectionRow> row = EncodeConnection(FullConnection("a"), *cipher_);
  ASSERT_TRUE(row.ok());
  pb::ConnectionMeta meta;
  ASSERT_TRUE(meta.ParseFromString(row->meta));
  meta.set_status(static_cast<pb::ConnectionStatus>(99));
  row->meta = meta.SerializeAsString();
  EXPECT_EQ(DecodeConnection(*row, *cipher_).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(RecordCodecTest, FieldsOfANewerReleaseAreKeptOnRewrite) {
  // A newer release wrote field 1000 into the metadata, 1001 into its grant and 1002 into the
  // secrets.
  HookedCipher hooked(*cipher_);
  std::string unknown_secret;
  {
    pb::ConnectionSecrets extra;
    extra.GetReflection()->MutableUnknownFields(&extra)->AddVarint(1002, 42);
    unknown_secret = extra.SerializeAsString();
  }
  hooked.TransformPlaintext([&](absl::string_view p) { return absl::StrCat(p, unknown_secret); });
  const core::Connection c = FullConnection("a");
  absl::StatusOr<ConnectionRow> previous = EncodeConnection(c, hooked);
  ASSERT_TRUE(previous.ok());
  pb::ConnectionMeta meta;
  ASSERT_TRUE(meta.ParseFromString(previous->meta));
  meta.GetReflection()->MutableUnknownFields(&meta)->AddVarint(1000, 7);
  meta.mutable_grant()
      ->GetReflection()
      ->MutableUnknownFields(meta.mutable_grant())
      ->AddVarint(1001, 8);
  previous->meta = meta.SerializeAsString();
  hooked.TransformPlaintext(nullptr);

  // This release rewrites the row (a refresh).
  core::Connection next = c;
  next.grant = FullGrant(8, "next");
  next.revision = 1;
  absl::StatusOr<ConnectionRow> row = EncodeConnection(next, hooked, &*previous);
  ASSERT_TRUE(row.ok()) << row.status();

  pb::ConnectionMeta written;
  ASSERT_TRUE(written.ParseFromString(row->meta));
  const google::protobuf::UnknownFieldSet& top = written.GetReflection()->GetUnknownFields(written);
  ASSERT_EQ(top.field_count(), 1);
  EXPECT_EQ(top.field(0).number(), 1000);
  EXPECT_EQ(top.field(0).varint(), 7u);
  const google::protobuf::UnknownFieldSet& grant =
      written.grant().GetReflection()->GetUnknownFields(written.grant());
  ASSERT_EQ(grant.field_count(), 1);
  EXPECT_EQ(grant.field(0).number(), 1001);
  EXPECT_EQ(written.grant().generation(), 8u);

  pb::ConnectionSecrets secrets;
  ASSERT_TRUE(secrets.ParseFromString(hooked.last_sealed_plaintext()));
  const google::protobuf::UnknownFieldSet& s = secrets.GetReflection()->GetUnknownFields(secrets);
  ASSERT_EQ(s.field_count(), 1);
  EXPECT_EQ(s.field(0).number(), 1002);
  EXPECT_EQ(secrets.grant().access_token(), next.grant->access_token.Reveal());

  absl::StatusOr<core::Connection> back = DecodeConnection(*row, *cipher_);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameConnection(*back, next);
}

TEST_F(RecordCodecTest, LinkRoundTripsAndDoesNotOpenUnderAnotherId) {
  core::LinkRecord r = FullLink("link-1");
  r.revoked = true;
  r.used_at = T(5);
  absl::StatusOr<LinkRow> row = EncodeLink(r, *cipher_);
  ASSERT_TRUE(row.ok()) << row.status();
  EXPECT_EQ(row->link_id, "link-1");
  EXPECT_EQ(row->connection_id, "acme");
  EXPECT_EQ(row->expires_at_unix_ms, absl::ToUnixMillis(r.link.expires_at));
  absl::StatusOr<core::LinkRecord> back = DecodeLink(*row, *cipher_);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameLink(*back, r);

  row->link_id = "link-2";
  EXPECT_EQ(DecodeLink(*row, *cipher_).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(RecordCodecTest, StateHashIsSha256) {
  EXPECT_EQ(absl::BytesToHexString(StateHash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST_F(RecordCodecTest, AuthorizationStoresNoStateAndOpensOnlyForItsState) {
  HookedCipher hooked(*cipher_);
  const core::PendingAuthorization a = FullAuthorization(T(120));
  absl::StatusOr<AuthorizationRow> row = EncodeAuthorization(a, hooked);
  ASSERT_TRUE(row.ok()) << row.status();
  EXPECT_EQ(row->state_hash, StateHash(a.state.Reveal()));
  EXPECT_EQ(row->expires_at_unix_ms, absl::ToUnixMillis(a.expires_at));
  EXPECT_FALSE(absl::StrContains(hooked.last_sealed_plaintext(), a.state.Reveal()));

  absl::StatusOr<core::PendingAuthorization> back =
      DecodeAuthorization(*row, a.state.Reveal(), *cipher_);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameAuthorization(*back, a);

  absl::StatusOr<core::PendingAuthorization> no_state = DecodeAuthorization(*row, *cipher_);
  ASSERT_TRUE(no_state.ok()) << no_state.status();
  EXPECT_TRUE(no_state->state.empty());
  EXPECT_EQ(no_state->verifier.Reveal(), a.verifier.Reveal());

  EXPECT_EQ(DecodeAuthorization(*row, "another state", *cipher_).status().code(),
            absl::StatusCode::kDataLoss);
  AuthorizationRow moved = *row;
  moved.state_hash = StateHash("another state");
  EXPECT_EQ(DecodeAuthorization(moved, *cipher_).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(RecordCodecTest, ResealMovesEveryKindOfRowToTheCurrentKey) {
  const core::Connection c = FullConnection("acme");
  const core::LinkRecord l = FullLink("link-1");
  const core::PendingAuthorization a = FullAuthorization(T(120));
  absl::StatusOr<ConnectionRow> crow = EncodeConnection(c, *cipher_);
  absl::StatusOr<LinkRow> lrow = EncodeLink(l, *cipher_);
  absl::StatusOr<AuthorizationRow> arow = EncodeAuthorization(a, *cipher_);
  ASSERT_TRUE(crow.ok() && lrow.ok() && arow.ok());

  std::unique_ptr<core::Cipher> rotated = MakeCipher({k1_, k2_});
  absl::StatusOr<core::Sealed> s = ResealConnection(*crow, *rotated);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->key_id, "k2");
  crow->sealed = *s;
  s = ResealLink(*lrow, *rotated);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->key_id, "k2");
  lrow->sealed = *s;
  s = ResealAuthorization(*arow, *rotated);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->key_id, "k2");
  arow->sealed = *s;

  // Readable with the new key alone.
  std::unique_ptr<core::Cipher> only_new = MakeCipher({k2_});
  absl::StatusOr<core::Connection> c2 = DecodeConnection(*crow, *only_new);
  ASSERT_TRUE(c2.ok());
  ExpectSameConnection(*c2, c);
  absl::StatusOr<core::LinkRecord> l2 = DecodeLink(*lrow, *only_new);
  ASSERT_TRUE(l2.ok());
  ExpectSameLink(*l2, l);
  absl::StatusOr<core::PendingAuthorization> a2 =
      DecodeAuthorization(*arow, a.state.Reveal(), *only_new);
  ASSERT_TRUE(a2.ok());
  ExpectSameAuthorization(*a2, a);
}

TEST_F(RecordCodecTest, ResealOfABlobThatDoesNotOpenIsDataLoss) {
  absl::StatusOr<ConnectionRow> row = EncodeConnection(FullConnection("acme"), *cipher_);
  ASSERT_TRUE(row.ok());
  row->sealed.ciphertext[row->sealed.ciphertext.size() / 2] ^= 1;
  EXPECT_EQ(ResealConnection(*row, *MakeCipher({k1_, k2_})).status().code(),
            absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace tb::store::testing
