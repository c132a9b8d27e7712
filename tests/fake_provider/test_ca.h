#ifndef TB_TESTS_FAKE_PROVIDER_TEST_CA_H_
#define TB_TESTS_FAKE_PROVIDER_TEST_CA_H_

// A throwaway certificate authority for tests and the development provider: a self-signed CA and
// one server certificate signed by it, generated at runtime (OpenSSL 3, EC P-256, X.509 v3), so no
// key material is ever checked in. Clients trust the CA through its PEM file and verify the
// server's chain and host name against the certificate's subjectAltName.

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tb::testing {

struct TestCaOptions {
  // subjectAltName entries of the server certificate. Clients verify the host they connect to
  // against these, so they must name every address the server is reached by.
  std::vector<std::string> dns_names = {"localhost"};
  std::vector<std::string> ip_addresses = {"127.0.0.1"};
  // Both certificates are valid from now - not_before_skew (tolerates clock skew) for `validity`.
  absl::Duration not_before_skew = absl::Hours(1);
  absl::Duration validity = absl::Hours(7 * 24);
};

struct TestCertificates {
  std::string ca_cert_pem;      // the trust anchor: what a client uses as its CA file
  std::string server_cert_pem;  // the leaf certificate alone (the CA is not part of the chain)
  std::string server_key_pem;   // the leaf's private key, PKCS#8 PEM. Never log it.
  std::string ca_key_pem;       // the CA's private key, to issue more leaves. Never log it.
};

struct ClientCertificate {
  std::string cert_pem;
  std::string key_pem;  // PKCS#8 PEM. Never log it.
};

// Issues a client certificate (CA:FALSE, digitalSignature, clientAuth) signed by `ca`'s CA,
// with subject CN `common_name` and the URI subjectAltNames `uri_sans` (SPIFFE ids, say).
// Errors: kInvalidArgument (an empty CN, a URI with a comma or space); kInternal (OpenSSL).
absl::StatusOr<ClientCertificate> IssueClientCertificate(const TestCertificates& ca,
                                                         const std::string& common_name,
                                                         const std::vector<std::string>& uri_sans,
                                                         const TestCaOptions& options = {});

// Generates a new CA key and certificate (basicConstraints CA:TRUE, keyCertSign) and a server
// certificate signed by it (CA:FALSE, digitalSignature, serverAuth, the SANs of `options`).
// Thread-safe. Errors: kInvalidArgument (no SAN at all, an IP entry that is not an IPv4/IPv6
// literal, a non-positive validity); kInternal (an OpenSSL call failed; the message names it).
absl::StatusOr<TestCertificates> GenerateTestCertificates(const TestCaOptions& options = {});

// Writes `contents` to `path` (mode 0644), replacing the file atomically (a temporary file beside
// it, then rename), so a client never reads a half-written CA file.
// Errors: kInvalidArgument (empty path); kUnavailable (the file cannot be written).
absl::Status WritePemFile(const std::string& path, const std::string& contents);

}  // namespace tb::testing

#endif  // TB_TESTS_FAKE_PROVIDER_TEST_CA_H_
