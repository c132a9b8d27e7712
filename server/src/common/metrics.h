#ifndef TB_COMMON_METRICS_H_
#define TB_COMMON_METRICS_H_

// tb::metrics: a small Prometheus client (text exposition format 0.0.4), standard library and
// Abseil only, so the domain can count what it does. Debian ships no C++ Prometheus client.
//
// Model
//   Registry           owns every metric family; Render() produces the /metrics body.
//   Family<T>          one metric name, help text and label names; WithLabels() finds or
//                      creates the child for one set of label values.
//   Counter            monotonically increasing integer (sharded per CPU, see below).
//   Gauge              a double that is Set() or Add()ed.
//   Histogram          fixed bucket bounds; Observe(value) (sharded per CPU).
//   Callback families  samples computed at scrape time by a callback ("connections by status",
//                      "seconds until the soonest expiry"); unregistered by a CallbackHandle.
//   PerStatusCode<T>   children of a family indexed by absl::StatusCode, so the gRPC hot path
//                      does no hash lookup and takes no lock.
//
// Example
//   metrics::Registry registry;  // one per process, created in main.cc, outlives every user
//   auto& requests = registry.AddCounterFamily(
//       "tb_grpc_requests_total", "gRPC requests handled, by method and code.",
//       {"method", "code"});
//   auto& latency = registry.AddHistogramFamily(
//       "tb_grpc_request_duration_seconds", "gRPC request latency, by method.", {"method"},
//       metrics::ExponentialBuckets(50e-6, 2, 16));  // 50 us .. 1.6 s
//
//   // In the service's constructor: resolve the children once and keep the pointers.
//   get_token_codes_ = metrics::StatusCodeCounters(requests, {"GetToken"});
//   get_token_latency_ = &latency.WithLabels({"GetToken"});
//   // On the hot path: no lock, no lookup, a few nanoseconds each.
//   get_token_codes_.Increment(status.code());
//   get_token_latency_->Observe(elapsed);  // absl::Duration, recorded in seconds
//
//   // Computed at scrape time; the handle unregisters the callback when destroyed.
//   handle_ = registry.AddCallbackFamily(
//       "tb_connections", "Connections by status.", metrics::MetricType::kGauge, {"status"},
//       [this](metrics::SampleSink& out) {
//         const Counts c = cache_.CountByStatus();
//         out.Add({"active"}, c.active);
//         out.Add({"needs_reauth"}, c.needs_reauth);
//       });
//
// How a hot-path caller holds a child
//   Call WithLabels() once (constructor, or first use of a new label value) and keep the
//   returned reference or pointer for as long as the Registry lives: children are never
//   removed or moved. WithLabels() takes the family's reader lock (one lock word that every
//   caller writes) and searches an ordered map (~35 ns), so it belongs on paths that run at most
//   a few thousand times a second (a refresh, a provider call), never on GetToken. For a label with
//   a small fixed set of values (the gRPC code), use PerStatusCode<T> or an array of pointers
//   resolved up front. Updates on a child (Increment, Set, Add, Observe) are lock-free relaxed
//   atomics.
//
// Cost (bench/metrics_bench.cc, Release, this 2-core Xeon; CPU time per update)
//   Counter::Increment 7 ns single-threaded, and still 7 ns per thread with 2 threads hammering
//   one counter, where one std::atomic shared by both costs 32 ns (5.5 ns alone): each counter
//   keeps one cache line per shard and a thread updates the shard of the CPU it runs on
//   (sched_getcpu(), answered from rseq by glibc 2.36 without a system call, ~1 ns), so cores
//   do not bounce a line. A thread that migrates between reading its CPU and updating at worst
//   shares a line for one update; nothing is lost (the cells are atomic). StatusCodeCounters
//   7 ns, Histogram::Observe 12 ns (bucket scan, one add, one sum CAS), Gauge::Add 10 ns (not
//   sharded), Render ~16-18 us for 50 counters, 10 histograms and 10 gauges (17 KB). Memory: 64
//   bytes per shard per counter, shards = CPUs rounded up to a power of two, capped at 16: 128
//   bytes per counter here, 1 KiB on a 16-core node; a histogram takes ceil((buckets + 2) / 8)
//   lines per shard. Value() and Render() sum the shards.
//
// Names and errors
//   Metric names must match [a-zA-Z_:][a-zA-Z0-9_:]*, label names [a-zA-Z_][a-zA-Z0-9_]*, and
//   label names starting with "__" are reserved; histograms may not use the label "le". A
//   family name (or, for a histogram, its _bucket/_sum/_count names) already registered, a
//   duplicate label name, unsorted or non-finite histogram bounds, or a WithLabels() call with
//   the wrong number of values are programming errors: they print a message to stderr and
//   abort, in every build type. Why not absl::StatusOr: names and label sets are literals in
//   our source, registered at startup, where STYLE.md makes errors fatal anyway, and any test
//   that constructs the component hits the abort; a StatusOr would make every instrumented
//   constructor fallible for a condition that cannot depend on input. Code that builds names
//   from data can check IsValidMetricName()/IsValidLabelName() first.
//   Label values may be any string; they are escaped at render time. Cardinality is the
//   caller's business: do not use unbounded values (connection ids) as labels unless the
//   operator asked for it in config.
//
// Thread-safety: everything here is thread-safe. Render() runs concurrently with updates,
// registrations and WithLabels(); it reads each value atomically but not a snapshot across
// values (a histogram's _sum may lag its _count by in-flight observations; _count always
// equals the +Inf bucket).

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "server/src/common/mutex.h"

#if defined(__linux__)
#include <sched.h>
#endif

namespace tb::metrics {

// The Content-Type of a Render() body.
inline constexpr absl::string_view kContentType = "text/plain; version=0.0.4; charset=utf-8";

enum class MetricType { kCounter, kGauge, kHistogram };

// Label values of one child, in the order of the family's label names. A braced list of
// string literals, std::strings or absl::string_views converts: family.WithLabels({"GetToken",
// code_name}).
using LabelValues = absl::Span<const absl::string_view>;

bool IsValidMetricName(absl::string_view name);
bool IsValidLabelName(absl::string_view name);  // false for the reserved "__" prefix too

// Bucket bounds. Both abort on count < 1 (and on start <= 0 or factor <= 1 for exponential).
// {start, start*factor, ..., start*factor^(count-1)}
std::vector<double> ExponentialBuckets(double start, double factor, int count);
// {start, start+width, ..., start+width*(count-1)}
std::vector<double> LinearBuckets(double start, double width, int count);
// Prometheus' default bounds, .005 .. 10 seconds: too coarse for sub-millisecond RPCs.
std::vector<double> DefaultBuckets();

template <typename T>
class Family;
class Registry;

namespace internal {

inline constexpr std::size_t kCacheLine = 64;

// One cache line of 8 counters; shards of a metric never share a line.
struct alignas(kCacheLine) Line {
  std::atomic<uint64_t> words[kCacheLine / sizeof(uint64_t)] = {};
};

// Number of per-CPU shards: CPUs rounded up to a power of two, at most 16. Computed once.
std::size_t ShardCount();
// Index of the fallback shard of the calling thread (when the CPU is unknown).
std::size_t ThreadShard();

// The shard of the calling thread, in [0, mask]. The current CPU when the kernel tells it
// (glibc >= 2.35 answers sched_getcpu() from rseq without a system call); threads may migrate
// between the read and the update, which costs at worst one contended update, never a lost one
// (the cells are atomics).
inline std::size_t ShardIndex(std::size_t mask) {
  if (mask == 0) {
    return 0;
  }
#if defined(__linux__)
  const int cpu = sched_getcpu();
  if (cpu >= 0) [[likely]] {
    return static_cast<std::size_t>(cpu) & mask;
  }
#endif
  return ThreadShard() & mask;
}

// Appends `value` as the text format writes floats: shortest round-trip decimal, "+Inf",
// "-Inf", "NaN".
void AppendDouble(std::string& out, double value);

// The common part of every family, for the Registry's list. Thread-safe.
class FamilyBase {
 public:
  FamilyBase(std::string name, std::string help, MetricType type,
             std::vector<std::string> label_names);
  virtual ~FamilyBase() = default;
  FamilyBase(const FamilyBase&) = delete;
  FamilyBase& operator=(const FamilyBase&) = delete;

  const std::string& name() const { return name_; }
  MetricType type() const { return type_; }
  const std::vector<std::string>& label_names() const { return label_names_; }

  // Appends "# HELP", "# TYPE" and every sample of this family to `out`.
  virtual void RenderTo(std::string& out) const = 0;

 protected:
  // Appends the "# HELP" and "# TYPE" lines.
  void AppendHeader(std::string& out) const;
  // Aborts unless `values` has one value per label name.
  void CheckArity(LabelValues values) const;

 private:
  const std::string name_;
  const std::string help_;
  const MetricType type_;
  const std::vector<std::string> label_names_;
};

// Ordered, transparent comparison so a lookup by string_views allocates nothing.
struct LabelValuesLess {
  using is_transparent = void;
  template <typename A, typename B>
  bool operator()(const A& a, const B& b) const {
    return std::lexicographical_compare(a.begin(), a.end(), b.begin(), b.end());
  }
};

class CallbackFamily;

// Only the Registry constructs families (it validates their names first).
class RegistryKey {
 private:
  friend class ::tb::metrics::Registry;
  RegistryKey() = default;
};

}  // namespace internal

// A monotonically increasing integer: requests, attempts, errors, hits. Values are integers
// because every counter we keep counts events; durations go to a Histogram's _sum.
// Thread-safe, lock-free. Obtained from a Registry or Family, never constructed directly.
class Counter {
 public:
  Counter(const Counter&) = delete;
  Counter& operator=(const Counter&) = delete;

  void Increment() { Increment(1); }
  void Increment(uint64_t n) {
    cells_[internal::ShardIndex(mask_)].words[0].fetch_add(n, std::memory_order_relaxed);
  }
  // The sum over the shards: exact once updates have stopped (tests, callbacks).
  uint64_t Value() const;

 private:
  template <typename T>
  friend class Family;
  Counter();

  const std::size_t mask_;
  std::unique_ptr<internal::Line[]> cells_;  // one line per shard, word 0 used
};

// A value that goes up and down: queue depth, last success time. Not sharded: Set() must be
// exact, and gauges are not on the per-request path. Thread-safe, lock-free.
class Gauge {
 public:
  Gauge(const Gauge&) = delete;
  Gauge& operator=(const Gauge&) = delete;

  void Set(double value);
  void Add(double delta);  // a compare-and-swap loop
  void Increment() { Add(1); }
  void Decrement() { Add(-1); }
  // Seconds since the Unix epoch, to the microsecond (absl::ToDoubleSeconds rounds worse).
  void SetToTime(absl::Time t) { Set(static_cast<double>(absl::ToUnixMicros(t)) / 1e6); }
  double Value() const;

 private:
  template <typename T>
  friend class Family;
  Gauge() = default;

  std::atomic<uint64_t> bits_{0};  // the double's bits; 0 is +0.0
};

// Counts observations into fixed buckets; renders cumulative `_bucket{le=...}` samples ending
// with `le="+Inf"`, then `_sum` and `_count`. A value v falls in the first bucket whose bound b
// has v <= b (bounds are inclusive, as Prometheus defines `le`); NaN falls in +Inf only and
// makes _sum NaN. Thread-safe, lock-free; sharded per CPU like Counter.
class Histogram {
 public:
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;

  void Observe(double value);
  // Records `d` in seconds, the Prometheus base unit (from whole nanoseconds: one correctly
  // rounded division, where absl::ToDoubleSeconds can be off in the last digit).
  void Observe(absl::Duration d) {
    Observe(static_cast<double>(absl::ToInt64Nanoseconds(d)) / 1e9);
  }

  // Totals over the shards, for tests: non-cumulative count of bucket i (i == bounds().size()
  // is the +Inf bucket), the count and the sum.
  uint64_t BucketCount(std::size_t i) const;
  uint64_t Count() const;
  double Sum() const;
  absl::Span<const double> bounds() const { return bounds_; }

 private:
  template <typename T>
  friend class Family;
  // `bounds` is owned by the family and outlives this histogram.
  explicit Histogram(absl::Span<const double> bounds);

  std::atomic<uint64_t>& Word(std::size_t shard, std::size_t i) const {
    return lines_[shard * lines_per_shard_ + i / 8].words[i % 8];
  }

  const absl::Span<const double> bounds_;
  const std::size_t mask_;
  const std::size_t lines_per_shard_;
  // Per shard: bounds_.size() + 1 bucket counts, then the sum (double bits).
  std::unique_ptr<internal::Line[]> lines_;
};

// One metric name with its children, one per set of label values. Thread-safe: WithLabels
// takes a reader lock on a hit and a writer lock to create; see the header comment for hot
// paths. Owned by the Registry; references stay valid as long as it does.
template <typename T>
class Family final : public internal::FamilyBase {
 public:
  // Returns the child for `values` (one per label name, aborting otherwise), creating it at
  // zero on first use. The reference stays valid for the Registry's lifetime.
  T& WithLabels(LabelValues values) ABSL_LOCKS_EXCLUDED(mu_);

  // Number of children created so far.
  std::size_t size() const ABSL_LOCKS_EXCLUDED(mu_);

  // For the Registry; use Registry::Add...Family.
  Family(internal::RegistryKey, std::string name, std::string help,
         std::vector<std::string> label_names, std::vector<double> bounds = {});

 private:
  void RenderTo(std::string& out) const override ABSL_LOCKS_EXCLUDED(mu_);

  const std::vector<double> bounds_;  // histograms only
  mutable SharedMutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<T>, internal::LabelValuesLess> children_
      ABSL_GUARDED_BY(mu_);
};

extern template class Family<Counter>;
extern template class Family<Gauge>;
extern template class Family<Histogram>;

using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;
using HistogramFamily = Family<Histogram>;

// The children of a family whose last label is a status code, indexed by absl::StatusCode, with
// the leading label values fixed (typically the gRPC method). The code label's value is
// absl::StatusCodeToString(code), gRPC's canonical name: "OK", "NOT_FOUND", "UNAVAILABLE".
// Codes outside 0..16 count as UNKNOWN, as gRPC treats them. A child is created on the first
// use of its code, so only codes that happened appear in /metrics; call At(absl::StatusCode::kOk)
// up front for a series that should read 0 from the start.
// Thread-safe, except moving: At()/Increment() are an acquire load and, after the first use of
// a code, take no lock. Holds a pointer to `family`, which must outlive it (the Registry does).
// Movable but not copyable, so a member can be default-constructed and assigned in a
// constructor body, before any other thread sees it.
template <typename T>
class PerStatusCode {
 public:
  static constexpr int kCodes = 17;  // absl::StatusCode::kOk .. kUnauthenticated

  PerStatusCode() = default;
  PerStatusCode(Family<T>& family, std::vector<std::string> leading_values);
  PerStatusCode(PerStatusCode&& other) noexcept { *this = std::move(other); }
  PerStatusCode& operator=(PerStatusCode&& other) noexcept;

  T& At(absl::StatusCode code) {
    const int i = Index(code);
    T* child = children_[i].load(std::memory_order_acquire);
    if (child == nullptr) [[unlikely]] {
      child = Create(i);
    }
    return *child;
  }

  // Counter only. A member template, so that instantiating PerStatusCode<Histogram> does not
  // instantiate it (clang 14 ignores a requires-clause in explicit instantiations).
  template <typename U = T>
  void Increment(absl::StatusCode code) {
    static_assert(std::is_same_v<U, Counter>, "Increment() is for counters; use At().Observe()");
    At(code).Increment();
  }

 private:
  static int Index(absl::StatusCode code) {
    const int i = static_cast<int>(code);
    return i >= 0 && i < kCodes ? i : static_cast<int>(absl::StatusCode::kUnknown);
  }
  T* Create(int i);

  Family<T>* family_ = nullptr;
  std::vector<std::string> leading_values_;
  // Written once per code; racing first uses resolve to the same child (WithLabels is
  // idempotent), so a plain store suffices.
  std::array<std::atomic<T*>, kCodes> children_ = {};
};

extern template class PerStatusCode<Counter>;
extern template class PerStatusCode<Histogram>;

using StatusCodeCounters = PerStatusCode<Counter>;
using StatusCodeHistograms = PerStatusCode<Histogram>;

// Receives the samples of a callback family at render time.
class SampleSink {
 public:
  // One sample: `values` must have one value per label name of the family; a sample with the
  // wrong number is dropped (and asserts in debug builds). Emit each label set once.
  void Add(LabelValues values, double value);

 private:
  friend class internal::CallbackFamily;
  SampleSink(const internal::CallbackFamily& family, std::string& out)
      : family_(family), out_(out) {}

  const internal::CallbackFamily& family_;
  std::string& out_;
};

// Keeps a callback family registered; destroying it (or Reset()) removes the family from the
// Registry and waits for a running invocation of its callback to finish, after which the
// callback is never called again and the name may be registered anew. So destroy the handle
// before whatever the callback reads, and never while holding a lock the callback takes, nor
// from inside the callback. Movable. The Registry must outlive it.
class [[nodiscard]] CallbackHandle {
 public:
  CallbackHandle() = default;
  ~CallbackHandle() { Reset(); }
  CallbackHandle(CallbackHandle&& other) noexcept;
  CallbackHandle& operator=(CallbackHandle&& other) noexcept;

  void Reset();

 private:
  friend class Registry;
  CallbackHandle(Registry* registry, std::shared_ptr<internal::CallbackFamily> family)
      : registry_(registry), family_(std::move(family)) {}

  Registry* registry_ = nullptr;
  std::shared_ptr<internal::CallbackFamily> family_;
};

// Owns the metric families of a process (or of a test). Families render in registration order,
// children in lexicographic order of their label values. Thread-safe. Must outlive every
// reference, pointer, PerStatusCode and CallbackHandle it handed out.
class Registry {
 public:
  Registry();
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // A metric without labels. Registration aborts on invalid or duplicate names (see above).
  Counter& AddCounter(absl::string_view name, absl::string_view help) ABSL_LOCKS_EXCLUDED(mu_);
  Gauge& AddGauge(absl::string_view name, absl::string_view help) ABSL_LOCKS_EXCLUDED(mu_);
  // `bounds`: strictly increasing finite upper bounds; a trailing +Inf is accepted and dropped.
  Histogram& AddHistogram(absl::string_view name, absl::string_view help,
                          std::vector<double> bounds) ABSL_LOCKS_EXCLUDED(mu_);

  // A family with the given label names; children come from WithLabels().
  CounterFamily& AddCounterFamily(absl::string_view name, absl::string_view help,
                                  std::vector<std::string> label_names) ABSL_LOCKS_EXCLUDED(mu_);
  GaugeFamily& AddGaugeFamily(absl::string_view name, absl::string_view help,
                              std::vector<std::string> label_names) ABSL_LOCKS_EXCLUDED(mu_);
  HistogramFamily& AddHistogramFamily(absl::string_view name, absl::string_view help,
                                      std::vector<std::string> label_names,
                                      std::vector<double> bounds) ABSL_LOCKS_EXCLUDED(mu_);

  // A gauge without labels whose value `value()` returns at each Render().
  CallbackHandle AddCallbackGauge(absl::string_view name, absl::string_view help,
                                  std::function<double()> value) ABSL_LOCKS_EXCLUDED(mu_);
  // A counter or gauge family (type kHistogram aborts) whose samples `collect` emits at each
  // Render(), e.g. connections by status. `collect` runs on the rendering thread, without the
  // Registry's lock (it may take its own locks, and may even register other metrics) but under
  // the family's own mutex, which is what lets CallbackHandle wait for it.
  CallbackHandle AddCallbackFamily(absl::string_view name, absl::string_view help, MetricType type,
                                   std::vector<std::string> label_names,
                                   std::function<void(SampleSink&)> collect)
      ABSL_LOCKS_EXCLUDED(mu_);

  // The text exposition format 0.0.4 of every family (serve it with kContentType). Takes the
  // Registry's lock only to copy the family list, then each family's lock while rendering it,
  // so it never blocks updates and blocks WithLabels() on one family at a time.
  std::string Render() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  friend class CallbackHandle;

  // Validates `family`'s names against the rules and the names taken, then appends it.
  void Insert(std::shared_ptr<internal::FamilyBase> family) ABSL_LOCKS_EXCLUDED(mu_);
  void Remove(const internal::FamilyBase* family) ABSL_LOCKS_EXCLUDED(mu_);

  mutable Mutex mu_;
  std::vector<std::shared_ptr<internal::FamilyBase>> families_ ABSL_GUARDED_BY(mu_);
  // Every sample name in use: a family's name, plus _bucket, _sum and _count for histograms.
  absl::flat_hash_set<std::string> sample_names_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tb::metrics

#endif  // TB_COMMON_METRICS_H_
