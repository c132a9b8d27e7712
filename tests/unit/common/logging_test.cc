#include "server/src/common/logging.h"

#include <spdlog/spdlog.h>

#include <boost/json/parse.hpp>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"

namespace tb {
namespace {

TEST(LoggingTest, JsonFormatWritesOneParseableObjectPerLine) {
  const std::string path = ::testing::TempDir() + "/logging_test.jsonl";
  std::remove(path.c_str());
  auto previous = spdlog::default_logger();
  ASSERT_TRUE(InitLogging({"debug", "json", path}).ok());
  spdlog::info("a \"quoted\" word, a back\\slash,\na newline and a \x01 control");
  spdlog::debug("second");
  spdlog::trace("below the level");
  spdlog::default_logger()->flush();
  spdlog::set_default_logger(previous);

  std::ifstream in(path);
  std::string line;
  std::vector<std::string> messages;
  while (std::getline(in, line)) {
    boost::system::error_code ec;
    boost::json::value v = boost::json::parse(line, ec);
    ASSERT_FALSE(ec) << line;
    messages.emplace_back(v.at("msg").as_string().c_str());
    EXPECT_TRUE(v.as_object().contains("time"));
    EXPECT_TRUE(v.as_object().contains("level"));
  }
  ASSERT_EQ(messages.size(), 2u);
  EXPECT_EQ(messages[0], "a \"quoted\" word, a back\\slash,\na newline and a \x01 control");
  EXPECT_EQ(messages[1], "second");
}

TEST(LoggingTest, RejectsUnknownLevelAndFormat) {
  EXPECT_EQ(InitLogging({"loud", "text", ""}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(InitLogging({"info", "xml", ""}).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tb
