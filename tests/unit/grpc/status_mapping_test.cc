#include "server/src/grpc/status_mapping.h"

#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "gtest/gtest.h"
#include "server/src/core/errors.h"

namespace tb::grpc_api {
namespace {

TEST(StatusMappingTest, CodesMapOneToOne) {
  EXPECT_EQ(ToGrpcStatus(absl::NotFoundError("x")).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(ToGrpcStatus(absl::UnavailableError("x")).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_TRUE(ToGrpcStatus(absl::NotFoundError("x")).error_details().empty());
}

TEST(StatusMappingTest, ReasonBecomesErrorInfoInDetails) {
  const grpc::Status s = ToGrpcStatus(core::ReasonError(absl::StatusCode::kFailedPrecondition,
                                                        core::Reason::kNeedsReauth, "reconnect"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  google::rpc::Status details;
  ASSERT_TRUE(details.ParseFromString(s.error_details()));
  EXPECT_EQ(details.code(), static_cast<int>(grpc::StatusCode::FAILED_PRECONDITION));
  ASSERT_EQ(details.details_size(), 1);
  google::rpc::ErrorInfo info;
  ASSERT_TRUE(details.details(0).UnpackTo(&info));
  EXPECT_EQ(info.reason(), "NEEDS_REAUTH");
  EXPECT_EQ(info.domain(), "tokenbroker.v1");
  EXPECT_EQ(details.details(0).type_url(), "type.googleapis.com/google.rpc.ErrorInfo");
}

TEST(StatusMappingTest, ConnectionProtoCarriesNoSecret) {
  core::Connection c;
  c.id = "acme";
  c.provider = "zendesk";
  c.status = core::ConnectionStatus::kActive;
  core::Grant g;
  g.access_token = AccessToken("the-access-token-value");
  g.refresh_token = RefreshToken("the-refresh-token-value");
  g.generation = 4;
  c.grant = g;
  tokenbroker::v1::Connection out;
  ToProto(c, &out);
  const std::string wire = out.SerializeAsString();
  EXPECT_EQ(wire.find("the-access-token-value"), std::string::npos);
  EXPECT_EQ(wire.find("the-refresh-token-value"), std::string::npos);
  EXPECT_EQ(out.generation(), 4u);
  EXPECT_TRUE(out.refreshable());
  EXPECT_EQ(out.status(), tokenbroker::v1::CONNECTION_STATUS_ACTIVE);
}

}  // namespace
}  // namespace tb::grpc_api
