#include "tests/integration/provider/connect_proxy.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace tb::testing {
namespace {

bool WriteAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
    if (n <= 0) {
      return false;
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

int ConnectTo(const std::string& host, const std::string& port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0) {
    return -1;
  }
  int fd = -1;
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    fd = ::socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0) {
      continue;
    }
    if (::connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
      break;
    }
    ::close(fd);
    fd = -1;
  }
  ::freeaddrinfo(res);
  return fd;
}

// Copies bytes both ways until both directions have ended or one fails.
void Pipe(int a, int b) {
  bool a_open = true;
  bool b_open = true;
  char buf[16384];
  while (a_open || b_open) {
    pollfd fds[2] = {{a, static_cast<short>(a_open ? POLLIN : 0), 0},
                     {b, static_cast<short>(b_open ? POLLIN : 0), 0}};
    if (::poll(fds, 2, 10'000) <= 0) {
      return;
    }
    for (int i = 0; i < 2; ++i) {
      const int from = i == 0 ? a : b;
      const int to = i == 0 ? b : a;
      bool& open = i == 0 ? a_open : b_open;
      if (!open || (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0) {
        continue;
      }
      const ssize_t n = ::recv(from, buf, sizeof(buf), 0);
      if (n < 0) {
        return;
      }
      if (n == 0) {
        open = false;
        ::shutdown(to, SHUT_WR);
        continue;
      }
      if (!WriteAll(to, buf, static_cast<size_t>(n))) {
        return;
      }
    }
  }
}

}  // namespace

ConnectProxy::ConnectProxy(std::optional<uint16_t> redirect_port, int answer_status)
    : redirect_port_(redirect_port), answer_status_(answer_status) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) {
    return;
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd, 16) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    return;
  }
  listen_fd_ = fd;
  port_ = ntohs(addr.sin_port);
  acceptor_ = std::thread([this] { AcceptLoop(); });
}

ConnectProxy::~ConnectProxy() {
  stopping_ = true;
  if (listen_fd_ >= 0) {
    ::shutdown(listen_fd_, SHUT_RDWR);  // wakes accept()
  }
  if (acceptor_.joinable()) {
    acceptor_.join();
  }
  std::vector<std::thread> workers;
  {
    MutexLock lock(&mu_);
    for (int fd : open_fds_) {
      ::shutdown(fd, SHUT_RDWR);  // wakes poll()/recv() in the workers
    }
    workers = std::move(workers_);
  }
  for (std::thread& t : workers) {
    t.join();
  }
  MutexLock lock(&mu_);
  for (int fd : open_fds_) {
    ::close(fd);
  }
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
  }
}

std::string ConnectProxy::url() const { return absl::StrCat("http://127.0.0.1:", port_); }

std::vector<std::string> ConnectProxy::targets() const {
  MutexLock lock(&mu_);
  return targets_;
}

void ConnectProxy::Track(int fd) {
  MutexLock lock(&mu_);
  open_fds_.push_back(fd);
}

void ConnectProxy::AcceptLoop() {
  while (!stopping_) {
    const int client = ::accept(listen_fd_, nullptr, nullptr);
    if (client < 0) {
      if (stopping_) {
        return;
      }
      continue;
    }
    MutexLock lock(&mu_);
    open_fds_.push_back(client);
    workers_.emplace_back([this, client] { Serve(client); });
  }
}

void ConnectProxy::Serve(int client) {
  // However a tunnel ends, both peers see it end now; the descriptors are closed by the
  // destructor (closing here could race with its shutdown() on a reused descriptor number).
  int upstream = -1;
  struct Ender {
    const int& client;
    const int& upstream;
    ~Ender() {
      ::shutdown(client, SHUT_RDWR);
      if (upstream >= 0) {
        ::shutdown(upstream, SHUT_RDWR);
      }
    }
  } ender{client, upstream};
  std::string head;
  char buf[4096];
  while (head.find("\r\n\r\n") == std::string::npos && head.size() < 8192) {
    const ssize_t n = ::recv(client, buf, sizeof(buf), 0);
    if (n <= 0) {
      return;
    }
    head.append(buf, static_cast<size_t>(n));
  }
  const size_t end = head.find("\r\n\r\n");
  if (end == std::string::npos) {
    return;
  }
  // "CONNECT host:port HTTP/1.1"
  const std::vector<std::string> words =
      absl::StrSplit(head.substr(0, head.find("\r\n")), ' ', absl::SkipEmpty());
  if (words.size() != 3 || words[0] != "CONNECT") {
    static constexpr char kBad[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
    WriteAll(client, kBad, sizeof(kBad) - 1);
    return;
  }
  const std::string& target = words[1];
  {
    MutexLock lock(&mu_);
    targets_.push_back(target);
  }
  if (answer_status_ != 200) {
    const std::string refuse =
        absl::StrCat("HTTP/1.1 ", answer_status_, " Refused\r\nContent-Length: 0\r\n\r\n");
    WriteAll(client, refuse.data(), refuse.size());
    return;
  }
  const size_t colon = target.rfind(':');
  std::string host = target.substr(0, colon);
  std::string port = colon == std::string::npos ? "443" : target.substr(colon + 1);
  if (host.size() > 1 && host.front() == '[') {
    host = host.substr(1, host.size() - 2);
  }
  if (redirect_port_) {
    host = "127.0.0.1";
    port = absl::StrCat(*redirect_port_);
  }
  upstream = ConnectTo(host, port);
  if (upstream < 0) {
    static constexpr char kBadGateway[] = "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n";
    WriteAll(client, kBadGateway, sizeof(kBadGateway) - 1);
    return;
  }
  Track(upstream);
  static constexpr char kOk[] = "HTTP/1.1 200 Connection Established\r\n\r\n";
  if (!WriteAll(client, kOk, sizeof(kOk) - 1)) {
    return;
  }
  // Bytes the client sent after the CONNECT head belong to the tunnel.
  const std::string early = head.substr(end + 4);
  if (!early.empty() && !WriteAll(upstream, early.data(), early.size())) {
    return;
  }
  Pipe(client, upstream);
}

}  // namespace tb::testing
