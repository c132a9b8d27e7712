#include "tests/client/blackhole_proxy.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace tb::testing {
namespace {

sockaddr_in Loopback(int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

}  // namespace

BlackholeProxy::BlackholeProxy(int target_port) : target_port_(target_port) {
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a = Loopback(0);
  socklen_t len = sizeof(a);
  if (listen_fd_ < 0 || ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::listen(listen_fd_, 16) != 0 ||
      ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    std::abort();  // a test machine without loopback sockets cannot run these tests
  }
  port_ = ntohs(a.sin_port);
  acceptor_ = std::thread([this] { AcceptLoop(); });
}

BlackholeProxy::~BlackholeProxy() {
  stopping_ = true;
  ::shutdown(listen_fd_, SHUT_RDWR);  // wakes accept()
  acceptor_.join();
  std::vector<std::thread> pumps;
  {
    MutexLock lock(&mu_);
    for (const auto& l : links_) {
      ::shutdown(l->client_fd, SHUT_RDWR);  // wakes both pumps' read()
      ::shutdown(l->server_fd, SHUT_RDWR);
    }
    pumps = std::move(pumps_);
  }
  for (auto& t : pumps) {
    t.join();
  }
  MutexLock lock(&mu_);
  for (const auto& l : links_) {
    ::close(l->client_fd);
    ::close(l->server_fd);
  }
  ::close(listen_fd_);
}

void BlackholeProxy::SwallowOpenConnections() {
  MutexLock lock(&mu_);
  for (const auto& l : links_) {
    l->swallow = true;
  }
}

void BlackholeProxy::AcceptLoop() {
  for (;;) {
    const int client = ::accept(listen_fd_, nullptr, nullptr);
    if (client < 0) {
      return;  // shut down
    }
    const int server = ::socket(AF_INET, SOCK_STREAM, 0);
    const sockaddr_in to = Loopback(target_port_);
    if (server < 0 || ::connect(server, reinterpret_cast<const sockaddr*>(&to), sizeof(to)) != 0) {
      ::close(client);
      if (server >= 0) {
        ::close(server);
      }
      continue;
    }
    auto link = std::make_shared<Link>();
    link->client_fd = client;
    link->server_fd = server;
    accepted_.fetch_add(1);
    MutexLock lock(&mu_);
    if (stopping_) {
      ::close(client);
      ::close(server);
      return;
    }
    links_.push_back(link);
    pumps_.emplace_back([link] { Pump(link->client_fd, link->server_fd, link); });
    pumps_.emplace_back([link] { Pump(link->server_fd, link->client_fd, link); });
  }
}

void BlackholeProxy::Pump(int from, int to, const std::shared_ptr<Link>& link) {
  char buf[16384];
  for (;;) {
    const ssize_t n = ::read(from, buf, sizeof(buf));
    if (n <= 0) {
      if (!link->swallow) {
        ::shutdown(to, SHUT_WR);  // pass the end on; a vanished peer sends none
      }
      return;
    }
    if (link->swallow) {
      continue;
    }
    for (ssize_t off = 0; off < n;) {
      const ssize_t w = ::send(to, buf + off, static_cast<size_t>(n - off), MSG_NOSIGNAL);
      if (w <= 0) {
        return;
      }
      off += w;
    }
  }
}

}  // namespace tb::testing
