#include "server/src/crypto/key_ring.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/src/crypto/openssl_random.h"
#include "tests/support/test_secrets.h"

namespace tb::crypto {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr absl::string_view kSource = "/etc/token-broker/keys";

// A random key of `size` bytes in the spellings a key file may use. Every spelling is recorded
// for the end-of-run log scan.
struct TestKey {
  std::string raw;
  std::string base64;         // standard, padded: what `openssl rand -base64 32` prints
  std::string base64_no_pad;  // standard, unpadded
  std::string url_safe;       // URL-safe, unpadded
  std::string url_safe_padded;
};

TestKey NewKey(size_t size = KeyRing::kKeySize) {
  TestKey key;
  key.raw.resize(size);
  OpenSslRandom random;
  random.Fill(absl::MakeSpan(reinterpret_cast<uint8_t*>(key.raw.data()), key.raw.size()));
  key.base64 = absl::Base64Escape(key.raw);
  key.base64_no_pad = key.base64.substr(0, key.base64.find('='));
  key.url_safe = absl::WebSafeBase64Escape(key.raw);
  key.url_safe_padded = key.url_safe + std::string(key.base64.size() - key.url_safe.size(), '=');
  for (const std::string* s : {&key.base64, &key.base64_no_pad, &key.url_safe}) {
    testing::RecordTestSecret(*s);
  }
  return key;
}

// Asserts that `message` contains none of `secrets`, nor any 8-character piece of one (a key
// cut short is still mostly a key).
void ExpectNoSecrets(absl::string_view message, const std::vector<std::string>& secrets) {
  for (const std::string& secret : secrets) {
    ASSERT_GE(secret.size(), 8u);
    for (size_t i = 0; i + 8 <= secret.size(); ++i) {
      const absl::string_view piece = absl::string_view(secret).substr(i, 8);
      EXPECT_EQ(message.find(piece), absl::string_view::npos)
          << "the message contains part of a secret at offset " << i;
    }
  }
}

std::vector<std::string> SecretsOf(const TestKey& key) {
  return {key.raw, key.base64, key.url_safe};
}

// Parses `text`, expects INVALID_ARGUMENT naming `where` (e.g. "<source>:3"), and checks that
// no part of `secrets` is in the message. Returns the message for further checks.
std::string ExpectParseError(const std::string& text, const std::string& where,
                             const std::vector<std::string>& secrets) {
  const absl::StatusOr<KeyRing> ring = KeyRing::Parse(text, kSource);
  EXPECT_EQ(ring.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(ring.status().message());
  EXPECT_THAT(message, HasSubstr(where));
  ExpectNoSecrets(message, secrets);
  return message;
}

std::string Line(int n) { return absl::StrCat(kSource, ":", n); }

// The standard base64 alphabet, digit values in order.
constexpr absl::string_view kAlphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

TEST(KeyRingTest, ParsesKeysInFileOrderAndTheLastOneIsCurrent) {
  const TestKey a = NewKey();
  const TestKey b = NewKey();
  const TestKey c = NewKey();
  const std::string text = absl::StrCat(  //
      "# token-broker encryption keys, oldest first\n", "\n", "  2023-a   ", a.base64,
      "  \n",  // surrounding and inner whitespace
      "\t# an indented comment\n", "k.b_2\t", b.base64_no_pad, "\r\n",  // CRLF, a tab, no padding
      "   \n", "c-3 ", c.url_safe);  // URL-safe, no final newline
  const absl::StatusOr<KeyRing> ring = KeyRing::Parse(text, kSource);
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_THAT(ring->ids(), ElementsAre("2023-a", "k.b_2", "c-3"));
  EXPECT_EQ(ring->current_id(), "c-3");
  ASSERT_NE(ring->Find("2023-a"), nullptr);
  EXPECT_EQ(ring->Find("2023-a")->Reveal(), a.raw);
  ASSERT_NE(ring->Find("k.b_2"), nullptr);
  EXPECT_EQ(ring->Find("k.b_2")->Reveal(), b.raw);
  ASSERT_NE(ring->Find("c-3"), nullptr);
  EXPECT_EQ(ring->Find("c-3")->Reveal(), c.raw);
  EXPECT_EQ(ring->Find("c"), nullptr);
  EXPECT_EQ(ring->Find(""), nullptr);
}

TEST(KeyRingTest, AcceptsUrlSafeBase64WithPadding) {
  const TestKey key = NewKey();
  const absl::StatusOr<KeyRing> ring =
      KeyRing::Parse(absl::StrCat("k1 ", key.url_safe_padded, "\n"), kSource);
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_EQ(ring->Find("k1")->Reveal(), key.raw);
}

TEST(KeyRingTest, AcceptsAnIdOf64Characters) {
  const TestKey key = NewKey();
  const std::string id(64, 'x');
  const absl::StatusOr<KeyRing> ring = KeyRing::Parse(absl::StrCat(id, " ", key.base64), kSource);
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_EQ(ring->current_id(), id);
}

TEST(KeyRingTest, DuplicateIdIsRejectedNamingTheIdAndLine) {
  const TestKey a = NewKey();
  const TestKey b = NewKey();
  const TestKey c = NewKey();
  const std::string message = ExpectParseError(
      absl::StrCat("k1 ", a.base64, "\n", "k2 ", b.base64, "\n", "k1 ", c.base64, "\n"), Line(3),
      {a.raw, a.base64, b.raw, b.base64, c.raw, c.base64});
  EXPECT_THAT(message, HasSubstr("'k1'"));
}

TEST(KeyRingTest, BadBase64CharacterIsRejectedNamingTheIdAndLine) {
  const TestKey key = NewKey();
  std::string bad = key.base64;
  bad[10] = '*';
  testing::RecordTestSecret(bad);
  const std::string message =
      ExpectParseError(absl::StrCat("# keys\nk1 ", bad, "\n"), Line(2), {key.raw, bad});
  EXPECT_THAT(message, HasSubstr("'k1'"));
}

TEST(KeyRingTest, BadPaddingIsRejected) {
  const TestKey key = NewKey();
  for (const std::string& bad :
       {key.base64 + "=", key.base64 + "==", "=" + key.base64, key.url_safe + "=="}) {
    testing::RecordTestSecret(bad);
    ExpectParseError(absl::StrCat("k1 ", bad), Line(1), SecretsOf(key));
  }
}

TEST(KeyRingTest, MixedAlphabetsAreRejected) {
  // 43 digits decode to 32 bytes; '+' is standard, '-' URL-safe.
  const std::string mixed = "Zm9v+-" + std::string(37, 'Q');
  testing::RecordTestSecret(mixed);
  ExpectParseError(absl::StrCat("k1 ", mixed), Line(1), {mixed});
  // Each alphabet alone decodes to the same 32 bytes, so the failure above is the mixing.
  EXPECT_TRUE(KeyRing::Parse(absl::StrCat("k1 Zm9v++", std::string(37, 'Q')), kSource).ok());
  EXPECT_TRUE(KeyRing::Parse(absl::StrCat("k1 Zm9v--", std::string(37, 'Q')), kSource).ok());
}

TEST(KeyRingTest, NonCanonicalFinalDigitIsRejected) {
  const TestKey key = NewKey();
  // 43 digits carry 258 bits for 256: the last digit's two low bits are unused and must be 0.
  std::string bad = key.base64_no_pad;
  bad.back() = kAlphabet[kAlphabet.find(bad.back()) | 1];
  testing::RecordTestSecret(bad);
  ExpectParseError(absl::StrCat("k1 ", bad), Line(1), {key.raw, key.base64, bad});
}

TEST(KeyRingTest, KeysThatAreNot32BytesAreRejectedNamingTheIdAndLine) {
  for (size_t size : {16u, 31u, 33u, 64u}) {
    const TestKey key = NewKey(size);
    const std::string message = ExpectParseError(
        absl::StrCat("\n\nshort-or-long ", key.base64, "\n"), Line(3), SecretsOf(key));
    EXPECT_THAT(message, HasSubstr("'short-or-long'")) << size;
  }
}

TEST(KeyRingTest, BadKeyIdsAreRejected) {
  const TestKey key = NewKey();
  for (const std::string& id :
       {std::string("k/1"), std::string("k=1"), std::string("k+1"), std::string("k\xc3\xa9"),
        std::string("a:b"), std::string(65, 'x')}) {
    ExpectParseError(absl::StrCat(id, " ", key.base64), Line(1), SecretsOf(key));
  }
}

TEST(KeyRingTest, SwappedFieldsNeverEchoTheKey) {
  const TestKey key = NewKey();
  // Standard base64 in the id's place is not a valid id ('+', '/', '=' or simply too long to
  // hold a key); URL-safe unpadded base64 is a valid id, and then "k1" is bad base64.
  ExpectParseError(absl::StrCat(key.base64, " k1"), Line(1), SecretsOf(key));
  ExpectParseError(absl::StrCat(key.url_safe, " k1"), Line(1), SecretsOf(key));
  ExpectParseError(absl::StrCat(key.url_safe, " k1k1k1k1"), Line(1), SecretsOf(key));
}

TEST(KeyRingTest, LineWithoutAnIdIsRejected) {
  const TestKey key = NewKey();
  ExpectParseError(absl::StrCat("k1 ", NewKey().base64, "\n", key.base64, "\n"), Line(2),
                   SecretsOf(key));
}

TEST(KeyRingTest, LineWithExtraFieldsIsRejected) {
  const TestKey key = NewKey();
  ExpectParseError(absl::StrCat("k1 ", key.base64, " # the first key"), Line(1), SecretsOf(key));
  // A key broken by a space.
  ExpectParseError(absl::StrCat("k1 ", key.base64.substr(0, 20), " ", key.base64.substr(20)),
                   Line(1), SecretsOf(key));
}

TEST(KeyRingTest, NoKeysIsRejected) {
  for (const std::string& text :
       {std::string(""), std::string("\n\n"), std::string("# nothing here\n   \n# still none")}) {
    const absl::StatusOr<KeyRing> ring = KeyRing::Parse(text, kSource);
    EXPECT_EQ(ring.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(ring.status().message(), HasSubstr(kSource));
  }
}

TEST(KeyRingTest, ReportsTheFirstBadLine) {
  const TestKey good = NewKey();
  const TestKey short_key = NewKey(16);
  ExpectParseError(absl::StrCat("k1 ", good.base64, "\n", "k2 ", short_key.base64, "\n", "k1 ",
                                good.base64, "\n"),
                   Line(2), {good.raw, good.base64, short_key.raw, short_key.base64});
}

TEST(KeyRingTest, FromKeysKeepsOrder) {
  const TestKey a = NewKey();
  const TestKey b = NewKey();
  std::vector<std::pair<std::string, KeyMaterial>> keys;
  keys.emplace_back("a", KeyMaterial(a.raw));
  keys.emplace_back("b", KeyMaterial(b.raw));
  const absl::StatusOr<KeyRing> ring = KeyRing::FromKeys(std::move(keys));
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_THAT(ring->ids(), ElementsAre("a", "b"));
  EXPECT_EQ(ring->current_id(), "b");
  EXPECT_EQ(ring->Find("a")->Reveal(), a.raw);
  EXPECT_EQ(ring->Find("b")->Reveal(), b.raw);
}

TEST(KeyRingTest, FromKeysRejectsWhatParseRejects) {
  const TestKey good = NewKey();
  const TestKey short_key = NewKey(16);
  const auto from = [](std::vector<std::pair<std::string, std::string>> raw) {
    std::vector<std::pair<std::string, KeyMaterial>> keys;
    for (auto& [id, key] : raw) {
      keys.emplace_back(id, KeyMaterial(key));
    }
    return KeyRing::FromKeys(std::move(keys)).status();
  };
  const absl::Status too_short = from({{"k1", short_key.raw}});
  EXPECT_EQ(too_short.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(too_short.message(), HasSubstr("'k1'"));
  ExpectNoSecrets(too_short.message(), SecretsOf(short_key));

  const absl::Status duplicate = from({{"k1", good.raw}, {"k1", good.raw}});
  EXPECT_EQ(duplicate.code(), absl::StatusCode::kInvalidArgument);
  ExpectNoSecrets(duplicate.message(), SecretsOf(good));

  EXPECT_EQ(from({{"bad id", good.raw}}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(from({{"", good.raw}}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(from({}).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tb::crypto
