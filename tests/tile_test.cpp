// The tile layer: exp2_softmax accuracy, partial loads/stores, bf16/f16 conversions, the
// online-softmax step and the two microkernels, all on tile::default_arch (the build's -march).
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include <headwise/tile/tile.hpp>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "common/testing.hpp"

// GCC 12 false positives on AVX-512 intrinsics inlined here (see tile/diagnostics.hpp).
HEADWISE_DIAGNOSTICS_PUSH

namespace {

namespace tile = headwise::tile;
using A = tile::default_arch;
using Traits = tile::arch_traits<A>;
using Batch = xsimd::batch<float, A>;
constexpr int W = Traits::lanes;
using avec = std::vector<float, xsimd::aligned_allocator<float, 64>>;
using hwt::AllClose;
using hwt::kInf;
using hwt::kNaN;

std::uint32_t bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
float from_bits(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// =============================================================================================
// exp2_softmax
// =============================================================================================

/// exp2_softmax over xs (any length), lane by lane.
std::vector<float> exp2_all(const std::vector<float>& xs) {
  std::vector<float> out(xs.size());
  alignas(64) float buf[W];
  for (std::size_t i = 0; i < xs.size(); i += W) {
    const std::size_t n = std::min<std::size_t>(W, xs.size() - i);
    for (std::size_t l = 0; l < static_cast<std::size_t>(W); ++l) buf[l] = l < n ? xs[i + l] : 0.0f;
    tile::exp2_softmax<A>(Batch::load_aligned(buf)).store_aligned(buf);
    for (std::size_t l = 0; l < n; ++l) out[i + l] = buf[l];
  }
  return out;
}

/// Max relative error of exp2_softmax against long-double exp2l over xs; also reports where.
double max_rel_error(const std::vector<float>& xs, float* worst_x) {
  const std::vector<float> got = exp2_all(xs);
  double worst = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const long double want = exp2l(static_cast<long double>(xs[i]));
    const double e = static_cast<double>(std::fabs((static_cast<long double>(got[i]) - want) / want));
    if (!(e <= worst)) {  // NaN counts as worst
      worst = std::isnan(e) ? std::numeric_limits<double>::infinity() : e;
      *worst_x = xs[i];
    }
  }
  return worst;
}

std::vector<float> linspace(double lo, double hi, std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(lo + (hi - lo) * static_cast<double>(i) / (n - 1));
  return v;
}

TEST(Exp2Softmax, RelativeErrorWithinBoundOnSoftmaxDomain) {
  // 2M evenly spaced points of [-125, 0] plus 1M random floats of [-125, 0].
  std::vector<float> xs = linspace(-125.0, 0.0, 2'000'000);
  const std::vector<float> r = hwt::random_uniform(1'000'000, 7, -125.0f, 0.0f);
  xs.insert(xs.end(), r.begin(), r.end());
  float wx = 0;
  const double e = max_rel_error(xs, &wx);
  EXPECT_LE(e, tile::exp2_rel_error_bound) << "worst at x = " << wx;
}

TEST(Exp2Softmax, RelativeErrorWithinBoundNearZeroAndOnPositiveRange) {
  // Every float of [-1, 1] at a 2^-20 step (the polynomial's reduction range, both signs of f),
  // then (0, 127].
  std::vector<float> xs = linspace(-1.0, 1.0, (1u << 21) + 1);
  float wx = 0;
  double e = max_rel_error(xs, &wx);
  EXPECT_LE(e, tile::exp2_rel_error_bound) << "worst at x = " << wx;
  xs = linspace(1e-6, 127.0, 1'000'000);
  xs.push_back(127.0f);
  xs.push_back(std::numeric_limits<float>::denorm_min());
  xs.push_back(std::numeric_limits<float>::min());
  e = max_rel_error(xs, &wx);
  EXPECT_LE(e, tile::exp2_rel_error_bound) << "worst at x = " << wx;
}

TEST(Exp2Softmax, IntegersAreExactPowersOfTwo) {
  std::vector<float> xs;
  for (int n = -125; n <= 127; ++n) xs.push_back(static_cast<float>(n));
  const std::vector<float> got = exp2_all(xs);
  for (std::size_t i = 0; i < xs.size(); ++i) EXPECT_EQ(got[i], std::ldexp(1.0f, static_cast<int>(xs[i]))) << xs[i];
}

TEST(Exp2Softmax, SpecialValues) {
  const float lowest = std::numeric_limits<float>::lowest();
  const std::vector<float> xs = {-kInf, kNaN, -kNaN, -127.0001f, -127.5f, -128.0f, -150.0f, -1000.0f, -1e30f, lowest};
  const std::vector<float> got = exp2_all(xs);
  EXPECT_EQ(got[0], 0.0f) << "exp2(-inf)";
  EXPECT_TRUE(std::isnan(got[1])) << "exp2(NaN) = " << got[1];
  EXPECT_TRUE(std::isnan(got[2])) << "exp2(-NaN) = " << got[2];
  for (std::size_t i = 3; i < xs.size(); ++i) EXPECT_EQ(got[i], 0.0f) << "exp2(" << xs[i] << ")";
  // NaN in one lane does not disturb the other lanes.
  std::vector<float> mixed(static_cast<std::size_t>(W), -1.0f);
  mixed[0] = kNaN;
  const std::vector<float> m = exp2_all(mixed);
  for (int l = 1; l < W; ++l) EXPECT_EQ(m[static_cast<std::size_t>(l)], 0.5f);
}

// =============================================================================================
// load_partial / store_partial: never touch memory beyond n
// =============================================================================================

/// Two pages; the second is PROT_NONE, so any access past the first page faults.
class GuardedPage {
 public:
  GuardedPage() {
    page_ = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, 2 * page_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
    base_ = static_cast<char*>(p);
    if (mprotect(base_ + page_, page_, PROT_NONE) != 0) throw std::runtime_error("mprotect failed");
  }
  ~GuardedPage() { munmap(base_, 2 * page_); }
  GuardedPage(const GuardedPage&) = delete;
  GuardedPage& operator=(const GuardedPage&) = delete;
  /// A float pointer such that [p, p + n) ends exactly at the guard page.
  float* ending_at_guard(int n) const { return reinterpret_cast<float*>(base_ + page_) - n; }

 private:
  char* base_ = nullptr;
  std::size_t page_ = 0;
};

TEST(Partial, LoadReadsExactlyNAndZeroFills) {
  GuardedPage g;
  for (int n = 0; n <= W; ++n) {
    float* p = g.ending_at_guard(n);  // reading p[n] would fault
    for (int i = 0; i < n; ++i) p[i] = 1.5f + static_cast<float>(i);
    alignas(64) float out[W];
    tile::load_partial<A>(p, n).store_aligned(out);
    for (int i = 0; i < W; ++i) EXPECT_EQ(out[i], i < n ? 1.5f + static_cast<float>(i) : 0.0f) << "n=" << n << " i=" << i;
  }
}

TEST(Partial, StoreWritesExactlyN) {
  GuardedPage g;
  alignas(64) float src[W];
  for (int i = 0; i < W; ++i) src[i] = -2.0f - static_cast<float>(i);
  for (int n = 0; n <= W; ++n) {
    // At the end of the page: a write past p + n faults.
    float* p = g.ending_at_guard(n);
    tile::store_partial<A>(p, Batch::load_aligned(src), n);
    for (int i = 0; i < n; ++i) EXPECT_EQ(p[i], src[i]);
    // In the middle of a buffer with guard values on both sides.
    std::vector<float> buf(static_cast<std::size_t>(3 * W), 777.0f);
    tile::store_partial<A>(buf.data() + W, Batch::load_aligned(src), n);
    for (int i = 0; i < 3 * W; ++i) {
      const bool inside = i >= W && i < W + n;
      EXPECT_EQ(buf[static_cast<std::size_t>(i)], inside ? src[i - W] : 777.0f) << "n=" << n << " i=" << i;
    }
  }
}

TEST(Partial, RoundTripAtUnalignedAddresses) {
  std::vector<float> buf(static_cast<std::size_t>(4 * W + 3));
  hwt::fill_normal(buf, 3);
  for (int off = 0; off < 3; ++off)
    for (int n = 0; n <= W; ++n) {
      std::vector<float> dst(buf.size(), 99.0f);
      tile::store_partial<A>(dst.data() + off + 1, tile::load_partial<A>(buf.data() + off, n), n);
      for (int i = 0; i < n; ++i) EXPECT_EQ(dst[static_cast<std::size_t>(off + 1 + i)], buf[static_cast<std::size_t>(off + i)]);
      EXPECT_EQ(dst[static_cast<std::size_t>(off + 1 + n)], 99.0f);
      EXPECT_EQ(dst[static_cast<std::size_t>(off)], 99.0f);
    }
}

// =============================================================================================
// bf16 / f16 loads and conversions
// =============================================================================================

bool is_nan_f16(std::uint16_t h) { return (h & 0x7C00u) == 0x7C00u && (h & 0x3FFu) != 0; }
bool is_nan_bf16(std::uint16_t h) { return (h & 0x7F80u) == 0x7F80u && (h & 0x7Fu) != 0; }

template <class T>
void check_load_as_float_exhaustive(bool (*is_nan)(std::uint16_t)) {
  std::vector<T> all(65536 + W);
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = T{static_cast<std::uint16_t>(i & 0xFFFF)};
  std::size_t bad = 0;
  alignas(64) float out[W];
  for (std::size_t i = 0; i < 65536; i += W) {
    tile::load_as_float<A>(all.data() + i).store_aligned(out);
    for (int l = 0; l < W; ++l) {
      const std::uint16_t h = all[i + static_cast<std::size_t>(l)].bits;
      const float want = headwise::to_float(all[i + static_cast<std::size_t>(l)]);
      const bool ok = is_nan(h) ? std::isnan(out[l]) : bits(out[l]) == bits(want);
      if (!ok && bad++ < 5) ADD_FAILURE() << "bits 0x" << std::hex << h << ": got " << out[l] << ", want " << want;
    }
  }
  EXPECT_EQ(bad, 0u);
}

TEST(Convert, LoadAsFloatBf16AllBitPatterns) { check_load_as_float_exhaustive<headwise::bf16>(is_nan_bf16); }
TEST(Convert, LoadAsFloatF16AllBitPatterns) { check_load_as_float_exhaustive<headwise::f16>(is_nan_f16); }

TEST(Convert, ScalarToFloatNaNsAreNaN) {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    if (is_nan_f16(static_cast<std::uint16_t>(h))) {
      ASSERT_TRUE(std::isnan(headwise::to_float(headwise::f16{static_cast<std::uint16_t>(h)}))) << h;
    }
    if (is_nan_bf16(static_cast<std::uint16_t>(h))) {
      ASSERT_TRUE(std::isnan(headwise::to_float(headwise::bf16{static_cast<std::uint16_t>(h)}))) << h;
    }
  }
}

template <class T>
void check_convert_row(bool (*is_nan)(std::uint16_t), std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  for (const std::ptrdiff_t n : {0, 1, W - 1, W, W + 1, 2 * W + 3, 37, 129, 576}) {
    std::vector<T> src(static_cast<std::size_t>(n) + 1);
    for (auto& x : src) {
      std::uint16_t h;
      do h = static_cast<std::uint16_t>(gen()); while (is_nan(h));
      x = T{h};
    }
    // NaN for both bf16 and f16: one in the scalar tail, one in the vector body.
    if (n > 3) src[static_cast<std::size_t>(n) - 2] = T{static_cast<std::uint16_t>(0xFF81)};
    if (n > W) src[1] = T{static_cast<std::uint16_t>(0x7FC1)};
    std::vector<float> dst(static_cast<std::size_t>(n) + 4, 4321.0f);
    tile::convert_row<A>(dst.data() + 1, src.data(), n);
    EXPECT_EQ(dst[0], 4321.0f);
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      const std::uint16_t h = src[static_cast<std::size_t>(i)].bits;
      const float got = dst[static_cast<std::size_t>(i) + 1], want = headwise::to_float(src[static_cast<std::size_t>(i)]);
      if (is_nan(h)) {
        EXPECT_TRUE(std::isnan(got)) << "n=" << n << " i=" << i;
      } else {
        EXPECT_EQ(bits(got), bits(want)) << "n=" << n << " i=" << i << " bits 0x" << std::hex << h;
      }
    }
    for (std::size_t i = static_cast<std::size_t>(n) + 1; i < dst.size(); ++i) EXPECT_EQ(dst[i], 4321.0f) << "n=" << n;
  }
}

TEST(Convert, ConvertRowBf16) { check_convert_row<headwise::bf16>(is_nan_bf16, 11); }
TEST(Convert, ConvertRowF16) { check_convert_row<headwise::f16>(is_nan_f16, 12); }
TEST(Convert, ConvertRowF32IsCopy) {
  std::vector<float> src = hwt::random_normal(77, 13), dst(78, 5.0f);
  tile::convert_row<A>(dst.data(), src.data(), 77);
  EXPECT_TRUE(hwt::BitwiseEqual(std::vector<float>(dst.begin(), dst.begin() + 77), src));
  EXPECT_EQ(dst[77], 5.0f);
}

// -------- to_bf16 --------

/// Independent round-to-nearest-even to p significant bits (emin: the smallest normal exponent)
/// in double arithmetic; returns +-inf past the overflow threshold.
double round_to_format(float x, int p, int emin, double max_finite) {
  const double ax = std::fabs(static_cast<double>(x));
  if (ax == 0) return x;
  int e = std::ilogb(ax);
  if (e < emin) e = emin;
  const double q = std::ldexp(1.0, e - (p - 1));  // spacing of the format near x
  const double r = std::nearbyint(ax / q) * q;     // default rounding: to nearest, ties to even
  // Past the largest finite value by half a spacing or more: infinity.
  const double q_top = std::ldexp(1.0, std::ilogb(max_finite) - (p - 1));
  const double res = ax >= max_finite + q_top / 2 ? std::numeric_limits<double>::infinity() : r;
  return std::signbit(x) ? -res : res;
}

TEST(ToBf16, RoundToNearestEvenCases) {
  struct tc {
    std::uint32_t in;
    std::uint16_t out;
  };
  for (const tc c : {tc{0x3F800000u, 0x3F80}, tc{0x3F808000u, 0x3F80},  // tie -> even (down)
                     tc{0x3F818000u, 0x3F82},                           // tie -> even (up)
                     tc{0x3F808001u, 0x3F81}, tc{0x3F807FFFu, 0x3F80},  // above / below half
                     tc{0xBF808000u, 0xBF80}, tc{0xBF818000u, 0xBF82},  // negative ties
                     tc{0x3F80FFFFu, 0x3F81}, tc{0x3FFF8000u, 0x4000},  // carry into the exponent
                     tc{0x7F7FFFFFu, 0x7F80},                           // FLT_MAX rounds to inf
                     tc{0x7F7F7FFFu, 0x7F7F},                           // largest that stays finite
                     tc{0x7F800000u, 0x7F80}, tc{0xFF800000u, 0xFF80},  // +-inf
                     tc{0x00000000u, 0x0000}, tc{0x80000000u, 0x8000},  // +-0
                     tc{0x00008000u, 0x0000}, tc{0x00018000u, 0x0002},  // subnormal ties
                     tc{0x00008001u, 0x0001}}) {
    EXPECT_EQ(headwise::to_bf16(from_bits(c.in)).bits, c.out) << std::hex << "in 0x" << c.in;
  }
}

TEST(ToBf16, NaNStaysNaN) {
  for (const std::uint32_t u : {0x7FC00000u, 0x7F800001u, 0x7F80FFFFu, 0xFF800001u, 0x7FFFFFFFu, 0xFFC00000u}) {
    const headwise::bf16 h = headwise::to_bf16(from_bits(u));
    EXPECT_TRUE(is_nan_bf16(h.bits)) << std::hex << "in 0x" << u << " -> 0x" << h.bits;
    EXPECT_EQ(h.bits & 0x8000u, (u >> 16) & 0x8000u) << "sign of NaN";
  }
}

TEST(ToBf16, MatchesIndependentRoundingOnRandomFloats) {
  std::mt19937_64 gen(17);
  const double max_bf16 = static_cast<double>(from_bits(0x7F7F0000u));
  std::size_t bad = 0;
  for (int i = 0; i < 1'000'000; ++i) {
    const float x = from_bits(static_cast<std::uint32_t>(gen()));
    if (std::isnan(x)) continue;
    const double want = round_to_format(x, 8, -126, max_bf16);
    const float got = headwise::to_float(headwise::to_bf16(x));
    if (!(static_cast<double>(got) == want) && bad++ < 5)
      ADD_FAILURE() << std::hex << "x bits 0x" << bits(x) << std::dec << ": got " << got << ", want " << want;
  }
  EXPECT_EQ(bad, 0u);
}

// -------- to_f16 --------

TEST(ToF16, RoundTripsEveryF16BitPattern) {
  std::size_t bad = 0;
  for (std::uint32_t u = 0; u < 65536; ++u) {
    const headwise::f16 h{static_cast<std::uint16_t>(u)};
    const headwise::f16 back = headwise::to_f16(headwise::to_float(h));
    const bool ok = is_nan_f16(h.bits) ? is_nan_f16(back.bits) : back.bits == h.bits;
    if (!ok && bad++ < 5) ADD_FAILURE() << std::hex << "0x" << u << " -> 0x" << back.bits;
  }
  EXPECT_EQ(bad, 0u);
}

TEST(ToF16, OverflowSubnormalsAndTies) {
  struct tc {
    float in;
    std::uint16_t out;
  };
  const float t25 = std::ldexp(1.0f, -25), t24 = std::ldexp(1.0f, -24), t14 = std::ldexp(1.0f, -14);
  for (const tc c : {tc{65504.0f, 0x7BFF}, tc{65519.99f, 0x7BFF}, tc{65520.0f, 0x7C00},  // 65520: tie -> inf
                     tc{-65520.0f, 0xFC00}, tc{1e6f, 0x7C00}, tc{std::numeric_limits<float>::max(), 0x7C00},
                     tc{kInf, 0x7C00}, tc{-kInf, 0xFC00}, tc{1.0f, 0x3C00}, tc{-2.0f, 0xC000},
                     tc{1.0f + std::ldexp(1.0f, -11), 0x3C00},                       // tie -> even (down)
                     tc{1.0f + 3 * std::ldexp(1.0f, -11), 0x3C02},                   // tie -> even (up)
                     tc{t24, 0x0001}, tc{t25, 0x0000},                                // smallest subnormal; tie -> 0
                     tc{std::nextafter(t25, 1.0f), 0x0001}, tc{3 * t25, 0x0002},     // 1.5 ulp -> 2
                     tc{5 * t25, 0x0002}, tc{-t24, 0x8001},                           // 2.5 ulp -> 2
                     tc{t14, 0x0400}, tc{t14 - t24, 0x03FF},                          // normal / largest subnormal
                     tc{t14 - t25, 0x0400},                                           // tie -> even (0x400)
                     tc{1e-10f, 0x0000}, tc{-1e-10f, 0x8000}, tc{0.0f, 0x0000}, tc{-0.0f, 0x8000},
                     tc{std::numeric_limits<float>::denorm_min(), 0x0000}}) {
    EXPECT_EQ(headwise::to_f16(c.in).bits, c.out) << "in " << c.in << std::hex << " (0x" << bits(c.in) << ")";
  }
  for (const std::uint32_t u : {0x7FC00000u, 0x7F800001u, 0xFF812345u})
    EXPECT_TRUE(is_nan_f16(headwise::to_f16(from_bits(u)).bits)) << std::hex << u;
}

TEST(ToF16, MatchesIndependentRoundingOnRandomFloats) {
  std::mt19937_64 gen(19);
  std::size_t bad = 0;
  for (int i = 0; i < 1'000'000; ++i) {
    // Random sign/mantissa, exponents concentrated around the f16 range (2^-30 .. 2^17).
    const std::uint32_t e = 97u + static_cast<std::uint32_t>(gen() % 48);
    const float x = from_bits((static_cast<std::uint32_t>(gen()) & 0x807FFFFFu) | (e << 23));
    const double want = round_to_format(x, 11, -14, 65504.0);
    const float got = headwise::to_float(headwise::to_f16(x));
    if (!(static_cast<double>(got) == want) && bad++ < 5)
      ADD_FAILURE() << std::hex << "x bits 0x" << bits(x) << std::dec << ": got " << got << ", want " << want;
#if defined(__F16C__)
    const auto hw = static_cast<std::uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
    if (hw != headwise::to_f16(x).bits && bad++ < 5)
      ADD_FAILURE() << std::hex << "x bits 0x" << bits(x) << ": F16C gives 0x" << hw << ", to_f16 0x"
                    << headwise::to_f16(x).bits;
#endif
  }
  EXPECT_EQ(bad, 0u);
}

// =============================================================================================
// softmax_update / softmax_finalize against a scalar double online softmax
// =============================================================================================

// Row/lane kinds of the online-softmax tests: 0 ordinary; 1 fully -inf forever; 2 -inf in the
// first two tiles; 3 starts with a sink state (m = 3·log2e, l = 1) and sees only -inf in tile 1;
// 4 sparse -inf entries.
void softmax_initial_state(int kind, float& m, float& l) {
  m = kind == 3 ? 3.0f * 1.4426950408889634f : -kInf;
  l = kind == 3 ? 1.0f : 0.0f;
}
/// Score for a row of `kind` in tile t: a draw from val, or -inf where the kind says so.
float softmax_test_score(int kind, int t, std::mt19937_64& gen, std::uniform_real_distribution<float>& val) {
  const float x = val(gen);
  return kind == 1 || (kind == 2 && t < 2) || (kind == 3 && t == 1) || (kind == 4 && gen() % 3 == 0) ? -kInf : x;
}

TEST(Softmax, UpdateAndFinalizeMatchScalarOnlineSoftmax) {
  std::mt19937_64 gen(23);
  std::uniform_real_distribution<float> val(-30.0f, 30.0f);
  for (const std::ptrdiff_t nvec : {1, 2, 3}) {
    const std::ptrdiff_t lanes = nvec * W, ld = lanes + W;  // ld > lanes: the extra column is never used
    const int tiles = 5;
    const std::ptrdiff_t ns[tiles] = {1, 7, 16, 3, 33};
    avec m(static_cast<std::size_t>(lanes)), l(m.size()), alpha(m.size());
    std::vector<int> kind(static_cast<std::size_t>(lanes));
    for (std::ptrdiff_t r = 0; r < lanes; ++r) kind[static_cast<std::size_t>(r)] = static_cast<int>(r % 5);
    std::vector<double> dm(m.size()), dl(m.size());  // double reference state (log2 domain)
    std::vector<std::vector<float>> seen(m.size());   // every score of the lane, for the final check
    for (std::ptrdiff_t r = 0; r < lanes; ++r)
      softmax_initial_state(kind[static_cast<std::size_t>(r)], m[static_cast<std::size_t>(r)], l[static_cast<std::size_t>(r)]);
    for (int t = 0; t < tiles; ++t) {
      const std::ptrdiff_t n = ns[t];
      avec s(static_cast<std::size_t>(n * ld), 555.0f);
      for (std::ptrdiff_t j = 0; j < n; ++j)
        for (std::ptrdiff_t r = 0; r < lanes; ++r)
          s[static_cast<std::size_t>(j * ld + r)] = softmax_test_score(kind[static_cast<std::size_t>(r)], t, gen, val);
      const avec s_in = s;
      const avec m_old = m, l_old = l;
      tile::softmax_update<A>(s.data(), ld, n, nvec, m.data(), l.data(), alpha.data());
      for (std::ptrdiff_t r = 0; r < lanes; ++r) {
        const std::size_t R = static_cast<std::size_t>(r);
        // m' = max(m, max S): exact.
        float want_m = m_old[R];
        for (std::ptrdiff_t j = 0; j < n; ++j) want_m = std::max(want_m, s_in[static_cast<std::size_t>(j * ld + r)]);
        ASSERT_EQ(m[R], want_m) << "tile " << t << " lane " << r;
        const float m_ref = want_m == -kInf ? 0.0f : want_m;
        // α and P: exp2 of the same f32 differences, within the exp2 bound.
        const double a_want = static_cast<double>(exp2l(static_cast<long double>(m_old[R] - m_ref)));
        EXPECT_NEAR(alpha[R], a_want, tile::exp2_rel_error_bound * a_want) << "alpha, tile " << t << " lane " << r;
        double psum = 0;
        for (std::ptrdiff_t j = 0; j < n; ++j) {
          const float x = s_in[static_cast<std::size_t>(j * ld + r)];
          seen[R].push_back(x);
          const double p_want = static_cast<double>(exp2l(static_cast<long double>(x - m_ref)));
          const float p = s[static_cast<std::size_t>(j * ld + r)];
          psum += p;
          if (x == -kInf) {
            ASSERT_EQ(p, 0.0f) << "P of a -inf score, tile " << t << " lane " << r;
          } else {
            EXPECT_NEAR(p, p_want, tile::exp2_rel_error_bound * p_want) << "P tile " << t << " lane " << r << " j " << j;
          }
        }
        // l' = α·l + ΣP: an f32 sum of n + 1 positive terms, relative error <= (n + 1)·u.
        const double l_want = static_cast<double>(alpha[R]) * l_old[R] + psum;
        EXPECT_NEAR(l[R], l_want, static_cast<double>(n + 2) * std::ldexp(1.0, -24) * l_want)
            << "l, tile " << t << " lane " << r;
      }
      for (std::ptrdiff_t j = 0; j < n; ++j)  // the padding column is left alone
        for (std::ptrdiff_t c = lanes; c < ld; ++c) ASSERT_EQ(s[static_cast<std::size_t>(j * ld + c)], 555.0f);
    }
    // End state against the whole-row double softmax: m = max, l = Σ 2^(s - m), LSE.
    for (std::ptrdiff_t r = 0; r < lanes; ++r) {
      const std::size_t R = static_cast<std::size_t>(r);
      const int k = kind[R];
      double mx = k == 3 ? 3.0 * 1.4426950408889634 : -std::numeric_limits<double>::infinity();
      for (const float x : seen[R]) mx = std::max(mx, static_cast<double>(x));
      const tile::softmax_result res = tile::softmax_finalize(m[R], l[R]);
      if (k == 1) {  // never saw a finite score
        EXPECT_EQ(m[R], -kInf);
        EXPECT_EQ(l[R], 0.0f);
        EXPECT_EQ(res.inv_l, 0.0f);
        EXPECT_EQ(res.lse, -kInf);
        continue;
      }
      double sum = k == 3 ? std::exp2(3.0 * 1.4426950408889634 - mx) : 0.0;
      for (const float x : seen[R]) sum += std::exp2(static_cast<double>(x) - mx);
      EXPECT_NEAR(m[R], mx, 1e-5) << "lane " << r;
      EXPECT_NEAR(l[R], sum, 1e-5 * sum) << "lane " << r;
      EXPECT_EQ(res.inv_l, 1.0f / l[R]);
      const double lse = (mx + std::log2(sum)) * std::log(2.0);
      // d(lse) = dl / l: the absolute LSE error is the relative error of l (<= 1e-5 above).
      EXPECT_NEAR(res.lse, lse, 1e-5 + 1e-7 * std::abs(lse)) << "lane " << r;
    }
  }
}

// Key-lane step (softmax_update_rows, the decode path's): rows of keys, each row's state in
// m/l[r], row counts below, at and past the lane count; the floats after the last row's state
// are not written.
TEST(Softmax, KeyLaneRowsUpdateMatchesScalarOnlineSoftmax) {
  std::mt19937_64 gen(29);
  std::uniform_real_distribution<float> val(-30.0f, 30.0f);
  for (const std::ptrdiff_t rows : {std::ptrdiff_t{1}, std::ptrdiff_t{3}, std::ptrdiff_t{4}, std::ptrdiff_t{W},
                                    std::ptrdiff_t{W + 3}, std::ptrdiff_t{2 * W + 1}}) {
    const int tiles = 6;
    const std::ptrdiff_t ns[tiles] = {1, 7, W, 3, 2 * W + 1, 16};
    const std::ptrdiff_t ld = 3 * W + W;  // past the widest tile's padded length: never touched
    avec m(static_cast<std::size_t>(rows + W), 777.0f), l(m.size(), 777.0f), alpha(static_cast<std::size_t>(rows));
    std::vector<int> kind(static_cast<std::size_t>(rows));
    for (std::ptrdiff_t r = 0; r < rows; ++r) {
      kind[static_cast<std::size_t>(r)] = static_cast<int>((r * 7 + 1) % 5);
      softmax_initial_state(kind[static_cast<std::size_t>(r)], m[static_cast<std::size_t>(r)], l[static_cast<std::size_t>(r)]);
    }
    for (int t = 0; t < tiles; ++t) {
      const std::ptrdiff_t n = ns[t], padded = (n + W - 1) / W * W;
      avec s(static_cast<std::size_t>(rows * ld), 555.0f);
      for (std::ptrdiff_t r = 0; r < rows; ++r)
        for (std::ptrdiff_t j = 0; j < n; ++j)
          s[static_cast<std::size_t>(r * ld + j)] = softmax_test_score(kind[static_cast<std::size_t>(r)], t, gen, val);
      const avec s_in = s, m_old = m, l_old = l;
      tile::softmax_update_rows<A>(s.data(), ld, rows, n, m.data(), l.data(), alpha.data());
      for (std::ptrdiff_t r = 0; r < rows; ++r) {
        const std::size_t R = static_cast<std::size_t>(r);
        float want_m = m_old[R];
        for (std::ptrdiff_t j = 0; j < n; ++j) want_m = std::max(want_m, s_in[static_cast<std::size_t>(r * ld + j)]);
        ASSERT_EQ(m[R], want_m) << "rows " << rows << " tile " << t << " row " << r;
        const float m_ref = want_m == -kInf ? 0.0f : want_m;
        const double a_want = static_cast<double>(exp2l(static_cast<long double>(m_old[R] - m_ref)));
        EXPECT_NEAR(alpha[R], a_want, tile::exp2_rel_error_bound * a_want) << "alpha, row " << r;
        double psum = 0;
        for (std::ptrdiff_t j = 0; j < n; ++j) {
          const float x = s_in[static_cast<std::size_t>(r * ld + j)];
          const float p = s[static_cast<std::size_t>(r * ld + j)];
          psum += p;
          if (x == -kInf) {
            ASSERT_EQ(p, 0.0f) << "P of a -inf score, row " << r;
          } else {
            const double p_want = static_cast<double>(exp2l(static_cast<long double>(x - m_ref)));
            EXPECT_NEAR(p, p_want, tile::exp2_rel_error_bound * p_want) << "P row " << r << " key " << j;
          }
        }
        for (std::ptrdiff_t j = n; j < padded; ++j)  // the pad keys of the last vector: P = 0
          ASSERT_EQ(s[static_cast<std::size_t>(r * ld + j)], 0.0f) << "pad key " << j << " row " << r;
        for (std::ptrdiff_t j = padded; j < ld; ++j)  // past it: untouched
          ASSERT_EQ(s[static_cast<std::size_t>(r * ld + j)], 555.0f) << "column " << j << " row " << r;
        const double l_want = static_cast<double>(alpha[R]) * l_old[R] + psum;
        EXPECT_NEAR(l[R], l_want, static_cast<double>(n + 2) * std::ldexp(1.0, -24) * l_want)
            << "l, rows " << rows << " tile " << t << " row " << r;
        if (kind[R] == 1) {  // never a finite score: the empty state, α = 0 against m_ref = 0
          EXPECT_EQ(m[R], -kInf);
          EXPECT_EQ(l[R], 0.0f);
          EXPECT_EQ(alpha[R], 0.0f);
        }
      }
      for (std::size_t i = static_cast<std::size_t>(rows); i < m.size(); ++i) {  // the pad stays as it was
        ASSERT_EQ(m[i], 777.0f);
        ASSERT_EQ(l[i], 777.0f);
      }
    }
  }
}

// tile::fma rounds once where the arch has FMA instructions: (1 + 2^-12)² - (1 + 2^-11) is 2^-24
// fused and 0 as a multiply and an add (the product rounds to 1 + 2^-11), on every lane, whatever
// the compiler's contraction setting. Elsewhere (the SSE2 test build) it is xsimd::fma, bit for bit.
TEST(Fma, RoundsOnceWhereTheArchHasFma) {
  const float a = 1.0f + std::ldexp(1.0f, -12), c = -(1.0f + std::ldexp(1.0f, -11));
  alignas(64) float out[W], fallback[W];
  tile::fma<A>(Batch(a), Batch(a), Batch(c)).store_aligned(out);
  xsimd::fma(Batch(a), Batch(a), Batch(c)).store_aligned(fallback);
  for (int i = 0; i < W; ++i) {
    if constexpr (tile::has_fma_v<A>) {
      EXPECT_EQ(out[i], std::ldexp(1.0f, -24)) << "lane " << i;
    } else {
      EXPECT_EQ(bits(out[i]), bits(fallback[i])) << "lane " << i;
    }
  }
}

TEST(Softmax, FinalizeEmptyAndSingle) {
  const tile::softmax_result e = tile::softmax_finalize(-kInf, 0.0f);
  EXPECT_EQ(e.inv_l, 0.0f);
  EXPECT_EQ(e.lse, -kInf);
  const tile::softmax_result one = tile::softmax_finalize(0.0f, 1.0f);
  EXPECT_EQ(one.inv_l, 1.0f);
  EXPECT_EQ(one.lse, 0.0f);
  const tile::softmax_result two = tile::softmax_finalize(1.0f, 2.0f);  // (1 + 1)·ln 2
  EXPECT_FLOAT_EQ(two.lse, static_cast<float>(2.0 * std::log(2.0)));
}

// =============================================================================================
// Microkernels: qk_tile (S = Q·Kᵀ) and pv_tile (O = α·O + P·V) against naive loops
// =============================================================================================

struct mma_shape {
  std::ptrdiff_t n, nvec, dim;
};

std::vector<mma_shape> mma_shapes() {
  std::vector<mma_shape> v;
  for (const std::ptrdiff_t n : {1, 5, 6, 7, 13, 64})
    for (const std::ptrdiff_t nvec : {1, 2, 3, 4, 5, 9})
      for (const std::ptrdiff_t dim : {1, 7, 80, 129}) v.push_back({n, nvec, dim});
  return v;
}

/// Small integers: every product and partial sum is exact in f32, so results must be exact.
float small_int(std::mt19937_64& g) { return static_cast<float>(static_cast<int>(g() % 17) - 8); }

// stream (the streaming items' prefetch of the next block of K rows, past the last row of the
// tile too: only addresses, never read) must give the same exact S.
TEST(Mma, QkTileExactOnIntegersWithAndWithoutStreamPrefetch) {
  std::mt19937_64 gen(29);
  for (const bool stream : {false, true})
    for (const mma_shape sh : mma_shapes()) {
      const std::ptrdiff_t lanes = sh.nvec * W, ld_s = lanes + W, ld_q = lanes + 2 * W, ld_k = sh.dim + 3;
      avec q(static_cast<std::size_t>(sh.dim * ld_q)), s(static_cast<std::size_t>((sh.n + 1) * ld_s), 321.0f);
      std::vector<float> k(static_cast<std::size_t>(sh.n * ld_k));
      for (auto& x : q) x = small_int(gen);
      for (auto& x : k) x = small_int(gen);
      tile::qk_tile<A>(s.data(), ld_s, k.data(), ld_k, q.data(), ld_q, sh.dim, sh.n, sh.nvec, stream);
      for (std::ptrdiff_t j = 0; j <= sh.n; ++j)
        for (std::ptrdiff_t r = 0; r < ld_s; ++r) {
          const float got = s[static_cast<std::size_t>(j * ld_s + r)];
          if (j == sh.n || r >= lanes) {
            ASSERT_EQ(got, 321.0f) << "written outside the tile: n " << sh.n << " nvec " << sh.nvec << " dim " << sh.dim
                                   << " stream " << stream;
            continue;
          }
          float want = 0;
          for (std::ptrdiff_t d = 0; d < sh.dim; ++d)
            want += k[static_cast<std::size_t>(j * ld_k + d)] * q[static_cast<std::size_t>(d * ld_q + r)];
          ASSERT_EQ(got, want) << "S[" << j << "][" << r << "] n " << sh.n << " nvec " << sh.nvec << " dim " << sh.dim
                               << " stream " << stream;
        }
    }
}

TEST(Mma, PvTileExactOnIntegers) {
  std::mt19937_64 gen(31);
  const float alphas[] = {0.0f, 0.5f, 1.0f, 2.0f};
  for (const mma_shape sh : mma_shapes()) {
    const std::ptrdiff_t lanes = sh.nvec * W, ld_o = lanes + W, ld_p = lanes + 2 * W, ld_v = sh.dim + 5;
    const std::ptrdiff_t dim_v = sh.dim;
    avec o(static_cast<std::size_t>((dim_v + 1) * ld_o), 321.0f), p(static_cast<std::size_t>(sh.n * ld_p)),
        alpha(static_cast<std::size_t>(lanes + W));
    std::vector<float> v(static_cast<std::size_t>(sh.n * ld_v));
    for (std::ptrdiff_t c = 0; c < dim_v; ++c)
      for (std::ptrdiff_t r = 0; r < lanes; ++r) o[static_cast<std::size_t>(c * ld_o + r)] = small_int(gen);
    for (auto& x : p) x = small_int(gen);
    for (auto& x : v) x = small_int(gen);
    for (auto& a : alpha) a = alphas[gen() % 4];
    const avec o0 = o;
    tile::pv_tile<A>(o.data(), ld_o, alpha.data(), v.data(), ld_v, p.data(), ld_p, dim_v, sh.n, sh.nvec);
    for (std::ptrdiff_t c = 0; c <= dim_v; ++c)
      for (std::ptrdiff_t r = 0; r < ld_o; ++r) {
        const std::size_t x = static_cast<std::size_t>(c * ld_o + r);
        if (c == dim_v || r >= lanes) {
          ASSERT_EQ(o[x], 321.0f) << "written outside the tile: n " << sh.n << " nvec " << sh.nvec << " dim " << dim_v;
          continue;
        }
        float want = alpha[static_cast<std::size_t>(r)] * o0[x];
        for (std::ptrdiff_t j = 0; j < sh.n; ++j)
          want += v[static_cast<std::size_t>(j * ld_v + c)] * p[static_cast<std::size_t>(j * ld_p + r)];
        ASSERT_EQ(o[x], want) << "O[" << c << "][" << r << "] n " << sh.n << " nvec " << sh.nvec << " dim " << dim_v;
      }
  }
}

#if XSIMD_WITH_AVX512F
TEST(Mma, QkTileQuadsExactOnIntegersAndWithinBoundOnNormals) {
  // The quad-packed Q·Kᵀ of one AVX-512 vector of rows (query_lanes::q_quads): Q packed at
  // tile::quad_index, any dim (tails of 1-3 dims loaded masked, never past the row), keys in
  // blocks of 6 and a rest. Small integers: exact. Normal values: within the f32 accumulation
  // bound dim·u·Σ|terms|. Nothing written past the n x 16 tile.
  if constexpr (tile::is_avx512_v<A>) {
    std::mt19937_64 gen(43);
    std::normal_distribution<float> nd;
    const double u = std::ldexp(1.0, -24);
    for (const std::ptrdiff_t n : {1, 5, 6, 7, 13, 64})
      for (const std::ptrdiff_t dim : {1, 2, 3, 4, 5, 7, 80, 129, 576})
        for (const bool ints : {true, false}) {
          auto val = [&] { return ints ? small_int(gen) : nd(gen); };
          const std::ptrdiff_t ld_s = 32, ld_k = dim + 3;
          std::vector<float> q(static_cast<std::size_t>(16 * dim));  // q[r * dim + d]
          for (auto& x : q) x = val();
          avec qp(static_cast<std::size_t>(tile::round_up(dim, 4) * 16), 0.0f);
          for (std::ptrdiff_t r = 0; r < 16; ++r)
            for (std::ptrdiff_t d = 0; d < dim; ++d)
              qp[static_cast<std::size_t>(tile::quad_index(r, d))] = q[static_cast<std::size_t>(r * dim + d)];
          // K rows end exactly at the end of their allocation (the tail is read by a masked
          // load, which cannot fault on the masked lanes).
          std::vector<float> k(static_cast<std::size_t>((n - 1) * ld_k + dim));
          for (auto& x : k) x = val();
          avec s(static_cast<std::size_t>((n + 1) * ld_s), 321.0f);
          tile::qk_tile_quads(s.data(), ld_s, k.data(), ld_k, qp.data(), dim, n);
          for (std::ptrdiff_t j = 0; j <= n; ++j)
            for (std::ptrdiff_t r = 0; r < ld_s; ++r) {
              const float got = s[static_cast<std::size_t>(j * ld_s + r)];
              if (j == n || r >= 16) {
                ASSERT_EQ(got, 321.0f) << "written outside the tile: n " << n << " dim " << dim;
                continue;
              }
              double exact = 0, mag = 0;
              for (std::ptrdiff_t d = 0; d < dim; ++d) {
                const double t = static_cast<double>(k[static_cast<std::size_t>(j * ld_k + d)]) *
                                 q[static_cast<std::size_t>(r * dim + d)];
                exact += t;
                mag += std::abs(t);
              }
              if (ints) {
                ASSERT_EQ(got, static_cast<float>(exact)) << "S[" << j << "][" << r << "] n " << n << " dim " << dim;
              } else {
                ASSERT_NEAR(got, exact, static_cast<double>(dim) * u * mag) << "S[" << j << "][" << r << "] n " << n
                                                                            << " dim " << dim;
              }
            }
        }
  }
}
#endif

TEST(Mma, PvTileORowsExactOnIntegersAndBitwiseEqualToPvTile) {
  // Row-major P·V (one lane vector of rows: query_lanes::o_rows) against naive loops on small
  // integers (exact), and bitwise against pv_tile's dim-major O on normal values (the same
  // products in the same order). Writes stay inside rows x round_up(dim_v, W).
  std::mt19937_64 gen(41);
  std::normal_distribution<float> nd;
  const float alphas[] = {0.0f, 0.5f, 1.0f, 2.0f};
  for (const std::ptrdiff_t rows : {1, 3, W / 2 + 1, W - 1, W})
    for (const std::ptrdiff_t dim_v : {1, 7, 16, 17, 48, 80, 129, 512})
      for (const std::ptrdiff_t n : {1, 5, 64}) {
        const std::ptrdiff_t ld_o = tile::round_up(dim_v, W) + W, ld_p = 2 * W, ld_v = dim_v + 5;
        for (const bool ints : {true, false}) {
          auto val = [&] { return ints ? small_int(gen) : nd(gen); };
          avec o(static_cast<std::size_t>((rows + 1) * ld_o), 321.0f), p(static_cast<std::size_t>(n * ld_p)),
              alpha(static_cast<std::size_t>(W));
          // V rows end exactly at the end of their allocation (a tail read past the last row
          // would show under ASan).
          std::vector<float> v(static_cast<std::size_t>((n - 1) * ld_v + dim_v));
          for (std::ptrdiff_t r = 0; r < rows; ++r)
            for (std::ptrdiff_t c = 0; c < tile::round_up(dim_v, W); ++c)
              o[static_cast<std::size_t>(r * ld_o + c)] = c < dim_v ? val() : 0.0f;
          for (auto& x : p) x = val();
          for (auto& x : v) x = val();
          for (auto& a : alpha) a = alphas[gen() % 4];
          const avec o0 = o;
          // The same values dim-major for pv_tile (W lanes, rows past `rows` zero).
          avec od(static_cast<std::size_t>(dim_v * W), 0.0f);
          for (std::ptrdiff_t c = 0; c < dim_v; ++c)
            for (std::ptrdiff_t r = 0; r < rows; ++r)
              od[static_cast<std::size_t>(c * W + r)] = o0[static_cast<std::size_t>(r * ld_o + c)];
          tile::pv_tile_o_rows<A>(o.data(), ld_o, alpha.data(), v.data(), ld_v, p.data(), ld_p, rows, dim_v, n);
          tile::pv_tile<A>(od.data(), W, alpha.data(), v.data(), ld_v, p.data(), ld_p, dim_v, n, 1);
          for (std::ptrdiff_t r = 0; r <= rows; ++r)
            for (std::ptrdiff_t c = 0; c < ld_o; ++c) {
              const std::size_t x = static_cast<std::size_t>(r * ld_o + c);
              if (r == rows || c >= tile::round_up(dim_v, W)) {
                ASSERT_EQ(o[x], 321.0f) << "written outside: rows " << rows << " dim_v " << dim_v << " n " << n;
                continue;
              }
              if (c >= dim_v) continue;  // pad columns of the row: written, never read as output
              const float got = o[x];
              ASSERT_EQ(got, od[static_cast<std::size_t>(c * W + r)])
                  << "O[" << r << "][" << c << "] differs from pv_tile: rows " << rows << " dim_v " << dim_v << " n " << n;
              if (ints) {
                float want = alpha[static_cast<std::size_t>(r)] * o0[x];
                for (std::ptrdiff_t j = 0; j < n; ++j)
                  want += v[static_cast<std::size_t>(j * ld_v + c)] * p[static_cast<std::size_t>(j * ld_p + r)];
                ASSERT_EQ(got, want) << "O[" << r << "][" << c << "] rows " << rows << " dim_v " << dim_v << " n " << n;
              }
            }
        }
      }
}

TEST(Mma, RandomValuesMatchDoubleWithinAccumulationBound) {
  // Normal values: |got - exact| <= dim·u·Σ|terms| (the standard bound for an f32 dot product
  // summed in any order, FMA or not), with u = 2^-24. One lane vector (nvec 1) takes the phased
  // Q·Kᵀ kernel: 3 interleaved partial sums.
  std::mt19937_64 gen(37);
  std::normal_distribution<float> nd;
  const double u = std::ldexp(1.0, -24);
  for (const mma_shape sh : {mma_shape{13, 3, 129}, mma_shape{64, 2, 80}, mma_shape{7, 5, 576}, mma_shape{64, 1, 576},
                             mma_shape{13, 1, 80}, mma_shape{9, 1, 7}}) {
    const std::ptrdiff_t lanes = sh.nvec * W;
    avec q(static_cast<std::size_t>(sh.dim * lanes)), s(static_cast<std::size_t>(sh.n * lanes));
    std::vector<float> k(static_cast<std::size_t>(sh.n * sh.dim));
    for (auto& x : q) x = nd(gen);
    for (auto& x : k) x = nd(gen);
    tile::qk_tile<A>(s.data(), lanes, k.data(), sh.dim, q.data(), lanes, sh.dim, sh.n, sh.nvec);
    for (std::ptrdiff_t j = 0; j < sh.n; ++j)
      for (std::ptrdiff_t r = 0; r < lanes; ++r) {
        double exact = 0, mag = 0;
        for (std::ptrdiff_t d = 0; d < sh.dim; ++d) {
          const double t = static_cast<double>(k[static_cast<std::size_t>(j * sh.dim + d)]) *
                           q[static_cast<std::size_t>(d * lanes + r)];
          exact += t;
          mag += std::abs(t);
        }
        ASSERT_NEAR(s[static_cast<std::size_t>(j * lanes + r)], exact, static_cast<double>(sh.dim) * u * mag);
      }
    // P·V with P in [0, 1] (softmax-like) and α = 1 on a zero O.
    avec o(static_cast<std::size_t>(sh.dim * lanes), 0.0f), p(static_cast<std::size_t>(sh.n * lanes)),
        alpha(static_cast<std::size_t>(lanes), 1.0f);
    std::uniform_real_distribution<float> ud(0.0f, 1.0f);
    for (auto& x : p) x = ud(gen);
    tile::pv_tile<A>(o.data(), lanes, alpha.data(), k.data(), sh.dim, p.data(), lanes, sh.dim, sh.n, sh.nvec);
    for (std::ptrdiff_t c = 0; c < sh.dim; ++c)
      for (std::ptrdiff_t r = 0; r < lanes; ++r) {
        double exact = 0, mag = 0;
        for (std::ptrdiff_t j = 0; j < sh.n; ++j) {
          const double t = static_cast<double>(k[static_cast<std::size_t>(j * sh.dim + c)]) *
                           p[static_cast<std::size_t>(j * lanes + r)];
          exact += t;
          mag += std::abs(t);
        }
        ASSERT_NEAR(o[static_cast<std::size_t>(c * lanes + r)], exact, static_cast<double>(sh.n + 1) * u * mag);
      }
  }
}

// Key-lane microkernels (decode): S[r][j] = Q[r]·K[j] folded across lanes, and O[r] += P[r][j]·V[j],
// with K/V rows read in place through row pointers in their storage dtype. Small integers are
// exact in f32, bf16 and f16 and in every partial sum, so results must be exact.

template <class T>
T store_as(float x) {
  if constexpr (std::is_same_v<T, headwise::bf16>) {
    return headwise::to_bf16(x);
  } else if constexpr (std::is_same_v<T, headwise::f16>) {
    return headwise::to_f16(x);
  } else {
    return x;
  }
}

/// n rows of dim elements stored in reverse order with gaps, as a paged or gathered tile is.
template <class T>
struct scattered_rows {
  std::vector<T> data;
  std::vector<float> value;  ///< the rows as f32, row-major (n, dim)
  std::vector<const void*> ptr;
  scattered_rows(std::mt19937_64& gen, std::ptrdiff_t n, std::ptrdiff_t dim) {
    const std::ptrdiff_t ld = dim + 3;
    data.resize(static_cast<std::size_t>(n * ld));
    value.resize(static_cast<std::size_t>(n * dim));
    ptr.resize(static_cast<std::size_t>(n));
    for (std::ptrdiff_t j = 0; j < n; ++j) {
      T* row = data.data() + (n - 1 - j) * ld;
      ptr[static_cast<std::size_t>(j)] = row;
      for (std::ptrdiff_t d = 0; d < dim; ++d) {
        const float x = small_int(gen);
        row[d] = store_as<T>(x);
        value[static_cast<std::size_t>(j * dim + d)] = x;
      }
    }
  }
};

/// The `next` rows the key-lane kernels prefetch: other scattered rows, every third entry none.
template <class T>
struct next_rows_of {
  scattered_rows<T> rows;
  std::vector<const void*> ptr;
  next_rows_of(std::mt19937_64& gen, std::ptrdiff_t n, std::ptrdiff_t dim) : rows(gen, n, dim), ptr(rows.ptr) {
    for (std::size_t j = 2; j < ptr.size(); j += 3) ptr[j] = nullptr;
  }
};

/// S is exact on small integers, with and without rows to prefetch (`next`, which must change
/// nothing).
template <class T>
void check_qk_tile_rows() {
  std::mt19937_64 gen(41);
  for (const bool with_next : {false, true}) {
    for (const std::ptrdiff_t rows : {1, 3, 4, 8, 9})
      for (const std::ptrdiff_t n : std::vector<std::ptrdiff_t>{1, 2, 3, W - 1, W, W + 1, 2 * W + 3})
        for (const std::ptrdiff_t dim : {1, 7, 16, 80, 129}) {
          const std::ptrdiff_t dim_pad = (dim + W - 1) / W * W, ld_q = dim_pad + W, n_pad = (n + W - 1) / W * W;
          const std::ptrdiff_t ld_s = n_pad + W;
          avec q(static_cast<std::size_t>(rows * ld_q), 0.0f), s(static_cast<std::size_t>((rows + 1) * ld_s), 321.0f);
          for (std::ptrdiff_t r = 0; r < rows; ++r)
            for (std::ptrdiff_t d = 0; d < dim; ++d) q[static_cast<std::size_t>(r * ld_q + d)] = small_int(gen);
          const scattered_rows<T> k(gen, n, dim);
          const next_rows_of<T> next(gen, n, dim);
          tile::qk_tile_rows<A, T>(s.data(), ld_s, q.data(), ld_q, k.ptr.data(), rows, n, dim,
                                   with_next ? next.ptr.data() : nullptr);
          for (std::ptrdiff_t r = 0; r <= rows; ++r)
            for (std::ptrdiff_t j = 0; j < ld_s; ++j) {
              const float got = s[static_cast<std::size_t>(r * ld_s + j)];
              if (r == rows || j >= n_pad) {
                ASSERT_EQ(got, 321.0f) << "written outside the tile: rows " << rows << " n " << n << " dim " << dim << " next " << with_next;
                continue;
              }
              float want = 0;
              for (std::ptrdiff_t d = 0; d < dim && j < n; ++d)
                want += q[static_cast<std::size_t>(r * ld_q + d)] * k.value[static_cast<std::size_t>(j * dim + d)];
              ASSERT_EQ(got, want) << "S[" << r << "][" << j << "] rows " << rows << " n " << n << " dim " << dim << " next " << with_next;
            }
        }
  }
}

TEST(Mma, KeyLaneQkRowsExactOnIntegersF32) { check_qk_tile_rows<float>(); }
TEST(Mma, KeyLaneQkRowsExactOnIntegersBf16) { check_qk_tile_rows<headwise::bf16>(); }
TEST(Mma, KeyLaneQkRowsExactOnIntegersF16) { check_qk_tile_rows<headwise::f16>(); }

/// O = α·O + P·V is exact on small integers, with and without rows to prefetch (`next`).
template <class T>
void check_pv_tile_rows() {
  std::mt19937_64 gen(43);
  const float alphas[] = {0.0f, 0.5f, 1.0f, 2.0f};
  for (const bool with_next : {false, true}) {
    for (const std::ptrdiff_t rows : {1, 3, 4, 5, 9})
      for (const std::ptrdiff_t n : std::vector<std::ptrdiff_t>{1, 2, W - 1, W + 1, 2 * W + 3})
        for (const std::ptrdiff_t vecs : {1, 2, 4, 5, 9}) {
          const std::ptrdiff_t dv = vecs * W, ld_o = dv + W, ld_p = n + 5;
          avec o(static_cast<std::size_t>((rows + 1) * ld_o), 321.0f), p(static_cast<std::size_t>(rows * ld_p)),
              alpha(static_cast<std::size_t>(rows));
          for (std::ptrdiff_t r = 0; r < rows; ++r)
            for (std::ptrdiff_t c = 0; c < dv; ++c) o[static_cast<std::size_t>(r * ld_o + c)] = small_int(gen);
          for (auto& x : p) x = small_int(gen);
          for (auto& a : alpha) a = alphas[gen() % 4];
          const scattered_rows<T> v(gen, n, dv);
          const next_rows_of<T> next(gen, n, dv);
          const avec o0 = o;
          tile::pv_tile_rows<A, T>(o.data(), ld_o, alpha.data(), v.ptr.data(), p.data(), ld_p, rows, vecs, n,
                                   with_next ? next.ptr.data() : nullptr);
          for (std::ptrdiff_t r = 0; r <= rows; ++r)
            for (std::ptrdiff_t c = 0; c < ld_o; ++c) {
              const std::size_t x = static_cast<std::size_t>(r * ld_o + c);
              if (r == rows || c >= dv) {
                ASSERT_EQ(o[x], 321.0f) << "written outside the tile: rows " << rows << " n " << n << " vecs " << vecs << " next " << with_next;
                continue;
              }
              float want = alpha[static_cast<std::size_t>(r)] * o0[x];
              for (std::ptrdiff_t j = 0; j < n; ++j)
                want += p[static_cast<std::size_t>(r * ld_p + j)] * v.value[static_cast<std::size_t>(j * dv + c)];
              ASSERT_EQ(o[x], want) << "O[" << r << "][" << c << "] rows " << rows << " n " << n << " vecs " << vecs << " next " << with_next;
            }
        }
  }
}

TEST(Mma, KeyLanePvRowsExactOnIntegersF32) { check_pv_tile_rows<float>(); }
TEST(Mma, KeyLanePvRowsExactOnIntegersBf16) { check_pv_tile_rows<headwise::bf16>(); }
TEST(Mma, KeyLanePvRowsExactOnIntegersF16) { check_pv_tile_rows<headwise::f16>(); }

// The query-lane epilogue's O transpose (query_lanes::out_rows): column l of the block comes
// back as vector l, strides honoured; NaN and -0 pass through unchanged.
TEST(Transpose, BlockColumnsComeBackAsVectors) {
  const std::ptrdiff_t ld_src = W + 3;
  std::vector<float> src(static_cast<std::size_t>(W * ld_src));
  for (std::ptrdiff_t i = 0; i < W; ++i)
    for (std::ptrdiff_t l = 0; l < ld_src; ++l) src[static_cast<std::size_t>(i * ld_src + l)] = static_cast<float>(i * 100 + l);
  src[1] = kNaN;
  src[static_cast<std::size_t>(ld_src + 2)] = -0.0f;
  std::vector<Batch> col(static_cast<std::size_t>(W));
  tile::transpose_block<A>(src.data(), ld_src, col.data());
  for (std::ptrdiff_t l = 0; l < W; ++l) {
    alignas(64) float got[W];
    col[static_cast<std::size_t>(l)].store_aligned(got);
    for (std::ptrdiff_t i = 0; i < W; ++i) {
      const float want = src[static_cast<std::size_t>(i * ld_src + l)];
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(got[i])) << l << "," << i;
      } else {
        ASSERT_EQ(got[i], want) << l << "," << i;
        ASSERT_EQ(std::signbit(got[i]), std::signbit(want)) << l << "," << i;
      }
    }
  }
}

TEST(Arch, TraitsAreConsistent) {
  EXPECT_EQ(Traits::lanes, static_cast<int>(Batch::size));
  EXPECT_GE(Traits::alignment, sizeof(float) * static_cast<std::size_t>(W));
  EXPECT_EQ(tile::round_up(0, 8), 0);
  EXPECT_EQ(tile::round_up(9, 8), 16);
  EXPECT_EQ(tile::round_up(16, 8), 16);
  // The build's -march decides the lane count (no runtime dispatch).
#if defined(__AVX512F__)
  EXPECT_EQ(W, 16);
#elif defined(__AVX2__)
  EXPECT_EQ(W, 8);
#else
  EXPECT_EQ(W, 4);
#endif
}

}  // namespace

HEADWISE_DIAGNOSTICS_POP
