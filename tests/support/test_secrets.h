#ifndef TB_TESTS_SUPPORT_TEST_SECRETS_H_
#define TB_TESTS_SUPPORT_TEST_SECRETS_H_

#include <string>

#include "absl/strings/string_view.h"

namespace tb::testing {

// A fresh, unique secret value for a test ("<label>/<random>+x="), recorded in
// ${TB_TEST_LOG_DIR}/secrets-<pid>.txt so that the end-of-run scan can prove it never reached a
// log in raw, URL-encoded or JSON-escaped form. The '/', '+' and '=' make the encoded forms
// differ from the raw one. Every test that creates a token, code or key uses this.
std::string NewTestSecret(absl::string_view label);

// Records a secret made elsewhere (a token or code the fake provider issued) for the same scan.
// Values shorter than 8 characters are not scanned for.
void RecordTestSecret(absl::string_view value);

}  // namespace tb::testing

#endif  // TB_TESTS_SUPPORT_TEST_SECRETS_H_
