// The main() of every test binary. With TB_TEST_LOG_DIR set (ctest sets it), every log line of
// the test, at trace level, goes to a file there for the whole-run secret scan.

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (const char* dir = std::getenv("TB_TEST_LOG_DIR"); dir != nullptr && *dir != '\0') {
    std::string name = argc > 0 ? argv[0] : "test";
    name = name.substr(name.find_last_of('/') + 1);
    auto logger = std::make_shared<spdlog::logger>(
        "test", std::make_shared<spdlog::sinks::basic_file_sink_mt>(
                    absl::StrCat(dir, "/", name, "-", getpid(), ".log")));
    logger->set_level(spdlog::level::trace);
    logger->flush_on(spdlog::level::trace);
    spdlog::set_default_logger(std::move(logger));
  } else {
    spdlog::set_level(spdlog::level::trace);
  }
  return RUN_ALL_TESTS();
}
