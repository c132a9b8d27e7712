#include "server/src/common/metrics.h"

#include <atomic>
#include <cmath>
#include <limits>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tb::metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

// Checks `text` against the text exposition format 0.0.4 as Prometheus parses it, and returns
// the problems found (empty when it is well formed):
//   - every line is "# HELP name text", "# TYPE name type" or "name[{l="v",...}] value";
//   - label values contain only the escapes \\ \" \n; values are Go floats, +Inf, -Inf or NaN;
//   - a family's TYPE comes before its samples and once only; its samples are contiguous;
//   - histogram samples are name_bucket (with le, cumulative, ending with +Inf), name_sum and
//     name_count, and _count equals the +Inf bucket.
std::vector<std::string> FormatProblems(const std::string& text) {
  static const std::regex kHelp(R"(# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*))");
  static const std::regex kType(R"(# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram))");
  static const std::regex kSample(
      R"(([a-zA-Z_:][a-zA-Z0-9_:]*)(\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*)?\})? ([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]Inf|NaN))");
  static const std::regex kLabel(R"(([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)\")");

  std::vector<std::string> problems;
  if (!text.empty() && text.back() != '\n') {
    problems.push_back("does not end with a newline");
  }
  std::map<std::string, std::string> types;  // family name -> type
  std::set<std::string> finished;            // families whose samples are over
  std::string current;                       // family of the previous sample
  // Per histogram series (name + labels other than le): last cumulative count and +Inf count.
  std::map<std::string, double> last_bucket;
  std::map<std::string, double> inf_bucket;
  const std::vector<std::string> lines = absl::StrSplit(text, '\n', absl::SkipEmpty());
  for (const std::string& line : lines) {
    std::smatch m;
    if (std::regex_match(line, m, kHelp)) {
      continue;
    }
    if (std::regex_match(line, m, kType)) {
      if (types.contains(m[1])) {
        problems.push_back("second TYPE for " + m[1].str());
      }
      types[m[1]] = m[2];
      continue;
    }
    if (!std::regex_match(line, m, kSample)) {
      problems.push_back("not a sample: " + line);
      continue;
    }
    const std::string name = m[1];
    std::string family = name;
    std::string type = types.contains(name) ? types[name] : "";
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      const std::string base = name.substr(0, name.size() - std::string(suffix).size());
      if (name.ends_with(suffix) && types.contains(base) && types[base] == "histogram") {
        family = base;
        type = "histogram";
      }
    }
    if (type.empty()) {
      problems.push_back("sample before its TYPE: " + line);
      continue;
    }
    if (family != current) {
      if (finished.contains(family)) {
        problems.push_back("samples of " + family + " not contiguous");
      }
      if (!current.empty()) {
        finished.insert(current);
      }
      current = family;
    }
    if (type != "histogram") {
      continue;
    }
    std::string series;  // labels other than le
    std::string le;
    const std::string labels = m[3];
    for (std::sregex_iterator it(labels.begin(), labels.end(), kLabel), end; it != end; ++it) {
      if ((*it)[1] == "le") {
        le = (*it)[2];
      } else {
        series += (*it)[0].str() + ",";
      }
    }
    const double value = std::stod(m[4]);
    if (name == family + "_bucket") {
      if (le.empty()) {
        problems.push_back("bucket without le: " + line);
      }
      if (last_bucket.contains(series) && value < last_bucket[series]) {
        problems.push_back("buckets not cumulative: " + line);
      }
      last_bucket[series] = value;
      if (le == "+Inf") {
        inf_bucket[series] = value;
      }
    } else if (!le.empty()) {
      problems.push_back("le outside _bucket: " + line);
    } else if (name == family + "_count") {
      if (!inf_bucket.contains(series) || inf_bucket[series] != value) {
        problems.push_back("_count differs from the +Inf bucket: " + line);
      }
      last_bucket.erase(series);
    }
  }
  return problems;
}

TEST(MetricsTest, CounterRendersHelpTypeAndIntegerValue) {
  Registry registry;
  Counter& c = registry.AddCounter("tb_refreshes_total", "Refreshes attempted.");
  c.Increment();
  c.Increment(41);
  EXPECT_EQ(c.Value(), 42u);
  EXPECT_EQ(registry.Render(),
            "# HELP tb_refreshes_total Refreshes attempted.\n"
            "# TYPE tb_refreshes_total counter\n"
            "tb_refreshes_total 42\n");
}

TEST(MetricsTest, LabelledCounterRendersChildrenInLabelOrderAndKeepsReferencesStable) {
  Registry registry;
  CounterFamily& requests =
      registry.AddCounterFamily("tb_grpc_requests_total", "gRPC requests.", {"method", "code"});
  Counter& get_ok = requests.WithLabels({"GetToken", "OK"});
  requests.WithLabels({"Refresh", "OK"}).Increment(3);
  requests.WithLabels({"GetToken", "NOT_FOUND"}).Increment();
  get_ok.Increment(2);
  const std::string method = "GetToken";  // std::string values convert too
  EXPECT_EQ(&requests.WithLabels({method, "OK"}), &get_ok);
  EXPECT_EQ(requests.size(), 3u);
  EXPECT_EQ(registry.Render(),
            "# HELP tb_grpc_requests_total gRPC requests.\n"
            "# TYPE tb_grpc_requests_total counter\n"
            "tb_grpc_requests_total{method=\"GetToken\",code=\"NOT_FOUND\"} 1\n"
            "tb_grpc_requests_total{method=\"GetToken\",code=\"OK\"} 2\n"
            "tb_grpc_requests_total{method=\"Refresh\",code=\"OK\"} 3\n");
}

TEST(MetricsTest, FamilyWithoutChildrenRendersOnlyItsHeader) {
  Registry registry;
  registry.AddCounterFamily("tb_store_errors_total", "Store errors.", {"op"});
  EXPECT_EQ(registry.Render(),
            "# HELP tb_store_errors_total Store errors.\n"
            "# TYPE tb_store_errors_total counter\n");
}

TEST(MetricsTest, GaugeSetsAddsAndRendersFloats) {
  Registry registry;
  Gauge& g = registry.AddGauge("tb_queue_depth", "Queued refreshes.");
  GaugeFamily& f = registry.AddGaugeFamily("tb_value", "Values.", {"kind"});
  g.Set(3);
  g.Increment();
  g.Add(0.5);
  g.Decrement();
  EXPECT_DOUBLE_EQ(g.Value(), 3.5);
  f.WithLabels({"neg"}).Set(-0.25);
  f.WithLabels({"big"}).Set(1e21);
  f.WithLabels({"small"}).Set(1.5e-7);
  f.WithLabels({"inf"}).Set(std::numeric_limits<double>::infinity());
  f.WithLabels({"ninf"}).Set(-std::numeric_limits<double>::infinity());
  f.WithLabels({"nan"}).Set(std::numeric_limits<double>::quiet_NaN());
  f.WithLabels({"time"}).SetToTime(absl::FromUnixMillis(1'700'000'000'250));
  f.WithLabels({"zero"});
  EXPECT_EQ(registry.Render(),
            "# HELP tb_queue_depth Queued refreshes.\n"
            "# TYPE tb_queue_depth gauge\n"
            "tb_queue_depth 3.5\n"
            "# HELP tb_value Values.\n"
            "# TYPE tb_value gauge\n"
            "tb_value{kind=\"big\"} 1e+21\n"
            "tb_value{kind=\"inf\"} +Inf\n"
            "tb_value{kind=\"nan\"} NaN\n"
            "tb_value{kind=\"neg\"} -0.25\n"
            "tb_value{kind=\"ninf\"} -Inf\n"
            "tb_value{kind=\"small\"} 1.5e-07\n"
            "tb_value{kind=\"time\"} 1700000000.25\n"
            "tb_value{kind=\"zero\"} 0\n");
}

TEST(MetricsTest, HistogramRendersCumulativeBucketsWithInclusiveBoundsSumAndCount) {
  Registry registry;
  // Binary fractions, so the sum is exact whatever shards the observations landed in.
  Histogram& h =
      registry.AddHistogram("tb_store_duration_seconds", "Store latency.", {0.25, 0.5, 1, 2.5});
  h.Observe(0.125);
  h.Observe(0.25);  // on a bound: counted in that bucket (le is inclusive)
  h.Observe(absl::Milliseconds(375));
  h.Observe(2);
  h.Observe(4);     // above every bound: +Inf only
  h.Observe(-1.0);  // below every bound: first bucket
  EXPECT_EQ(h.Count(), 6u);
  EXPECT_EQ(h.BucketCount(0), 3u);
  EXPECT_EQ(h.BucketCount(4), 1u);
  EXPECT_EQ(registry.Render(),
            "# HELP tb_store_duration_seconds Store latency.\n"
            "# TYPE tb_store_duration_seconds histogram\n"
            "tb_store_duration_seconds_bucket{le=\"0.25\"} 3\n"
            "tb_store_duration_seconds_bucket{le=\"0.5\"} 4\n"
            "tb_store_duration_seconds_bucket{le=\"1\"} 4\n"
            "tb_store_duration_seconds_bucket{le=\"2.5\"} 5\n"
            "tb_store_duration_seconds_bucket{le=\"+Inf\"} 6\n"
            "tb_store_duration_seconds_sum 5.75\n"
            "tb_store_duration_seconds_count 6\n");
}

TEST(MetricsTest, BucketBoundsRenderAsShortestDecimals) {
  Registry registry;
  registry.AddHistogram("tb_d_seconds", "d", DefaultBuckets()).Observe(0.003);
  std::vector<std::string> les;
  const std::regex le(R"re(le="([^"]*)")re");
  const std::string text = registry.Render();
  for (std::sregex_iterator it(text.begin(), text.end(), le), end; it != end; ++it) {
    les.push_back((*it)[1]);
  }
  EXPECT_EQ(les, (std::vector<std::string>{"0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
                                           "1", "2.5", "5", "10", "+Inf"}));
  EXPECT_THAT(text, HasSubstr("\ntb_d_seconds_sum 0.003\n"));
}

TEST(MetricsTest, LabelledHistogramPutsLeLastAndAcceptsATrailingInf) {
  Registry registry;
  HistogramFamily& f =
      registry.AddHistogramFamily("tb_provider_duration_seconds", "Provider latency.", {"provider"},
                                  {0.5, std::numeric_limits<double>::infinity()});
  f.WithLabels({"zendesk"}).Observe(0.25);
  f.WithLabels({"zendesk"}).Observe(std::numeric_limits<double>::quiet_NaN());
  EXPECT_EQ(registry.Render(),
            "# HELP tb_provider_duration_seconds Provider latency.\n"
            "# TYPE tb_provider_duration_seconds histogram\n"
            "tb_provider_duration_seconds_bucket{provider=\"zendesk\",le=\"0.5\"} 1\n"
            "tb_provider_duration_seconds_bucket{provider=\"zendesk\",le=\"+Inf\"} 2\n"
            "tb_provider_duration_seconds_sum{provider=\"zendesk\"} NaN\n"
            "tb_provider_duration_seconds_count{provider=\"zendesk\"} 2\n");
}

TEST(MetricsTest, HistogramWithManyBucketsSpansCacheLines) {
  Registry registry;
  Histogram& h = registry.AddHistogram("tb_h", "h", LinearBuckets(1, 1, 20));  // 21 buckets + sum
  for (int v = 0; v <= 25; ++v) {
    h.Observe(v);
  }
  EXPECT_EQ(h.BucketCount(0), 2u);   // 0 and 1
  EXPECT_EQ(h.BucketCount(19), 1u);  // 20
  EXPECT_EQ(h.BucketCount(20), 5u);  // 21..25
  EXPECT_EQ(h.Count(), 26u);
  EXPECT_DOUBLE_EQ(h.Sum(), 25 * 26 / 2);
  EXPECT_THAT(registry.Render(), HasSubstr("tb_h_bucket{le=\"20\"} 21\n"));
  EXPECT_THAT(FormatProblems(registry.Render()), IsEmpty());
}

TEST(MetricsTest, EscapesLabelValuesAndHelpText) {
  Registry registry;
  registry.AddCounter("tb_a_total", "Help with \\ backslash,\nnewline and \"quotes\".");
  registry.AddGaugeFamily("tb_b", "b", {"v"}).WithLabels({"a\\b \"c\"\nd"}).Set(1);
  const std::string text = registry.Render();
  EXPECT_EQ(text,
            "# HELP tb_a_total Help with \\\\ backslash,\\nnewline and \"quotes\".\n"
            "# TYPE tb_a_total counter\n"
            "tb_a_total 0\n"
            "# HELP tb_b b\n"
            "# TYPE tb_b gauge\n"
            "tb_b{v=\"a\\\\b \\\"c\\\"\\nd\"} 1\n");
  EXPECT_THAT(FormatProblems(text), IsEmpty());
}

TEST(MetricsTest, RendersFamiliesInRegistrationOrder) {
  Registry registry;
  registry.AddGauge("tb_z", "z");
  registry.AddCounter("tb_a_total", "a");
  registry.AddHistogram("tb_m_seconds", "m", {1});
  const std::string text = registry.Render();
  const std::size_t z = text.find("# HELP tb_z ");
  const std::size_t a = text.find("# HELP tb_a_total ");
  const std::size_t m = text.find("# HELP tb_m_seconds ");
  ASSERT_NE(m, std::string::npos);
  EXPECT_LT(z, a);
  EXPECT_LT(a, m);
}

TEST(MetricsTest, StatusCodeCountersUseCanonicalCodeNamesAndMapUnknownCodes) {
  Registry registry;
  CounterFamily& requests =
      registry.AddCounterFamily("tb_grpc_requests_total", "r", {"method", "code"});
  StatusCodeCounters get_token;  // assigned later, as a member would be
  get_token = StatusCodeCounters(requests, {"GetToken"});
  get_token.Increment(absl::StatusCode::kOk);
  get_token.Increment(absl::StatusCode::kOk);
  get_token.Increment(absl::StatusCode::kUnauthenticated);
  get_token.Increment(static_cast<absl::StatusCode>(99));
  get_token.Increment(static_cast<absl::StatusCode>(-1));
  EXPECT_EQ(&get_token.At(absl::StatusCode::kOk), &requests.WithLabels({"GetToken", "OK"}));
  EXPECT_EQ(registry.Render(),
            "# HELP tb_grpc_requests_total r\n"
            "# TYPE tb_grpc_requests_total counter\n"
            "tb_grpc_requests_total{method=\"GetToken\",code=\"OK\"} 2\n"
            "tb_grpc_requests_total{method=\"GetToken\",code=\"UNAUTHENTICATED\"} 1\n"
            "tb_grpc_requests_total{method=\"GetToken\",code=\"UNKNOWN\"} 2\n");
}

TEST(MetricsTest, StatusCodeHistogramsIndexHistogramsByCode) {
  Registry registry;
  HistogramFamily& latency =
      registry.AddHistogramFamily("tb_rpc_seconds", "l", {"method", "code"}, {1});
  StatusCodeHistograms by_code(latency, {"Refresh"});
  by_code.At(absl::StatusCode::kUnavailable).Observe(2);
  EXPECT_EQ(latency.WithLabels({"Refresh", "UNAVAILABLE"}).Count(), 1u);
}

TEST(MetricsTest, CallbackGaugeIsComputedAtEachRender) {
  Registry registry;
  double seconds = 12.5;
  CallbackHandle handle = registry.AddCallbackGauge(
      "tb_soonest_expiry_seconds", "Seconds until the soonest expiry.", [&] { return seconds; });
  EXPECT_EQ(registry.Render(),
            "# HELP tb_soonest_expiry_seconds Seconds until the soonest expiry.\n"
            "# TYPE tb_soonest_expiry_seconds gauge\n"
            "tb_soonest_expiry_seconds 12.5\n");
  seconds = 3;
  EXPECT_THAT(registry.Render(), HasSubstr("\ntb_soonest_expiry_seconds 3\n"));
}

TEST(MetricsTest, CallbackFamilyEmitsLabelledSamplesAndDropsMalformedOnes) {
  Registry registry;
  registry.AddCounter("tb_before_total", "before");
  CallbackHandle handle =
      registry.AddCallbackFamily("tb_connections", "Connections by status.", MetricType::kGauge,
                                 {"status"}, [](SampleSink& out) {
                                   out.Add({"active"}, 10);
#ifdef NDEBUG
                                   out.Add({"too", "many"}, 1);  // dropped (debug: asserts)
#endif
                                   out.Add({"needs_reauth"}, 2);
                                 });
  CallbackHandle counter =
      registry.AddCallbackFamily("tb_cache_hits_total", "Cache hits.", MetricType::kCounter, {},
                                 [](SampleSink& out) { out.Add({}, 7); });
  EXPECT_EQ(registry.Render(),
            "# HELP tb_before_total before\n"
            "# TYPE tb_before_total counter\n"
            "tb_before_total 0\n"
            "# HELP tb_connections Connections by status.\n"
            "# TYPE tb_connections gauge\n"
            "tb_connections{status=\"active\"} 10\n"
            "tb_connections{status=\"needs_reauth\"} 2\n"
            "# HELP tb_cache_hits_total Cache hits.\n"
            "# TYPE tb_cache_hits_total counter\n"
            "tb_cache_hits_total 7\n");
}

TEST(MetricsTest, ResettingACallbackHandleRemovesTheFamilyAndFreesItsName) {
  Registry registry;
  int calls = 0;
  CallbackHandle handle = registry.AddCallbackGauge("tb_g", "g", [&] { return ++calls; });
  CallbackHandle moved = std::move(handle);
  handle.Reset();  // moved-from: a no-op
  EXPECT_THAT(registry.Render(), HasSubstr("tb_g 1\n"));
  moved.Reset();
  EXPECT_EQ(registry.Render(), "");
  EXPECT_EQ(calls, 1);
  // The name can be registered again, as a reload would.
  CallbackHandle again = registry.AddCallbackGauge("tb_g", "g", [] { return 5; });
  EXPECT_EQ(registry.Render(), "# HELP tb_g g\n# TYPE tb_g gauge\ntb_g 5\n");
  {
    CallbackHandle scoped = registry.AddCallbackGauge("tb_h", "h", [] { return 1; });
  }
  EXPECT_EQ(registry.Render(), "# HELP tb_g g\n# TYPE tb_g gauge\ntb_g 5\n");
}

TEST(MetricsTest, BucketHelpers) {
  EXPECT_EQ(ExponentialBuckets(1, 2, 4), (std::vector<double>{1, 2, 4, 8}));
  EXPECT_EQ(LinearBuckets(0.5, 0.5, 3), (std::vector<double>{0.5, 1, 1.5}));
  EXPECT_EQ(DefaultBuckets().size(), 11u);
}

TEST(MetricsTest, ValidatesNamesAsPrometheusDefinesThem) {
  EXPECT_TRUE(IsValidMetricName("tb_grpc_requests_total"));
  EXPECT_TRUE(IsValidMetricName("job:rate5m"));
  EXPECT_TRUE(IsValidMetricName("_x"));
  EXPECT_FALSE(IsValidMetricName(""));
  EXPECT_FALSE(IsValidMetricName("1x"));
  EXPECT_FALSE(IsValidMetricName("tb-x"));
  EXPECT_FALSE(IsValidMetricName("tb x"));
  EXPECT_TRUE(IsValidLabelName("method"));
  EXPECT_TRUE(IsValidLabelName("_m9"));
  EXPECT_FALSE(IsValidLabelName("a:b"));
  EXPECT_FALSE(IsValidLabelName("__name__"));
  EXPECT_FALSE(IsValidLabelName("9a"));
  EXPECT_FALSE(IsValidLabelName(""));
}

TEST(MetricsDeathTest, MisuseAbortsWithAMessage) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  Registry registry;
  EXPECT_DEATH(registry.AddCounter("tb-bad", "x"), "invalid metric name");
  EXPECT_DEATH(registry.AddCounterFamily("tb_x", "x", {"__reserved"}), "invalid label name");
  EXPECT_DEATH(registry.AddCounterFamily("tb_x", "x", {"a", "a"}), "duplicate label name");
  EXPECT_DEATH(registry.AddHistogramFamily("tb_x", "x", {"le"}, {1}), "label \"le\"");
  EXPECT_DEATH(registry.AddHistogram("tb_x", "x", {2, 1}), "strictly increasing");
  EXPECT_DEATH(registry.AddHistogram("tb_x", "x", {1, std::nan("")}), "strictly increasing");
  EXPECT_DEATH(ExponentialBuckets(0, 2, 3), "ExponentialBuckets");
  registry.AddCounter("tb_x_count", "x");
  EXPECT_DEATH(registry.AddGauge("tb_x_count", "x"), "already registered");
  EXPECT_DEATH(registry.AddHistogram("tb_x", "x", {1}), "already registered");
  CounterFamily& f = registry.AddCounterFamily("tb_f_total", "f", {"a", "b"});
  EXPECT_DEATH(f.WithLabels({"only-one"}), "1 label values for 2 label names");
  EXPECT_DEATH(StatusCodeCounters(f, {}), "PerStatusCode");
  EXPECT_DEATH(
      (void)registry.AddCallbackFamily("tb_c", "c", MetricType::kHistogram, {}, [](SampleSink&) {}),
      "counter or a gauge");
}

// Several threads update a counter, a histogram, per-code counters and fresh children while
// another renders and checks the text; afterwards every total is exact.
TEST(MetricsTest, ConcurrentUpdatesWhileRenderingKeepExactTotals) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 50'000;
  Registry registry;
  Counter& counter = registry.AddCounter("tb_ops_total", "ops");
  Histogram& histogram = registry.AddHistogram("tb_op_seconds", "op", {1, 2, 3});
  Gauge& gauge = registry.AddGauge("tb_level", "level");
  CounterFamily& by_code = registry.AddCounterFamily("tb_rpc_total", "rpc", {"method", "code"});
  CounterFamily& dynamic = registry.AddCounterFamily("tb_dynamic_total", "dynamic", {"thread"});
  StatusCodeCounters codes(by_code, {"GetToken"});  // shared: racing first uses of each code

  std::atomic<bool> done{false};
  std::atomic<int> renders{0};
  std::thread renderer([&] {
    while (!done.load()) {
      const std::string text = registry.Render();
      const std::vector<std::string> problems = FormatProblems(text);
      EXPECT_THAT(problems, IsEmpty()) << text;
      renders.fetch_add(1);
    }
  });
  // A callback family registered and unregistered while renders run.
  std::thread churn([&] {
    for (int i = 0; i < 200; ++i) {
      int value = i;
      CallbackHandle h = registry.AddCallbackFamily(
          "tb_churn", "churn", MetricType::kGauge, {"i"},
          [&value](SampleSink& out) { out.Add({absl::StrCat(value)}, value); });
    }
  });
  std::vector<std::thread> workers;
  for (int t = 0; t < kThreads; ++t) {
    workers.emplace_back([&, t] {
      while (renders.load() == 0) {
        std::this_thread::yield();  // start once the renderer runs, so the two overlap
      }
      Counter& mine = dynamic.WithLabels({absl::StrCat("t", t)});
      for (int i = 0; i < kPerThread; ++i) {
        counter.Increment();
        histogram.Observe(i % 4);  // 0,1 -> le=1; 2 -> le=2; 3 -> le=3
        gauge.Add(1);
        codes.Increment(static_cast<absl::StatusCode>(i % 17));
        mine.Increment();
        if (i % 1000 == 0) {
          dynamic.WithLabels({absl::StrCat("t", t, "-", i)}).Increment();
        }
      }
    });
  }
  for (std::thread& w : workers) {
    w.join();
  }
  churn.join();
  const int renders_during_updates = renders.load();
  ::testing::Test::RecordProperty("renders_during_updates", renders_during_updates);
  done = true;
  renderer.join();

  constexpr uint64_t kTotal = uint64_t{kThreads} * kPerThread;
  EXPECT_EQ(counter.Value(), kTotal);
  EXPECT_EQ(histogram.Count(), kTotal);
  EXPECT_EQ(histogram.BucketCount(0), kTotal / 2);
  EXPECT_EQ(histogram.BucketCount(1), kTotal / 4);
  EXPECT_EQ(histogram.BucketCount(2), kTotal / 4);
  EXPECT_EQ(histogram.BucketCount(3), 0u);
  EXPECT_DOUBLE_EQ(histogram.Sum(), 1.5 * kTotal);
  EXPECT_DOUBLE_EQ(gauge.Value(), static_cast<double>(kTotal));
  uint64_t code_total = 0;
  for (int c = 0; c < StatusCodeCounters::kCodes; ++c) {
    code_total += codes.At(static_cast<absl::StatusCode>(c)).Value();
  }
  EXPECT_EQ(code_total, kTotal);
  EXPECT_EQ(by_code.size(), 17u);
  EXPECT_EQ(dynamic.size(), kThreads + kThreads * (kPerThread / 1000));
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(dynamic.WithLabels({absl::StrCat("t", t)}).Value(), uint64_t{kPerThread});
  }
  const std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr(absl::StrCat("\ntb_ops_total ", kTotal, "\n")));
  EXPECT_THAT(text, HasSubstr(absl::StrCat("\ntb_op_seconds_count ", kTotal, "\n")));
  EXPECT_THAT(text, Not(HasSubstr("tb_churn")));
  EXPECT_THAT(FormatProblems(text), IsEmpty());
}

TEST(MetricsTest, FormatCheckerRejectsMalformedText) {
  // The checker above is what the other tests lean on: make sure it can fail.
  EXPECT_THAT(FormatProblems("tb_x 1\n"), Not(IsEmpty()));  // sample before TYPE
  EXPECT_THAT(FormatProblems("# TYPE tb_x counter\ntb_x{a=\"b} 1\n"), Not(IsEmpty()));
  EXPECT_THAT(FormatProblems("# TYPE tb_x counter\ntb_x one\n"), Not(IsEmpty()));
  EXPECT_THAT(FormatProblems("# TYPE h histogram\nh_bucket{le=\"1\"} 2\n"
                             "h_bucket{le=\"+Inf\"} 1\nh_count 1\n"),
              Not(IsEmpty()));  // not cumulative
  EXPECT_THAT(FormatProblems("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\n"),
              Not(IsEmpty()));  // count differs
  EXPECT_THAT(FormatProblems("# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na 2\n"),
              Not(IsEmpty()));  // not contiguous
  EXPECT_THAT(FormatProblems("# HELP a x\n# TYPE a gauge\na{l=\"\\\\\"} -1.5e-3\n"), IsEmpty());
}

}  // namespace
}  // namespace tb::metrics
