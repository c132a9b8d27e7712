#ifndef TB_TESTS_CLIENT_BLACKHOLE_PROXY_H_
#define TB_TESTS_CLIENT_BLACKHOLE_PROXY_H_

// A TCP proxy on 127.0.0.1 whose open connections can be made to swallow every byte in both
// directions without closing: what a peer that vanished (a node gone, a NAT entry dropped)
// looks like. Connections accepted later are forwarded normally. Plain POSIX sockets and a
// thread per direction: Asio would buy nothing for a test helper that moves a few kilobytes.

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "server/src/common/mutex.h"

namespace tb::testing {

class BlackholeProxy {
 public:
  // Forwards to 127.0.0.1:`target_port`.
  explicit BlackholeProxy(int target_port);
  ~BlackholeProxy();
  BlackholeProxy(const BlackholeProxy&) = delete;
  BlackholeProxy& operator=(const BlackholeProxy&) = delete;

  int port() const { return port_; }
  // From now on, every connection open now drops what it reads instead of forwarding it.
  void SwallowOpenConnections() ABSL_LOCKS_EXCLUDED(mu_);
  int accepted() const { return accepted_.load(); }

 private:
  struct Link {
    int client_fd = -1;
    int server_fd = -1;
    std::atomic<bool> swallow{false};
  };
  void AcceptLoop();
  static void Pump(int from, int to, const std::shared_ptr<Link>& link);

  const int target_port_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<int> accepted_{0};
  std::atomic<bool> stopping_{false};
  std::thread acceptor_;
  Mutex mu_;
  std::vector<std::shared_ptr<Link>> links_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> pumps_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tb::testing

#endif  // TB_TESTS_CLIENT_BLACKHOLE_PROXY_H_
