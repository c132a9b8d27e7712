#ifndef TB_COMMON_BOXED_OPTIONAL_H_
#define TB_COMMON_BOXED_OPTIONAL_H_

// An optional value kept on the heap: the size of one pointer while empty.
//
// For members that are rarely set in a type held a million times over (core::Connection's
// refresh intent is 64 bytes inline as std::optional and empty in nearly every connection).
// Same value semantics and the same spelling as std::optional where the code uses it: copies
// copy the value, comparison compares values. Neither the standard library nor Abseil or Boost
// has a copyable heap optional (std::unique_ptr is move-only, boost::optional is inline).

#include <memory>
#include <utility>

namespace tb {

template <typename T>
class BoxedOptional {
 public:
  BoxedOptional() = default;
  BoxedOptional(T value) : value_(std::make_unique<T>(std::move(value))) {}  // NOLINT: implicit
  BoxedOptional(const BoxedOptional& o)
      : value_(o.value_ ? std::make_unique<T>(*o.value_) : nullptr) {}
  BoxedOptional(BoxedOptional&&) noexcept = default;
  BoxedOptional& operator=(const BoxedOptional& o) {
    if (this != &o) {
      value_ = o.value_ ? std::make_unique<T>(*o.value_) : nullptr;
    }
    return *this;
  }
  BoxedOptional& operator=(BoxedOptional&&) noexcept = default;
  BoxedOptional& operator=(T value) {
    value_ = std::make_unique<T>(std::move(value));
    return *this;
  }

  bool has_value() const { return value_ != nullptr; }
  explicit operator bool() const { return has_value(); }
  // Like std::optional, these require a value.
  const T& operator*() const { return *value_; }
  T& operator*() { return *value_; }
  const T* operator->() const { return value_.get(); }
  T* operator->() { return value_.get(); }
  void reset() { value_.reset(); }

  friend bool operator==(const BoxedOptional& a, const BoxedOptional& b) {
    return a.has_value() == b.has_value() && (!a.has_value() || *a == *b);
  }

 private:
  std::unique_ptr<T> value_;
};

}  // namespace tb

#endif  // TB_COMMON_BOXED_OPTIONAL_H_
