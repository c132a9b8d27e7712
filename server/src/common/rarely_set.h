#ifndef TB_COMMON_RARELY_SET_H_
#define TB_COMMON_RARELY_SET_H_

// A string or container that is empty in nearly every object, kept on the heap only while it
// holds something: the size of one pointer while empty.
//
// For core::Connection, held a million times over, whose operator detail, data-loss reason and
// revocations still owed are empty in nearly every connection (88 bytes inline as std::string,
// std::string and std::vector, 24 as three of these). Value semantics: copies copy the value,
// comparison compares values, and an empty value is the same as an unset one. Reads go through
// get(), writes through assignment or mutable_value(). Like BoxedOptional (boxed_optional.h),
// nothing in the standard library, Abseil or Boost does this for a copyable type.

#include <cstddef>
#include <memory>
#include <utility>

namespace tb {

template <typename T>
class RarelySet {
 public:
  RarelySet() = default;
  RarelySet(T value) { *this = std::move(value); }  // NOLINT: implicit, like the T it stands for
  RarelySet(const RarelySet& o) : value_(o.empty() ? nullptr : std::make_unique<T>(*o.value_)) {}
  RarelySet(RarelySet&&) noexcept = default;
  RarelySet& operator=(const RarelySet& o) {
    if (this != &o) {
      value_ = o.empty() ? nullptr : std::make_unique<T>(*o.value_);
    }
    return *this;
  }
  RarelySet& operator=(RarelySet&&) noexcept = default;
  RarelySet& operator=(T value) {
    value_ = value.empty() ? nullptr : std::make_unique<T>(std::move(value));
    return *this;
  }

  // The value; an empty T when unset.
  const T& get() const { return value_ ? *value_ : Empty(); }
  // The value to change in place (allocates it when unset).
  T& mutable_value() {
    if (!value_) {
      value_ = std::make_unique<T>();
    }
    return *value_;
  }
  bool empty() const { return !value_ || value_->empty(); }
  size_t size() const { return get().size(); }
  void clear() { value_.reset(); }
  auto begin() const { return get().begin(); }
  auto end() const { return get().end(); }

  friend bool operator==(const RarelySet& a, const RarelySet& b) { return a.get() == b.get(); }

 private:
  static const T& Empty() {
    static const T* const empty = new T();  // never destroyed: safe to read during exit
    return *empty;
  }

  std::unique_ptr<T> value_;
};

}  // namespace tb

#endif  // TB_COMMON_RARELY_SET_H_
