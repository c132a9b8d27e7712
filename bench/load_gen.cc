// load_gen: a closed-loop (or paced) async gRPC load generator for TokenBroker/GetToken
// (issue 8). It drives the broker and bench/echo_server alike: same method, same messages.
//
//   load_gen --target=127.0.0.1:8443 --tls --ca_file=ca.pem --api_key_file=key
//            --channels=1 --inflight=16 --duration=10s --warmup=2s --connections=1000
//
// Model: --threads completion queues, one thread each; --inflight calls in flight in total,
// spread round-robin over the threads and over --channels channels (each channel its own TCP
// connection: a local subchannel pool). A call that completes starts the next one on the same
// slot at once (closed loop), or, with --rate, at the slot's next scheduled time. Every call
// carries a deadline and, with --api_key_file, `authorization: Bearer <key>`, as
// tokenbroker::Client sends it.
//
// Only calls that complete inside the measured window (after --warmup, for --duration) count.
// Latency is from StartCall to the Finish tag, in a log-linear histogram (< 1% error).
//
// --watchers=N opens N WatchToken streams (on --watch_channels channels of their own, over the
// connection ids) before the warmup and keeps reading them; the run waits until each has its
// first token. --check validates every OK answer (valid_for > 0, valid_until and expires_at in
// the future on this host's clock, a non-empty access token, generations never going backwards
// per connection) and counts violations. --generations_out writes "<id> <max generation>" lines.
//
// Output: one human line, or with --json one JSON object:
//   {"rps":..., "calls":..., "errors":..., "p50_us":..., "p99_us":..., "p999_us":...,
//    "max_us":..., "cpu_us_per_call":..., ...}
// Exit status 1 when any call failed or any check was violated (the numbers are still printed).

#include <grpcpp/alarm.h>
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/src/common/absl_mutex_mode.h"
#include "tokenbroker/v1/token_broker.grpc.pb.h"

ABSL_FLAG(std::string, target, "127.0.0.1:8443", "host:port of the server");
ABSL_FLAG(bool, tls, false, "TLS (SslCredentials, as tokenbroker::Client uses)");
ABSL_FLAG(std::string, ca_file, "", "CA certificate (PEM) the server's chains to; implies --tls");
ABSL_FLAG(std::string, server_name, "", "TLS host name to verify, if not the target's host");
ABSL_FLAG(std::string, api_key_file, "", "API key sent as authorization: Bearer <key>");
ABSL_FLAG(int, channels, 1, "channels (TCP connections) for GetToken");
ABSL_FLAG(int, inflight, 16, "GetToken calls in flight, in total");
ABSL_FLAG(int, threads, 2, "client completion queues, one thread each");
ABSL_FLAG(absl::Duration, duration, absl::Seconds(10), "measured window");
ABSL_FLAG(absl::Duration, warmup, absl::Seconds(2), "unmeasured run before the window");
ABSL_FLAG(absl::Duration, deadline, absl::Seconds(5), "deadline of every call");
ABSL_FLAG(double, rate, 0, "calls per second in total; 0: closed loop (as fast as answered)");
ABSL_FLAG(std::string, id_format, "bench-%06d", "connection ids: absl::StrFormat pattern of i");
ABSL_FLAG(int, connections, 1, "ids 0..N-1 of --id_format, visited in turn by each slot");
ABSL_FLAG(int, id_offset, 0, "first id number");
ABSL_FLAG(int, watchers, 0, "WatchToken streams held open during the run");
ABSL_FLAG(int, watch_channels, 8, "channels for the WatchToken streams");
ABSL_FLAG(bool, check, false, "validate every answer (see the file comment)");
ABSL_FLAG(bool, sweep, false,
          "ask for every connection id exactly once, then stop (no warmup; --duration caps it)");
ABSL_FLAG(std::string, generations_out, "", "with --check: write '<id> <max generation>' lines");
ABSL_FLAG(bool, json, false, "print one JSON object");
ABSL_FLAG(std::string, label, "", "free text copied into the output");

namespace {

namespace v1 = tokenbroker::v1;
using Clock = std::chrono::steady_clock;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

// Log-linear histogram of nanoseconds: 128 sub-buckets per power of two (< 0.8% error).
class Histogram {
 public:
  static constexpr int kSub = 7;
  void Add(int64_t ns) {
    ++buckets_[Index(static_cast<uint64_t>(std::max<int64_t>(ns, 1)))];
    ++count_;
    max_ = std::max(max_, ns);
  }
  void Merge(const Histogram& o) {
    for (size_t i = 0; i < buckets_.size(); ++i) {
      buckets_[i] += o.buckets_[i];
    }
    count_ += o.count_;
    max_ = std::max(max_, o.max_);
  }
  uint64_t count() const { return count_; }
  int64_t max() const { return max_; }
  // The value at quantile q (0..1), as the midpoint of its bucket.
  double Quantile(double q) const {
    if (count_ == 0) {
      return 0;
    }
    const uint64_t rank = static_cast<uint64_t>(std::ceil(q * static_cast<double>(count_)));
    uint64_t seen = 0;
    for (size_t i = 0; i < buckets_.size(); ++i) {
      seen += buckets_[i];
      if (seen >= std::max<uint64_t>(rank, 1)) {
        return Mid(i);
      }
    }
    return static_cast<double>(max_);
  }

 private:
  static size_t Index(uint64_t v) {
    if (v < (1u << kSub)) {
      return v;
    }
    const int msb = 63 - __builtin_clzll(v);
    const int shift = msb - kSub;
    return (static_cast<size_t>(shift + 1) << kSub) + ((v >> shift) & ((1u << kSub) - 1));
  }
  static double Mid(size_t i) {
    if (i < (1u << kSub)) {
      return static_cast<double>(i);
    }
    const int shift = static_cast<int>(i >> kSub) - 1;
    const uint64_t base = (uint64_t{1} << (shift + kSub)) + ((i & ((1u << kSub) - 1)) << shift);
    return static_cast<double>(base) + static_cast<double>(uint64_t{1} << shift) / 2.0;
  }
  std::vector<uint64_t> buckets_ = std::vector<uint64_t>((64 - kSub + 1) << kSub, 0);
  uint64_t count_ = 0;
  int64_t max_ = 0;
};

struct Options {
  std::string api_key;
  std::vector<std::string> ids;
  absl::Duration deadline;
  bool check = false;
  double interval_ns = 0;  // per slot, with --rate
  // --sweep: the next id to ask for, shared by every slot; null otherwise.
  std::atomic<size_t>* sweep_next = nullptr;
};

// What the measured window saw, per thread (merged at the end).
struct Tally {
  Histogram latency;
  uint64_t ok = 0;
  uint64_t errors = 0;
  uint64_t violations = 0;
  std::map<int, uint64_t> codes;  // non-OK status codes
  std::string first_error;
  std::string first_violation;
  absl::flat_hash_map<std::string, uint64_t> max_generation;
};

// The window, shared by every thread.
struct Window {
  std::atomic<int64_t> start_ns{INT64_MAX};
  std::atomic<int64_t> end_ns{INT64_MAX};
  std::atomic<bool> stopping{false};
};

class Worker;

// One event on a worker's CQ.
struct Tag {
  virtual ~Tag() = default;
  virtual void On(bool ok) = 0;
};

// One slot: a GetToken in flight at a time.
class Slot final : public Tag {
 public:
  Slot(Worker& w, v1::TokenBroker::Stub* stub, size_t first_id)
      : worker_(w), stub_(stub), next_id_(first_id) {}
  void Start();
  void On(bool ok) override;

 private:
  void Issue();
  Worker& worker_;
  v1::TokenBroker::Stub* const stub_;
  size_t next_id_;
  std::optional<grpc::ClientContext> ctx_;
  v1::GetTokenRequest request_;
  v1::GetTokenResponse response_;
  grpc::Status status_;
  std::unique_ptr<grpc::ClientAsyncResponseReader<v1::GetTokenResponse>> reader_;
  int64_t started_ns_ = 0;
  double due_ns_ = 0;  // paced: when the next call is due
  bool waiting_alarm_ = false;
  grpc::Alarm alarm_;
};

// One WatchToken stream, read until cancelled.
class Watcher final : public Tag {
 public:
  Watcher(Worker& w, v1::TokenBroker::Stub* stub, std::string id)
      : worker_(w), stub_(stub), id_(std::move(id)) {}
  void Start();
  void Cancel() { ctx_.TryCancel(); }
  void On(bool ok) override;
  bool finished() const { return state_ == State::kFinished; }

 private:
  enum class State { kStarting, kReading, kFinishing, kFinished };
  Worker& worker_;
  v1::TokenBroker::Stub* const stub_;
  const std::string id_;
  grpc::ClientContext ctx_;
  v1::WatchTokenRequest request_;
  v1::WatchTokenResponse response_;
  grpc::Status status_;
  std::unique_ptr<grpc::ClientAsyncReader<v1::WatchTokenResponse>> reader_;
  State state_ = State::kStarting;
  bool got_first_ = false;
};

class Worker {
 public:
  Worker(const Options& o, Window& w) : options_(o), window_(w) {}

  void AddSlot(v1::TokenBroker::Stub* stub, size_t first_id) {
    slots_.push_back(std::make_unique<Slot>(*this, stub, first_id));
  }
  void AddWatcher(v1::TokenBroker::Stub* stub, std::string id) {
    watchers_.push_back(std::make_unique<Watcher>(*this, stub, std::move(id)));
  }

  void StartWatchers() {
    for (auto& w : watchers_) {
      w->Start();
    }
  }
  void StartSlots() {
    for (auto& s : slots_) {
      s->Start();
    }
  }
  void Run() {
    void* tag = nullptr;
    bool ok = false;
    while (cq_.Next(&tag, &ok)) {
      static_cast<Tag*>(tag)->On(ok);
      MaybeShutdown();
    }
  }
  // Called by the main thread at the end of the run: stop starting calls, cancel streams.
  // Every slot has a call or an alarm pending and every open stream is cancelled here, so each
  // yields one more event, on which MaybeShutdown sees the end. A worker with neither has no
  // events to wait for.
  void Stop() {
    for (auto& w : watchers_) {
      w->Cancel();
    }
    MaybeShutdown();
  }

  grpc::CompletionQueue* cq() { return &cq_; }
  const Options& options() const { return options_; }
  Window& window() { return window_; }
  Tally& tally() { return tally_; }
  std::atomic<uint64_t>& watch_messages() { return watch_messages_; }
  std::atomic<int>& watchers_ready() { return watchers_ready_; }
  std::atomic<uint64_t>& watch_errors() { return watch_errors_; }

  void SlotIdle() { ++idle_slots_; }
  void WatcherFinished() { ++finished_watchers_; }
  size_t idle_slots() const { return idle_slots_.load(); }
  size_t slots() const { return slots_.size(); }

 private:
  // From the worker's thread after each event, and from the main thread in Stop().
  void MaybeShutdown() {
    if (window_.stopping.load() && idle_slots_.load() == slots_.size() &&
        finished_watchers_.load() == watchers_.size() && !shut_.exchange(true)) {
      cq_.Shutdown();
    }
  }

  const Options& options_;
  Window& window_;
  grpc::CompletionQueue cq_;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<std::unique_ptr<Watcher>> watchers_;
  Tally tally_;
  std::atomic<size_t> idle_slots_{0};
  std::atomic<size_t> finished_watchers_{0};
  std::atomic<bool> shut_{false};
  std::atomic<uint64_t> watch_messages_{0};
  std::atomic<uint64_t> watch_errors_{0};
  std::atomic<int> watchers_ready_{0};
};

void Slot::Start() {
  due_ns_ = static_cast<double>(NowNs());
  Issue();
}

void Slot::Issue() {
  const Options& o = worker_.options();
  if (o.sweep_next != nullptr) {
    next_id_ = o.sweep_next->fetch_add(1);
    if (next_id_ >= o.ids.size()) {
      worker_.SlotIdle();
      return;
    }
  }
  ctx_.emplace();
  ctx_->set_deadline(absl::ToChronoTime(absl::Now() + o.deadline));
  if (!o.api_key.empty()) {
    ctx_->AddMetadata("authorization", o.api_key);
  }
  request_.set_connection_id(o.ids[next_id_]);
  next_id_ = next_id_ + 1 == o.ids.size() ? 0 : next_id_ + 1;
  response_.Clear();
  started_ns_ = NowNs();
  reader_ = stub_->PrepareAsyncGetToken(&*ctx_, request_, worker_.cq());
  reader_->StartCall();
  reader_->Finish(&response_, &status_, this);
}

void Slot::On(bool) {
  if (waiting_alarm_) {
    waiting_alarm_ = false;
    if (worker_.window().stopping.load()) {
      worker_.SlotIdle();
      return;
    }
    Issue();
    return;
  }
  const int64_t done = NowNs();
  Window& w = worker_.window();
  if (done >= w.start_ns.load(std::memory_order_relaxed) &&
      done < w.end_ns.load(std::memory_order_relaxed)) {
    Tally& t = worker_.tally();
    t.latency.Add(done - started_ns_);
    if (status_.ok()) {
      ++t.ok;
    } else {
      ++t.errors;
      ++t.codes[status_.error_code()];
      if (t.first_error.empty()) {
        t.first_error = absl::StrCat(status_.error_code(), " ", status_.error_message());
      }
    }
  }
  if (status_.ok() && worker_.options().check) {
    // Checked in warmup too: a violation is a violation.
    Tally& t = worker_.tally();
    const v1::Token& tok = response_.token();
    const int64_t now_s = absl::ToUnixSeconds(absl::Now());
    std::string why;
    if (tok.access_token().empty()) {
      why = "empty access token";
    } else if (tok.has_valid_for() &&
               (tok.valid_for().seconds() < 0 ||
                (tok.valid_for().seconds() == 0 && tok.valid_for().nanos() <= 0))) {
      why = "valid_for not positive";
    } else if (tok.has_valid_until() && tok.valid_until().seconds() < now_s) {
      // whole seconds: valid_until is in the past by more than the clock's resolution
      why = "valid_until in the past";
    } else if (tok.has_expires_at() && tok.expires_at().seconds() < now_s) {
      why = "expires_at in the past";
    }
    uint64_t& g = t.max_generation[request_.connection_id()];
    if (why.empty() && tok.generation() < g) {
      why = absl::StrCat("generation went back from ", g, " to ", tok.generation());
    }
    g = std::max<uint64_t>(g, tok.generation());
    if (!why.empty()) {
      ++t.violations;
      if (t.first_violation.empty()) {
        t.first_violation = absl::StrCat(request_.connection_id(), ": ", why);
      }
    }
  }
  if (w.stopping.load()) {
    worker_.SlotIdle();
    return;
  }
  const Options& o = worker_.options();
  if (o.interval_ns > 0) {
    due_ns_ += o.interval_ns;
    const double wait = due_ns_ - static_cast<double>(NowNs());
    if (wait > 0) {
      waiting_alarm_ = true;
      alarm_.Set(
          worker_.cq(),
          std::chrono::system_clock::now() + std::chrono::nanoseconds(static_cast<int64_t>(wait)),
          this);
      return;
    }
    due_ns_ = static_cast<double>(NowNs());  // behind: do not burst to catch up
  }
  Issue();
}

void Watcher::Start() {
  if (!worker_.options().api_key.empty()) {
    ctx_.AddMetadata("authorization", worker_.options().api_key);
  }
  request_.set_connection_id(id_);
  reader_ = stub_->PrepareAsyncWatchToken(&ctx_, request_, worker_.cq());
  reader_->StartCall(this);
}

void Watcher::On(bool ok) {
  switch (state_) {
    case State::kStarting:
    case State::kReading:
      if (ok) {
        if (state_ == State::kReading) {
          worker_.watch_messages().fetch_add(1, std::memory_order_relaxed);
          if (!got_first_) {
            got_first_ = true;
            worker_.watchers_ready().fetch_add(1);
          }
        }
        state_ = State::kReading;
        reader_->Read(&response_, this);
        return;
      }
      state_ = State::kFinishing;
      reader_->Finish(&status_, this);
      return;
    case State::kFinishing:
      state_ = State::kFinished;
      if (!status_.ok() && status_.error_code() != grpc::StatusCode::CANCELLED) {
        worker_.watch_errors().fetch_add(1);
        if (!got_first_) {
          std::fprintf(stderr, "load_gen: WatchToken %s ended: %d %s\n", id_.c_str(),
                       status_.error_code(), status_.error_message().c_str());
        }
      }
      worker_.WatcherFinished();
      return;
    case State::kFinished:
      return;
  }
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    std::fprintf(stderr, "load_gen: cannot read %s\n", path.c_str());
    std::exit(2);
  }
  std::stringstream s;
  s << in.rdbuf();
  std::string v = s.str();
  while (!v.empty() && (v.back() == '\n' || v.back() == '\r')) {
    v.pop_back();
  }
  return v;
}

std::shared_ptr<grpc::Channel> MakeChannel(int index, const std::string& role) {
  grpc::ChannelArguments args;
  // Each channel its own subchannel, hence its own TCP connection.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetString("tb.bench.channel", absl::StrCat(role, index));
  if (const std::string name = absl::GetFlag(FLAGS_server_name); !name.empty()) {
    args.SetSslTargetNameOverride(name);
  }
  std::shared_ptr<grpc::ChannelCredentials> creds;
  const std::string ca = absl::GetFlag(FLAGS_ca_file);
  if (absl::GetFlag(FLAGS_tls) || !ca.empty()) {
    grpc::SslCredentialsOptions ssl;
    if (!ca.empty()) {
      ssl.pem_root_certs = ReadFile(ca);
    }
    creds = grpc::SslCredentials(ssl);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  return grpc::CreateCustomChannel(absl::GetFlag(FLAGS_target), creds, args);
}

// For the JSON output: messages may hold quotes or control characters.
std::string JsonEscape(const std::string& in) {
  std::string out;
  for (const char c : in) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
    } else {
      out += c;
    }
  }
  return out;
}

double CpuSeconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  tb::UseReleaseAbslMutexMode();
  absl::ParseCommandLine(argc, argv);
  Options o;
  if (const std::string f = absl::GetFlag(FLAGS_api_key_file); !f.empty()) {
    o.api_key = absl::StrCat("Bearer ", ReadFile(f));
  }
  const auto format = absl::ParsedFormat<'d'>::New(absl::GetFlag(FLAGS_id_format));
  if (format == nullptr) {
    std::fprintf(stderr, "load_gen: --id_format must take one %%d\n");
    return 2;
  }
  const int n_ids = std::max(1, absl::GetFlag(FLAGS_connections));
  for (int i = 0; i < n_ids; ++i) {
    o.ids.push_back(absl::StrFormat(*format, i + absl::GetFlag(FLAGS_id_offset)));
  }
  o.deadline = absl::GetFlag(FLAGS_deadline);
  o.check = absl::GetFlag(FLAGS_check);
  const int inflight = std::max(1, absl::GetFlag(FLAGS_inflight));
  if (const double rate = absl::GetFlag(FLAGS_rate); rate > 0) {
    o.interval_ns = 1e9 * inflight / rate;
  }
  std::atomic<size_t> sweep_next{0};
  const bool sweep = absl::GetFlag(FLAGS_sweep);
  if (sweep) {
    o.sweep_next = &sweep_next;
  }
  const int n_threads = std::max(1, absl::GetFlag(FLAGS_threads));
  const int n_channels = std::max(1, absl::GetFlag(FLAGS_channels));

  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<v1::TokenBroker::Stub>> stubs;
  for (int i = 0; i < n_channels; ++i) {
    channels.push_back(MakeChannel(i, "get"));
    stubs.push_back(v1::TokenBroker::NewStub(channels.back()));
  }
  for (auto& ch : channels) {
    if (!ch->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
      std::fprintf(stderr, "load_gen: cannot connect to %s\n", absl::GetFlag(FLAGS_target).c_str());
      return 2;
    }
  }

  Window window;
  std::vector<std::unique_ptr<Worker>> workers;
  for (int i = 0; i < n_threads; ++i) {
    workers.push_back(std::make_unique<Worker>(o, window));
  }
  for (int s = 0; s < inflight; ++s) {
    // Slots start at spread-out ids so that concurrent calls ask for different connections.
    workers[s % n_threads]->AddSlot(stubs[s % n_channels].get(),
                                    static_cast<size_t>(s) * o.ids.size() / inflight);
  }
  const int n_watchers = std::max(0, absl::GetFlag(FLAGS_watchers));
  std::vector<std::shared_ptr<grpc::Channel>> watch_channels;
  std::vector<std::unique_ptr<v1::TokenBroker::Stub>> watch_stubs;
  if (n_watchers > 0) {
    for (int i = 0; i < std::max(1, absl::GetFlag(FLAGS_watch_channels)); ++i) {
      watch_channels.push_back(MakeChannel(i, "watch"));
      watch_stubs.push_back(v1::TokenBroker::NewStub(watch_channels.back()));
    }
    for (int i = 0; i < n_watchers; ++i) {
      workers[i % n_threads]->AddWatcher(watch_stubs[i % watch_stubs.size()].get(),
                                         o.ids[i % o.ids.size()]);
    }
  }

  std::vector<std::thread> threads;
  for (auto& w : workers) {
    threads.emplace_back([&w] { w->Run(); });
  }
  for (auto& w : workers) {
    w->StartWatchers();
  }
  if (n_watchers > 0) {
    const absl::Time give_up = absl::Now() + absl::Seconds(60);
    int ready = 0;
    uint64_t failed = 0;
    while (absl::Now() < give_up) {
      ready = 0;
      failed = 0;
      for (auto& w : workers) {
        ready += w->watchers_ready().load();
        failed += w->watch_errors().load();
      }
      if (ready + static_cast<int>(failed) >= n_watchers) {
        break;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    if (ready < n_watchers) {
      std::fprintf(stderr, "load_gen: only %d of %d WatchToken streams got their first token\n",
                   ready, n_watchers);
    }
  }

  const int64_t t0 = NowNs();
  const int64_t warmup = sweep ? 0 : absl::ToInt64Nanoseconds(absl::GetFlag(FLAGS_warmup));
  int64_t duration = absl::ToInt64Nanoseconds(absl::GetFlag(FLAGS_duration));
  window.start_ns = t0 + warmup;
  window.end_ns = sweep ? INT64_MAX : t0 + warmup + duration;
  for (auto& w : workers) {
    w->StartSlots();
  }
  absl::SleepFor(absl::Nanoseconds(warmup));
  // Markers for a driver that samples the server's CPU time over the same window.
  std::fprintf(stderr, "load_gen: window begins\n");
  std::fflush(stderr);
  const double cpu0 = CpuSeconds();
  uint64_t watch0 = 0;
  for (auto& w : workers) {
    watch0 += w->watch_messages().load();
  }
  if (sweep) {
    const int64_t cap = t0 + duration;
    for (;;) {
      size_t idle = 0;
      for (auto& w : workers) {
        idle += w->idle_slots();
      }
      if (idle == static_cast<size_t>(inflight) || NowNs() > cap) {
        break;
      }
      absl::SleepFor(absl::Milliseconds(5));
    }
    duration = NowNs() - t0;
  } else {
    absl::SleepFor(absl::Nanoseconds(duration));
  }
  std::fprintf(stderr, "load_gen: window ends\n");
  std::fflush(stderr);
  const double cpu1 = CpuSeconds();
  uint64_t watch1 = 0;
  for (auto& w : workers) {
    watch1 += w->watch_messages().load();
  }
  window.stopping = true;
  for (auto& w : workers) {
    w->Stop();
  }
  for (std::thread& t : threads) {
    t.join();
  }

  Tally all;
  for (auto& w : workers) {
    Tally& t = w->tally();
    all.latency.Merge(t.latency);
    all.ok += t.ok;
    all.errors += t.errors;
    all.violations += t.violations;
    for (const auto& [c, n] : t.codes) {
      all.codes[c] += n;
    }
    if (all.first_error.empty()) {
      all.first_error = t.first_error;
    }
    if (all.first_violation.empty()) {
      all.first_violation = t.first_violation;
    }
    for (const auto& [id, g] : t.max_generation) {
      uint64_t& m = all.max_generation[id];
      m = std::max(m, g);
    }
  }
  const double secs = static_cast<double>(duration) / 1e9;
  const double calls = static_cast<double>(all.latency.count());
  const double rps = calls / secs;
  const double cpu_per_call = calls > 0 ? (cpu1 - cpu0) * 1e6 / calls : 0;
  std::string codes;
  for (const auto& [c, n] : all.codes) {
    absl::StrAppend(&codes, codes.empty() ? "" : ",", "\"", c, "\":", n);
  }
  if (const std::string out = absl::GetFlag(FLAGS_generations_out); !out.empty()) {
    std::ofstream f(out);
    for (const auto& [id, g] : all.max_generation) {
      f << id << " " << g << "\n";
    }
  }
  auto us = [&](double q) { return all.latency.Quantile(q) / 1e3; };
  if (absl::GetFlag(FLAGS_json)) {
    std::printf(
        "{\"label\":\"%s\",\"channels\":%d,\"inflight\":%d,\"threads\":%d,\"watchers\":%d,"
        "\"seconds\":%.3f,\"rps\":%.1f,\"calls\":%.0f,\"ok\":%llu,\"errors\":%llu,"
        "\"codes\":{%s},\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,"
        "\"max_us\":%.1f,\"client_cpu_us_per_call\":%.2f,\"watch_messages\":%llu,"
        "\"violations\":%llu,\"first_error\":\"%s\",\"first_violation\":\"%s\"}\n",
        JsonEscape(absl::GetFlag(FLAGS_label)).c_str(), n_channels, inflight, n_threads, n_watchers,
        secs, rps, calls, static_cast<unsigned long long>(all.ok),
        static_cast<unsigned long long>(all.errors), codes.c_str(), us(0.5), us(0.9), us(0.99),
        us(0.999), static_cast<double>(all.latency.max()) / 1e3, cpu_per_call,
        static_cast<unsigned long long>(watch1 - watch0),
        static_cast<unsigned long long>(all.violations), JsonEscape(all.first_error).c_str(),
        JsonEscape(all.first_violation).c_str());
  } else {
    std::printf(
        "%s channels=%d inflight=%d rps=%.0f p50=%.0fus p99=%.0fus p999=%.0fus max=%.0fus "
        "errors=%llu violations=%llu client_cpu=%.1fus/call%s%s\n",
        absl::GetFlag(FLAGS_label).c_str(), n_channels, inflight, rps, us(0.5), us(0.99), us(0.999),
        static_cast<double>(all.latency.max()) / 1e3, static_cast<unsigned long long>(all.errors),
        static_cast<unsigned long long>(all.violations), cpu_per_call,
        all.first_error.empty() ? "" : " first_error=", all.first_error.c_str());
  }
  return all.errors > 0 || all.violations > 0 ? 1 : 0;
}
