#include "server/src/crypto/aes_gcm_cipher.h"

#include <cstdint>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/src/crypto/internal/aes_gcm.h"
#include "server/src/crypto/key_ring.h"
#include "server/src/crypto/openssl_digest.h"
#include "server/src/crypto/openssl_random.h"
#include "tests/fakes/fake_provider_client.h"
#include "tests/support/test_secrets.h"

namespace tb::crypto {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string Hex(absl::string_view hex) { return absl::HexStringToBytes(hex); }

// A random 32-byte key; its base64 is recorded for the end-of-run log scan.
std::string NewRawKey() {
  std::string raw(KeyRing::kKeySize, '\0');
  OpenSslRandom random;
  random.Fill(absl::MakeSpan(reinterpret_cast<uint8_t*>(raw.data()), raw.size()));
  testing::RecordTestSecret(absl::Base64Escape(raw));
  return raw;
}

KeyRing Ring(std::vector<std::pair<std::string, std::string>> keys) {
  std::vector<std::pair<std::string, KeyMaterial>> material;
  for (auto& [id, raw] : keys) {
    material.emplace_back(id, KeyMaterial(raw));
  }
  absl::StatusOr<KeyRing> ring = KeyRing::FromKeys(std::move(material));
  EXPECT_TRUE(ring.ok()) << ring.status();
  return *std::move(ring);
}

std::vector<uint8_t> BytesOf(absl::string_view s) { return {s.begin(), s.end()}; }

// An error message must not carry the data it is about.
void ExpectNoData(const absl::Status& status, const std::vector<std::string>& data) {
  for (const std::string& d : data) {
    ASSERT_GE(d.size(), 8u);
    EXPECT_THAT(std::string(status.message()), Not(HasSubstr(d)));
    EXPECT_THAT(std::string(status.message()), Not(HasSubstr(absl::BytesToHexString(d))));
  }
}

// McGrew and Viega, "The Galois/Counter Mode of Operation (GCM)", appendix B, the AES-256
// cases with 96-bit IVs (also in NIST's gcmEncryptExtIV256 vectors).
struct GcmVector {
  const char* name;
  const char* key;
  const char* iv;
  const char* plaintext;
  const char* aad;
  const char* ciphertext;
  const char* tag;
};

constexpr char kSpecKey[] = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
constexpr char kSpecIv[] = "cafebabefacedbaddecaf888";
constexpr char kSpecPlaintext64[] =
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255";
constexpr char kSpecCiphertext64[] =
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad";

const GcmVector kGcmSpecVectors[] = {
    {"test case 13", "0000000000000000000000000000000000000000000000000000000000000000",
     "000000000000000000000000", "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"},
    {"test case 14", "0000000000000000000000000000000000000000000000000000000000000000",
     "000000000000000000000000", "00000000000000000000000000000000", "",
     "cea7403d4d606b6e074ec5d3baf39d18", "d0d1c8a799996bf0265b98b5d48ab919"},
    {"test case 15", kSpecKey, kSpecIv, kSpecPlaintext64, "", kSpecCiphertext64,
     "b094dac5d93471bdec1a502270e3cc6c"},
    {"test case 16", kSpecKey, kSpecIv,
     "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
     "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
     "feedfacedeadbeeffeedfacedeadbeefabaddad2",
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
     "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
     "76fc6ece0f4e1768cddf8853bb2d551b"},
};

TEST(AesGcmCipherTest, PrimitiveMatchesGcmSpecVectors) {
  for (const GcmVector& v : kGcmSpecVectors) {
    SCOPED_TRACE(v.name);
    const std::string sealed = absl::StrCat(Hex(v.ciphertext), Hex(v.tag));
    const absl::StatusOr<std::string> out =
        internal::Aes256GcmSeal(Hex(v.key), Hex(v.iv), Hex(v.plaintext), Hex(v.aad));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(absl::BytesToHexString(*out), absl::BytesToHexString(sealed));
    const absl::StatusOr<std::string> back =
        internal::Aes256GcmOpen(Hex(v.key), Hex(v.iv), sealed, Hex(v.aad));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, Hex(v.plaintext));
  }
}

TEST(AesGcmCipherTest, AssociatedDataEncodingIsLabelThenLengthPrefixedKeyIdThenCallerData) {
  using namespace std::string_literals;
  EXPECT_EQ(internal::EncodeAssociatedData("k1", "row-7"),
            "token-broker aes-256-gcm v1\0\0\0\0\x02k1row-7"s);
  EXPECT_EQ(internal::EncodeAssociatedData("", ""), "token-broker aes-256-gcm v1\0\0\0\0\0"s);
  // The length prefix keeps the split between key id and caller data unambiguous.
  EXPECT_NE(internal::EncodeAssociatedData("a", "bc"), internal::EncodeAssociatedData("ab", "c"));
}

// The whole construction, with the nonce injected: the GCM spec's key, IV and plaintext (test
// case 15), the key id "k1" and caller data "connection=acme;generation=7". The ciphertext body
// depends only on key, IV and plaintext, so it is the spec's; the tag covers the encoded
// authenticated data and was computed independently with pyca/cryptography's AESGCM over
// b"token-broker aes-256-gcm v1\x00" + struct.pack(">I", 2) + b"k1" + b"connection=...".
TEST(AesGcmCipherTest, SealMatchesKnownAnswerWithInjectedNonce) {
  testing::FixedRandom nonces(BytesOf(Hex(kSpecIv)));
  const AesGcmCipher cipher(Ring({{"k1", Hex(kSpecKey)}}), nonces);
  const absl::StatusOr<core::Sealed> sealed =
      cipher.Seal(Hex(kSpecPlaintext64), "connection=acme;generation=7");
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  EXPECT_EQ(sealed->key_id, "k1");
  EXPECT_EQ(absl::BytesToHexString(sealed->nonce), kSpecIv);
  EXPECT_EQ(absl::BytesToHexString(sealed->ciphertext),
            absl::StrCat(kSpecCiphertext64, "591cbcc8f1482c45f7997a66b49659de"));
  const absl::StatusOr<std::string> opened = cipher.Open(*sealed, "connection=acme;generation=7");
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(*opened, Hex(kSpecPlaintext64));
}

TEST(AesGcmCipherTest, RoundTrips) {
  const AesGcmCipher cipher(Ring({{"k1", NewRawKey()}}));
  const std::string binary("\0\x01\xff\0refresh", 11);
  for (const std::string& plaintext :
       {std::string(), std::string("x"), binary, std::string(5000, 'r')}) {
    for (const std::string& aad : {std::string(), std::string("connection=acme;generation=3")}) {
      const absl::StatusOr<core::Sealed> sealed = cipher.Seal(plaintext, aad);
      ASSERT_TRUE(sealed.ok()) << sealed.status();
      EXPECT_EQ(sealed->key_id, "k1");
      EXPECT_EQ(sealed->nonce.size(), 12u);
      EXPECT_EQ(sealed->ciphertext.size(), plaintext.size() + 16);
      if (plaintext.size() >= 8) {
        EXPECT_THAT(sealed->ciphertext, Not(HasSubstr(plaintext.substr(0, 8))));
      }
      const absl::StatusOr<std::string> opened = cipher.Open(*sealed, aad);
      ASSERT_TRUE(opened.ok()) << opened.status();
      EXPECT_EQ(*opened, plaintext);
    }
  }
}

TEST(AesGcmCipherTest, AssociatedDataMismatchIsDataLoss) {
  const AesGcmCipher cipher(Ring({{"k1", NewRawKey()}}));
  const std::string plaintext = testing::NewTestSecret("refresh");
  const absl::StatusOr<core::Sealed> sealed = cipher.Seal(plaintext, "connection=acme;gen=3");
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  for (const std::string& other :
       {std::string("connection=acme;gen=4"), std::string("connection=acmf;gen=3"),
        std::string("connection=acme;gen=3 "), std::string()}) {
    const absl::StatusOr<std::string> opened = cipher.Open(*sealed, other);
    EXPECT_EQ(opened.status().code(), absl::StatusCode::kDataLoss) << other;
    EXPECT_THAT(opened.status().message(), HasSubstr("'k1'"));
    ExpectNoData(opened.status(), {plaintext, "connection=acme;gen=3", sealed->ciphertext});
  }
}

TEST(AesGcmCipherTest, FlippingAnyByteOfCiphertextOrNonceIsDataLoss) {
  const AesGcmCipher cipher(Ring({{"k1", NewRawKey()}}));
  const std::string plaintext = testing::NewTestSecret("access");
  const absl::StatusOr<core::Sealed> sealed = cipher.Seal(plaintext, "row");
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  ASSERT_TRUE(cipher.Open(*sealed, "row").ok());
  for (uint8_t flip : {uint8_t{0x01}, uint8_t{0x80}}) {
    for (size_t i = 0; i < sealed->ciphertext.size(); ++i) {  // body and tag
      core::Sealed tampered = *sealed;
      tampered.ciphertext[i] = static_cast<char>(tampered.ciphertext[i] ^ flip);
      const absl::StatusOr<std::string> opened = cipher.Open(tampered, "row");
      EXPECT_EQ(opened.status().code(), absl::StatusCode::kDataLoss) << "ciphertext byte " << i;
      ExpectNoData(opened.status(), {plaintext});
    }
    for (size_t i = 0; i < sealed->nonce.size(); ++i) {
      core::Sealed tampered = *sealed;
      tampered.nonce[i] = static_cast<char>(tampered.nonce[i] ^ flip);
      EXPECT_EQ(cipher.Open(tampered, "row").status().code(), absl::StatusCode::kDataLoss)
          << "nonce byte " << i;
    }
  }
}

TEST(AesGcmCipherTest, TruncatedOrMisshapenValuesAreDataLoss) {
  const AesGcmCipher cipher(Ring({{"k1", NewRawKey()}}));
  const absl::StatusOr<core::Sealed> sealed = cipher.Seal("some refresh token", "row");
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  const auto open_with = [&](auto change) {
    core::Sealed s = *sealed;
    change(s);
    return cipher.Open(s, "row").status().code();
  };
  EXPECT_EQ(open_with([](core::Sealed& s) { s.ciphertext.pop_back(); }),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(open_with([](core::Sealed& s) { s.ciphertext.push_back('x'); }),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(open_with([](core::Sealed& s) { s.ciphertext.resize(15); }),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(open_with([](core::Sealed& s) { s.ciphertext.clear(); }), absl::StatusCode::kDataLoss);
  EXPECT_EQ(open_with([](core::Sealed& s) { s.nonce.pop_back(); }), absl::StatusCode::kDataLoss);
  EXPECT_EQ(open_with([](core::Sealed& s) { s.nonce.push_back('\0'); }),
            absl::StatusCode::kDataLoss);
}

TEST(AesGcmCipherTest, UnknownKeyIdIsDataLossNamingIt) {
  const AesGcmCipher k1(Ring({{"k1", NewRawKey()}}));
  const AesGcmCipher others(Ring({{"k2", NewRawKey()}, {"k3", NewRawKey()}}));
  const absl::StatusOr<core::Sealed> sealed = k1.Seal("secret", "row");
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  const absl::StatusOr<std::string> opened = others.Open(*sealed, "row");
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(opened.status().message(), HasSubstr("'k1'"));

  // A key id that is not even well formed is reported, but not echoed.
  core::Sealed garbled = *sealed;
  garbled.key_id = "k1\n<script>garbage";
  const absl::StatusOr<std::string> garbled_open = k1.Open(garbled, "row");
  EXPECT_EQ(garbled_open.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(garbled_open.status().message(), Not(HasSubstr("garbage")));
}

TEST(AesGcmCipherTest, WrongKeyUnderTheSameIdIsDataLossNamingIt) {
  const AesGcmCipher sealer(Ring({{"k1", NewRawKey()}}));
  const AesGcmCipher opener(Ring({{"k1", NewRawKey()}}));
  const absl::StatusOr<core::Sealed> sealed = sealer.Seal("secret", "row");
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  const absl::StatusOr<std::string> opened = opener.Open(*sealed, "row");
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(opened.status().message(), HasSubstr("'k1'"));
}

TEST(AesGcmCipherTest, CiphertextIsBoundToItsKeyId) {
  // Two ids with the same key bytes: relabelling a value still fails, because the id is part
  // of the authenticated data.
  const std::string key = NewRawKey();
  const AesGcmCipher cipher(Ring({{"a", key}, {"b", key}}));
  absl::StatusOr<core::Sealed> sealed = cipher.Seal("secret", "row");
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  ASSERT_EQ(sealed->key_id, "b");
  ASSERT_TRUE(cipher.Open(*sealed, "row").ok());
  sealed->key_id = "a";
  EXPECT_EQ(cipher.Open(*sealed, "row").status().code(), absl::StatusCode::kDataLoss);
}

TEST(AesGcmCipherTest, RotationOpensOldDataAndSealsWithTheNewKey) {
  const std::string k1 = NewRawKey();
  const std::string k2 = NewRawKey();
  const AesGcmCipher before(Ring({{"k1", k1}}));
  const AesGcmCipher during(Ring({{"k1", k1}, {"k2", k2}}));
  const AesGcmCipher after(Ring({{"k2", k2}}));

  const absl::StatusOr<core::Sealed> old_value = before.Seal("old grant", "row");
  ASSERT_TRUE(old_value.ok()) << old_value.status();
  EXPECT_EQ(old_value->key_id, "k1");

  const absl::StatusOr<std::string> opened = during.Open(*old_value, "row");
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(*opened, "old grant");
  EXPECT_EQ(during.current_key_id(), "k2");
  EXPECT_EQ(during.key_ids(), (std::vector<std::string>{"k1", "k2"}));

  const absl::StatusOr<core::Sealed> new_value = during.Seal("new grant", "row");
  ASSERT_TRUE(new_value.ok()) << new_value.status();
  EXPECT_EQ(new_value->key_id, "k2");
  ASSERT_TRUE(after.Open(*new_value, "row").ok());

  const absl::StatusOr<std::string> lost = after.Open(*old_value, "row");
  EXPECT_EQ(lost.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(lost.status().message(), HasSubstr("'k1'"));
}

TEST(AesGcmCipherTest, TenThousandSealsUseTenThousandNonces) {
  const AesGcmCipher cipher(Ring({{"k1", NewRawKey()}}));
  std::set<std::string> nonces;
  for (int i = 0; i < 10'000; ++i) {
    const absl::StatusOr<core::Sealed> sealed = cipher.Seal("same plaintext", "same row");
    ASSERT_TRUE(sealed.ok()) << sealed.status();
    ASSERT_EQ(sealed->nonce.size(), 12u);
    nonces.insert(sealed->nonce);
  }
  EXPECT_EQ(nonces.size(), 10'000u);
}

TEST(AesGcmCipherTest, KeyCheckIsStablePerKeyAndDiffersBetweenKeys) {
  const std::string k1 = NewRawKey();
  const std::string k2 = NewRawKey();
  const AesGcmCipher cipher(Ring({{"k1", k1}, {"k2", k2}}));
  const AesGcmCipher again(Ring({{"renamed", k1}}));

  const absl::StatusOr<std::string> check1 = cipher.KeyCheck("k1");
  const absl::StatusOr<std::string> check2 = cipher.KeyCheck("k2");
  ASSERT_TRUE(check1.ok()) << check1.status();
  ASSERT_TRUE(check2.ok()) << check2.status();
  EXPECT_NE(*check1, *check2);
  EXPECT_EQ(cipher.KeyCheck("k1").value(), *check1);
  EXPECT_EQ(again.KeyCheck("renamed").value(), *check1);  // depends on the key, not the id

  // The documented construction: hex of the first 16 bytes of HMAC-SHA-256(key, label).
  const std::string mac = OpenSslDigest().HmacSha256(k1, "token-broker key check v1");
  EXPECT_EQ(*check1, absl::BytesToHexString(mac.substr(0, 16)));
  EXPECT_EQ(check1->size(), 32u);
  EXPECT_THAT(*check1, Not(HasSubstr(absl::BytesToHexString(k1.substr(0, 8)))));
}

TEST(AesGcmCipherTest, KeyCheckOfUnknownIdIsNotFound) {
  const AesGcmCipher cipher(Ring({{"k1", NewRawKey()}}));
  EXPECT_EQ(cipher.KeyCheck("k2").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cipher.KeyCheck("").status().code(), absl::StatusCode::kNotFound);
}

// Concurrent Seal and Open on one cipher; meaningful under TSan (this is a DOMAIN test).
TEST(AesGcmCipherTest, ConcurrentSealAndOpen) {
  const AesGcmCipher cipher(Ring({{"k1", NewRawKey()}, {"k2", NewRawKey()}}));
  std::vector<std::thread> threads;
  std::vector<int> failures(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&cipher, &failures, t] {
      for (int i = 0; i < 200; ++i) {
        const std::string plaintext = absl::StrCat("grant ", t, "/", i);
        const std::string aad = absl::StrCat("row ", t);
        absl::StatusOr<core::Sealed> sealed = cipher.Seal(plaintext, aad);
        if (!sealed.ok()) {
          ++failures[t];
          continue;
        }
        absl::StatusOr<std::string> opened = cipher.Open(*sealed, aad);
        if (!opened.ok() || *opened != plaintext) {
          ++failures[t];
        }
      }
    });
  }
  for (std::thread& thread : threads) {
    thread.join();
  }
  EXPECT_EQ(failures, std::vector<int>(4, 0));
}

}  // namespace
}  // namespace tb::crypto
