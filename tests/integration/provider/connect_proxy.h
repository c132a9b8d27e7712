#ifndef TB_TESTS_INTEGRATION_PROVIDER_CONNECT_PROXY_H_
#define TB_TESTS_INTEGRATION_PROVIDER_CONNECT_PROXY_H_

// A tiny HTTP CONNECT proxy for tests: plain TCP on 127.0.0.1:0, reads
// "CONNECT host:port HTTP/1.1", connects there (or to a fixed 127.0.0.1 port when told to),
// answers "200 Connection Established" and pipes bytes both ways until either side closes.
// Thread-safe; one thread per tunnel.

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "server/src/common/mutex.h"

namespace tb::testing {

class ConnectProxy {
 public:
  // `redirect_port`: when set, every tunnel goes to 127.0.0.1:redirect_port whatever CONNECT
  // named (to present a certificate for another host name). `answer_status`: the status sent to
  // CONNECT; anything but 200 refuses the tunnel.
  explicit ConnectProxy(std::optional<uint16_t> redirect_port = std::nullopt,
                        int answer_status = 200);
  ~ConnectProxy();  // closes every socket and joins every thread
  ConnectProxy(const ConnectProxy&) = delete;
  ConnectProxy& operator=(const ConnectProxy&) = delete;

  bool ok() const { return listen_fd_ >= 0; }
  uint16_t port() const { return port_; }
  std::string url() const;  // "http://127.0.0.1:<port>"
  // The "host:port" of every CONNECT request so far.
  std::vector<std::string> targets() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void AcceptLoop() ABSL_LOCKS_EXCLUDED(mu_);
  void Serve(int client_fd) ABSL_LOCKS_EXCLUDED(mu_);
  void Track(int fd) ABSL_LOCKS_EXCLUDED(mu_);

  const std::optional<uint16_t> redirect_port_;
  const int answer_status_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread acceptor_;

  mutable Mutex mu_;
  std::vector<std::string> targets_ ABSL_GUARDED_BY(mu_);
  std::vector<int> open_fds_ ABSL_GUARDED_BY(mu_);  // shut down on destruction
  std::vector<std::thread> workers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tb::testing

#endif  // TB_TESTS_INTEGRATION_PROVIDER_CONNECT_PROXY_H_
