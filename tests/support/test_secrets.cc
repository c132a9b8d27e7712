#include "tests/support/test_secrets.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tb::testing {

void RecordTestSecret(absl::string_view value) {
  if (const char* dir = std::getenv("TB_TEST_LOG_DIR"); dir != nullptr && *dir != '\0') {
    std::ofstream out(absl::StrCat(dir, "/secrets-", getpid(), ".txt"), std::ios::app);
    out << value << "\n";
  }
}

std::string NewTestSecret(absl::string_view label) {
  static std::atomic<uint64_t> counter{0};
  std::random_device rd;
  const std::string value =
      absl::StrFormat("%s/%08x%08x+%d=", label, rd(), rd(), counter.fetch_add(1));
  if (const char* dir = std::getenv("TB_TEST_LOG_DIR"); dir != nullptr && *dir != '\0') {
    std::ofstream out(absl::StrCat(dir, "/secrets-", getpid(), ".txt"), std::ios::app);
    out << value << "\n";
  }
  return value;
}

}  // namespace tb::testing
