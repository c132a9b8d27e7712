#include "server/src/common/logging.h"

#include <spdlog/spdlog.h>

#include <boost/json/parse.hpp>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace tb {
namespace {

// Every line of the file at `path`.
std::vector<std::string> Lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) {
    out.push_back(line);
  }
  return out;
}

// Logs through InitLogging(format) into a fresh file while `body` runs, then puts the previous
// logger back and returns the file's lines.
std::vector<std::string> LogWith(const std::string& format, const std::function<void()>& body) {
  const std::string path = ::testing::TempDir() + "/logging_test_request_id." + format;
  std::remove(path.c_str());
  auto previous = spdlog::default_logger();
  EXPECT_TRUE(InitLogging({"debug", format, path}).ok());
  body();
  spdlog::default_logger()->flush();
  spdlog::set_default_logger(previous);
  return Lines(path);
}

bool IsHex16(const std::string& s) {
  return s.size() == 16 && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

// The "request_id" of a JSON line, "<none>" without one.
std::string JsonRequestId(const std::string& line) {
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(line, ec);
  EXPECT_FALSE(ec) << line;
  if (ec || !v.is_object()) {
    return "<unparseable>";
  }
  const boost::json::object& o = v.as_object();
  const auto it = o.find("request_id");
  return it == o.end() ? "<none>" : std::string(it->value().as_string().c_str());
}

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

TEST(LoggingTest, JsonLinesCarryTheRequestIdOfTheirScopeAndNoneOutside) {
  std::string nested;
  const std::vector<std::string> lines = LogWith("json", [&nested] {
    spdlog::info("before");
    {
      ScopedRequestId request("req-42.a_b:C");
      spdlog::info("inside");
      {
        ScopedRequestId inner;  // a new random id
        nested = std::string(CurrentRequestId());
        spdlog::warn("nested");
      }
      spdlog::info("inside again");
      Audit("revoke", {{"caller", "ops"}});
    }
    spdlog::info("after");
    Audit("connect", {{"caller", "ops"}});
  });
  ASSERT_EQ(lines.size(), 7u);
  EXPECT_EQ(JsonRequestId(lines[0]), "<none>");
  EXPECT_EQ(JsonRequestId(lines[1]), "req-42.a_b:C");
  EXPECT_TRUE(IsHex16(nested)) << nested;
  EXPECT_EQ(JsonRequestId(lines[2]), nested);
  EXPECT_EQ(JsonRequestId(lines[3]), "req-42.a_b:C");
  EXPECT_EQ(JsonRequestId(lines[4]), "req-42.a_b:C");  // the audit line
  EXPECT_TRUE(absl::StrContains(lines[4], R"("audit":"revoke")")) << lines[4];
  EXPECT_EQ(JsonRequestId(lines[5]), "<none>");
  EXPECT_EQ(JsonRequestId(lines[6]), "<none>");
  EXPECT_EQ(CurrentRequestId(), "");
}

TEST(LoggingTest, TextLinesShowTheRequestIdBeforeTheMessage) {
  const std::vector<std::string> lines = LogWith("text", [] {
    spdlog::info("outside");
    ScopedRequestId request("0af7651916cd43dd8448eb211c80319c");
    spdlog::info("inside");
  });
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_TRUE(absl::EndsWith(lines[0], " outside")) << lines[0];
  EXPECT_FALSE(absl::StrContains(lines[0], "request_id")) << lines[0];
  EXPECT_TRUE(absl::EndsWith(lines[1], " request_id=0af7651916cd43dd8448eb211c80319c inside"))
      << lines[1];
}

TEST(LoggingTest, CallerRequestIdsThatAreNotWellFormedAreReplaced) {
  EXPECT_TRUE(IsWellFormedRequestId("a"));
  EXPECT_TRUE(IsWellFormedRequestId(std::string(64, 'x')));
  EXPECT_TRUE(IsWellFormedRequestId("123e4567-e89b-12d3-a456-426614174000"));
  for (const std::string& bad :
       {std::string(), std::string(65, 'x'), std::string("two words"), std::string("q\"uote"),
        std::string("new\nline"), std::string("br{ace}"), std::string("caf\xc3\xa9")}) {
    EXPECT_FALSE(IsWellFormedRequestId(bad)) << bad;
    ScopedRequestId request(bad);
    EXPECT_TRUE(IsHex16(std::string(CurrentRequestId()))) << CurrentRequestId();
  }
  {
    ScopedRequestId request("caller-chosen");
    EXPECT_EQ(CurrentRequestId(), "caller-chosen");
  }
  EXPECT_EQ(CurrentRequestId(), "");
}

TEST(LoggingTest, NewRequestIdsAreSixteenHexDigitsAndDistinct) {
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    const std::string id = NewRequestId();
    EXPECT_TRUE(IsHex16(id)) << id;
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 1000u);
  // Another thread's generator is seeded on its own.
  std::string other;
  std::thread([&other] { other = NewRequestId(); }).join();
  EXPECT_EQ(seen.count(other), 0u);
}

TEST(LoggingTest, WithCurrentRequestIdCarriesTheIdIntoWorkOnAnotherThread) {
  std::function<int(int)> task;
  std::function<void()> background;
  {
    ScopedRequestId request("posted-from-handler");
    task = WithCurrentRequestId([](int x) {
      EXPECT_EQ(CurrentRequestId(), "posted-from-handler");
      return x + 1;
    });
  }
  background = WithCurrentRequestId([] { EXPECT_EQ(CurrentRequestId(), ""); });
  std::thread([&] {
    ScopedRequestId own("worker-own");
    EXPECT_EQ(task(41), 42);
    EXPECT_EQ(CurrentRequestId(), "worker-own");  // restored after the task
    background();                                 // posted outside any request: none
    EXPECT_EQ(CurrentRequestId(), "worker-own");
  }).join();
  EXPECT_EQ(CurrentRequestId(), "");
}

TEST(LoggingTest, RejectsUnknownLevelAndFormat) {
  EXPECT_EQ(InitLogging({"loud", "text", ""}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(InitLogging({"info", "xml", ""}).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tb
