#include "server/src/common/metrics.h"

#include <algorithm>
#include <bit>
#include <cassert>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <thread>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tb::metrics {
namespace {

// Misuse of the API is a bug in our source (names are literals): stop at once, in every build
// type, with a message a test run shows. See the header for why this is not a Status.
[[noreturn]] void Fatal(absl::string_view message) {
  std::fprintf(stderr, "tb::metrics: %.*s\n", static_cast<int>(message.size()), message.data());
  std::fflush(stderr);
  std::abort();
}

bool IsNameStart(char c, bool colon) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':');
}
bool IsNameChar(char c, bool colon) { return IsNameStart(c, colon) || (c >= '0' && c <= '9'); }

bool IsValidName(absl::string_view name, bool colon) {
  if (name.empty() || !IsNameStart(name[0], colon)) {
    return false;
  }
  return std::all_of(name.begin() + 1, name.end(),
                     [colon](char c) { return IsNameChar(c, colon); });
}

// HELP escapes backslash and newline; label values also escape the double quote (format 0.0.4).
void AppendEscaped(std::string& out, absl::string_view text, bool quote) {
  for (const char c : text) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '"':
        out += quote ? "\\\"" : "\"";
        break;
      default:
        out += c;
    }
  }
}

// `name{l1="v1",...[,extra_name="extra_value"]}`, without braces when there is no label.
template <typename Values>
void AppendSeries(std::string& out, absl::string_view name, absl::Span<const std::string> names,
                  const Values& values, absl::string_view extra_name = {},
                  absl::string_view extra_value = {}) {
  out.append(name.data(), name.size());
  if (names.empty() && extra_name.empty()) {
    return;
  }
  out += '{';
  std::size_t i = 0;
  for (const auto& value : values) {
    if (i > 0) {
      out += ',';
    }
    out += names[i++];
    out += "=\"";
    AppendEscaped(out, value, /*quote=*/true);
    out += '"';
  }
  if (!extra_name.empty()) {
    if (i > 0) {
      out += ',';
    }
    out.append(extra_name.data(), extra_name.size());
    out += "=\"";
    out.append(extra_value.data(), extra_value.size());  // a number: nothing to escape
    out += '"';
  }
  out += '}';
}

void AppendUint(std::string& out, uint64_t value) {
  char buf[24];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), value);
  out.append(buf, end);
}

std::string DoubleString(double value) {
  std::string s;
  internal::AppendDouble(s, value);
  return s;
}

double FromBits(uint64_t bits) { return std::bit_cast<double>(bits); }
uint64_t ToBits(double value) { return std::bit_cast<uint64_t>(value); }

// Adds `delta` to the double stored as bits in `word`.
void AtomicAddDouble(std::atomic<uint64_t>& word, double delta) {
  uint64_t old = word.load(std::memory_order_relaxed);
  while (
      !word.compare_exchange_weak(old, ToBits(FromBits(old) + delta), std::memory_order_relaxed)) {
  }
}

const char* TypeName(MetricType type) {
  switch (type) {
    case MetricType::kCounter:
      return "counter";
    case MetricType::kGauge:
      return "gauge";
    case MetricType::kHistogram:
      return "histogram";
  }
  return "untyped";
}

template <typename T>
constexpr MetricType TypeOf() {
  if constexpr (std::is_same_v<T, Counter>) {
    return MetricType::kCounter;
  } else if constexpr (std::is_same_v<T, Gauge>) {
    return MetricType::kGauge;
  } else {
    static_assert(std::is_same_v<T, Histogram>);
    return MetricType::kHistogram;
  }
}

// Drops a trailing +Inf and aborts unless the rest is finite and strictly increasing.
std::vector<double> CheckedBounds(absl::string_view name, std::vector<double> bounds) {
  if (!bounds.empty() && bounds.back() == std::numeric_limits<double>::infinity()) {
    bounds.pop_back();
  }
  for (std::size_t i = 0; i < bounds.size(); ++i) {
    if (!std::isfinite(bounds[i]) || (i > 0 && !(bounds[i - 1] < bounds[i]))) {
      Fatal(absl::StrCat("histogram ", name,
                         ": bucket bounds must be finite and strictly increasing"));
    }
  }
  return bounds;
}

}  // namespace

bool IsValidMetricName(absl::string_view name) { return IsValidName(name, /*colon=*/true); }

bool IsValidLabelName(absl::string_view name) {
  return IsValidName(name, /*colon=*/false) && name.substr(0, 2) != "__";
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  if (count < 1 || !(start > 0) || !(factor > 1)) {
    Fatal("ExponentialBuckets needs count >= 1, start > 0 and factor > 1");
  }
  std::vector<double> bounds;
  bounds.reserve(count);
  double bound = start;
  for (int i = 0; i < count; ++i, bound *= factor) {
    bounds.push_back(bound);
  }
  return bounds;
}

std::vector<double> LinearBuckets(double start, double width, int count) {
  if (count < 1 || !(width > 0)) {
    Fatal("LinearBuckets needs count >= 1 and width > 0");
  }
  std::vector<double> bounds;
  bounds.reserve(count);
  for (int i = 0; i < count; ++i) {
    bounds.push_back(start + width * i);
  }
  return bounds;
}

std::vector<double> DefaultBuckets() {
  return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
}

namespace internal {

std::size_t ShardCount() {
  static const std::size_t count = [] {
    const unsigned cpus = std::max(1u, std::thread::hardware_concurrency());
    return std::min<std::size_t>(16, std::bit_ceil(cpus));
  }();
  return count;
}

std::size_t ThreadShard() {
  static std::atomic<std::size_t> next{0};
  thread_local const std::size_t shard = next.fetch_add(1, std::memory_order_relaxed);
  return shard;
}

void AppendDouble(std::string& out, double value) {
  if (std::isnan(value)) {
    out += "NaN";
  } else if (std::isinf(value)) {
    out += value > 0 ? "+Inf" : "-Inf";
  } else {
    char buf[32];
    const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), value);
    out.append(buf, end);
  }
}

FamilyBase::FamilyBase(std::string name, std::string help, MetricType type,
                       std::vector<std::string> label_names)
    : name_(std::move(name)),
      help_(std::move(help)),
      type_(type),
      label_names_(std::move(label_names)) {}

void FamilyBase::AppendHeader(std::string& out) const {
  out += "# HELP ";
  out += name_;
  out += ' ';
  AppendEscaped(out, help_, /*quote=*/false);
  out += "\n# TYPE ";
  out += name_;
  out += ' ';
  out += TypeName(type_);
  out += '\n';
}

void FamilyBase::CheckArity(LabelValues values) const {
  if (values.size() != label_names_.size()) {
    Fatal(absl::StrCat(name_, ": ", values.size(), " label values for ", label_names_.size(),
                       " label names (", absl::StrJoin(label_names_, ","), ")"));
  }
}

// A family whose samples a callback emits at render time. The callback runs under mu_ so that
// Clear() can wait for a running invocation: that is what makes destroying a CallbackHandle
// safe while a scrape is in progress.
class CallbackFamily final : public FamilyBase {
 public:
  CallbackFamily(std::string name, std::string help, MetricType type,
                 std::vector<std::string> label_names, std::function<void(SampleSink&)> collect)
      : FamilyBase(std::move(name), std::move(help), type, std::move(label_names)),
        collect_(std::move(collect)) {}

  void RenderTo(std::string& out) const override ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock lock(&mu_);
    if (!collect_) {
      return;  // unregistered after Render() took its snapshot
    }
    AppendHeader(out);
    SampleSink sink(*this, out);
    collect_(sink);
  }

  // Waits for a running callback, then drops it. The callable is destroyed outside the lock.
  void Clear() ABSL_LOCKS_EXCLUDED(mu_) {
    std::function<void(SampleSink&)> dropped;
    {
      MutexLock lock(&mu_);
      dropped.swap(collect_);
    }
  }

  using FamilyBase::label_names;
  using FamilyBase::name;

 private:
  mutable Mutex mu_;
  std::function<void(SampleSink&)> collect_ ABSL_GUARDED_BY(mu_);
};

}  // namespace internal

// ---- Counter ----

Counter::Counter()
    : mask_(internal::ShardCount() - 1),
      cells_(std::make_unique<internal::Line[]>(internal::ShardCount())) {}

uint64_t Counter::Value() const {
  uint64_t total = 0;
  for (std::size_t i = 0; i <= mask_; ++i) {
    total += cells_[i].words[0].load(std::memory_order_relaxed);
  }
  return total;
}

// ---- Gauge ----

void Gauge::Set(double value) { bits_.store(ToBits(value), std::memory_order_relaxed); }
void Gauge::Add(double delta) { AtomicAddDouble(bits_, delta); }
double Gauge::Value() const { return FromBits(bits_.load(std::memory_order_relaxed)); }

// ---- Histogram ----

Histogram::Histogram(absl::Span<const double> bounds)
    : bounds_(bounds),
      mask_(internal::ShardCount() - 1),
      // bounds + 1 buckets, then the sum, rounded up to whole cache lines.
      lines_per_shard_((bounds.size() + 2 + 7) / 8),
      lines_(std::make_unique<internal::Line[]>(internal::ShardCount() * lines_per_shard_)) {}

void Histogram::Observe(double value) {
  // A linear scan: latency bounds number a dozen or two, and most observations land in the
  // first few buckets, where it beats a binary search's unpredictable branches. The negated
  // comparison sends NaN to +Inf.
  std::size_t i = 0;
  const std::size_t n = bounds_.size();
  while (i < n && !(value <= bounds_[i])) {
    ++i;
  }
  const std::size_t shard = internal::ShardIndex(mask_);
  Word(shard, i).fetch_add(1, std::memory_order_relaxed);
  AtomicAddDouble(Word(shard, n + 1), value);
}

uint64_t Histogram::BucketCount(std::size_t i) const {
  uint64_t total = 0;
  for (std::size_t s = 0; s <= mask_; ++s) {
    total += Word(s, i).load(std::memory_order_relaxed);
  }
  return total;
}

uint64_t Histogram::Count() const {
  uint64_t total = 0;
  for (std::size_t i = 0; i <= bounds_.size(); ++i) {
    total += BucketCount(i);
  }
  return total;
}

double Histogram::Sum() const {
  double total = 0;
  for (std::size_t s = 0; s <= mask_; ++s) {
    total += FromBits(Word(s, bounds_.size() + 1).load(std::memory_order_relaxed));
  }
  return total;
}

// ---- Family ----

template <typename T>
Family<T>::Family(internal::RegistryKey, std::string name, std::string help,
                  std::vector<std::string> label_names, std::vector<double> bounds)
    : FamilyBase(std::move(name), std::move(help), TypeOf<T>(), std::move(label_names)),
      bounds_(std::move(bounds)) {}

template <typename T>
T& Family<T>::WithLabels(LabelValues values) {
  CheckArity(values);
  {
    ReaderLock lock(&mu_);
    const auto it = children_.find(values);
    if (it != children_.end()) {
      return *it->second;
    }
  }
  WriterLock lock(&mu_);
  auto [it, inserted] =
      children_.try_emplace(std::vector<std::string>(values.begin(), values.end()));
  if (inserted) {
    // The constructors are private to this friend, hence new rather than make_unique.
    if constexpr (std::is_same_v<T, Histogram>) {
      it->second.reset(new Histogram(bounds_));
    } else {
      it->second.reset(new T());
    }
  }
  return *it->second;
}

template <typename T>
std::size_t Family<T>::size() const {
  ReaderLock lock(&mu_);
  return children_.size();
}

template <typename T>
void Family<T>::RenderTo(std::string& out) const {
  AppendHeader(out);
  ReaderLock lock(&mu_);
  for (const auto& [values, child] : children_) {
    if constexpr (std::is_same_v<T, Counter>) {
      AppendSeries(out, name(), label_names(), values);
      out += ' ';
      AppendUint(out, child->Value());
      out += '\n';
    } else if constexpr (std::is_same_v<T, Gauge>) {
      AppendSeries(out, name(), label_names(), values);
      out += ' ';
      internal::AppendDouble(out, child->Value());
      out += '\n';
    } else {
      // Buckets are stored per bucket and cumulated here, so _count (the cumulated total) always
      // equals the +Inf bucket even while observations race with the scrape.
      const std::string bucket = absl::StrCat(name(), "_bucket");
      uint64_t cumulative = 0;
      for (std::size_t i = 0; i <= bounds_.size(); ++i) {
        cumulative += child->BucketCount(i);
        AppendSeries(out, bucket, label_names(), values, "le",
                     i < bounds_.size() ? DoubleString(bounds_[i]) : "+Inf");
        out += ' ';
        AppendUint(out, cumulative);
        out += '\n';
      }
      AppendSeries(out, absl::StrCat(name(), "_sum"), label_names(), values);
      out += ' ';
      internal::AppendDouble(out, child->Sum());
      out += '\n';
      AppendSeries(out, absl::StrCat(name(), "_count"), label_names(), values);
      out += ' ';
      AppendUint(out, cumulative);
      out += '\n';
    }
  }
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

// ---- PerStatusCode ----

template <typename T>
PerStatusCode<T>::PerStatusCode(Family<T>& family, std::vector<std::string> leading_values)
    : family_(&family), leading_values_(std::move(leading_values)) {
  if (leading_values_.size() + 1 != family.label_names().size()) {
    Fatal(absl::StrCat(family.name(), ": PerStatusCode needs one leading label value per label ",
                       "but the last (the code)"));
  }
}

template <typename T>
PerStatusCode<T>& PerStatusCode<T>::operator=(PerStatusCode&& other) noexcept {
  if (this == &other) {
    return *this;
  }
  family_ = other.family_;
  leading_values_ = std::move(other.leading_values_);
  for (int i = 0; i < kCodes; ++i) {
    children_[i].store(other.children_[i].load(std::memory_order_acquire),
                       std::memory_order_release);
  }
  return *this;
}

template <typename T>
T* PerStatusCode<T>::Create(int i) {
  assert(family_ != nullptr && "PerStatusCode used before being assigned a family");
  const std::string code = absl::StatusCodeToString(static_cast<absl::StatusCode>(i));
  std::vector<absl::string_view> values(leading_values_.begin(), leading_values_.end());
  values.push_back(code);
  T* child = &family_->WithLabels(values);
  children_[i].store(child, std::memory_order_release);
  return child;
}

template class PerStatusCode<Counter>;
template class PerStatusCode<Histogram>;

// ---- SampleSink, CallbackHandle ----

void SampleSink::Add(LabelValues values, double value) {
  if (values.size() != family_.label_names().size()) {
    assert(false && "SampleSink::Add: wrong number of label values");
    return;  // a scrape must not abort the server: drop the sample
  }
  AppendSeries(out_, family_.name(), family_.label_names(), values);
  out_ += ' ';
  internal::AppendDouble(out_, value);
  out_ += '\n';
}

CallbackHandle::CallbackHandle(CallbackHandle&& other) noexcept
    : registry_(std::exchange(other.registry_, nullptr)), family_(std::move(other.family_)) {}

CallbackHandle& CallbackHandle::operator=(CallbackHandle&& other) noexcept {
  if (this != &other) {
    Reset();
    registry_ = std::exchange(other.registry_, nullptr);
    family_ = std::move(other.family_);
  }
  return *this;
}

void CallbackHandle::Reset() {
  if (family_ == nullptr) {
    return;
  }
  // Out of the list first, so no later Render() sees it; then wait out one that already did.
  registry_->Remove(family_.get());
  family_->Clear();
  family_.reset();
  registry_ = nullptr;
}

// ---- Registry ----

Registry::Registry() = default;
Registry::~Registry() = default;

void Registry::Insert(std::shared_ptr<internal::FamilyBase> family) {
  const std::string& name = family->name();
  if (!IsValidMetricName(name)) {
    Fatal(absl::StrCat("invalid metric name \"", name, "\""));
  }
  const std::vector<std::string>& labels = family->label_names();
  for (std::size_t i = 0; i < labels.size(); ++i) {
    if (!IsValidLabelName(labels[i])) {
      Fatal(absl::StrCat(name, ": invalid label name \"", labels[i], "\""));
    }
    if (std::find(labels.begin(), labels.begin() + i, labels[i]) != labels.begin() + i) {
      Fatal(absl::StrCat(name, ": duplicate label name \"", labels[i], "\""));
    }
    if (family->type() == MetricType::kHistogram && labels[i] == "le") {
      Fatal(absl::StrCat(name, ": a histogram may not have the label \"le\""));
    }
  }
  std::vector<std::string> samples = {name};
  if (family->type() == MetricType::kHistogram) {
    samples = {name, absl::StrCat(name, "_bucket"), absl::StrCat(name, "_sum"),
               absl::StrCat(name, "_count")};
  }
  MutexLock lock(&mu_);
  for (const std::string& sample : samples) {
    if (sample_names_.contains(sample)) {
      Fatal(absl::StrCat(name, ": the name \"", sample, "\" is already registered"));
    }
  }
  sample_names_.insert(samples.begin(), samples.end());
  families_.push_back(std::move(family));
}

void Registry::Remove(const internal::FamilyBase* family) {
  MutexLock lock(&mu_);
  const auto it = std::find_if(families_.begin(), families_.end(),
                               [family](const auto& f) { return f.get() == family; });
  if (it == families_.end()) {
    return;
  }
  sample_names_.erase(family->name());
  if (family->type() == MetricType::kHistogram) {
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      sample_names_.erase(absl::StrCat(family->name(), suffix));
    }
  }
  families_.erase(it);
}

Counter& Registry::AddCounter(absl::string_view name, absl::string_view help) {
  return AddCounterFamily(name, help, {}).WithLabels({});
}

Gauge& Registry::AddGauge(absl::string_view name, absl::string_view help) {
  return AddGaugeFamily(name, help, {}).WithLabels({});
}

Histogram& Registry::AddHistogram(absl::string_view name, absl::string_view help,
                                  std::vector<double> bounds) {
  return AddHistogramFamily(name, help, {}, std::move(bounds)).WithLabels({});
}

CounterFamily& Registry::AddCounterFamily(absl::string_view name, absl::string_view help,
                                          std::vector<std::string> label_names) {
  auto family = std::make_shared<CounterFamily>(internal::RegistryKey(), std::string(name),
                                                std::string(help), std::move(label_names));
  CounterFamily& ref = *family;
  Insert(std::move(family));
  return ref;
}

GaugeFamily& Registry::AddGaugeFamily(absl::string_view name, absl::string_view help,
                                      std::vector<std::string> label_names) {
  auto family = std::make_shared<GaugeFamily>(internal::RegistryKey(), std::string(name),
                                              std::string(help), std::move(label_names));
  GaugeFamily& ref = *family;
  Insert(std::move(family));
  return ref;
}

HistogramFamily& Registry::AddHistogramFamily(absl::string_view name, absl::string_view help,
                                              std::vector<std::string> label_names,
                                              std::vector<double> bounds) {
  auto family = std::make_shared<HistogramFamily>(internal::RegistryKey(), std::string(name),
                                                  std::string(help), std::move(label_names),
                                                  CheckedBounds(name, std::move(bounds)));
  HistogramFamily& ref = *family;
  Insert(std::move(family));
  return ref;
}

CallbackHandle Registry::AddCallbackGauge(absl::string_view name, absl::string_view help,
                                          std::function<double()> value) {
  return AddCallbackFamily(name, help, MetricType::kGauge, {},
                           [value = std::move(value)](SampleSink& out) { out.Add({}, value()); });
}

CallbackHandle Registry::AddCallbackFamily(absl::string_view name, absl::string_view help,
                                           MetricType type, std::vector<std::string> label_names,
                                           std::function<void(SampleSink&)> collect) {
  if (type == MetricType::kHistogram) {
    Fatal(absl::StrCat(name, ": a callback family is a counter or a gauge"));
  }
  if (!collect) {
    Fatal(absl::StrCat(name, ": a callback family needs a callback"));
  }
  auto family = std::make_shared<internal::CallbackFamily>(
      std::string(name), std::string(help), type, std::move(label_names), std::move(collect));
  std::shared_ptr<internal::CallbackFamily> handle_ref = family;
  Insert(std::move(family));
  return CallbackHandle(this, std::move(handle_ref));
}

std::string Registry::Render() const {
  // Render outside the Registry's lock: callbacks may take their components' locks, which must
  // not nest inside ours (a component may register while holding them).
  std::vector<std::shared_ptr<internal::FamilyBase>> families;
  {
    MutexLock lock(&mu_);
    families = families_;
  }
  std::string out;
  out.reserve(256 * families.size());
  for (const auto& family : families) {
    family->RenderTo(out);
  }
  return out;
}

}  // namespace tb::metrics
