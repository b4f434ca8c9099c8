// libFuzzer harness for headwise's public entry points (issue 7, item 3).
//
// Every input is turned into one API call: headwise::attention, attention_blocked (small
// blockings, so that split-KV merging and tile boundaries are reached with tiny shapes),
// attention_varlen, attention_paged, attention_paged_varlen, mla_absorbed, mla_absorbed_paged
// or diff_attention, with arbitrary (small) shapes, strides, dtypes and options, valid or not.
//
// The oracle:
//   * the call throws headwise::argument_error: every byte of every buffer handed to the call
//     (inputs, outputs, padding) is unchanged, and the configuration was one the harness had
//     mutated (a call built only from valid choices must not be rejected);
//   * the call returns: the configuration was not one the harness knows to be invalid (negative
//     extents, null data, non-contiguous last axis, outputs overlapping anything, bad option
//     values), every output element matches the fp64 reference (headwise/reference/) within a
//     tolerance scaled with the row's logit magnitude and max|V|, and no byte outside the output
//     elements changed (padding, inputs, other buffers sharing memory);
//   * anything else (another exception, a crash, a sanitizer report, a mismatch) aborts.
//
// Memory safety: every view the harness builds points into an allocation sized from the view's
// own shape and strides (the span of all its elements), so the library may read any element
// of any view it accepts. Views whose shape cannot be backed (negative or huge extents) get a
// null pointer or a 16-byte buffer and must be rejected before any access.
//
// Values come from a small table (0, ±0.25..±3, ±1e-30, ±30) so that the comparisons stay
// meaningful. A "poison" mode (dense attention only) also puts NaN/±inf into q/k/v and checks
// only the rows that cannot see a non-finite value (plus: no crash).
//
// Build and run: scripts/fuzz.sh [runs]. Replay a crash: build/fuzz/attention_fuzz <file>;
// HEADWISE_FUZZ_VERBOSE=1 prints every case before its call (for sanitizer reports, which abort
// before the harness can print it), HEADWISE_FUZZ_STATS=1 prints the outcome table at exit.
//
// Library defects this harness found (fixed; the inputs stay in the generator and the corpus):
//   1. A subnormal options.softcap passed the argument check but made 1/softcap = +inf in the
//      tile (0·inf = NaN rows); softcap must now be 0 or in [FLT_MIN, 1e38].
//   2. tensor_view::numel_checked computed reach + 1 past INT64_MAX (extent 2, stride ±INT64_MAX)
//      and negated INT64_MIN strides: signed overflow (UBSan). Both are now rejected cleanly.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <headwise/headwise.hpp>
#include <headwise/reference/attention.hpp>
#include <headwise/reference/diff.hpp>

namespace {

using headwise::attention_options;
using headwise::bf16;
using headwise::causal_mode;
using headwise::diff_norm;
using headwise::diff_options;
using headwise::f16;
using headwise::head_map;
using headwise::tensor_view;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr std::int64_t kI64Max = std::numeric_limits<std::int64_t>::max();
constexpr std::int64_t kI64Min = std::numeric_limits<std::int64_t>::min();

// Tolerances (see the file comment): out |got - ref| <= max|V|·(kOutTol + kLogitTol·L) with L the
// row's logit bound |scale|·|q|·max|k| (+ |sink|, + softcap); lse |got - ref| <= kLseTol·max(1,
// |ref|) + kLogitTol·L. kOutTol is attention_test's 2e-5 with margin; kLogitTol covers an f32
// dot product of <= 100 terms (~d·u relative to Σ|q||k| <= |q||k|) through the 2-Lipschitz
// softmax, about 4x over.

constexpr double kOutTol = 4e-5;
constexpr double kLogitTol = 2e-5;
constexpr double kLseTol = 8e-6;

std::string g_log;  // the current case, printed on failure

// Outcome counters, printed at exit when HEADWISE_FUZZ_STATS is set.
struct stats {
  static constexpr int kOps = 9;
  static constexpr const char* kNames[kOps] = {"attention",       "attention_blocked", "attention_varlen",
                                               "attention_paged", "attention_paged_varlen", "mla_absorbed",
                                               "mla_absorbed_paged", "diff_attention", "(none)"};
  long calls[kOps] = {}, accepted[kOps] = {}, rejected[kOps] = {}, mutated_ok[kOps] = {}, poison[kOps] = {};
  long reruns = 0;
  double seconds[kOps] = {};
  int op = kOps - 1;
  stats() {
    if (std::getenv("HEADWISE_FUZZ_STATS") != nullptr) std::atexit([] { print(); });
  }
  static void print();
} g_stats;

void stats::print() {
  const stats& s = g_stats;
  long tc = 0, ta = 0, tr = 0;
  std::fprintf(stderr, "%-24s %8s %8s %8s %12s %8s %10s\n", "entry point", "calls", "accepted", "rejected",
               "mutated+ok", "poison", "ms/input");
  for (int i = 0; i < kOps - 1; ++i) {
    std::fprintf(stderr, "%-24s %8ld %8ld %8ld %12ld %8ld %10.3f\n", kNames[i], s.calls[i], s.accepted[i],
                 s.rejected[i], s.mutated_ok[i], s.poison[i], s.calls[i] ? 1e3 * s.seconds[i] / double(s.calls[i]) : 0.0);
    tc += s.calls[i];
    ta += s.accepted[i];
    tr += s.rejected[i];
  }
  std::fprintf(stderr, "%-24s %8ld %8ld %8ld   (thread/determinism re-runs: %ld)\n", "total", tc, ta, tr, s.reruns);
}

[[noreturn]] void fail(const std::string& why) {
  std::fprintf(stderr, "\n==== headwise fuzz failure ====\n%s\ncase:\n%s\n", why.c_str(), g_log.c_str());
  std::fflush(stderr);
  std::abort();
}

template <class T>
std::string str(const T& v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// ---------------------------------------------------------------------------------------------
// Value generation: a splitmix64 stream seeded from the input
// ---------------------------------------------------------------------------------------------

struct value_rng {
  std::uint64_t s = 0;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  std::uint32_t below(std::uint32_t n) { return static_cast<std::uint32_t>(next() % n); }
};

constexpr float kValues[] = {0.0f,  1.0f,   -1.0f,  0.5f,   -0.5f, 2.0f,  -2.0f,  0.25f, -0.75f,
                             -0.0f, 3.0f,   -3.0f,  1e-30f, -1e-30f, 30.0f, -30.0f};

enum class dtype : std::uint8_t { f32, bf16, f16, i32 };

int esize(dtype t) { return t == dtype::bf16 || t == dtype::f16 ? 2 : 4; }
const char* dname(dtype t) {
  switch (t) {
    case dtype::bf16: return "bf16";
    case dtype::f16: return "f16";
    case dtype::i32: return "i32";
    default: return "f32";
  }
}
template <class T>
constexpr dtype dtype_of() {
  if constexpr (std::is_same_v<T, bf16>) return dtype::bf16;
  else if constexpr (std::is_same_v<T, f16>) return dtype::f16;
  else if constexpr (std::is_same_v<T, std::int32_t>) return dtype::i32;
  else return dtype::f32;
}

// ---------------------------------------------------------------------------------------------
// The arena: slots (views) placed in byte groups (allocations)
// ---------------------------------------------------------------------------------------------

struct slot {
  std::string name;
  int rank = 1;
  std::array<std::int64_t, 4> shape{}, stride{};
  dtype dt = dtype::f32;
  bool output = false;
  bool wild = false;       ///< shape not backed by memory (negative / huge extents)
  bool null_data = false;  ///< data = nullptr
  int group = -1;
  std::int64_t byte_off = 0;  ///< in its group, of the lowest-addressed element
  std::int64_t lo = 0, hi = 0;  ///< element offsets of the lowest / highest element
  unsigned char* data = nullptr;

  [[nodiscard]] std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= shape[static_cast<std::size_t>(i)];
    return n;
  }
  [[nodiscard]] bool empty() const { return wild || numel() == 0; }
  [[nodiscard]] std::int64_t span_bytes() const { return (hi - lo + 1) * esize(dt); }
  template <class F>
  void for_each(F&& f) const {  // f(index array, element offset)
    if (empty()) return;
    std::array<std::int64_t, 4> ix{};
    for (;;) {
      std::int64_t off = 0;
      for (int i = 0; i < rank; ++i) off += ix[static_cast<std::size_t>(i)] * stride[static_cast<std::size_t>(i)];
      f(ix, off);
      int ax = rank - 1;
      for (; ax >= 0; --ax) {
        const auto a = static_cast<std::size_t>(ax);
        if (++ix[a] < shape[a]) break;
        ix[a] = 0;
      }
      if (ax < 0) return;
    }
  }
  [[nodiscard]] std::string describe() const {
    std::ostringstream os;
    os << "  " << name << (output ? " (out)" : "") << " " << dname(dt) << " shape [";
    for (int i = 0; i < rank; ++i) os << (i ? "," : "") << shape[static_cast<std::size_t>(i)];
    os << "] stride [";
    for (int i = 0; i < rank; ++i) os << (i ? "," : "") << stride[static_cast<std::size_t>(i)];
    os << "]";
    if (wild) os << " wild";
    if (null_data) os << " null";
    if (!wild) os << " group " << group << " +" << byte_off << "B span " << span_bytes() << "B";
    return os.str();
  }
};

struct group_buf {
  std::unique_ptr<unsigned char[]> mem;
  std::size_t bytes = 0;
  std::vector<unsigned char> snap;
};

struct ctx {
  FuzzedDataProvider& fdp;
  std::vector<slot> slots;
  std::vector<group_buf> groups;
  int site = 0;                 ///< mutation sites passed so far
  std::array<int, 2> targets{-1, -1};  ///< the sites that mutate (-1: none)
  bool mutated = false;         ///< the configuration may be invalid
  bool expect_invalid = false;  ///< the configuration is certainly invalid
  bool poison = false;          ///< NaN/inf inputs allowed
  int regime = 0;               ///< value table regime
  value_rng vr;  ///< tensor values
  value_rng sr;  ///< structural choices once the input's bytes are used up
  std::ostringstream log;

  explicit ctx(FuzzedDataProvider& f) : fdp(f) {}

  /// A choice in [lo, hi]: from the input's bytes while there are any, then from a stream
  /// seeded by the input (short inputs would otherwise get the minimum of every later choice).
  template <class T>
  T range(T lo, T hi) {
    if (fdp.remaining_bytes() > 0) return fdp.ConsumeIntegralInRange<T>(lo, hi);
    const std::uint64_t span = static_cast<std::uint64_t>(hi) - static_cast<std::uint64_t>(lo);
    const std::uint64_t r = span == ~std::uint64_t{0} ? sr.next() : sr.next() % (span + 1);
    return static_cast<T>(static_cast<std::uint64_t>(lo) + r);
  }
  bool coin(int one_in) { return range<int>(0, one_in - 1) == 0; }
  template <class T, std::size_t N>
  T pick(const T (&a)[N]) { return a[range<std::size_t>(0, N - 1)]; }

  /// A mutation site: true when this call should break something here (the input picked the
  /// site numbers up front, so that every site is equally likely to be hit).
  bool bad() {
    const int me = site++;
    if (me != targets[0] && me != targets[1]) return false;
    mutated = true;
    return true;
  }
  void invalid(const std::string& why) {
    expect_invalid = true;
    log << "  [invalid: " << why << "]\n";
  }
  void maybe(const std::string& why) { log << "  [mutation: " << why << "]\n"; }

  float value() {
    if (poison && vr.below(24) == 0) {
      const float bad_vals[] = {kNaN, kInf, -kInf};
      return bad_vals[vr.below(3)];
    }
    switch (regime) {
      case 0: return kValues[vr.below(9)];   // |x| <= 2
      case 1: return kValues[vr.below(16)];  // the whole table
      default: return vr.below(3) == 0 ? kValues[12 + vr.below(2)] : kValues[vr.below(12)];  // tiny-heavy
    }
  }

  // --- slots -----------------------------------------------------------------------------

  /// Adds a view of the given shape with generated strides. `min_ext` is the smallest legal
  /// extent per axis (used to tell certainly-invalid shape mutations).
  int add(const std::string& name, int rank, std::array<std::int64_t, 4> shape, dtype dt, bool output,
          std::array<std::int64_t, 4> min_ext = {}) {
    slot s;
    s.name = name;
    s.rank = rank;
    s.dt = dt;
    s.output = output;
    const auto R = static_cast<std::size_t>(rank);
    // Shape mutation: one extent changed.
    if (bad()) {
      const auto ax = range<std::size_t>(0, R - 1);
      const std::int64_t old = shape[ax];
      switch (range(0, 6)) {
        case 0: shape[ax] = old + 1; break;
        case 1: shape[ax] = old > 0 ? old - 1 : 2; break;
        case 2: shape[ax] = 0; break;
        case 3: shape[ax] = -1; break;
        case 4: shape[ax] = kI64Min; break;
        case 5: shape[ax] = std::int64_t{1} << 40; break;  // big, not overflowing: null data
        default: shape[ax] = std::int64_t{1} << 62; break;
      }
      maybe(name + ".shape[" + str(ax) + "] " + str(old) + " -> " + str(shape[ax]));
    }
    s.shape = shape;
    bool huge = false;
    for (std::size_t i = 0; i < R; ++i) {
      if (shape[i] < 0) s.wild = true;
      if (shape[i] > 4096) huge = true;
    }
    if (huge) s.wild = true;

    // Strides: inner to outer in a random order of the outer axes, with padding.
    std::array<std::size_t, 4> order{0, 1, 2, 3};  // outer axes, inner first after permutation
    const std::size_t outer = R - 1;
    const int mode = range(0, 9);  // 0-4 contiguous, 5 padded, 6 permuted, 7 negative, 8 broadcast, 9 overlap
    if (mode == 6)
      for (std::size_t i = 0; i + 1 < outer; ++i) std::swap(order[i], order[range<std::size_t>(i, outer - 1)]);
    else
      for (std::size_t i = 0; i < outer; ++i) order[i] = outer - 1 - i;  // row-major: axis R-2 innermost
    auto ext = [](std::int64_t e) { return std::clamp<std::int64_t>(e, 1, 4096); };
    s.stride[R - 1] = 1;
    std::int64_t run = ext(shape[R - 1]) + (mode >= 5 ? range<std::int64_t>(0, 3) : 0);
    for (std::size_t i = 0; i < outer; ++i) {
      const std::size_t ax = order[i];
      s.stride[ax] = run;
      run = run * ext(shape[ax]) + (mode >= 5 ? range<std::int64_t>(0, 2) : 0);
    }
    if (mode == 7 && outer > 0) {
      for (std::size_t ax = 0; ax < outer; ++ax)
        if (coin(2)) s.stride[ax] = -s.stride[ax];
    }
    // Broadcast (zero stride) and overlapping rows: legal for float inputs. Not for the integer
    // tables, whose rows the harness writes per sequence.
    const bool reads_only = !output && dt != dtype::i32;
    if (mode == 8 && outer > 0 && reads_only) s.stride[range<std::size_t>(0, outer - 1)] = 0;
    if (mode == 9 && outer > 0 && reads_only) s.stride[outer - 1] = range<std::int64_t>(1, 2);
    // Stride mutations.
    if (bad()) {
      const std::int64_t vals[] = {2, 0, -1, 3};
      s.stride[R - 1] = pick(vals);
      maybe(name + ".stride[last] = " + str(s.stride[R - 1]));
      if (shape[R - 1] > 1 && !s.wild && s.numel() > 0) invalid(name + " last axis not contiguous");
    }
    bool maybe_overlap = false;
    if (output && outer > 0 && bad()) {
      const auto ax = range<std::size_t>(0, outer - 1);
      const std::int64_t vals[] = {0, 1, s.stride[ax] - 1, -1};
      s.stride[ax] = pick(vals);
      maybe_overlap = true;
      maybe(name + ".stride[" + str(ax) + "] = " + str(s.stride[ax]) + " (output overlap)");
    }
    if (bad()) {
      // A stride whose span overflows 64-bit byte offsets: only on an axis of extent >= 2 (and
      // |stride| >= 2^62, so that (extent - 1)·|stride|·sizeof(T) always overflows).
      std::vector<std::size_t> axes;
      for (std::size_t i = 0; i < R; ++i)
        if (shape[i] >= 2) axes.push_back(i);
      if (!axes.empty()) {
        const std::int64_t vals[] = {std::int64_t{1} << 62, -(std::int64_t{1} << 62), kI64Max, kI64Min + 1, kI64Min};
        const std::size_t ax = axes[range<std::size_t>(0, axes.size() - 1)];
        s.stride[ax] = pick(vals);
        s.wild = true;
        maybe(name + ".stride[" + str(ax) + "] = " + str(s.stride[ax]) + " (overflowing)");
        bool has_elements = true;
        for (std::size_t i = 0; i < R; ++i) has_elements = has_elements && shape[i] > 0;
        if (has_elements) invalid(name + " element offsets overflow 64 bits");
      }
    }
    if (bad()) {
      s.null_data = true;
      maybe(name + " null data");
    }

    if (s.wild) {
      // No memory behind it: must be rejected before any access (unless it holds no element).
      s.null_data = s.null_data || huge || coin(2);
    } else {
      if (s.numel() > 0) {
        for (std::size_t i = 0; i < R; ++i) {
          const std::int64_t e = (shape[i] - 1) * s.stride[i];
          (e < 0 ? s.lo : s.hi) += e;
        }
        if (s.null_data) invalid(name + " null data with elements");
        if (maybe_overlap && output && has_duplicates(s)) invalid(name + " output elements overlap");
      }
    }
    // An extent below its minimum is rejected, unless the view is "absent" (null, all zero).
    bool all_zero = true, below = false;
    for (std::size_t i = 0; i < R; ++i) {
      all_zero = all_zero && shape[i] == 0;
      below = below || shape[i] < min_ext[i];
    }
    if (below && !(all_zero && s.null_data)) invalid(name + " extent below its minimum");
    s.group = static_cast<int>(slots.size());  // own group until placed elsewhere
    s.byte_off = (s.dt == dtype::i32 || s.dt == dtype::f32 ? 4 : 2) * range<std::int64_t>(0, 3);
    slots.push_back(s);
    return static_cast<int>(slots.size()) - 1;
  }

  static bool has_duplicates(const slot& s) {
    std::vector<std::int64_t> offs;
    s.for_each([&](const std::array<std::int64_t, 4>&, std::int64_t off) { offs.push_back(off); });
    std::sort(offs.begin(), offs.end());
    return std::adjacent_find(offs.begin(), offs.end()) != offs.end();
  }

  /// Places slot a in slot b's group: overlapping b's bytes (overlap) or right after them.
  void place_with(int a, int b, bool overlap) {
    slot& A = slots[static_cast<std::size_t>(a)];
    const slot& B = slots[static_cast<std::size_t>(b)];
    if (A.wild || B.wild || A.null_data || B.null_data || A.empty() || B.empty()) return;
    for (const auto& s : slots)
      if (&s != &A && s.group == A.group) return;  // A must be alone in its group
    const std::int64_t sa = A.span_bytes(), sb = B.span_bytes();
    std::int64_t off;
    if (overlap) {
      const std::int64_t first = std::max<std::int64_t>(0, B.byte_off - sa + 4), last = B.byte_off + sb - 4;
      if (last < first) return;
      off = first + 4 * range<std::int64_t>(0, (last - first) / 4);
      off -= off % 4;
    } else {
      off = B.byte_off + sb;
      off += (4 - off % 4) % 4;
    }
    A.group = B.group;
    A.byte_off = off;
    log << "  [" << A.name << " placed " << (overlap ? "over " : "after ") << B.name << "]\n";
  }

  /// Allocates the groups, fills them with the NaN sentinel pattern and sets data pointers.
  void finalize() {
    groups.clear();
    groups.resize(slots.size());
    std::vector<std::int64_t> need(slots.size(), 0);
    for (const auto& s : slots) {
      const std::int64_t end = s.wild ? 16 : s.byte_off + s.span_bytes();
      auto& n = need[static_cast<std::size_t>(s.group)];
      n = std::max(n, end);
    }
    for (std::size_t g = 0; g < slots.size(); ++g) {
      if (need[g] == 0) continue;
      const auto bytes = static_cast<std::size_t>(need[g] + 2 * range<std::int64_t>(0, 3));
      groups[g].bytes = bytes;
      groups[g].mem.reset(new unsigned char[bytes]);
      for (std::size_t i = 0; i < bytes; ++i) groups[g].mem[i] = (i % 2 == 0) ? 0xC0 : 0x7F;  // 0x7FC0: NaN
    }
    for (auto& s : slots) {
      if (s.null_data) {
        s.data = nullptr;
        continue;
      }
      unsigned char* base = groups[static_cast<std::size_t>(s.group)].mem.get();
      s.data = s.wild ? base : base + s.byte_off - s.lo * esize(s.dt);
    }
    // Certain aliasing: an output overlapping any other view.
    for (std::size_t i = 0; i < slots.size(); ++i) {
      const slot& o = slots[i];
      if (!o.output || o.empty() || o.null_data) continue;
      for (std::size_t j = 0; j < slots.size(); ++j) {
        const slot& x = slots[j];
        if (j == i || x.empty() || x.null_data || x.group != o.group) continue;
        if (o.byte_off < x.byte_off + x.span_bytes() && x.byte_off < o.byte_off + o.span_bytes())
          invalid(o.name + " overlaps " + x.name);
      }
    }
  }

  void snapshot() {
    for (auto& g : groups)
      if (g.mem) g.snap.assign(g.mem.get(), g.mem.get() + g.bytes);
  }

  slot& at(int id) { return slots[static_cast<std::size_t>(id)]; }

  template <class T, std::size_t R>
  tensor_view<T, R> view(int id) {
    const slot& s = at(id);
    tensor_view<T, R> v;
    v.data = reinterpret_cast<T*>(s.data);
    for (std::size_t i = 0; i < R; ++i) {
      v.shape[i] = s.shape[i];
      v.stride[i] = s.stride[i];
    }
    return v;
  }

  /// Writes generated values into every element of an input slot.
  void fill(int id) {
    slot& s = at(id);
    if (s.data == nullptr) return;
    s.for_each([&](const std::array<std::int64_t, 4>&, std::int64_t off) { store(s, off, value()); });
  }
  template <class Gen>
  void fill_with(int id, Gen&& gen) {
    slot& s = at(id);
    if (s.data == nullptr) return;
    s.for_each([&](const std::array<std::int64_t, 4>& ix, std::int64_t off) { store(s, off, gen(ix)); });
  }
  static void store(slot& s, std::int64_t off, float x) {
    unsigned char* p = s.data + off * esize(s.dt);
    switch (s.dt) {
      case dtype::f32: std::memcpy(p, &x, 4); break;
      case dtype::bf16: {
        const bf16 h = headwise::to_bf16(x);
        std::memcpy(p, &h, 2);
        break;
      }
      case dtype::f16: {
        const f16 h = headwise::to_f16(x);
        std::memcpy(p, &h, 2);
        break;
      }
      case dtype::i32: {
        const auto i = static_cast<std::int32_t>(x);
        std::memcpy(p, &i, 4);
        break;
      }
    }
  }
  static void store_i32(slot& s, std::int64_t off, std::int32_t x) { std::memcpy(s.data + off * 4, &x, 4); }

  std::string describe() const {
    std::ostringstream os;
    os << log.str();
    for (const auto& s : slots) os << s.describe() << "\n";
    os << "  mutated " << mutated << ", expect_invalid " << expect_invalid << ", poison " << poison;
    return os.str();
  }

  // --- the oracle ------------------------------------------------------------------------

  /// Runs the call; returns true when it succeeded (the caller then checks the outputs).
  template <class F>
  bool run(F&& call) {
    snapshot();
    g_log = describe();
    static const bool verbose = std::getenv("HEADWISE_FUZZ_VERBOSE") != nullptr;
    if (verbose) std::fprintf(stderr, "---- case\n%s\n", g_log.c_str());
    ++g_stats.calls[g_stats.op];
    if (poison) ++g_stats.poison[g_stats.op];
    try {
      call();
    } catch (const headwise::argument_error& e) {
      ++g_stats.rejected[g_stats.op];
      if (!mutated && !expect_invalid) fail(std::string("a valid call was rejected: ") + e.what());
      for (const auto& g : groups)
        if (g.mem && std::memcmp(g.mem.get(), g.snap.data(), g.bytes) != 0)
          fail(std::string("memory changed by a rejected call: ") + e.what());
      return false;
    } catch (const std::exception& e) {
      fail(std::string("unexpected exception: ") + e.what());
    } catch (...) {
      fail("unexpected non-std exception");
    }
    if (expect_invalid) fail("an invalid call was accepted");
    ++g_stats.accepted[g_stats.op];
    if (mutated) ++g_stats.mutated_ok[g_stats.op];
    // Nothing but output elements may change.
    std::vector<std::vector<unsigned char>> writable(groups.size());
    for (std::size_t g = 0; g < groups.size(); ++g) writable[g].assign(groups[g].bytes, 0);
    for (const auto& s : slots) {
      if (!s.output || s.empty() || s.null_data) continue;
      auto& w = writable[static_cast<std::size_t>(s.group)];
      const unsigned char* base = groups[static_cast<std::size_t>(s.group)].mem.get();
      s.for_each([&](const std::array<std::int64_t, 4>&, std::int64_t off) {
        const auto p = static_cast<std::size_t>(s.data + off * esize(s.dt) - base);
        for (int b = 0; b < esize(s.dt); ++b) w[p + static_cast<std::size_t>(b)] = 1;
      });
    }
    for (std::size_t g = 0; g < groups.size(); ++g)
      for (std::size_t i = 0; i < groups[g].bytes; ++i)
        if (!writable[g][i] && groups[g].mem[i] != groups[g].snap[i])
          fail("byte " + str(i) + " of group " + str(g) + " (not an output element) was written");
    return true;
  }

  /// Re-runs a successful call (another thread count) from the pre-call memory: the outputs
  /// must be bitwise identical.
  template <class F>
  void rerun_identical(F&& call, const std::string& what) {
    ++g_stats.reruns;
    std::vector<std::vector<unsigned char>> after;
    for (auto& g : groups) {
      after.emplace_back(g.mem ? g.mem.get() : nullptr, g.mem ? g.mem.get() + g.bytes : nullptr);
      if (g.mem) std::memcpy(g.mem.get(), g.snap.data(), g.bytes);
    }
    try {
      call();
    } catch (const std::exception& e) {
      fail(what + ": the re-run threw: " + e.what());
    }
    for (std::size_t g = 0; g < groups.size(); ++g)
      if (groups[g].mem && std::memcmp(groups[g].mem.get(), after[g].data(), groups[g].bytes) != 0)
        fail(what + ": results differ bitwise from the first run");
  }
};

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// The options shared by every entry point (sink_logits and heads are set by the caller).
void gen_options(ctx& c, attention_options& o, bool need_scale) {
  // scale
  if (!need_scale && c.coin(2)) {
    o.scale.reset();
  } else {
    const float ok[] = {1.0f, 0.5f, 0.125f, 0.35355339f, -1.0f, 0.0f, 2.0f, 1e-3f, -0.0f};
    o.scale = c.pick(ok);
  }
  if (need_scale && c.bad()) {
    o.scale.reset();
    c.invalid("MLA without options.scale");
  } else if (c.bad()) {
    const float badv[] = {kNaN, kInf, -kInf};
    o.scale = c.pick(badv);
    c.invalid("scale not finite");
  }
  // causal
  {
    const int r = c.range(0, 9);
    o.causal = r < 4 ? causal_mode::none : r < 7 ? causal_mode::bottom_right : causal_mode::top_left;
    if (c.bad()) {
      o.causal = static_cast<causal_mode>(c.range<int>(3, 255));
      c.invalid("causal enum out of range");
    }
  }
  // windows
  auto window = [&]() -> std::int64_t {
    const int r = c.range(0, 9);
    if (r < 5) return -1;
    if (r < 9) return c.range<std::int64_t>(0, 9);
    const std::int64_t big[] = {kI64Max, kI64Max / 4, kI64Max / 4 - 1, std::int64_t{1} << 40, INT32_MAX};
    return c.pick(big);
  };
  o.window_left = window();
  o.window_right = window();
  if (o.causal != causal_mode::none && o.window_right > 0 && !c.coin(4)) o.window_right = c.coin(2) ? 0 : -1;
  if (o.causal != causal_mode::none && o.window_right > 0) {
    c.mutated = true;
    c.invalid("window_right > 0 with causal");
  }
  if (c.bad()) {
    const std::int64_t badv[] = {-2, kI64Min, -1000};
    (c.coin(2) ? o.window_left : o.window_right) = c.pick(badv);
    c.invalid("window < -1");
  }
  // sinks
  {
    const int r = c.range(0, 9);
    o.sink_tokens = r < 6 ? 0 : r < 9 ? c.range<std::int64_t>(1, 5) : kI64Max;
    if (c.bad()) {
      const std::int64_t badv[] = {-1, kI64Min};
      o.sink_tokens = c.pick(badv);
      c.invalid("sink_tokens < 0");
    }
  }
  // softcap
  {
    const float ok[] = {0.0f, 0.0f, 0.0f, 0.0f, 0.5f, 5.0f, 30.0f, 1e-3f, -0.0f, 1e-37f, 1e38f};
    o.softcap = c.pick(ok);
    if (c.bad()) {
      const float badv[] = {-1.0f, kNaN, kInf, -kInf, -1e-40f, 1e-40f, 3e38f};
      o.softcap = c.pick(badv);
      c.invalid("softcap negative, subnormal, above 1e38 or not finite");
    }
  }
  // threads
  {
    const int ok[] = {0, 0, 0, 1, 2, 3, 4, INT_MAX};
    o.num_threads = c.pick(ok);
    if (c.bad()) {
      const int badv[] = {-1, INT_MIN};
      o.num_threads = c.pick(badv);
      c.invalid("num_threads < 0");
    }
  }
}

std::string options_str(const attention_options& o) {
  std::ostringstream os;
  os << "  options: scale=" << (o.scale ? str(*o.scale) : "default") << " causal=" << static_cast<int>(o.causal)
     << " window=(" << o.window_left << "," << o.window_right << ") sink_tokens=" << o.sink_tokens
     << " softcap=" << o.softcap << " heads=" << static_cast<int>(o.heads) << " threads=" << o.num_threads
     << (o.sink_logits.absent() ? "" : " sink_logits") << "\n";
  return os.str();
}

/// Head counts for a head map: interleave (heads_kv | heads_q) or tile (one divides the other).
struct heads_cfg {
  std::int64_t hq, hkv, ho;
  head_map map;
};
heads_cfg gen_heads(ctx& c, bool allow_tile = true) {
  heads_cfg h{};
  if (allow_tile && c.coin(4)) {
    const std::int64_t a = c.range<std::int64_t>(1, 3), r = c.range<std::int64_t>(1, 3);
    if (c.coin(2)) {
      h.hq = a;
      h.hkv = a * r;
    } else {
      h.hq = a * r;
      h.hkv = a;
    }
    h.map = head_map::tile;
    h.ho = std::max(h.hq, h.hkv);
  } else {
    h.hkv = c.range<std::int64_t>(1, 3);
    h.hq = h.hkv * c.range<std::int64_t>(1, 4);
    h.map = head_map::interleave;
    h.ho = h.hq;
  }
  return h;
}

void gen_head_map_mutation(ctx& c, attention_options& o, const heads_cfg& h) {
  o.heads = h.map;
  if (c.bad()) {
    o.heads = static_cast<head_map>(c.range<int>(2, 255));
    c.invalid("head_map enum out of range");
  } else if (c.bad()) {
    o.heads = o.heads == head_map::tile ? head_map::interleave : head_map::tile;
    c.maybe("head map flipped");
  }
}

std::int64_t gen_dim(ctx& c) {
  const std::int64_t small[] = {1, 2, 3, 4, 5, 7, 8, 9, 16, 17};
  const std::int64_t big[] = {24, 33, 64, 72, 80};
  return c.coin(12) ? c.pick(big) : c.pick(small);
}

/// Optional sink logits (heads_out values); returns the slot or -1.
int gen_sink_logits(ctx& c, std::int64_t heads_out) {
  if (!c.coin(4)) return -1;
  std::int64_t n = heads_out;
  if (c.bad()) {
    n = heads_out + (c.coin(2) ? 1 : -1);
    if (n != heads_out) c.invalid("sink_logits length");
  }
  return c.add("sink_logits", 1, {n}, dtype::f32, false, {1});
}
void fill_sink_logits(ctx& c, int id) {
  if (id < 0) return;
  const float ok[] = {-kInf, 0.0f, 1.0f, -1.0f, 3.0f, -30.0f, 30.0f, 0.5f};
  const bool make_bad = c.bad();
  bool any = false;
  c.fill_with(id, [&](const auto&) {
    if (make_bad && (!any || c.vr.below(2) == 0)) {
      any = true;
      return c.vr.below(2) == 0 ? kNaN : kInf;
    }
    return ok[c.vr.below(8)];
  });
  if (make_bad && any) c.invalid("sink_logits NaN or +inf");
}

// ---------------------------------------------------------------------------------------------
// Reference comparison for attention-like calls
// ---------------------------------------------------------------------------------------------

template <class T>
double as_double(const T& x) {
  return static_cast<double>(headwise::to_float(x));
}

/// Compares a dense problem's outputs (got, got_lse: views of what the library wrote) with the
/// fp64 reference on the same inputs. In poison mode, rows that can see a non-finite input are
/// skipped.
template <class KV>
void check_dense(ctx& c, tensor_view<const float, 4> q, tensor_view<const KV, 4> k, tensor_view<const KV, 4> v,
                 const attention_options& o, tensor_view<const float, 4> got, tensor_view<const float, 3> got_lse,
                 const std::string& what) {
  const std::int64_t B = q.shape[0], Sq = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const std::int64_t Skv = k.shape[1], Hkv = k.shape[2], Dv = v.shape[3], Ho = got.shape[2];
  if (B * Sq * Ho == 0) return;
  std::vector<float> ro(static_cast<std::size_t>(B * Sq * Ho * Dv)), rl(static_cast<std::size_t>(B * Ho * Sq));
  try {
    headwise::reference::attention(q, k, v, headwise::bshd(ro.data(), B, Sq, Ho, Dv), o,
                                   headwise::bhs(rl.data(), B, Ho, Sq));
  } catch (const std::exception& e) {
    fail(what + ": the reference rejected an accepted call: " + e.what());
  }
  const double scale = headwise::detail::resolve_scale(o, D);
  double extra = (o.softcap > 0.0f ? static_cast<double>(o.softcap) : 0.0);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Ho; ++h) {
      const std::int64_t hq = h % Hq, hk = o.heads == head_map::interleave ? h / (Hq / Hkv) : h % Hkv;
      double sink = 0;
      if (!o.sink_logits.absent() && std::isfinite(o.sink_logits(h))) sink = std::abs(double(o.sink_logits(h)));
      for (std::int64_t i = 0; i < Sq; ++i) {
        double qn = 0, kmax = 0, vmax = 0;
        bool bad = false, sees_any = false;
        for (std::int64_t d = 0; d < D; ++d) {
          const double x = q(b, i, hq, d);
          bad |= !std::isfinite(x);
          qn += x * x;
        }
        for (std::int64_t j = 0; j < Skv; ++j) {
          if (!headwise::reference::visible(o, i, j, Sq, Skv)) continue;
          sees_any = true;
          double kn = 0;
          for (std::int64_t d = 0; d < D; ++d) {
            const double x = as_double(k(b, j, hk, d));
            bad |= !std::isfinite(x);
            kn += x * x;
          }
          for (std::int64_t d = 0; d < Dv; ++d) {
            const double x = as_double(v(b, j, hk, d));
            bad |= !std::isfinite(x);
            vmax = std::max(vmax, std::abs(x));
          }
          kmax = std::max(kmax, kn);
        }
        // A non-finite V value also reaches rows masked from it within the same key tile (0·NaN
        // in P·V; documented in the README's Guarantees): tiles depend on the blocking, so any
        // non-finite V value of this (batch, KV head) taints every row that sees some key, or
        // only a sink logit (rows with neither write exact zeros).
        const bool sink_logit = !o.sink_logits.absent() && std::isfinite(o.sink_logits(h));
        if ((sees_any || sink_logit) && c.poison)
          for (std::int64_t j = 0; j < Skv && !bad; ++j)
            for (std::int64_t d = 0; d < Dv; ++d) bad |= !std::isfinite(as_double(v(b, j, hk, d)));
        if (bad) {
          if (!c.poison) fail(what + ": non-finite input outside poison mode");
          continue;
        }
        // The softcap term never exceeds the raw logit bound (|cap·tanh(s/cap)| <= |s|).
        const double raw = std::abs(scale) * std::sqrt(qn) * std::sqrt(kmax);
        const double L = raw + std::min(extra, raw) + sink;
        const double tol = vmax * (kOutTol + kLogitTol * L);
        for (std::int64_t d = 0; d < Dv; ++d) {
          const double g = got(b, i, h, d), r = ro[static_cast<std::size_t>(((b * Sq + i) * Ho + h) * Dv + d)];
          if (!(std::abs(g - r) <= tol))
            fail(what + ": out[" + str(b) + "," + str(i) + "," + str(h) + "," + str(d) + "] = " + str(g) +
                 ", reference " + str(r) + ", tolerance " + str(tol) + " (L " + str(L) + ", max|V| " + str(vmax) +
                 ")");
        }
        if (!got_lse.absent()) {
          const double g = got_lse(b, h, i), r = rl[static_cast<std::size_t>((b * Ho + h) * Sq + i)];
          const bool ok = (std::isinf(r) && g == r) ||
                          (std::isfinite(r) && std::abs(g - r) <= kLseTol * std::max(1.0, std::abs(r)) + kLogitTol * L);
          if (!ok)
            fail(what + ": lse[" + str(b) + "," + str(h) + "," + str(i) + "] = " + str(g) + ", reference " + str(r) +
                 " (L " + str(L) + ")");
        }
      }
    }
}

/// &t.data[index·t.stride[axis]], or t.data for a view without elements (which may be null or
/// carry strides whose products overflow: only views with elements have checked offsets).
template <class T, std::size_t R>
T* advance(const tensor_view<T, R>& t, std::int64_t index, std::size_t axis) {
  return t.numel() == 0 ? t.data : t.data + index * t.stride[axis];
}

/// A batch slice (extent 1 on axis 0) of a view; an absent view stays absent.
template <class T, std::size_t R>
tensor_view<T, R> batch_of(tensor_view<T, R> t, std::int64_t b) {
  if (t.absent()) return t;
  tensor_view<T, R> s = t;
  s.data = advance(t, b, 0);
  s.shape[0] = 1;
  return s;
}
/// A 3-D [total, heads, dim] range as a batch-1 4-D view.
template <class T>
tensor_view<T, 4> rows_of(tensor_view<T, 3> t, std::int64_t first, std::int64_t n) {
  return {advance(t, first, 0), {1, n, t.shape[1], t.shape[2]},
          {0, t.stride[0], t.stride[1], t.stride[2]}};
}
template <class T>
tensor_view<T, 3> cols_of(tensor_view<T, 2> t, std::int64_t first, std::int64_t n) {
  if (t.absent()) return {};
  return {advance(t, first, 1), {1, t.shape[0], n}, {0, t.stride[0], t.stride[1]}};
}

/// Gathers one sequence of a paged cache into a contiguous [1, len, heads, dim] buffer.
template <class T>
std::vector<T> gather(tensor_view<const T, 4> pages, tensor_view<const std::int32_t, 2> table, std::int64_t b,
                      std::int64_t len) {
  const std::int64_t ps = pages.shape[1], H = pages.shape[2], D = pages.shape[3];
  std::vector<T> out(static_cast<std::size_t>(std::max<std::int64_t>(1, len * H * D)));
  for (std::int64_t j = 0; j < len; ++j)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t d = 0; d < D; ++d)
        out[static_cast<std::size_t>((j * H + h) * D + d)] = pages(table(b, j / ps), j % ps, h, d);
  return out;
}

template <class T>
tensor_view<const T, 4> dense4(const std::vector<T>& buf, std::int64_t len, std::int64_t H, std::int64_t D) {
  return headwise::bshd<const T>(buf.data(), 1, len, H, D);
}

bool want_rerun(ctx& c, attention_options& o) {
  if (!c.coin(4)) return false;
  const int nts[] = {1, 2, 3, 0};
  const int old = o.num_threads;
  o.num_threads = c.pick(nts);
  if (o.num_threads == old) o.num_threads = old == 1 ? 2 : 1;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

std::int64_t gen_seq(ctx& c, std::int64_t small, std::int64_t big) {
  return c.coin(6) ? c.range<std::int64_t>(0, big) : c.range<std::int64_t>(0, small);
}

/// headwise::attention and attention_blocked.
template <class KV>
void op_dense(ctx& c, bool blocked) {
  const dtype kd = dtype_of<KV>();
  c.poison = c.coin(8);
  const std::int64_t B = c.range<std::int64_t>(1, 3), Sq = gen_seq(c, 9, 24), Skv = gen_seq(c, 12, 80);
  const heads_cfg h = gen_heads(c);
  const std::int64_t D = gen_dim(c), Dv = c.coin(3) ? D : gen_dim(c);
  const bool v_prefix = Dv <= D && c.coin(6);
  const bool with_lse = !c.coin(4);
  c.log << "  attention" << (blocked ? "_blocked" : "") << "<" << dname(kd) << "> B " << B << " Sq " << Sq << " Skv "
        << Skv << " Hq " << h.hq << " Hkv " << h.hkv << " D " << D << " Dv " << Dv << (v_prefix ? " v=k[..Dv]" : "")
        << "\n";
  const int q = c.add("q", 4, {B, Sq, h.hq, D}, dtype::f32, false, {1, 0, 1, 1});
  const int k = c.add("k", 4, {B, Skv, h.hkv, D}, kd, false, {1, 0, 1, 1});
  int v = -1;
  if (v_prefix) {
    slot s = c.at(k);
    s.name = "v";
    s.shape[3] = Dv;
    if (!s.wild && s.numel() > 0) {
      s.lo = 0;
      s.hi = 0;
      for (std::size_t i = 0; i < 4; ++i) {
        const std::int64_t e = (s.shape[i] - 1) * s.stride[i];
        (e < 0 ? s.lo : s.hi) += e;
      }
    }
    c.slots.push_back(s);
    v = static_cast<int>(c.slots.size()) - 1;
  } else {
    v = c.add("v", 4, {B, Skv, h.hkv, Dv}, kd, false, {1, 0, 1, 1});
  }
  const int out = c.add("out", 4, {B, Sq, h.ho, Dv}, dtype::f32, true, {1, 0, 1, 1});
  const int lse = with_lse ? c.add("lse", 3, {B, h.ho, Sq}, dtype::f32, true, {1, 1, 0}) : -1;
  attention_options o;
  gen_options(c, o, false);
  gen_head_map_mutation(c, o, h);
  const int sl = gen_sink_logits(c, h.ho);
  // Aliasing: inputs may share memory; outputs may sit next to anything, or (invalid) over it.
  if (!v_prefix && c.coin(8)) c.place_with(v, k, true);
  if (kd == dtype::f32 && c.coin(10)) c.place_with(k, q, c.coin(2));
  if (c.coin(6)) c.place_with(out, c.coin(2) ? q : k, false);
  if (c.bad()) {
    const int others[] = {q, k, v, lse, sl};
    int x = c.pick(others);
    if (x < 0) x = q;
    c.place_with(out, x, true);
  }
  if (lse >= 0 && c.bad()) c.place_with(lse, c.coin(2) ? out : q, true);
  headwise::engine::blocking blk;
  if (blocked) {
    blk.rows = c.range<std::int64_t>(1, 40);
    blk.block_kv = c.range<std::int64_t>(1, 20);
    blk.decode_block_kv = c.range<std::int64_t>(1, 20);
    blk.split_kv = c.range<std::int64_t>(0, 12);
    blk.prefetch_bytes = c.range<std::int64_t>(0, 512);
    blk.decode_block_kv16 = blk.decode_block_kv;  // 16-bit caches get the drawn tile size too
    if (c.bad()) {
      const std::int64_t badv[] = {0, -1, kI64Min};
      switch (c.range(0, 4)) {
        case 0: blk.rows = c.pick(badv); break;
        case 1: blk.block_kv = c.pick(badv); break;
        case 2: (c.coin(2) ? blk.decode_block_kv : blk.decode_block_kv16) = c.pick(badv); break;
        case 3: blk.split_kv = -1; break;
        default: blk.prefetch_bytes = -1; break;
      }
      c.invalid("blocking out of range");
    }
    c.log << "  blocking rows " << blk.rows << " block_kv " << blk.block_kv << " decode_block_kv "
          << blk.decode_block_kv << " decode_block_kv16 " << blk.decode_block_kv16 << " split_kv " << blk.split_kv
          << " prefetch " << blk.prefetch_bytes << "\n";
  }
  c.finalize();
  c.fill(q);
  c.fill(k);
  if (!v_prefix) c.fill(v);
  fill_sink_logits(c, sl);
  if (sl >= 0) o.sink_logits = c.view<const float, 1>(sl);
  c.log << options_str(o);

  const auto qv = c.view<const float, 4>(q);
  const auto kv = c.view<const KV, 4>(k);
  const auto vv = c.view<const KV, 4>(v);
  const auto ov = c.view<float, 4>(out);
  const auto lv = lse >= 0 ? c.view<float, 3>(lse) : tensor_view<float, 3>{};
  auto call = [&](const attention_options& opt) {
    if (blocked) headwise::attention_blocked(qv, kv, vv, ov, opt, lv, blk);
    else headwise::attention(qv, kv, vv, ov, opt, lv);
  };
  if (!c.run([&] { call(o); })) return;
  check_dense<KV>(c, qv, kv, vv, o, ov, lv, "attention");
  attention_options o2 = o;
  if (want_rerun(c, o2)) c.rerun_identical([&] { call(o2); }, "attention threads " + str(o2.num_threads));
}

/// headwise::attention_varlen.
template <class KV>
void op_varlen(ctx& c) {
  const dtype kd = dtype_of<KV>();
  const std::int64_t nb = c.range<std::int64_t>(1, 3);
  std::vector<std::int32_t> cq(static_cast<std::size_t>(nb + 1)), ck(static_cast<std::size_t>(nb + 1));
  for (std::int64_t b = 0; b < nb; ++b) {
    cq[static_cast<std::size_t>(b + 1)] = cq[static_cast<std::size_t>(b)] + static_cast<std::int32_t>(gen_seq(c, 6, 20));
    ck[static_cast<std::size_t>(b + 1)] = ck[static_cast<std::size_t>(b)] + static_cast<std::int32_t>(gen_seq(c, 10, 70));
  }
  const std::int64_t Tq = cq.back(), Tk = ck.back();
  const heads_cfg h = gen_heads(c);
  const std::int64_t D = gen_dim(c), Dv = c.coin(3) ? D : gen_dim(c);
  c.log << "  attention_varlen<" << dname(kd) << "> batch " << nb << " total_q " << Tq << " total_k " << Tk << " Hq "
        << h.hq << " Hkv " << h.hkv << " D " << D << " Dv " << Dv << "\n";
  const int q = c.add("q", 3, {Tq, h.hq, D}, dtype::f32, false, {0, 1, 1});
  const int k = c.add("k", 3, {Tk, h.hkv, D}, kd, false, {0, 1, 1});
  const int v = c.add("v", 3, {Tk, h.hkv, Dv}, kd, false, {0, 1, 1});
  const int out = c.add("out", 3, {Tq, h.ho, Dv}, dtype::f32, true, {0, 1, 1});
  const int lse = c.coin(3) ? -1 : c.add("lse", 2, {h.ho, Tq}, dtype::f32, true, {1, 0});
  const int cuq = c.add("cu_seqlens_q", 1, {nb + 1}, dtype::i32, false, {1});
  const int cuk = c.add("cu_seqlens_k", 1, {nb + 1}, dtype::i32, false, {1});
  attention_options o;
  gen_options(c, o, false);
  gen_head_map_mutation(c, o, h);
  const int sl = gen_sink_logits(c, h.ho);
  if (c.bad()) c.place_with(out, c.coin(2) ? cuq : v, true);
  // cu_seqlens mutations
  auto mutate_cu = [&](std::vector<std::int32_t>& cu, const char* name) {
    if (!c.bad()) return;
    const auto i = c.range<std::size_t>(0, cu.size() - 1);
    const std::int32_t old = cu[i];
    const std::int32_t vals[] = {old + 1, old - 1, -1, INT32_MAX, INT32_MIN, 0};
    cu[i] = c.pick(vals);
    c.maybe(std::string(name) + "[" + str(i) + "] " + str(old) + " -> " + str(cu[i]));
  };
  mutate_cu(cq, "cu_seqlens_q");
  mutate_cu(ck, "cu_seqlens_k");
  c.finalize();
  c.fill(q);
  c.fill(k);
  c.fill(v);
  fill_sink_logits(c, sl);
  if (sl >= 0) o.sink_logits = c.view<const float, 1>(sl);
  for (int id : {cuq, cuk}) {
    slot& s = c.at(id);
    const auto& cu = id == cuq ? cq : ck;
    if (s.data != nullptr)
      s.for_each([&](const auto& ix, std::int64_t off) {
        ctx::store_i32(s, off, ix[0] < static_cast<std::int64_t>(cu.size()) ? cu[static_cast<std::size_t>(ix[0])] : 7);
      });
  }
  c.log << options_str(o);
  const auto qv = c.view<const float, 3>(q);
  const auto kv = c.view<const KV, 3>(k);
  const auto vv = c.view<const KV, 3>(v);
  const auto ov = c.view<float, 3>(out);
  const auto lv = lse >= 0 ? c.view<float, 2>(lse) : tensor_view<float, 2>{};
  const auto cqv = c.view<const std::int32_t, 1>(cuq);
  const auto ckv = c.view<const std::int32_t, 1>(cuk);
  auto call = [&](const attention_options& opt) {
    headwise::attention_varlen(qv, kv, vv, cqv, ckv, ov, opt, lv);
  };
  if (!c.run([&] { call(o); })) return;
  for (std::int64_t b = 0; b + 1 < cqv.shape[0]; ++b) {
    const std::int64_t q0 = cqv(b), nq = cqv(b + 1) - q0, k0 = ckv(b), nk = ckv(b + 1) - k0;
    if (nq == 0) continue;
    check_dense<KV>(c, rows_of(qv, q0, nq), rows_of(kv, k0, nk), rows_of(vv, k0, nk), o,
                    rows_of(tensor_view<const float, 3>(ov), q0, nq), cols_of(tensor_view<const float, 2>(lv), q0, nq),
                    "attention_varlen sequence " + str(b));
  }
  attention_options o2 = o;
  if (want_rerun(c, o2)) c.rerun_identical([&] { call(o2); }, "attention_varlen threads");
}

/// Block table and lengths of a paged cache (shared by the paged entry points).
struct paged_cfg {
  std::int64_t pages, page_size, max_pages;
  std::vector<std::int32_t> table;  // batch x max_pages
  std::vector<std::int32_t> lens;
};

paged_cfg gen_paged(ctx& c, std::int64_t batch) {
  paged_cfg p{};
  p.pages = c.range<std::int64_t>(1, 8);
  p.page_size = c.range<std::int64_t>(1, 5);
  p.max_pages = c.range<std::int64_t>(0, 4);
  p.table.resize(static_cast<std::size_t>(batch * p.max_pages));
  p.lens.resize(static_cast<std::size_t>(batch));
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t cap = p.max_pages * p.page_size;
    p.lens[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(c.coin(4) ? cap : c.range<std::int64_t>(0, cap));
    const std::int64_t used = (p.lens[static_cast<std::size_t>(b)] + p.page_size - 1) / p.page_size;
    for (std::int64_t j = 0; j < p.max_pages; ++j) {
      const std::int32_t junk[] = {-1, static_cast<std::int32_t>(p.pages), INT32_MIN, INT32_MAX, 0};
      p.table[static_cast<std::size_t>(b * p.max_pages + j)] =
          j < used ? static_cast<std::int32_t>(c.range<std::int64_t>(0, p.pages - 1)) : c.pick(junk);
    }
  }
  if (c.bad() && batch > 0) {
    const auto b = c.range<std::int64_t>(0, batch - 1);
    auto& len = p.lens[static_cast<std::size_t>(b)];
    const std::int32_t vals[] = {static_cast<std::int32_t>(p.max_pages * p.page_size + 1), -1, INT32_MAX, INT32_MIN};
    len = c.pick(vals);
    c.invalid("seqlens[" + str(b) + "] = " + str(len) + " beyond capacity");
  }
  if (c.bad() && p.max_pages > 0) {
    const auto b = c.range<std::int64_t>(0, batch - 1);
    const std::int64_t used = (std::clamp<std::int64_t>(p.lens[static_cast<std::size_t>(b)], 0, p.max_pages * p.page_size) +
                               p.page_size - 1) / p.page_size;
    if (used > 0) {
      const auto j = c.range<std::int64_t>(0, used - 1);
      const std::int32_t vals[] = {-1, static_cast<std::int32_t>(p.pages), INT32_MIN, INT32_MAX};
      p.table[static_cast<std::size_t>(b * p.max_pages + j)] = c.pick(vals);
      c.invalid("block_table[" + str(b) + "][" + str(j) + "] out of range");
    }
  }
  return p;
}

void write_table(ctx& c, int id, const paged_cfg& p) {
  slot& s = c.at(id);
  if (s.data == nullptr) return;
  s.for_each([&](const auto& ix, std::int64_t off) {
    const bool in = ix[1] < p.max_pages && ix[0] * p.max_pages + ix[1] < static_cast<std::int64_t>(p.table.size());
    ctx::store_i32(s, off, in ? p.table[static_cast<std::size_t>(ix[0] * p.max_pages + ix[1])] : -5);
  });
}
void write_lens(ctx& c, int id, const std::vector<std::int32_t>& v) {
  slot& s = c.at(id);
  if (s.data == nullptr) return;
  s.for_each([&](const auto& ix, std::int64_t off) {
    ctx::store_i32(s, off, ix[0] < static_cast<std::int64_t>(v.size()) ? v[static_cast<std::size_t>(ix[0])] : 3);
  });
}

/// headwise::attention_paged (ragged = false) and attention_paged_varlen (ragged = true).
template <class KV>
void op_paged(ctx& c, bool ragged) {
  const dtype kd = dtype_of<KV>();
  const std::int64_t B = c.range<std::int64_t>(1, 3);
  const heads_cfg h = gen_heads(c);
  const std::int64_t D = gen_dim(c), Dv = c.coin(3) ? D : gen_dim(c);
  const paged_cfg p = gen_paged(c, B);
  std::int64_t Sq = 0;
  std::vector<std::int32_t> cq(static_cast<std::size_t>(B + 1));
  if (ragged) {
    for (std::int64_t b = 0; b < B; ++b)
      cq[static_cast<std::size_t>(b + 1)] = cq[static_cast<std::size_t>(b)] + static_cast<std::int32_t>(c.range(0, 5));
    if (c.bad()) {
      cq[static_cast<std::size_t>(c.range<std::int64_t>(0, B))] += c.coin(2) ? 1 : -1;
      c.maybe("cu_seqlens_q entry");
    }
  } else {
    Sq = gen_seq(c, 6, 12);
  }
  c.log << "  attention_paged" << (ragged ? "_varlen" : "") << "<" << dname(kd) << "> B " << B << " Sq "
        << (ragged ? cq.back() : Sq) << " Hq " << h.hq << " Hkv " << h.hkv << " D " << D << " Dv " << Dv << " pages "
        << p.pages << " page_size " << p.page_size << " max_pages " << p.max_pages << " lens";
  for (auto l : p.lens) c.log << " " << l;
  c.log << "\n";
  const std::int64_t Tq = cq.back();
  const int q = ragged ? c.add("q", 3, {Tq, h.hq, D}, dtype::f32, false, {0, 1, 1})
                       : c.add("q", 4, {B, Sq, h.hq, D}, dtype::f32, false, {1, 0, 1, 1});
  const int kp = c.add("k_pages", 4, {p.pages, p.page_size, h.hkv, D}, kd, false, {1, 1, 1, 1});
  const int vp = c.add("v_pages", 4, {p.pages, p.page_size, h.hkv, Dv}, kd, false, {1, 1, 1, 1});
  const int bt = c.add("block_table", 2, {B, p.max_pages}, dtype::i32, false, {B, 0});
  const int sq = c.add("seqlens", 1, {B}, dtype::i32, false, {B});
  const int out = ragged ? c.add("out", 3, {Tq, h.ho, Dv}, dtype::f32, true, {0, 1, 1})
                         : c.add("out", 4, {B, Sq, h.ho, Dv}, dtype::f32, true, {1, 0, 1, 1});
  const int lse = c.coin(3) ? -1
                  : ragged  ? c.add("lse", 2, {h.ho, Tq}, dtype::f32, true, {1, 0})
                            : c.add("lse", 3, {B, h.ho, Sq}, dtype::f32, true, {1, 1, 0});
  const int cuq = ragged ? c.add("cu_seqlens_q", 1, {B + 1}, dtype::i32, false, {1}) : -1;
  attention_options o;
  gen_options(c, o, false);
  gen_head_map_mutation(c, o, h);
  const int sl = gen_sink_logits(c, h.ho);
  if (c.coin(8)) c.place_with(vp, kp, true);
  if (c.bad()) {
    const int others[] = {kp, vp, bt, sq};
    c.place_with(out, c.pick(others), true);
  }
  if (lse >= 0 && c.bad()) c.place_with(lse, c.coin(2) ? bt : sq, true);
  c.finalize();
  c.fill(q);
  c.fill(kp);
  c.fill(vp);
  write_table(c, bt, p);
  write_lens(c, sq, p.lens);
  if (cuq >= 0) write_lens(c, cuq, cq);
  fill_sink_logits(c, sl);
  if (sl >= 0) o.sink_logits = c.view<const float, 1>(sl);
  c.log << options_str(o);
  const headwise::paged_kv<KV> kv{c.view<const KV, 4>(kp), c.view<const KV, 4>(vp),
                                  c.view<const std::int32_t, 2>(bt), c.view<const std::int32_t, 1>(sq)};
  auto check = [&](const attention_options& opt) {
    if (ragged) {
      const auto qv = c.view<const float, 3>(q);
      const auto ov = c.view<float, 3>(out);
      const auto lv = lse >= 0 ? c.view<float, 2>(lse) : tensor_view<float, 2>{};
      headwise::attention_paged_varlen(qv, c.view<const std::int32_t, 1>(cuq), kv, ov, opt, lv);
    } else {
      const auto qv = c.view<const float, 4>(q);
      const auto ov = c.view<float, 4>(out);
      const auto lv = lse >= 0 ? c.view<float, 3>(lse) : tensor_view<float, 3>{};
      headwise::attention_paged(qv, kv, ov, opt, lv);
    }
  };
  if (!c.run([&] { check(o); })) return;
  for (std::int64_t b = 0; b < kv.seqlens.shape[0] && b < kv.block_table.shape[0]; ++b) {
    const std::int64_t len = kv.seqlens(b);
    const auto kg = gather(kv.k_pages, kv.block_table, b, len);
    const auto vg = gather(kv.v_pages, kv.block_table, b, len);
    const auto k4 = dense4(kg, len, kv.k_pages.shape[2], kv.k_pages.shape[3]);
    const auto v4 = dense4(vg, len, kv.v_pages.shape[2], kv.v_pages.shape[3]);
    if (ragged) {
      const auto qv = c.view<const float, 3>(q);
      const auto cu = c.view<const std::int32_t, 1>(cuq);
      if (b + 1 >= cu.shape[0]) break;
      const std::int64_t q0 = cu(b), nq = cu(b + 1) - q0;
      if (nq == 0) continue;
      const auto lv = lse >= 0 ? c.view<const float, 2>(lse) : tensor_view<const float, 2>{};
      check_dense<KV>(c, rows_of(qv, q0, nq), k4, v4, o, rows_of(c.view<const float, 3>(out), q0, nq),
                      cols_of(lv, q0, nq), "attention_paged_varlen sequence " + str(b));
    } else {
      const auto lv = lse >= 0 ? c.view<const float, 3>(lse) : tensor_view<const float, 3>{};
      check_dense<KV>(c, batch_of(c.view<const float, 4>(q), b), k4, v4, o, batch_of(c.view<const float, 4>(out), b),
                      batch_of(lv, b), "attention_paged sequence " + str(b));
    }
  }
  attention_options o2 = o;
  if (want_rerun(c, o2)) c.rerun_identical([&] { check(o2); }, "attention_paged threads");
}

/// headwise::mla_absorbed (paged = false) and mla_absorbed_paged.
template <class KV>
void op_mla(ctx& c, bool paged) {
  const dtype kd = dtype_of<KV>();
  const std::int64_t B = c.range<std::int64_t>(1, 3), Sq = gen_seq(c, 5, 12);
  const std::int64_t H = c.range<std::int64_t>(1, 8);
  const std::int64_t dc_vals[] = {1, 2, 4, 7, 8, 16, 17, 32};
  const std::int64_t dc = c.pick(dc_vals), dr = c.range<std::int64_t>(0, 9), Dl = dc + dr;
  std::int64_t out_dc = dc;
  if (c.bad()) {
    const std::int64_t vals[] = {0, Dl + 1, -1, Dl};
    out_dc = c.pick(vals);
    c.maybe("out.shape[3] (d_c) = " + str(out_dc));
    if (out_dc > Dl || out_dc < 1) c.invalid("d_c outside 1..dim_qk");
  }
  paged_cfg p{};
  std::int64_t Skv = 0;
  if (paged) p = gen_paged(c, B);
  else Skv = gen_seq(c, 12, 80);
  c.log << "  mla_absorbed" << (paged ? "_paged" : "") << "<" << dname(kd) << "> B " << B << " Sq " << Sq << " H " << H
        << " d_c " << dc << " d_rope " << dr << " Skv " << Skv;
  if (paged) {
    c.log << " pages " << p.pages << " page_size " << p.page_size << " max_pages " << p.max_pages << " lens";
    for (auto l : p.lens) c.log << " " << l;
  }
  c.log << "\n";
  const int q = c.add("q", 4, {B, Sq, H, Dl}, dtype::f32, false, {1, 0, 1, 1});
  const int lat = paged ? c.add("latent_pages", 3, {p.pages, p.page_size, Dl}, kd, false, {1, 1, 1})
                        : c.add("latent", 3, {B, Skv, Dl}, kd, false, {1, 0, 1});
  const int bt = paged ? c.add("block_table", 2, {B, p.max_pages}, dtype::i32, false, {B, 0}) : -1;
  const int sq = paged ? c.add("seqlens", 1, {B}, dtype::i32, false, {B}) : -1;
  const int out = c.add("out", 4, {B, Sq, H, out_dc}, dtype::f32, true, {1, 0, 1, 1});
  const int lse = c.coin(3) ? -1 : c.add("lse", 3, {B, H, Sq}, dtype::f32, true, {1, 1, 0});
  attention_options o;
  gen_options(c, o, true);
  if (c.bad()) {
    o.heads = head_map::tile;
    c.maybe("tile head map for MLA");
  }
  const int sl = gen_sink_logits(c, H);
  if (c.bad()) c.place_with(out, c.coin(2) ? lat : q, true);
  if (lse >= 0 && c.bad()) c.place_with(lse, c.coin(2) ? lat : out, true);
  c.finalize();
  c.fill(q);
  c.fill(lat);
  if (paged) {
    write_table(c, bt, p);
    write_lens(c, sq, p.lens);
  }
  fill_sink_logits(c, sl);
  if (sl >= 0) o.sink_logits = c.view<const float, 1>(sl);
  c.log << options_str(o);
  const auto qv = c.view<const float, 4>(q);
  const auto lv3 = c.view<const KV, 3>(lat);
  const auto ov = c.view<float, 4>(out);
  const auto lsev = lse >= 0 ? c.view<float, 3>(lse) : tensor_view<float, 3>{};
  auto call = [&](const attention_options& opt) {
    if (paged)
      headwise::mla_absorbed_paged(qv, lv3, c.view<const std::int32_t, 2>(bt),
                                   c.view<const std::int32_t, 1>(sq), ov, opt, lsev);
    else headwise::mla_absorbed(qv, lv3, ov, opt, lsev);
  };
  if (!c.run([&] { call(o); })) return;
  const std::int64_t dcv = ov.shape[3];
  // K = the latent rows as one KV head, V = their first d_c values.
  auto as_kv = [&](tensor_view<const KV, 3> l, std::int64_t d) -> tensor_view<const KV, 4> {
    return {l.data, {l.shape[0], l.shape[1], 1, d}, {l.stride[0], l.stride[1], 0, l.stride[2]}};
  };
  const auto lsec = tensor_view<const float, 3>(lsev);
  if (!paged) {
    check_dense<KV>(c, qv, as_kv(lv3, lv3.shape[2]), as_kv(lv3, dcv), o, ov, lsec, "mla_absorbed");
  } else {
    const auto table = c.view<const std::int32_t, 2>(bt);
    const auto lens = c.view<const std::int32_t, 1>(sq);
    const tensor_view<const KV, 4> pages4{lv3.data, {lv3.shape[0], lv3.shape[1], 1, lv3.shape[2]},
                                          {lv3.stride[0], lv3.stride[1], 0, lv3.stride[2]}};
    for (std::int64_t b = 0; b < qv.shape[0]; ++b) {
      const std::int64_t len = lens(b);
      const auto g = gather(pages4, table, b, len);
      const auto k4 = dense4(g, len, 1, lv3.shape[2]);
      tensor_view<const KV, 4> v4 = k4;
      v4.shape[3] = dcv;
      check_dense<KV>(c, batch_of(qv, b), k4, v4, o, batch_of(tensor_view<const float, 4>(ov), b), batch_of(lsec, b),
                      "mla_absorbed_paged sequence " + str(b));
    }
  }
  attention_options o2 = o;
  if (want_rerun(c, o2)) c.rerun_identical([&] { call(o2); }, "mla threads");
}

/// headwise::diff_attention.
template <class KV>
void op_diff(ctx& c) {
  const dtype kd = dtype_of<KV>();
  const std::int64_t B = c.range<std::int64_t>(1, 2), Sq = gen_seq(c, 6, 16), Skv = gen_seq(c, 10, 40);
  const std::int64_t hn = c.range<std::int64_t>(1, 3), G = c.range<std::int64_t>(1, 3), hs = G * hn;
  std::int64_t pairs = hn;
  if (hn > 1 && c.coin(2)) pairs = 1;
  const bool shared = c.coin(3);
  const std::int64_t D = gen_dim(c), Dv = c.coin(2) ? 2 * D : gen_dim(c);
  c.log << "  diff_attention<" << dname(kd) << "> B " << B << " Sq " << Sq << " Skv " << Skv << " hs " << hs << " hn "
        << hn << " pairs " << pairs << (shared ? " shared_keys" : "") << " D " << D << " Dv " << Dv << "\n";
  const int q = c.add("q", 4, {B, Sq, hs + hn, D}, dtype::f32, false, {1, 0, 2, 1});
  const int k = c.add("k", 4, {B, Skv, shared ? pairs : 2 * pairs, D}, kd, false, {1, 0, 1, 1});
  const int v = c.add("v", 4, {B, Skv, pairs, Dv}, kd, false, {1, 0, 1, 1});
  const int out = c.add("out", 4, {B, Sq, hs, Dv}, dtype::f32, true, {1, 0, 1, 1});
  const int lss = c.coin(3) ? c.add("lse_signal", 3, {B, hs, Sq}, dtype::f32, true, {1, 1, 0}) : -1;
  const int lsn = c.coin(3) ? c.add("lse_noise", 3, {B, hn, Sq}, dtype::f32, true, {1, 1, 0}) : -1;
  diff_options o;
  gen_options(c, o, false);
  o.shared_keys = shared;
  if (c.bad()) {
    o.shared_keys = !shared;
    c.maybe("shared_keys flipped");
  }
  if (c.bad()) {
    o.heads = head_map::tile;
    c.invalid("diff_attention with head_map::tile");
  }
  int sl = -1;
  if (c.bad()) {
    sl = c.add("sink_logits", 1, {hs}, dtype::f32, false, {1});
    c.invalid("diff_attention with sink_logits");
  }
  // λ
  const float lambdas[] = {0.0f, 0.5f, 0.8f, 1.0f, -0.3f, 2.0f, 0.2f};
  int lt = -1;
  const bool tokens = c.coin(3);
  auto add_tokens = [&] {
    std::array<std::int64_t, 4> shp{B, Sq, hs, 0};
    if (c.bad()) {
      shp[c.range<std::size_t>(0, 2)] += c.coin(2) ? 1 : -1;
      c.maybe("lambda_tokens shape");
    }
    lt = c.add("lambda_tokens", 3, shp, dtype::f32, false, {1, 0, 1});
  };
  if (tokens) {
    add_tokens();
    if (c.bad()) {
      o.lambda = 0.5f;
      c.invalid("both lambda and lambda_tokens");
    }
  } else {
    o.lambda = c.pick(lambdas);
    if (c.bad()) {
      switch (c.range(0, 2)) {
        case 0:
          add_tokens();
          c.invalid("both lambda and lambda_tokens");
          break;
        case 1:
          o.lambda.reset();
          c.invalid("neither lambda nor lambda_tokens");
          break;
        default: {
          const float badv[] = {kNaN, kInf};
          o.lambda = c.pick(badv);
          c.invalid("lambda not finite");
        }
      }
    }
  }
  // norm
  int nw = -1;
  const bool rms = !c.coin(3);
  o.norm = rms ? diff_norm::rms : diff_norm::none;
  if (rms) {
    const float inits[] = {0.0f, 0.2f, 0.8f, 1.0f, -0.5f, 0.35f};
    o.lambda_init = c.pick(inits);
    const float eps[] = {1e-5f, 1e-6f, 0.5f, 1.0f, 1e-30f};
    o.norm_eps = c.pick(eps);
    if (c.coin(2)) {
      std::int64_t n = Dv;
      if (c.bad()) {
        n = Dv + 1;
        c.invalid("norm_weight length");
      }
      nw = c.add("norm_weight", 1, {n}, dtype::f32, false, {1});
    }
    if (c.bad()) {
      o.lambda_init.reset();
      c.invalid("rms without lambda_init");
    } else if (c.bad()) {
      const float badv[] = {kNaN, kInf};
      o.lambda_init = c.pick(badv);
      c.invalid("lambda_init not finite");
    }
    if (c.bad()) {
      const float badv[] = {0.0f, -1e-5f, kNaN, kInf};
      o.norm_eps = c.pick(badv);
      c.invalid("norm_eps");
    }
  } else {
    if (c.bad()) {
      o.lambda_init = 0.5f;
      c.invalid("lambda_init with norm none");
    } else if (c.bad()) {
      nw = c.add("norm_weight", 1, {Dv}, dtype::f32, false, {1});
      c.invalid("norm_weight with norm none");
    }
  }
  if (c.bad()) c.place_with(out, c.coin(2) ? q : v, true);
  if (lss >= 0 && c.bad()) c.place_with(lss, out, true);
  if (lsn >= 0 && lss >= 0 && c.bad()) c.place_with(lsn, lss, true);
  if (lt >= 0 && c.bad()) c.place_with(out, lt, true);
  c.finalize();
  c.fill(q);
  c.fill(k);
  c.fill(v);
  if (lt >= 0) c.fill_with(lt, [&](const auto&) { return lambdas[c.vr.below(7)]; });
  if (sl >= 0) c.fill_with(sl, [&](const auto&) { return 0.0f; });
  const bool nw_bad = nw >= 0 && rms && c.bad();
  if (nw >= 0) {
    const float ws[] = {1.0f, 0.5f, -2.0f, 0.0f, 3.0f};
    c.fill_with(nw, [&](const auto&) { return ws[c.vr.below(5)]; });
    if (nw_bad && !c.at(nw).empty() && c.at(nw).data != nullptr) {
      slot& s = c.at(nw);
      ctx::store(s, 0, kNaN);
      c.invalid("norm_weight NaN");
    }
  }
  if (lt >= 0) o.lambda_tokens = c.view<const float, 3>(lt);
  if (nw >= 0) o.norm_weight = c.view<const float, 1>(nw);
  if (sl >= 0) o.sink_logits = c.view<const float, 1>(sl);
  c.log << options_str(o) << "  diff: lambda=" << (o.lambda ? str(*o.lambda) : "none")
        << " lambda_tokens=" << (lt >= 0) << " norm=" << (rms ? "rms" : "none")
        << " lambda_init=" << (o.lambda_init ? str(*o.lambda_init) : "none") << " eps=" << o.norm_eps
        << " weight=" << (nw >= 0) << "\n";
  const auto qv = c.view<const float, 4>(q);
  const auto kv = c.view<const KV, 4>(k);
  const auto vv = c.view<const KV, 4>(v);
  const auto ov = c.view<float, 4>(out);
  const auto lsv = lss >= 0 ? c.view<float, 3>(lss) : tensor_view<float, 3>{};
  const auto lnv = lsn >= 0 ? c.view<float, 3>(lsn) : tensor_view<float, 3>{};
  auto call = [&](const diff_options& opt) { headwise::diff_attention(qv, kv, vv, ov, opt, lsv, lnv); };
  if (!c.run([&] { call(o); })) return;

  // Reference (fp64) with the pre-norm difference, and the tolerance of diff_test.cpp. Sizes
  // from the accepted views (a mutation may have changed them consistently).
  const std::int64_t Hs = ov.shape[2], Hn = qv.shape[2] - Hs, dv = vv.shape[3];
  const std::int64_t Bv = qv.shape[0], Sqv = qv.shape[1], Skvv = kv.shape[1], Dq = qv.shape[3];
  if (Bv * Sqv == 0) return;
  std::vector<float> ro(static_cast<std::size_t>(Bv * Sqv * Hs * dv)), pre(ro.size());
  std::vector<float> rls(static_cast<std::size_t>(Bv * Hs * Sqv)), rln(static_cast<std::size_t>(Bv * Hn * Sqv));
  try {
    headwise::reference::diff_attention(qv, kv, vv, headwise::bshd(ro.data(), Bv, Sqv, Hs, dv), o,
                                        headwise::bhs(rls.data(), Bv, Hs, Sqv), headwise::bhs(rln.data(), Bv, Hn, Sqv),
                                        headwise::bshd(pre.data(), Bv, Sqv, Hs, dv));
  } catch (const std::exception& e) {
    fail(std::string("diff reference rejected an accepted call: ") + e.what());
  }
  const double scale = o.scale ? static_cast<double>(*o.scale) : 1.0 / std::sqrt(static_cast<double>(Dq));
  double qmax = 0, kmax = 0, vmax = 0;
  for (std::int64_t b = 0; b < Bv; ++b) {
    for (std::int64_t i = 0; i < Sqv; ++i)
      for (std::int64_t hh = 0; hh < qv.shape[2]; ++hh) {
        double n = 0;
        for (std::int64_t d = 0; d < Dq; ++d) n += double(qv(b, i, hh, d)) * double(qv(b, i, hh, d));
        qmax = std::max(qmax, n);
      }
    for (std::int64_t j = 0; j < Skvv; ++j) {
      for (std::int64_t hh = 0; hh < kv.shape[2]; ++hh) {
        double n = 0;
        for (std::int64_t d = 0; d < Dq; ++d) n += as_double(kv(b, j, hh, d)) * as_double(kv(b, j, hh, d));
        kmax = std::max(kmax, n);
      }
      for (std::int64_t hh = 0; hh < vv.shape[2]; ++hh)
        for (std::int64_t d = 0; d < dv; ++d) vmax = std::max(vmax, std::abs(as_double(vv(b, j, hh, d))));
    }
  }
  const double raw = std::abs(scale) * std::sqrt(qmax) * std::sqrt(kmax);
  const double L = raw + std::min(raw, o.softcap > 0 ? double(o.softcap) : 0.0);
  const double pre_tol = kOutTol + kLogitTol * L;
  double wmax = 1.0;
  if (!o.norm_weight.absent()) {
    wmax = 0;
    for (std::int64_t ch = 0; ch < dv; ++ch) wmax = std::max(wmax, std::abs(double(o.norm_weight(ch))));
  }
  for (std::int64_t b = 0; b < Bv; ++b)
    for (std::int64_t i = 0; i < Sqv; ++i)
      for (std::int64_t hh = 0; hh < Hs; ++hh) {
        const double lam = o.lambda ? double(*o.lambda) : double(o.lambda_tokens(b, i, hh));
        const double A = pre_tol * vmax * (1.0 + std::abs(lam));
        const auto at = [&](const std::vector<float>& x, std::int64_t ch) {
          return double(x[static_cast<std::size_t>(((b * Sqv + i) * Hs + hh) * dv + ch)]);
        };
        double r = 1.0, f = 0.0;
        if (o.norm == diff_norm::rms) {
          double ss = 0;
          for (std::int64_t ch = 0; ch < dv; ++ch) ss += at(pre, ch) * at(pre, ch);
          r = std::sqrt(ss / double(dv) + double(o.norm_eps));
          f = std::abs(1.0 - double(*o.lambda_init));
        }
        for (std::int64_t ch = 0; ch < dv; ++ch) {
          const double ref = at(ro, ch), g = ov(b, i, hh, ch);
          const double tol = o.norm == diff_norm::rms ? A / r * (f * wmax + std::abs(ref)) + 1e-5 * std::abs(ref)
                                                      : A + 1e-5 * std::abs(ref);
          if (!(std::abs(g - ref) <= tol))
            fail("diff_attention: out[" + str(b) + "," + str(i) + "," + str(hh) + "," + str(ch) + "] = " + str(g) +
                 ", reference " + str(ref) + ", tolerance " + str(tol));
        }
      }
  auto check_lse = [&](tensor_view<float, 3> got, const std::vector<float>& ref, std::int64_t H, const char* name) {
    if (got.absent()) return;
    for (std::int64_t b = 0; b < Bv; ++b)
      for (std::int64_t hh = 0; hh < H; ++hh)
        for (std::int64_t i = 0; i < Sqv; ++i) {
          const double g = got(b, hh, i), r = ref[static_cast<std::size_t>((b * H + hh) * Sqv + i)];
          const bool ok = (std::isinf(r) && g == r) ||
                          (std::isfinite(r) && std::abs(g - r) <= kLseTol * std::max(1.0, std::abs(r)) + kLogitTol * L);
          if (!ok)
            fail(std::string("diff_attention: ") + name + "[" + str(b) + "," + str(hh) + "," + str(i) + "] = " + str(g) +
                 ", reference " + str(r));
        }
  };
  check_lse(lsv, rls, Hs, "lse_signal");
  check_lse(lnv, rln, Hn, "lse_noise");
  diff_options o2 = o;
  if (want_rerun(c, o2)) c.rerun_identical([&] { call(o2); }, "diff_attention threads");
}

template <class F>
void by_dtype(ctx& c, F&& f) {
  switch (c.range(0, 2)) {
    case 0: f(float{}); break;
    case 1: f(bf16{}); break;
    default: f(f16{}); break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider fdp(data, size);
  ctx c(fdp);
  c.vr.s = fdp.ConsumeIntegral<std::uint64_t>();
  c.sr.s = c.vr.s ^ 0x5DEECE66Dull;
  c.regime = c.range(0, 2);
  // About 2 in 3 calls are built from valid choices only; the rest get one or two mutations,
  // at sites picked uniformly among the first 64 the call passes (a call passes 30-60).
  const int r = c.range(0, 11);
  if (r >= 8) c.targets[0] = c.range(0, 63);
  if (r >= 11) c.targets[1] = c.range(0, 63);
  const int op = c.range(0, 8);
  g_stats.op = op == 0 ? 0 : op - 1;
  const auto t0 = std::chrono::steady_clock::now();
  by_dtype(c, [&](auto tag) {
    using KV = decltype(tag);
    switch (op) {
      case 0:
      case 1: op_dense<KV>(c, false); break;
      case 2: op_dense<KV>(c, true); break;
      case 3: op_varlen<KV>(c); break;
      case 4: op_paged<KV>(c, false); break;
      case 5: op_paged<KV>(c, true); break;
      case 6: op_mla<KV>(c, false); break;
      case 7: op_mla<KV>(c, true); break;
      default: op_diff<KV>(c); break;
    }
  });
  g_stats.seconds[g_stats.op] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 0;
}
