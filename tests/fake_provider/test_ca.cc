#include "tests/fake_provider/test_ca.h"

// OpenSSL 3 only (EVP_PKEY_Q_keygen). Every OpenSSL object lives in a unique_ptr with its free
// function, so each early return releases what was built so far.

#include <arpa/inet.h>
#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tb::testing {
namespace {

template <auto kFree>
struct Deleter {
  template <typename T>
  void operator()(T* p) const {
    kFree(p);
  }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY_free>>;
using X509Ptr = std::unique_ptr<X509, Deleter<X509_free>>;
using BioPtr = std::unique_ptr<BIO, Deleter<BIO_free_all>>;
using BignumPtr = std::unique_ptr<BIGNUM, Deleter<BN_free>>;
using ExtensionPtr = std::unique_ptr<X509_EXTENSION, Deleter<X509_EXTENSION_free>>;

// The failed call plus OpenSSL's error queue (which this also clears, so a later failure on this
// thread does not report a stale reason).
absl::Status OpenSslError(absl::string_view what) {
  std::string detail;
  while (const unsigned long code = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(code, buf, sizeof buf);
    absl::StrAppend(&detail, detail.empty() ? "" : "; ", buf);
  }
  return absl::InternalError(
      absl::StrCat("test CA: ", what, " failed", detail.empty() ? "" : ": ", detail));
}

absl::StatusOr<PkeyPtr> NewP256Key() {
  PkeyPtr key(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  if (key == nullptr) {
    return OpenSslError("EC P-256 key generation");
  }
  return key;
}

struct CertSpec {
  std::string common_name;
  X509* issuer_cert = nullptr;  // null: self-signed
  EVP_PKEY* issuer_key = nullptr;
  // (NID, OpenSSL config value), added in this order: subjectKeyIdentifier must come before an
  // authorityKeyIdentifier that refers to it.
  std::vector<std::pair<int, std::string>> extensions;
};

absl::StatusOr<X509Ptr> NewCertificate(EVP_PKEY* subject_key, const CertSpec& spec,
                                       const TestCaOptions& options) {
  X509Ptr cert(X509_new());
  if (cert == nullptr) {
    return OpenSslError("X509_new");
  }
  X509* x = cert.get();
  if (X509_set_version(x, X509_VERSION_3) != 1) {
    return OpenSslError("X509_set_version");
  }
  // A random positive 127-bit serial: browsers reject two certificates from one issuer with the
  // same serial, and every run makes a new CA and leaf.
  BignumPtr serial(BN_new());
  if (serial == nullptr || BN_rand(serial.get(), 127, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) != 1 ||
      BN_to_ASN1_INTEGER(serial.get(), X509_get_serialNumber(x)) == nullptr) {
    return OpenSslError("serial number");
  }
  const long skew = static_cast<long>(absl::ToInt64Seconds(options.not_before_skew));
  const long validity = static_cast<long>(absl::ToInt64Seconds(options.validity));
  if (X509_gmtime_adj(X509_getm_notBefore(x), -skew) == nullptr ||
      X509_gmtime_adj(X509_getm_notAfter(x), validity - skew) == nullptr) {
    return OpenSslError("validity");
  }
  if (X509_set_pubkey(x, subject_key) != 1) {
    return OpenSslError("X509_set_pubkey");
  }
  X509_NAME* name = X509_get_subject_name(x);
  const auto* org = reinterpret_cast<const unsigned char*>("token-broker tests");
  const auto* cn = reinterpret_cast<const unsigned char*>(spec.common_name.c_str());
  if (X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, org, -1, -1, 0) != 1 ||
      X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, cn, -1, -1, 0) != 1) {
    return OpenSslError("subject name");
  }
  X509* issuer = spec.issuer_cert != nullptr ? spec.issuer_cert : x;
  if (X509_set_issuer_name(x, X509_get_subject_name(issuer)) != 1) {
    return OpenSslError("X509_set_issuer_name");
  }
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, x, nullptr, nullptr, 0);
  for (const auto& [nid, value] : spec.extensions) {
    ExtensionPtr ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
    if (ext == nullptr || X509_add_ext(x, ext.get(), -1) != 1) {
      return OpenSslError(absl::StrCat("extension ", OBJ_nid2sn(nid)));
    }
  }
  EVP_PKEY* signer = spec.issuer_key != nullptr ? spec.issuer_key : subject_key;
  if (X509_sign(x, signer, EVP_sha256()) <= 0) {
    return OpenSslError("X509_sign");
  }
  return cert;
}

absl::StatusOr<std::string> BioContents(BIO* bio) {
  char* data = nullptr;
  const long size = BIO_get_mem_data(bio, &data);
  if (size <= 0 || data == nullptr) {
    return OpenSslError("PEM output");
  }
  return std::string(data, static_cast<size_t>(size));
}

absl::StatusOr<std::string> CertificatePem(X509* cert) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr || PEM_write_bio_X509(bio.get(), cert) != 1) {
    return OpenSslError("PEM_write_bio_X509");
  }
  return BioContents(bio.get());
}

absl::StatusOr<std::string> PrivateKeyPem(EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr ||
      PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    return OpenSslError("PEM_write_bio_PrivateKey");
  }
  return BioContents(bio.get());
}

bool IsIpLiteral(const std::string& ip) {
  unsigned char buf[sizeof(struct in6_addr)];
  return inet_pton(AF_INET, ip.c_str(), buf) == 1 || inet_pton(AF_INET6, ip.c_str(), buf) == 1;
}

absl::StatusOr<std::string> SubjectAltName(const TestCaOptions& options) {
  std::vector<std::string> entries;
  for (const std::string& dns : options.dns_names) {
    // A comma would start a new entry in OpenSSL's config syntax.
    if (dns.empty() || dns.find_first_of(", \t\r\n") != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("test CA: bad DNS name '", dns, "'"));
    }
    entries.push_back(absl::StrCat("DNS:", dns));
  }
  for (const std::string& ip : options.ip_addresses) {
    if (!IsIpLiteral(ip)) {
      return absl::InvalidArgumentError(absl::StrCat("test CA: '", ip, "' is not an IP literal"));
    }
    entries.push_back(absl::StrCat("IP:", ip));
  }
  if (entries.empty()) {
    return absl::InvalidArgumentError("test CA: the server certificate needs a subjectAltName");
  }
  return absl::StrJoin(entries, ",");
}

}  // namespace

absl::StatusOr<TestCertificates> GenerateTestCertificates(const TestCaOptions& options) {
  if (options.validity <= absl::ZeroDuration() || options.validity == absl::InfiniteDuration() ||
      options.not_before_skew < absl::ZeroDuration() ||
      options.not_before_skew == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError("test CA: validity must be positive and finite");
  }
  absl::StatusOr<std::string> san = SubjectAltName(options);
  if (!san.ok()) {
    return san.status();
  }

  absl::StatusOr<PkeyPtr> ca_key = NewP256Key();
  if (!ca_key.ok()) {
    return ca_key.status();
  }
  CertSpec ca_spec;
  ca_spec.common_name = "token-broker test CA";
  ca_spec.extensions = {
      {NID_basic_constraints, "critical,CA:TRUE,pathlen:0"},
      {NID_key_usage, "critical,keyCertSign,cRLSign"},
      {NID_subject_key_identifier, "hash"},
  };
  absl::StatusOr<X509Ptr> ca_cert = NewCertificate(ca_key->get(), ca_spec, options);
  if (!ca_cert.ok()) {
    return ca_cert.status();
  }

  absl::StatusOr<PkeyPtr> server_key = NewP256Key();
  if (!server_key.ok()) {
    return server_key.status();
  }
  CertSpec server_spec;
  server_spec.common_name = options.dns_names.empty() ? "fake provider" : options.dns_names[0];
  server_spec.issuer_cert = ca_cert->get();
  server_spec.issuer_key = ca_key->get();
  server_spec.extensions = {
      {NID_basic_constraints, "critical,CA:FALSE"},
      // ECDSA keys sign; they never encipher keys, so no keyEncipherment.
      {NID_key_usage, "critical,digitalSignature"},
      {NID_ext_key_usage, "serverAuth"},
      {NID_subject_key_identifier, "hash"},
      {NID_authority_key_identifier, "keyid:always"},
      {NID_subject_alt_name, *san},
  };
  absl::StatusOr<X509Ptr> server_cert = NewCertificate(server_key->get(), server_spec, options);
  if (!server_cert.ok()) {
    return server_cert.status();
  }

  TestCertificates out;
  absl::StatusOr<std::string> pem = CertificatePem(ca_cert->get());
  if (!pem.ok()) {
    return pem.status();
  }
  out.ca_cert_pem = *std::move(pem);
  pem = CertificatePem(server_cert->get());
  if (!pem.ok()) {
    return pem.status();
  }
  out.server_cert_pem = *std::move(pem);
  pem = PrivateKeyPem(server_key->get());
  if (!pem.ok()) {
    return pem.status();
  }
  out.server_key_pem = *std::move(pem);
  pem = PrivateKeyPem(ca_key->get());
  if (!pem.ok()) {
    return pem.status();
  }
  out.ca_key_pem = *std::move(pem);
  return out;
}

absl::StatusOr<ClientCertificate> IssueClientCertificate(const TestCertificates& ca,
                                                         const std::string& common_name,
                                                         const std::vector<std::string>& uri_sans,
                                                         const TestCaOptions& options) {
  if (common_name.empty()) {
    return absl::InvalidArgumentError("test CA: a client certificate needs a common name");
  }
  std::vector<std::string> sans;
  for (const std::string& uri : uri_sans) {
    if (uri.empty() || uri.find_first_of(", \t\r\n") != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("test CA: bad URI SAN '", uri, "'"));
    }
    sans.push_back(absl::StrCat("URI:", uri));
  }
  BioPtr cert_bio(BIO_new_mem_buf(ca.ca_cert_pem.data(), static_cast<int>(ca.ca_cert_pem.size())));
  BioPtr key_bio(BIO_new_mem_buf(ca.ca_key_pem.data(), static_cast<int>(ca.ca_key_pem.size())));
  if (cert_bio == nullptr || key_bio == nullptr) {
    return OpenSslError("BIO_new_mem_buf");
  }
  X509Ptr ca_cert(PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr));
  PkeyPtr ca_key(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr));
  if (ca_cert == nullptr || ca_key == nullptr) {
    return OpenSslError("reading the CA");
  }
  absl::StatusOr<PkeyPtr> key = NewP256Key();
  if (!key.ok()) {
    return key.status();
  }
  CertSpec spec;
  spec.common_name = common_name;
  spec.issuer_cert = ca_cert.get();
  spec.issuer_key = ca_key.get();
  spec.extensions = {
      {NID_basic_constraints, "critical,CA:FALSE"},
      {NID_key_usage, "critical,digitalSignature"},
      {NID_ext_key_usage, "clientAuth"},
      {NID_subject_key_identifier, "hash"},
      {NID_authority_key_identifier, "keyid:always"},
  };
  if (!sans.empty()) {
    spec.extensions.emplace_back(NID_subject_alt_name, absl::StrJoin(sans, ","));
  }
  absl::StatusOr<X509Ptr> cert = NewCertificate(key->get(), spec, options);
  if (!cert.ok()) {
    return cert.status();
  }
  ClientCertificate out;
  absl::StatusOr<std::string> pem = CertificatePem(cert->get());
  if (!pem.ok()) {
    return pem.status();
  }
  out.cert_pem = *std::move(pem);
  pem = PrivateKeyPem(key->get());
  if (!pem.ok()) {
    return pem.status();
  }
  out.key_pem = *std::move(pem);
  return out;
}

absl::Status WritePemFile(const std::string& path, const std::string& contents) {
  if (path.empty()) {
    return absl::InvalidArgumentError("test CA: empty file path");
  }
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = absl::StrCat(path, ".tmp-", getpid(), "-", counter.fetch_add(1));
  const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("cannot create ", tmp, ": ", strerror(errno)));
  }
  size_t written = 0;
  while (written < contents.size()) {
    const ssize_t n = write(fd, contents.data() + written, contents.size() - written);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      const int err = errno;
      close(fd);
      unlink(tmp.c_str());
      return absl::UnavailableError(absl::StrCat("cannot write ", tmp, ": ", strerror(err)));
    }
    written += static_cast<size_t>(n);
  }
  if (close(fd) != 0) {
    const int err = errno;
    unlink(tmp.c_str());
    return absl::UnavailableError(absl::StrCat("cannot write ", tmp, ": ", strerror(err)));
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    unlink(tmp.c_str());
    return absl::UnavailableError(absl::StrCat("cannot rename to ", path, ": ", strerror(err)));
  }
  return absl::OkStatus();
}

}  // namespace tb::testing
