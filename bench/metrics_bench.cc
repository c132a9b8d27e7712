// The cost of tb::metrics updates on the GetToken path (issue 8: a few nanoseconds each, no
// mutex shared by all threads). Multi-threaded cases share one metric across the threads, the
// worst case for cache-line contention; read the CPU column (CPU time per update per thread).
//
//   build/<dir>/bench/metrics_bench --benchmark_min_time=0.5

#include <array>
#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "benchmark/benchmark.h"
#include "server/src/common/metrics.h"

namespace tb::metrics {
namespace {

// Shared by every thread of a benchmark, as a process-wide metric is.
Registry& TheRegistry() {
  static Registry* registry = new Registry();
  return *registry;
}

Counter& SharedCounter() {
  static Counter& c = TheRegistry().AddCounter("bench_counter_total", "c");
  return c;
}

Histogram& SharedHistogram() {
  static Histogram& h =
      TheRegistry().AddHistogram("bench_latency_seconds", "h", ExponentialBuckets(50e-6, 2, 16));
  return h;
}

CounterFamily& RequestFamily() {
  static CounterFamily& f =
      TheRegistry().AddCounterFamily("bench_requests_total", "r", {"method", "code"});
  return f;
}

// Latencies around a cached GetToken's, spread over the first buckets.
std::array<double, 64> Latencies() {
  std::array<double, 64> v{};
  for (std::size_t i = 0; i < v.size(); ++i) {
    v[i] = 40e-6 + 10e-6 * static_cast<double>(i % 32);
  }
  return v;
}

// Baseline: one std::atomic shared by all threads (what an unsharded counter costs).
std::atomic<uint64_t> g_plain{0};
void BM_UnshardedAtomicIncrement(benchmark::State& state) {
  for (auto _ : state) {
    g_plain.fetch_add(1, std::memory_order_relaxed);
  }
}
BENCHMARK(BM_UnshardedAtomicIncrement)->Threads(1)->Threads(2);

void BM_CounterIncrement(benchmark::State& state) {
  Counter& c = SharedCounter();
  for (auto _ : state) {
    c.Increment();
  }
}
BENCHMARK(BM_CounterIncrement)->Threads(1)->Threads(2);

// What the gRPC layer does per call: per-method, per-code counters with no lookup.
void BM_StatusCodeCountersIncrement(benchmark::State& state) {
  static StatusCodeCounters* codes = new StatusCodeCounters(RequestFamily(), {"GetToken"});
  for (auto _ : state) {
    codes->Increment(absl::StatusCode::kOk);
  }
}
BENCHMARK(BM_StatusCodeCountersIncrement)->Threads(1)->Threads(2);

void BM_HistogramObserve(benchmark::State& state) {
  Histogram& h = SharedHistogram();
  const std::array<double, 64> values = Latencies();
  std::size_t i = 0;
  for (auto _ : state) {
    h.Observe(values[i++ & 63]);
  }
}
BENCHMARK(BM_HistogramObserve)->Threads(1)->Threads(2);

void BM_HistogramObserveDuration(benchmark::State& state) {
  Histogram& h = SharedHistogram();
  const absl::Duration d = absl::Microseconds(180);
  for (auto _ : state) {
    h.Observe(d);
  }
}
BENCHMARK(BM_HistogramObserveDuration);

void BM_GaugeAdd(benchmark::State& state) {
  static Gauge& g = TheRegistry().AddGauge("bench_gauge", "g");
  for (auto _ : state) {
    g.Add(1);
  }
}
BENCHMARK(BM_GaugeAdd);

// What a caller pays for not caching the child: a reader lock and a map lookup per update.
void BM_WithLabelsLookupThenIncrement(benchmark::State& state) {
  CounterFamily& f = RequestFamily();
  for (auto _ : state) {
    f.WithLabels({"GetToken", "OK"}).Increment();
  }
}
BENCHMARK(BM_WithLabelsLookupThenIncrement)->Threads(1)->Threads(2);

// One scrape of a registry the size the broker will have: 10 methods x 5 codes, 10 latency
// histograms of 16 buckets, a few gauges.
void BM_Render(benchmark::State& state) {
  Registry registry;
  CounterFamily& requests =
      registry.AddCounterFamily("tb_grpc_requests_total", "r", {"method", "code"});
  HistogramFamily& latency = registry.AddHistogramFamily(
      "tb_grpc_request_duration_seconds", "l", {"method"}, ExponentialBuckets(50e-6, 2, 16));
  for (int m = 0; m < 10; ++m) {
    const std::string method = absl::StrCat("Method", m);
    for (const char* code : {"OK", "NOT_FOUND", "UNAVAILABLE", "PERMISSION_DENIED", "INTERNAL"}) {
      requests.WithLabels({method, code}).Increment(12345);
    }
    latency.WithLabels({method}).Observe(0.0002);
  }
  for (int g = 0; g < 10; ++g) {
    registry.AddGauge(absl::StrCat("tb_gauge_", g), "g").Set(g);
  }
  std::size_t bytes = 0;
  for (auto _ : state) {
    const std::string text = registry.Render();
    bytes = text.size();
    benchmark::DoNotOptimize(text.data());
  }
  state.counters["bytes"] = static_cast<double>(bytes);
}
BENCHMARK(BM_Render);

}  // namespace
}  // namespace tb::metrics

BENCHMARK_MAIN();
