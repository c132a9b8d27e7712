#include "server/src/crypto/key_ring.h"

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace tb::crypto {
namespace {

// Value of a digit of either base64 alphabet (RFC 4648 sections 4 and 5), or -1.
int DigitValue(char c) {
  if (c >= 'A' && c <= 'Z') {
    return c - 'A';
  }
  if (c >= 'a' && c <= 'z') {
    return c - 'a' + 26;
  }
  if (c >= '0' && c <= '9') {
    return c - '0' + 52;
  }
  if (c == '+' || c == '-') {
    return 62;
  }
  if (c == '/' || c == '_') {
    return 63;
  }
  return -1;
}

// Decodes standard or URL-safe base64, with or without '=' padding. Written here rather than
// taken from absl::Base64Unescape because that one is lenient in ways a key file should not be
// (it skips embedded whitespace, for one). Rejected: any other character, padding that does not
// fit the length, a value mixing the two alphabets, and non-zero unused bits in the last digit;
// no encoder produces those, so they mean a value was truncated or edited by hand.
std::optional<std::string> DecodeBase64(absl::string_view text) {
  size_t padding = 0;
  while (padding < 2 && !text.empty() && text.back() == '=') {
    text.remove_suffix(1);
    ++padding;
  }
  if (text.size() % 4 == 1 || (padding > 0 && (text.size() + padding) % 4 != 0)) {
    return std::nullopt;
  }
  bool standard = false;
  bool url_safe = false;
  std::string out;
  out.reserve(text.size() * 3 / 4);
  uint32_t bits = 0;  // the not yet emitted low `bit_count` bits
  int bit_count = 0;
  for (char c : text) {
    const int value = DigitValue(c);
    if (value < 0) {
      return std::nullopt;
    }
    standard = standard || c == '+' || c == '/';
    url_safe = url_safe || c == '-' || c == '_';
    bits = (bits << 6) | static_cast<uint32_t>(value);
    bit_count += 6;
    if (bit_count >= 8) {
      bit_count -= 8;
      out.push_back(static_cast<char>((bits >> bit_count) & 0xff));
      bits &= (1u << bit_count) - 1;
    }
  }
  if (bits != 0 || (standard && url_safe)) {
    return std::nullopt;
  }
  return out;
}

// Whether `field` decodes as a key. A key id that does is probably a key in the id's place (the
// two fields swapped), and must not be echoed into an error message.
bool LooksLikeKey(absl::string_view field) {
  const std::optional<std::string> decoded = DecodeBase64(field);
  return decoded.has_value() && decoded->size() == KeyRing::kKeySize;
}

// "key 'k1'" for messages, unless the id might be key material.
std::string Named(absl::string_view id) {
  if (!KeyRing::IsValidId(id)) {
    return "a key with a malformed id";
  }
  if (LooksLikeKey(id)) {
    return "the key on this line (its id looks like a base64 key, so it is not shown: are the "
           "fields swapped?)";
  }
  return absl::StrCat("key '", id, "'");
}

absl::Status InvalidIdError(absl::string_view where, absl::string_view id) {
  return absl::InvalidArgumentError(absl::StrCat(
      where, ": the key id must be 1 to 64 of [A-Za-z0-9._-]",
      LooksLikeKey(id) ? " (it looks like a base64 key: are the fields swapped?)" : ""));
}

// The entries of a ring under construction, checked as they are added so that the first bad
// entry in file order is the one reported.
struct Entries {
  // `where` locates the entry for messages ("keys.txt:3", "entry 2").
  absl::Status Add(std::string where, absl::string_view id, KeyMaterial key) {
    if (!KeyRing::IsValidId(id)) {
      return InvalidIdError(where, id);
    }
    if (key.Reveal().size() != KeyRing::kKeySize) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": ", Named(id), " is ",
                                                     key.Reveal().size(), " bytes, want ",
                                                     KeyRing::kKeySize, " (AES-256)"));
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] == id) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": ", Named(id), " is listed twice (first at ", wheres[i], ")"));
      }
    }
    ids.emplace_back(id);
    keys.push_back(std::move(key));
    wheres.push_back(std::move(where));
    return absl::OkStatus();
  }

  std::vector<std::string> ids;
  std::vector<KeyMaterial> keys;
  std::vector<std::string> wheres;
};

}  // namespace

bool KeyRing::IsValidId(absl::string_view id) {
  if (id.empty() || id.size() > kMaxIdLength) {
    return false;
  }
  for (char c : id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

absl::StatusOr<KeyRing> KeyRing::Parse(absl::string_view text, absl::string_view source) {
  Entries entries;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') {
      continue;
    }
    std::string where = absl::StrCat(source, ":", line_number);
    // Nothing from the line itself goes into a message unless it is a well-formed id: a line
    // that does not parse may be a key with its id missing.
    const std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t\v\f\r"), absl::SkipEmpty());
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": expected '<key-id> <base64 of 32 bytes>', found ", fields.size(),
                       fields.size() == 1 ? " field" : " fields"));
    }
    const absl::string_view id = fields[0];
    if (!IsValidId(id)) {
      return InvalidIdError(where, id);
    }
    std::optional<std::string> key = DecodeBase64(fields[1]);
    if (!key.has_value()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": ", Named(id), " is not valid base64 (standard or URL-safe, padding optional)"));
    }
    const absl::Status added = entries.Add(std::move(where), id, KeyMaterial(*std::move(key)));
    if (!added.ok()) {
      return added;
    }
  }
  if (entries.ids.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": no keys (expected lines of '<key-id> <base64 of 32 bytes>')"));
  }
  return KeyRing(std::move(entries.ids), std::move(entries.keys));
}

absl::StatusOr<KeyRing> KeyRing::FromKeys(std::vector<std::pair<std::string, KeyMaterial>> keys) {
  Entries entries;
  for (size_t i = 0; i < keys.size(); ++i) {
    const absl::Status added = entries.Add(absl::StrCat("key ring entry ", i + 1), keys[i].first,
                                           std::move(keys[i].second));
    if (!added.ok()) {
      return added;
    }
  }
  if (entries.ids.empty()) {
    return absl::InvalidArgumentError("key ring: no keys");
  }
  return KeyRing(std::move(entries.ids), std::move(entries.keys));
}

const KeyMaterial* KeyRing::Find(absl::string_view id) const {
  for (size_t i = 0; i < ids_.size(); ++i) {
    if (ids_[i] == id) {
      return &keys_[i];
    }
  }
  return nullptr;
}

}  // namespace tb::crypto
