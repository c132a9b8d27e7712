#include "server/src/http/oauth_routes.h"

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace tb::http {
namespace {

TEST(OAuthRoutesTest, ParseQueryDecodesFormEncoding) {
  absl::StatusOr<std::map<std::string, std::string>> q =
      ParseQuery("state=a%2Fb&code=x+y&error_description=%E2%9C%93&empty=&flag");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->at("state"), "a/b");
  EXPECT_EQ(q->at("code"), "x y");
  EXPECT_EQ(q->at("error_description"), "\u2713");
  EXPECT_EQ(q->at("empty"), "");
  EXPECT_EQ(q->at("flag"), "");
  EXPECT_TRUE(ParseQuery("")->empty());
}

TEST(OAuthRoutesTest, ParseQueryRejectsGarbage) {
  for (const char* bad : {"state=%zz", "state=%4", "a=1&a=2", "state=%00%"}) {
    EXPECT_EQ(ParseQuery(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  std::string many;
  for (int i = 0; i < 40; ++i) {
    absl::StrAppend(&many, "p", i, "=1&");
  }
  EXPECT_FALSE(ParseQuery(many).ok());
}

TEST(OAuthRoutesTest, CookieValueFindsTheNamedCookie) {
  HttpRequest req;
  req.headers = {{"Cookie", "a=1; tb_oauth=xyz; b=2"}, {"cookie", "c=3"}};
  EXPECT_EQ(CookieValue(req, "tb_oauth"), "xyz");
  EXPECT_EQ(CookieValue(req, "c"), "3");
  EXPECT_EQ(CookieValue(req, "tb"), "");
  EXPECT_EQ(BindingCookieName(true), "__Host-tb_oauth");
  EXPECT_EQ(BindingCookieName(false), "tb_oauth");
}

TEST(OAuthRoutesTest, HtmlEscapeCoversEveryMetacharacter) {
  EXPECT_EQ(HtmlEscape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
}

}  // namespace
}  // namespace tb::http
