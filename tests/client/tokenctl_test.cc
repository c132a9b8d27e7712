// The real tokenctl binary against the real servers (seeded_broker, tests/support/seed.h), each
// in its own process. Asserts exit codes, stdout, and the stable tokens in stderr (code and
// reason names), not message text.

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/client/subprocess.h"
#include "tokenbroker/v1/token_broker.grpc.pb.h"

#ifndef TB_TOKENCTL_PATH
#error "TB_TOKENCTL_PATH must name the tokenctl binary"
#endif
#ifndef TB_SEEDED_BROKER_PATH
#error "TB_SEEDED_BROKER_PATH must name the seeded_broker binary"
#endif

namespace tb::testing {
namespace {

namespace v1 = tokenbroker::v1;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr absl::Duration kStartTimeout = absl::Seconds(30);
constexpr absl::Duration kRunTimeout = absl::Seconds(30);

const std::vector<std::string>& SeededIds() {
  static const auto* const kIds = new std::vector<std::string>{
      "active-co", "forever-co", "expired-co", "pending-co", "reauth-co", "lost-co", "revoked-co"};
  return *kIds;
}

// The lines of `text`, without the last empty one.
std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines = absl::StrSplit(text, '\n');
  if (!lines.empty() && lines.back().empty()) {
    lines.pop_back();
  }
  return lines;
}

// The first column of each table row after the header.
std::vector<std::string> ListedIds(const std::string& table) {
  std::vector<std::string> ids;
  std::vector<std::string> lines = Lines(table);
  for (size_t i = 1; i < lines.size(); ++i) {
    ids.push_back(std::string(lines[i].substr(0, lines[i].find(' '))));
  }
  return ids;
}

// A TCP port on 127.0.0.1 that nothing listens on (bound, then closed).
int ClosedPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

struct Ports {
  int grpc = 0;
  int probe = 0;
};

class TokenctlTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(StartBroker({})); }

  void TearDown() override {
    if (broker_ != nullptr) {
      EXPECT_EQ(broker_->Stop(), 0) << "seeded_broker did not exit cleanly";
    }
  }

  // (Re)starts seeded_broker with `flags` and reads its ports line.
  void StartBroker(const std::vector<std::string>& flags) {
    if (broker_ != nullptr) {
      EXPECT_EQ(broker_->Stop(), 0);
    }
    std::vector<std::string> argv = {TB_SEEDED_BROKER_PATH};
    argv.insert(argv.end(), flags.begin(), flags.end());
    absl::StatusOr<std::unique_ptr<ChildProcess>> child = ChildProcess::Start(argv);
    ASSERT_TRUE(child.ok()) << child.status();
    broker_ = *std::move(child);
    absl::StatusOr<std::string> line = broker_->ReadLine(kStartTimeout);
    ASSERT_TRUE(line.ok()) << line.status();
    // "ports grpc=<p> probe=<p> admin=<p>"
    for (absl::string_view field : absl::StrSplit(*line, ' ')) {
      std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(field, '=');
      int* port = kv.first == "grpc" ? &ports_.grpc : kv.first == "probe" ? &ports_.probe : nullptr;
      if (port != nullptr) {
        ASSERT_TRUE(absl::SimpleAtoi(kv.second, port)) << *line;
      }
    }
    ASSERT_GT(ports_.grpc, 0) << *line;
    ASSERT_GT(ports_.probe, 0) << *line;
  }

  std::string Target(int port) const { return absl::StrCat("127.0.0.1:", port); }

  // Runs tokenctl against the main port (unless `args` name a --target).
  RunResult Tokenctl(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {TB_TOKENCTL_PATH};
    bool has_target = false;
    for (const std::string& a : args) {
      has_target = has_target || absl::StartsWith(a, "--target");
    }
    if (!has_target) {
      argv.push_back(absl::StrCat("--target=", Target(ports_.grpc)));
    }
    argv.insert(argv.end(), args.begin(), args.end());
    absl::StatusOr<RunResult> r = RunToCompletion(argv, kRunTimeout);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *std::move(r) : RunResult{};
  }

  // The token of `id` from a direct GetToken call; "" on failure.
  std::string DirectToken(const std::string& id) {
    auto stub = v1::TokenBroker::NewStub(
        grpc::CreateChannel(Target(ports_.grpc), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    v1::GetTokenRequest req;
    req.set_connection_id(id);
    v1::GetTokenResponse resp;
    const grpc::Status s = stub->GetToken(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_code() << " " << s.error_message();
    return resp.token().access_token();
  }

  std::unique_ptr<ChildProcess> broker_;
  Ports ports_;
};

TEST_F(TokenctlTest, GetPrintsExactlyTheToken) {
  const std::string token = DirectToken("active-co");
  ASSERT_FALSE(token.empty());
  const RunResult r = Tokenctl({"get", "active-co"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  // Compared without printing: a failure message must not carry the token.
  EXPECT_TRUE(r.out == token + "\n") << "stdout is not the token and one newline (" << r.out.size()
                                     << " bytes, token " << token.size() << ")";
  EXPECT_EQ(r.err, "");
}

TEST_F(TokenctlTest, GetVerbosePrintsMetadataButNeverTheTokenOnStderr) {
  const std::string token = DirectToken("active-co");
  ASSERT_FALSE(token.empty());
  const RunResult r = Tokenctl({"get", "--verbose", "active-co"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(r.out == token + "\n") << "stdout is not the token";
  EXPECT_THAT(r.err, HasSubstr("generation: 1"));
  EXPECT_THAT(r.err, HasSubstr("valid_for:"));
  EXPECT_THAT(r.err, HasSubstr("expires_at:"));
  EXPECT_FALSE(absl::StrContains(r.err, token)) << "the token reached stderr";
}

TEST_F(TokenctlTest, GetPendingConnectionFailsWithNotConnected) {
  const RunResult r = Tokenctl({"get", "pending-co"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, HasSubstr("NOT_CONNECTED"));
  EXPECT_EQ(Lines(r.err).size(), 1u) << r.err;
}

TEST_F(TokenctlTest, GetNamesEveryReasonOfAConnectionThatCannotServe) {
  for (const auto& [id, reason] :
       std::vector<std::pair<std::string, std::string>>{{"reauth-co", "NEEDS_REAUTH"},
                                                        {"lost-co", "ROTATION_LOST"},
                                                        {"revoked-co", "REVOKED"}}) {
    const RunResult r = Tokenctl({"get", id});
    EXPECT_EQ(r.exit_code, 1) << id;
    EXPECT_EQ(r.out, "") << id;
    EXPECT_THAT(r.err, HasSubstr(reason)) << id;
  }
}

TEST_F(TokenctlTest, GetUnknownOrDeletedConnectionIsNotFound) {
  for (const std::string id : {"no-such-co", "deleted-co"}) {
    const RunResult r = Tokenctl({"get", id});
    EXPECT_EQ(r.exit_code, 1) << id;
    EXPECT_EQ(r.out, "") << id;
    EXPECT_THAT(r.err, HasSubstr("NOT_FOUND")) << id;
  }
}

TEST_F(TokenctlTest, UsageErrorsExitTwo) {
  const std::vector<std::vector<std::string>> cases = {
      {"frob"},                              // unknown command
      {},                                    // no command
      {"get"},                               // missing id
      {"get", "a", "b"},                     // extra argument
      {"show"},                              // missing id
      {"delete"},                            // missing id
      {"list", "extra"},                     // list takes no argument
      {"get", "active-co", "--bogus=1"},     // unknown flag
      {"get", "active-co", "--provider=z"},  // flag of another command
      {"get", "active-co", "--timeout=x"},   // bad flag value
      {"list", "--status=sleepy"},           // bad status
  };
  for (const std::vector<std::string>& args : cases) {
    const RunResult r = Tokenctl(args);
    const std::string what = absl::StrJoin(args, " ");
    EXPECT_EQ(r.exit_code, 2) << what << ": " << r.err;
    EXPECT_THAT(r.err, HasSubstr("tokenctl: ")) << what;
  }
  EXPECT_THAT(Tokenctl({"frob"}).err, HasSubstr("\"frob\""));
}

TEST_F(TokenctlTest, HelpGoesToStdoutAndExitsZero) {
  const RunResult r = Tokenctl({"--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("usage: tokenctl"));
}

TEST_F(TokenctlTest, ListShowsEverySeededConnection) {
  const RunResult r = Tokenctl({"list"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(Lines(r.out).front(), HasSubstr("ID"));
  std::vector<std::string> expected = SeededIds();
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(ListedIds(r.out), expected);  // in id order; deleted-co is gone

  // Following small pages gives the same table.
  const RunResult paged = Tokenctl({"list", "--page_size=2"});
  EXPECT_EQ(paged.exit_code, 0) << paged.err;
  EXPECT_EQ(paged.out, r.out);
}

TEST_F(TokenctlTest, ListFiltersAndLimits) {
  const RunResult pending = Tokenctl({"list", "--status=pending"});
  EXPECT_EQ(pending.exit_code, 0) << pending.err;
  EXPECT_EQ(ListedIds(pending.out), std::vector<std::string>{"pending-co"});

  const RunResult reauth = Tokenctl({"list", "--status=needs_reauth"});
  EXPECT_EQ(reauth.exit_code, 0) << reauth.err;
  EXPECT_EQ(ListedIds(reauth.out), (std::vector<std::string>{"lost-co", "reauth-co"}));

  const RunResult limited = Tokenctl({"list", "--limit=3", "--page_size=2"});
  EXPECT_EQ(limited.exit_code, 0) << limited.err;
  EXPECT_EQ(ListedIds(limited.out).size(), 3u);
}

TEST_F(TokenctlTest, ListFollowsEveryPage) {
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--bulk=250"}));
  const RunResult r = Tokenctl({"list"});  // the server's default page is 100
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<std::string> ids = ListedIds(r.out);
  EXPECT_EQ(ids.size(), 257u);
  EXPECT_TRUE(std::is_sorted(ids.begin(), ids.end()));

  const RunResult chat = Tokenctl({"list", "--provider=zendesk-chat"});
  EXPECT_EQ(chat.exit_code, 0) << chat.err;
  EXPECT_EQ(ListedIds(chat.out).size(), 125u);
}

TEST_F(TokenctlTest, ShowPrintsTheConnectionsMetadata) {
  const RunResult r = Tokenctl({"show", "active-co"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<std::string> lines = Lines(r.out);
  for (const std::string expected :
       {"id: active-co", "provider: zendesk", "status: active", "generation: 1",
        "refreshable: true", "params.subdomain: acme", "scopes: read write"}) {
    EXPECT_NE(std::find(lines.begin(), lines.end(), expected), lines.end()) << expected;
  }
  for (const std::string key :
       {"reason", "last_error", "expires_at", "refresh_at", "created_at", "updated_at"}) {
    EXPECT_THAT(r.out, HasSubstr(key + ": ")) << key;
  }
  const std::string token = DirectToken("active-co");
  EXPECT_FALSE(absl::StrContains(r.out, token)) << "show printed the token";

  const RunResult pending = Tokenctl({"show", "pending-co"});
  EXPECT_EQ(pending.exit_code, 0) << pending.err;
  EXPECT_THAT(pending.out, HasSubstr("reason: NOT_CONNECTED"));
}

TEST_F(TokenctlTest, DeleteThenGetIsNotFound) {
  const RunResult del = Tokenctl({"delete", "active-co"});
  EXPECT_EQ(del.exit_code, 0) << del.err;

  const RunResult get = Tokenctl({"get", "active-co"});
  EXPECT_EQ(get.exit_code, 1);
  EXPECT_EQ(get.out, "");
  EXPECT_THAT(get.err, HasSubstr("NOT_FOUND"));

  const RunResult show = Tokenctl({"show", "active-co"});
  EXPECT_EQ(show.exit_code, 1);
  EXPECT_THAT(show.err, HasSubstr("NOT_FOUND"));

  const RunResult again = Tokenctl({"delete", "active-co"});
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_THAT(again.err, HasSubstr("NOT_FOUND"));

  const RunResult list = Tokenctl({"list"});
  EXPECT_EQ(list.exit_code, 0);
  EXPECT_THAT(ListedIds(list.out), Not(::testing::Contains("active-co")));
}

TEST_F(TokenctlTest, HealthOnTheProbePortIsServing) {
  const std::string probe = absl::StrCat("--target=", Target(ports_.probe));
  for (const std::string service : {"", "liveness"}) {
    const RunResult r = Tokenctl({probe, "health", absl::StrCat("--service=", service)});
    EXPECT_EQ(r.exit_code, 0) << service << ": " << r.err;
    EXPECT_EQ(r.out, "SERVING\n") << service;
  }
  const RunResult main_port = Tokenctl({"health"});
  EXPECT_EQ(main_port.exit_code, 0) << main_port.err;
  EXPECT_EQ(main_port.out, "SERVING\n");
}

TEST_F(TokenctlTest, HealthOfAnUnknownServiceFails) {
  const RunResult r = Tokenctl({"health", "--service=no.such.Service"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("NOT_FOUND"));
}

TEST_F(TokenctlTest, GetOnTheProbePortIsUnimplemented) {
  const RunResult r =
      Tokenctl({absl::StrCat("--target=", Target(ports_.probe)), "get", "active-co"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, HasSubstr("UNIMPLEMENTED"));
}

TEST_F(TokenctlTest, ClosedPortCannotBeReached) {
  const int port = ClosedPort();
  ASSERT_GT(port, 0);
  for (const std::string command : {"get", "health"}) {
    std::vector<std::string> args = {absl::StrCat("--target=", Target(port)), command};
    if (command == "get") {
      args.push_back("active-co");
    }
    const RunResult r = Tokenctl(args);
    EXPECT_EQ(r.exit_code, 1) << command;
    EXPECT_EQ(r.out, "") << command;
    EXPECT_THAT(r.err, HasSubstr("cannot reach")) << command;
    EXPECT_THAT(r.err, HasSubstr("UNAVAILABLE")) << command;
  }
}

}  // namespace
}  // namespace tb::testing

namespace tb::testing {
namespace {

TEST_F(TokenctlTest, WatchPrintsGenerationAndToken) {
  const std::string token = DirectToken("active-co");
  const RunResult r = Tokenctl({"watch", "active-co", "--count=1"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(r.out == "1 " + token + "\n") << "stdout is not '1 <token>'";
}

TEST_F(TokenctlTest, RefreshAndRevokeOfAConnectionThatCannotServeExitOne) {
  for (const char* command : {"refresh", "revoke", "watch"}) {
    const RunResult r = Tokenctl({command, "pending-co"});
    EXPECT_EQ(r.exit_code, 1) << command;
    EXPECT_THAT(r.err, HasSubstr("NOT_CONNECTED")) << command;
  }
  const RunResult unknown = Tokenctl({"refresh", "nobody"});
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_THAT(unknown.err, HasSubstr("NOT_FOUND"));
}

TEST_F(TokenctlTest, RevokeStopsServingAndSaysWhetherTheProviderConfirmed) {
  const RunResult r = Tokenctl({"revoke", "active-co"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("revoked connection"));
  EXPECT_THAT(r.out, HasSubstr("confirm"));
  const RunResult get = Tokenctl({"get", "active-co"});
  EXPECT_EQ(get.exit_code, 1);
  EXPECT_THAT(get.err, HasSubstr("REVOKED"));
}

TEST_F(TokenctlTest, LinkNeedsAProvider) {
  const RunResult r = Tokenctl({"link", "acme"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--provider"));
  const RunResult unknown = Tokenctl({"link", "acme", "--provider=nope"});
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_THAT(unknown.err, HasSubstr("INVALID_ARGUMENT"));
}

}  // namespace
}  // namespace tb::testing
