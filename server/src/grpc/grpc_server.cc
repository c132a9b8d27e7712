#include "server/src/grpc/grpc_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/server_builder_option.h>
#include <spdlog/spdlog.h>

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/src/common/mutex.h"
#include "server/src/common/status_macros.h"
#include "server/src/grpc/admin_service.h"
#include "server/src/grpc/health_service.h"
#include "server/src/grpc/rpc_metrics.h"
#include "server/src/grpc/token_service.h"

namespace tb::grpc_api {

namespace {

// The keepalive policy GrpcServerOptions describes, as channel arguments (the echo server of
// bench/ sets the same ones).
void AddKeepalive(const GrpcServerOptions& o, grpc::ServerBuilder& builder) {
  const auto ms = [](absl::Duration d) { return static_cast<int>(absl::ToInt64Milliseconds(d)); };
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             ms(o.min_client_ping_interval));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, ms(o.keepalive));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ms(o.keepalive_timeout));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
}

// Takes server reflection off one builder. gRPC registers its reflection plugin for every
// server in the process (InitProtoReflectionServerBuilderPlugin, and a static initializer in
// libgrpc++_reflection); the probe port must serve health alone.
class WithoutReflection final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    const std::string reflection = grpc::reflection::ProtoServerReflectionPlugin().name();
    std::erase_if(*plugins, [&](const std::unique_ptr<grpc::ServerBuilderPlugin>& p) {
      return p->name() == reflection;
    });
  }
};

// Checks that a PEM file is readable and holds what it should before gRPC gets it (gRPC's file
// watcher would only log and keep serving without credentials).
absl::Status CheckPemFile(const std::string& path, absl::string_view what,
                          absl::string_view marker) {
  std::ifstream in(path);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read the ", what, " file ", path));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  if (!absl::StrContains(buf.str(), marker)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " does not hold a PEM ", what, " (no '", marker, "')"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MainCredentials(
    const std::optional<GrpcTlsOptions>& tls) {
  if (!tls) {
    return grpc::InsecureServerCredentials();
  }
  TB_RETURN_IF_ERROR(CheckPemFile(tls->cert_file, "certificate", "-----BEGIN CERTIFICATE-----"));
  TB_RETURN_IF_ERROR(CheckPemFile(tls->key_file, "private key", "PRIVATE KEY-----"));
  if (!tls->client_ca_file.empty()) {
    TB_RETURN_IF_ERROR(
        CheckPemFile(tls->client_ca_file, "client CA", "-----BEGIN CERTIFICATE-----"));
  }
  const auto interval =
      static_cast<unsigned int>(std::max<int64_t>(1, absl::ToInt64Seconds(tls->reload_interval)));
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      tls->key_file, tls->cert_file, tls->client_ca_file, interval);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (!tls->client_ca_file.empty()) {
    options.watch_root_certs();
    // Requested and verified when sent, not required: callers may use API keys instead. A
    // certificate from another CA fails the handshake.
    options.set_cert_request_type(GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

}  // namespace

class GrpcServer::Impl {
 public:
  Impl(const GrpcServerOptions& options, GrpcDomain domain)
      : options_(options),
        rpc_metrics_(options.metrics),
        allow_all_(domain.authorizer == nullptr ? auth::Authorizer::AllowAll() : nullptr),
        authorizer_(domain.authorizer != nullptr ? *domain.authorizer : *allow_all_),
        token_service_({domain.broker, domain.cache, domain.flow, domain.refresher,
                        domain.run_blocking, authorizer_},
                       {options.max_watch_streams, options.max_watch_streams_per_caller,
                        options.metrics, &rpc_metrics_}),
        admin_service_(domain.broker, domain.flow, std::move(domain.run_blocking), authorizer_,
                       &rpc_metrics_) {}

  absl::Status Start() {
    // Our own health service (one status table for both ports) instead of gRPC's built-in one;
    // server reflection on every server built from here on (the probe port opts out).
    grpc::EnableDefaultHealthCheckService(false);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();

    absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> creds = MainCredentials(options_.tls);
    if (!creds.ok()) {
      return creds.status();
    }
    grpc::ServerBuilder builder;
    // gRPC sets SO_REUSEPORT by default, which would let a second broker bind the same port
    // and silently share its traffic; a taken port must be a start-up error instead.
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    AddKeepalive(options_, builder);
    if (!options_.reflection) {
      builder.SetOption(std::make_unique<WithoutReflection>());
    }
    builder.AddListeningPort(options_.listen, *creds, &port_);
    main_queues_.AddTo(builder,
                       options_.cq_threads > 0
                           ? options_.cq_threads
                           : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    token_service_.RegisterWith(builder, main_queues_);
    admin_service_.RegisterWith(builder, main_queues_);
    health_.RegisterWith(builder, main_queues_);
    main_ = builder.BuildAndStart();
    if (main_ == nullptr || port_ == 0) {
      return absl::UnavailableError(
          absl::StrCat("cannot listen for gRPC on ", options_.listen, " (address in use?)"));
    }
    main_queues_.Start();

    grpc::ServerBuilder probe_builder;
    probe_builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    probe_builder.SetOption(std::make_unique<WithoutReflection>());
    probe_queues_.AddTo(probe_builder, 1);
    health_.RegisterWith(probe_builder, probe_queues_);
    probe_builder.AddListeningPort(options_.probe_listen, grpc::InsecureServerCredentials(),
                                   &probe_port_);
    probe_ = probe_builder.BuildAndStart();
    if (probe_ == nullptr || probe_port_ == 0) {
      return absl::UnavailableError(absl::StrCat("cannot listen for gRPC probes on ",
                                                 options_.probe_listen, " (address in use?)"));
    }
    probe_queues_.Start();
    health_.SetServing(kLivenessService, true);
    health_.SetServing(kStoreService, true);
    health_.SetServing("", false);
    health_.SetServing(kTokenBrokerService, false);
    spdlog::info("gRPC listening on {} (port {}, {}), probes on {} (port {})", options_.listen,
                 port_,
                 !options_.tls                          ? "plaintext"
                 : options_.tls->client_ca_file.empty() ? "TLS"
                                                        : "TLS, client certificates",
                 options_.probe_listen, probe_port_);
    return absl::OkStatus();
  }

  void SetReady(bool ready) {
    MutexLock lock(&mu_);
    if (shut_down_) {
      return;
    }
    ready_ = ready;
    health_.SetServing("", ready);
    health_.SetServing(kTokenBrokerService, ready);
  }

  bool ready() const {
    MutexLock lock(&mu_);
    return ready_;
  }

  void SetHealth(const std::string& service, bool serving) {
    {
      MutexLock lock(&mu_);
      if (shut_down_) {
        return;
      }
    }
    health_.SetServing(service, serving);
  }

  void Shutdown(absl::Time deadline) {
    {
      MutexLock lock(&mu_);
      if (shut_down_) {
        return;
      }
      shut_down_ = true;
      ready_ = false;
    }
    health_.SetServing("", false);
    health_.SetServing(kTokenBrokerService, false);
    // The streams end and the waiting calls are answered first: the server's Shutdown would
    // wait its whole deadline for them, then cancel them. In-flight unary calls finish.
    health_.Shutdown();
    token_service_.Shutdown();
    const auto d = absl::ToChronoTime(deadline);
    if (main_ != nullptr) {
      main_->Shutdown(d);
    }
    main_queues_.Shutdown();
    if (probe_ != nullptr) {
      probe_->Shutdown(d);
    }
    probe_queues_.Shutdown();
  }

  int port() const { return port_; }
  int probe_port() const { return probe_port_; }

 private:
  const GrpcServerOptions options_;
  RpcMetrics rpc_metrics_;  // shared by the services (one family per metric name)
  const std::unique_ptr<auth::Authorizer> allow_all_;  // when the domain brings none
  auth::Authorizer& authorizer_;
  HealthService health_;
  TokenService token_service_;
  AdminService admin_service_;
  // Before the servers: freed after them.
  cq::Queues main_queues_{"grpc-cq"};
  // Probes are seconds apart and may wait 20 ms; the main port's load may not pay for them.
  cq::Queues probe_queues_{"grpc-probe", absl::Milliseconds(20)};
  std::unique_ptr<grpc::Server> main_;
  std::unique_ptr<grpc::Server> probe_;
  int port_ = 0;
  int probe_port_ = 0;

  mutable Mutex mu_;
  bool ready_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

absl::StatusOr<std::unique_ptr<GrpcServer>> GrpcServer::Start(const GrpcServerOptions& options,
                                                              GrpcDomain domain) {
  auto impl = std::make_unique<Impl>(options, std::move(domain));
  if (absl::Status s = impl->Start(); !s.ok()) {
    impl->Shutdown(absl::Now());
    return s;
  }
  return std::unique_ptr<GrpcServer>(new GrpcServer(std::move(impl)));
}

GrpcServer::GrpcServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GrpcServer::~GrpcServer() { impl_->Shutdown(absl::Now()); }
int GrpcServer::port() const { return impl_->port(); }
int GrpcServer::probe_port() const { return impl_->probe_port(); }
void GrpcServer::SetReady(bool ready) { impl_->SetReady(ready); }
void GrpcServer::SetHealth(const std::string& service, bool serving) {
  impl_->SetHealth(service, serving);
}
bool GrpcServer::ready() const { return impl_->ready(); }
void GrpcServer::Shutdown(absl::Time deadline) { impl_->Shutdown(deadline); }

}  // namespace tb::grpc_api
