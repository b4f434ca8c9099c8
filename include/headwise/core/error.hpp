/// @file
/// @brief argument_error: the one exception headwise throws for bad input, before any work.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace headwise {

/// Thrown for every bad argument, before any work is done and before the output is touched.
/// what() names the function, the argument, what was expected and what was given.
class argument_error : public std::invalid_argument {
 public:
  argument_error(const std::string& function, const std::string& argument, const std::string& expected,
                 const std::string& given)
      : std::invalid_argument(function + ": argument '" + argument + "': expected " + expected +
                              ", got " + given),
        argument_(argument) {}

  /// The name of the offending argument (e.g. "k.shape[2]", "options.window_left").
  [[nodiscard]] const std::string& argument() const noexcept { return argument_; }

 private:
  std::string argument_;
};

namespace detail {
/// A value as text for an error message (integers without a stream: checks format lazily, but
/// some messages format their bounds eagerly).
template <class T>
std::string to_text(const T& v) {
  // Not bool nor the character types (a stream prints char as a character; the others it
  // does not take at all).
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char> &&
                !std::is_same_v<T, signed char> && !std::is_same_v<T, unsigned char> &&
                !std::is_same_v<T, wchar_t> && !std::is_same_v<T, char8_t> && !std::is_same_v<T, char16_t> &&
                !std::is_same_v<T, char32_t>) {
    return std::to_string(v);
  } else {
    std::ostringstream os;
    os << v;
    return os.str();
  }
}
}  // namespace detail

}  // namespace headwise
