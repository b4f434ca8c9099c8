// Bad-input audit (docs/errors.md; issue 7, item 4). docs/errors.md lists every argument check
// of every public entry point with the tests that cover it; this file covers the checks no other
// test did, and sweeps the shared ones (tensor views, options, output overlap) through every
// entry point. Each bad input must throw headwise::argument_error naming the argument
// (argument() and what()), with what() of the form
// "<function>: argument '<name>': expected <what>, got <value>", and leave every buffer as it was.
// Also: size products overflowing 64 bits are rejected for every tensor argument of every entry
// point, and KV caches are indexed with 64-bit offsets (real element offsets beyond 2^32, on
// reserved address space of which only the touched rows exist).
//
// The tests named audit_fixed_* reproduce defects the audit found (docs/errors.md, "Defects
// found") that are now fixed.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <headwise/headwise.hpp>
#include <headwise/model/diff.hpp>
#include <headwise/model/mla.hpp>
#include <headwise/model/rope.hpp>
#include <headwise/model/transmla.hpp>
#include <headwise/reference/attention.hpp>
#include <headwise/reference/diff.hpp>
#include <iterator>
#include <limits>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/testing.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#define HEADWISE_AUDIT_SPARSE 1
#else
#define HEADWISE_AUDIT_SPARSE 0
#endif

namespace {

using headwise::argument_error;
using headwise::attention_options;
using headwise::bf16;
using headwise::causal_mode;
using headwise::diff_norm;
using headwise::diff_options;
using headwise::head_map;
using headwise::paged_kv;
using headwise::tensor_view;
using hwt::bytes_of;
using hwt::kInf;
using hwt::kNaN;
namespace hm = headwise::model;
using hm::matrix;
using hm::rope_pairing;

using snapshot_t = std::vector<std::vector<unsigned char>>;
constexpr std::int64_t kHuge = std::int64_t{1} << 62;
constexpr std::size_t kBuf = 4096;  // every backing buffer: room for any re-shaped view below

static_assert(std::is_base_of_v<std::invalid_argument, argument_error>);

// =============================================================================================
// Checking one rejection
// =============================================================================================

/// f() throws argument_error naming `arg` (argument() is `arg` or `arg (<axis>)`; with `loose`,
/// argument() only contains `arg`), and what() is "<fn...>: argument '<argument()>': expected
/// <what>, got <value>". hwt::ThrowsArgumentError runs first (type, argument(), what()).
template <class F>
::testing::AssertionResult Rejects(F&& f, const std::string& fn, const std::string& arg, bool loose = false) {
  if (auto r = hwt::ThrowsArgumentError(f, arg); !r) return r;
  try {
    f();
  } catch (const argument_error& e) {
    const std::string a = e.argument(), w = e.what();
    const bool named = loose ? a.find(arg) != std::string::npos : (a == arg || a.rfind(arg + " (", 0) == 0);
    if (!named)
      return ::testing::AssertionFailure() << "argument() is '" << a << "', expected '" << arg << "'";
    if (w.rfind(fn, 0) != 0)
      return ::testing::AssertionFailure() << "what() does not start with " << fn << ": " << w;
    const std::string mid = ": argument '" + a + "': expected ";
    const auto at = w.find(mid);
    if (at == std::string::npos || w.find(", got ", at + mid.size()) == std::string::npos)
      return ::testing::AssertionFailure()
             << "what() is not '<function>: argument '<name>': expected <what>, got "
                "<value>': "
             << w;
    return ::testing::AssertionSuccess() << w;
  }
  return ::testing::AssertionFailure() << "the second call did not throw";
}

/// f() throws argument_error from `fn` (whatever argument it names).
template <class F>
::testing::AssertionResult RejectsAny(F&& f, const std::string& fn) {
  try {
    f();
  } catch (const argument_error& e) {
    if (std::string(e.what()).rfind(fn + ": argument '", 0) != 0)
      return ::testing::AssertionFailure() << "argument_error not from " << fn << ": " << e.what();
    return ::testing::AssertionSuccess() << e.what();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "wrong exception type: " << e.what();
  }
  return ::testing::AssertionFailure() << "no exception";
}

template <class Fx, class F>
void expect_rejected(const Fx& fx, F&& f, const std::string& fn, const std::string& arg, bool loose) {
  const snapshot_t before = fx.snapshot();
  EXPECT_TRUE(Rejects(f, fn, arg, loose));
  EXPECT_TRUE(before == fx.snapshot()) << fn << " changed a buffer before rejecting '" << arg << "'";
}

/// One bad input: how to break a valid fixture, and the argument the error must name.
template <class Fx>
struct bad {
  std::string what;
  std::function<void(Fx&)> mutate;
  std::string arg;
  bool loose = false;
};

/// An entry point run on a fixture; fn is the function name what() must start with.
template <class Fx>
struct runner {
  std::string label, fn;
  std::function<void(Fx&)> call;
};

/// Each case on a fresh fixture, through each runner (after checking the fixture itself is valid).
template <class Fx>
void check_cases(const std::vector<bad<Fx>>& cases, const std::vector<runner<Fx>>& runners) {
  for (const auto& r : runners) {
    {
      Fx fx;
      EXPECT_NO_THROW(r.call(fx)) << r.label << ": the unbroken fixture must be accepted";
    }
    for (const auto& c : cases) {
      SCOPED_TRACE(r.label + ": " + c.what);
      Fx fx;
      c.mutate(fx);
      expect_rejected(
          fx, [&] { r.call(fx); }, r.fn, c.arg, c.loose);
    }
  }
}

/// The axis whose stride the "huge stride" case sets: the widest axis before the last, else the
/// last (its extent must be >= 2 so that the stride counts).
template <class V>
std::size_t stretch_axis(const V& v) {
  std::size_t best = V::rank - 1;
  for (std::size_t i = 0; i + 1 < V::rank; ++i)
    if (v.shape[i] >= 2 && (best == V::rank - 1 || v.shape[i] > v.shape[best])) best = i;
  return best;
}

/// "[i]" (built by appending: GCC 12 warns falsely (-Wrestrict) on "[" + std::to_string(i)).
std::string index_text(std::int64_t i) {
  std::string s = "[";
  s += std::to_string(i);
  s += "]";
  return s;
}

/// The view checks of core/checks.hpp (checker::view) for one tensor argument, reached through
/// `get` (which may first install a valid view): each extent one below its minimum
/// (<name>.shape[i]); an extent of 2^62 with null data, and a stride of +-2^62, whose element
/// offsets overflow 64 bits (<name>.shape); null data (<name>.data); a last-axis stride of 2
/// (<name>.stride[R-1]).
template <class Fx, class Get>
void add_view_cases(std::vector<bad<Fx>>& out, const std::string& name, Get get,
                    const std::vector<std::int64_t>& min, bool loose = false) {
  using V = std::remove_reference_t<decltype(get(std::declval<Fx&>()))>;
  constexpr std::size_t R = V::rank;
  ASSERT_EQ(min.size(), R) << name;
  for (std::size_t i = 0; i < R; ++i) {
    const std::string axis = name + ".shape[" + std::to_string(i) + "]";
    out.push_back(
        {axis + " below its minimum", [get, i, m = min[i]](Fx& f) { get(f).shape[i] = m - 1; }, axis, loose});
  }
  out.push_back({name + " extent 2^62, null data",
                 [get](Fx& f) {
                   auto& v = get(f);
                   v.shape[0] = kHuge;
                   v.data = nullptr;
                 },
                 name + ".shape", loose});
  for (const std::int64_t s : {kHuge, -kHuge})
    out.push_back({name + " stride " + std::to_string(s),
                   [get, s](Fx& f) {
                     auto& v = get(f);
                     v.stride[stretch_axis(v)] = s;
                   },
                   name + ".shape", loose});
  out.push_back({name + " null data", [get](Fx& f) { get(f).data = nullptr; }, name + ".data", loose});
  out.push_back({name + " strided last axis", [get](Fx& f) { get(f).stride[R - 1] = 2; },
                 name + ".stride[" + std::to_string(R - 1) + "]", loose});
}

/// The option checks (check_heads' options.heads and check_options) for an entry point whose
/// output has heads_out heads; with sink logits supported, their view, length and value checks
/// too, else only that they are rejected (diff_attention).
template <class Fx>
std::vector<bad<Fx>> option_cases(std::int64_t heads_out, bool sinks) {
  std::vector<bad<Fx>> c = {
      {"scale NaN", [](Fx& f) { f.opts().scale = kNaN; }, "options.scale"},
      {"scale +inf", [](Fx& f) { f.opts().scale = kInf; }, "options.scale"},
      {"scale -inf", [](Fx& f) { f.opts().scale = -kInf; }, "options.scale"},
      {"softcap -1", [](Fx& f) { f.opts().softcap = -1.0f; }, "options.softcap"},
      {"softcap NaN", [](Fx& f) { f.opts().softcap = kNaN; }, "options.softcap"},
      {"softcap +inf", [](Fx& f) { f.opts().softcap = kInf; }, "options.softcap"},
      {"softcap subnormal", [](Fx& f) { f.opts().softcap = 1e-40f; }, "options.softcap"},
      {"softcap above 1e38", [](Fx& f) { f.opts().softcap = 2e38f; }, "options.softcap"},
      {"window_left -2", [](Fx& f) { f.opts().window_left = -2; }, "options.window_left"},
      {"window_right -2", [](Fx& f) { f.opts().window_right = -2; }, "options.window_right"},
      {"window_right 1 with bottom_right causal",
       [](Fx& f) {
         f.opts().causal = causal_mode::bottom_right;
         f.opts().window_right = 1;
       },
       "options.window_right"},
      {"window_right 2 with top_left causal",
       [](Fx& f) {
         f.opts().causal = causal_mode::top_left;
         f.opts().window_right = 2;
       },
       "options.window_right"},
      {"sink_tokens -1", [](Fx& f) { f.opts().sink_tokens = -1; }, "options.sink_tokens"},
      {"num_threads -1", [](Fx& f) { f.opts().num_threads = -1; }, "options.num_threads"},
      {"causal out of range", [](Fx& f) { f.opts().causal = static_cast<causal_mode>(9); }, "options.causal"},
      {"head map out of range", [](Fx& f) { f.opts().heads = static_cast<head_map>(7); }, "options.heads"},
  };
  if (sinks) {
    add_view_cases<Fx>(c, "options.sink_logits",
                       [heads_out](Fx& f) -> tensor_view<const float, 1>& {
                         f.opts().sink_logits = tensor_view<const float, 1>(f.sb.data(), {heads_out});
                         return f.opts().sink_logits;
                       },
                       {1});
    c.push_back({"sink_logits of heads_out - 1",
                 [heads_out](Fx& f) {
                   f.opts().sink_logits = tensor_view<const float, 1>(f.sb.data(), {heads_out - 1});
                 },
                 "options.sink_logits.shape[0]"});
    c.push_back({"sink_logits of heads_out + 1",
                 [heads_out](Fx& f) {
                   f.opts().sink_logits = tensor_view<const float, 1>(f.sb.data(), {heads_out + 1});
                 },
                 "options.sink_logits.shape[0]"});
    c.push_back({"sink logit NaN",
                 [heads_out](Fx& f) {
                   f.sb[1] = kNaN;
                   f.opts().sink_logits = tensor_view<const float, 1>(f.sb.data(), {heads_out});
                 },
                 "options.sink_logits[1]"});
    c.push_back({"sink logit +inf",
                 [heads_out](Fx& f) {
                   f.sb[static_cast<std::size_t>(heads_out - 1)] = kInf;
                   f.opts().sink_logits = tensor_view<const float, 1>(f.sb.data(), {heads_out});
                 },
                 std::string("options.sink_logits") + index_text(heads_out - 1)});
  } else {
    c.push_back(
        {"sink_logits given",
         [heads_out](Fx& f) { f.opts().sink_logits = tensor_view<const float, 1>(f.sb.data(), {heads_out}); },
         "options.sink_logits"});
  }
  return c;
}

template <class Fx>
void append_cases(std::vector<bad<Fx>>& to, const std::vector<bad<Fx>>& from) {
  to.insert(to.end(), from.begin(), from.end());
}

template <class T>
std::vector<T> filled(T v) {
  return std::vector<T>(kBuf, v);
}

// =============================================================================================
// attention, attention_blocked, reference::attention (variants/attention.hpp check_attention)
// =============================================================================================

struct dense_fx {
  static constexpr std::int64_t B = 2, SQ = 3, SK = 5, HQ = 4, HK = 2, D = 8;
  std::vector<float> qb = hwt::random_normal(kBuf, 1), kb = hwt::random_normal(kBuf, 2),
                     vb = hwt::random_normal(kBuf, 3), ob = filled(hwt::kOutSentinel),
                     lb = filled(hwt::kLseSentinel), sb = std::vector<float>(64, 0.5f);
  tensor_view<const float, 4> q = headwise::bshd<const float>(qb.data(), B, SQ, HQ, D);
  tensor_view<const float, 4> k = headwise::bshd<const float>(kb.data(), B, SK, HK, D);
  tensor_view<const float, 4> v = headwise::bshd<const float>(vb.data(), B, SK, HK, D);
  tensor_view<float, 4> out = headwise::bshd(ob.data(), B, SQ, HQ, D);
  tensor_view<float, 3> lse = headwise::bhs(lb.data(), B, HQ, SQ);
  attention_options o{};

  dense_fx() = default;
  dense_fx(const dense_fx&) = delete;
  dense_fx& operator=(const dense_fx&) = delete;
  attention_options& opts() { return o; }
  [[nodiscard]] snapshot_t snapshot() const {
    return {bytes_of(qb), bytes_of(kb), bytes_of(vb), bytes_of(ob), bytes_of(lb), bytes_of(sb)};
  }
};

std::vector<runner<dense_fx>> dense_runners() {
  return {
      {"attention", "headwise::attention",
       [](dense_fx& f) { headwise::attention(f.q, f.k, f.v, f.out, f.o, f.lse); }},
      {"attention_blocked", "headwise::attention_blocked",
       [](dense_fx& f) {
         headwise::attention_blocked(f.q, f.k, f.v, f.out, f.o, f.lse, headwise::engine::blocking{16, 16});
       }},
      {"reference::attention", "headwise::reference::attention",
       [](dense_fx& f) { headwise::reference::attention(f.q, f.k, f.v, f.out, f.o, f.lse); }},
  };
}

TEST(audit, audit_dense_views) {
  using F = dense_fx;
  std::vector<bad<F>> c;
  add_view_cases<F>(c, "q", [](F & f) -> auto& { return f.q; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "k", [](F & f) -> auto& { return f.k; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "v", [](F & f) -> auto& { return f.v; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "out", [](F & f) -> auto& { return f.out; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "lse", [](F & f) -> auto& { return f.lse; }, {1, 1, 0});
  check_cases(c, dense_runners());
}

TEST(audit, audit_dense_options) { check_cases(option_cases<dense_fx>(dense_fx::HQ, true), dense_runners()); }

TEST(audit, audit_dense_outputs) {
  using F = dense_fx;
  const std::vector<bad<F>> c = {
      {"out overlaps itself", [](F& f) { f.out.stride[1] = 0; }, "out.stride"},
      {"out in q", [](F& f) { f.out.data = f.qb.data() + 1; }, "out"},
      {"out in k", [](F& f) { f.out.data = f.kb.data(); }, "out"},
      {"out in v", [](F& f) { f.out.data = f.vb.data() + 9; }, "out"},
      {"out holds the sink logits",
       [](F& f) { f.o.sink_logits = tensor_view<const float, 1>(f.ob.data() + 2, {F::HQ}); }, "out"},
      {"lse overlaps itself", [](F& f) { f.lse.stride[1] = 0; }, "lse.stride"},
      {"lse in out", [](F& f) { f.lse.data = f.ob.data() + 5; }, "lse"},
      {"lse in q", [](F& f) { f.lse.data = f.qb.data(); }, "lse"},
      {"lse in k", [](F& f) { f.lse.data = f.kb.data() + 3; }, "lse"},
      {"lse in v", [](F& f) { f.lse.data = f.vb.data(); }, "lse"},
      {"lse holds the sink logits",
       [](F& f) { f.o.sink_logits = tensor_view<const float, 1>(f.lb.data() + 4, {F::HQ}); }, "lse"},
  };
  check_cases(c, dense_runners());
}

TEST(audit, audit_dense_blocking) {
  // Every field of engine::blocking (rows, block_kv, decode_block_kv, decode_block_kv16 >= 1;
  // split_kv, prefetch_bytes >= 0), before any tensor check.
  using blocking = headwise::engine::blocking;
  std::vector<blocking> bad_blk(6);
  bad_blk[0].rows = 0;
  bad_blk[1].block_kv = -1;
  bad_blk[2].decode_block_kv = 0;
  bad_blk[3].split_kv = -1;
  bad_blk[4].prefetch_bytes = -1;
  bad_blk[5].decode_block_kv16 = 0;
  for (const blocking& blk : bad_blk) {
    dense_fx f;
    f.q.data = nullptr;  // a tensor error too: the blocking is checked first
    expect_rejected(
        f, [&] { headwise::attention_blocked(f.q, f.k, f.v, f.out, f.o, f.lse, blk); },
        "headwise::attention_blocked", "blk", false);
  }
}

// =============================================================================================
// attention_varlen
// =============================================================================================

struct varlen_fx {
  static constexpr std::int64_t HQ = 4, HK = 2, D = 8, TQ = 6, TK = 9;
  std::vector<float> qb = hwt::random_normal(kBuf, 11), kb = hwt::random_normal(kBuf, 12),
                     vb = hwt::random_normal(kBuf, 13), ob = filled(hwt::kOutSentinel),
                     lb = filled(hwt::kLseSentinel), sb = std::vector<float>(64, 0.5f);
  std::vector<std::int32_t> cqb = filled<std::int32_t>(0), ckb = filled<std::int32_t>(0);
  tensor_view<const float, 3> q{qb.data(), {TQ, HQ, D}}, k{kb.data(), {TK, HK, D}}, v{vb.data(), {TK, HK, D}};
  tensor_view<float, 3> out{ob.data(), {TQ, HQ, D}};
  tensor_view<float, 2> lse{lb.data(), {HQ, TQ}};
  tensor_view<const std::int32_t, 1> cu_q{cqb.data(), {4}}, cu_k{ckb.data(), {4}};
  attention_options o{};

  varlen_fx() {
    const std::int32_t cq[] = {0, 2, 3, 6}, ck[] = {0, 4, 4, 9};
    std::copy(std::begin(cq), std::end(cq), cqb.begin());
    std::copy(std::begin(ck), std::end(ck), ckb.begin());
    o.causal = causal_mode::bottom_right;
  }
  varlen_fx(const varlen_fx&) = delete;
  varlen_fx& operator=(const varlen_fx&) = delete;
  attention_options& opts() { return o; }
  [[nodiscard]] snapshot_t snapshot() const {
    return {bytes_of(qb), bytes_of(kb), bytes_of(vb),  bytes_of(ob),
            bytes_of(lb), bytes_of(sb), bytes_of(cqb), bytes_of(ckb)};
  }
};

std::vector<runner<varlen_fx>> varlen_runners() {
  return {{"attention_varlen", "headwise::attention_varlen", [](varlen_fx& f) {
             headwise::attention_varlen(f.q, f.k, f.v, f.cu_q, f.cu_k, f.out, f.o, f.lse);
           }}};
}

TEST(audit, audit_varlen_views) {
  using F = varlen_fx;
  std::vector<bad<F>> c;
  add_view_cases<F>(c, "q", [](F & f) -> auto& { return f.q; }, {0, 1, 1});
  add_view_cases<F>(c, "k", [](F & f) -> auto& { return f.k; }, {0, 1, 1});
  add_view_cases<F>(c, "v", [](F & f) -> auto& { return f.v; }, {0, 1, 1});
  add_view_cases<F>(c, "out", [](F & f) -> auto& { return f.out; }, {0, 1, 1});
  add_view_cases<F>(c, "lse", [](F & f) -> auto& { return f.lse; }, {1, 0});
  add_view_cases<F>(c, "cu_seqlens_q", [](F & f) -> auto& { return f.cu_q; }, {1});
  add_view_cases<F>(c, "cu_seqlens_k", [](F & f) -> auto& { return f.cu_k; }, {1});
  check_cases(c, varlen_runners());
}

TEST(audit, audit_varlen_shapes) {
  using F = varlen_fx;
  const std::vector<bad<F>> c = {
      {"k dim != q dim", [](F& f) { f.k.shape[2] = F::D - 1; }, "k.shape[2]"},
      {"v rows != k rows", [](F& f) { f.v.shape[0] = F::TK - 1; }, "v.shape[0]"},
      {"v heads != k heads", [](F& f) { f.v.shape[1] = 1; }, "v.shape[1]"},
      {"interleave: heads_kv not dividing heads_q",
       [](F& f) {
         f.k.shape[1] = 3;
         f.v.shape[1] = 3;
       },
       "k.shape[1]"},
      {"tile: neither head count divides the other",
       [](F& f) {
         f.o.heads = head_map::tile;
         f.k.shape[1] = 3;
         f.v.shape[1] = 3;
       },
       "k.shape[1]"},
      {"out rows != total_q", [](F& f) { f.out.shape[0] = F::TQ - 1; }, "out.shape[0]"},
      {"out heads != heads_out", [](F& f) { f.out.shape[1] = 2; }, "out.shape[1]"},
      {"out dim != v dim", [](F& f) { f.out.shape[2] = F::D - 1; }, "out.shape[2]"},
      {"lse heads != heads_out", [](F& f) { f.lse.shape[0] = 3; }, "lse.shape[0]"},
      {"lse rows != total_q", [](F& f) { f.lse.shape[1] = F::TQ + 1; }, "lse.shape[1]"},
      {"cu_seqlens_q[0] != 0", [](F& f) { f.cqb[0] = 1; }, "cu_seqlens_q[0]"},
      {"cu_seqlens_k decreasing", [](F& f) { f.ckb[2] = 3; }, "cu_seqlens_k[2]"},
      {"cu_seqlens_q last != total_q", [](F& f) { f.cqb[3] = 5; }, "cu_seqlens_q[3]"},
      {"cu_seqlens_k last != total_k", [](F& f) { f.ckb[3] = 10; }, "cu_seqlens_k[3]"},
      {"cu_seqlens_k of another batch",
       [](F& f) {
         f.ckb[2] = 9;
         f.cu_k.shape[0] = 3;
       },
       "cu_seqlens_k.shape[0]"},
  };
  check_cases(c, varlen_runners());
}

TEST(audit, audit_varlen_options) {
  check_cases(option_cases<varlen_fx>(varlen_fx::HQ, true), varlen_runners());
}

TEST(audit, audit_varlen_outputs) {
  using F = varlen_fx;
  auto in_cu = [](std::vector<std::int32_t>& b) { return reinterpret_cast<float*>(b.data()); };
  const std::vector<bad<F>> c = {
      {"out overlaps itself", [](F& f) { f.out.stride[0] = 0; }, "out.stride"},
      {"out in q", [](F& f) { f.out.data = f.qb.data() + 4; }, "out"},
      {"out in k", [](F& f) { f.out.data = f.kb.data(); }, "out"},
      {"out in v", [](F& f) { f.out.data = f.vb.data(); }, "out"},
      {"out in cu_seqlens_q", [in_cu](F& f) { f.out.data = in_cu(f.cqb); }, "out"},
      {"out in cu_seqlens_k", [in_cu](F& f) { f.out.data = in_cu(f.ckb); }, "out"},
      {"out holds the sink logits",
       [](F& f) { f.o.sink_logits = tensor_view<const float, 1>(f.ob.data(), {F::HQ}); }, "out"},
      {"lse overlaps itself", [](F& f) { f.lse.stride[0] = 1; }, "lse.stride"},
      {"lse in out", [](F& f) { f.lse.data = f.ob.data() + 7; }, "lse"},
      {"lse in q", [](F& f) { f.lse.data = f.qb.data(); }, "lse"},
      {"lse in k", [](F& f) { f.lse.data = f.kb.data(); }, "lse"},
      {"lse in v", [](F& f) { f.lse.data = f.vb.data(); }, "lse"},
      {"lse in cu_seqlens_q", [in_cu](F& f) { f.lse.data = in_cu(f.cqb); }, "lse"},
      {"lse in cu_seqlens_k", [in_cu](F& f) { f.lse.data = in_cu(f.ckb); }, "lse"},
      {"lse holds the sink logits",
       [](F& f) { f.o.sink_logits = tensor_view<const float, 1>(f.lb.data(), {F::HQ}); }, "lse"},
  };
  check_cases(c, varlen_runners());
}

// =============================================================================================
// attention_paged, attention_paged_varlen (check_paged and their own checks)
// =============================================================================================

struct paged_fx {
  static constexpr std::int64_t B = 2, SQ = 2, HQ = 4, HK = 2, D = 8, PS = 4, NP = 6, MP = 3, TQ = 4;
  std::vector<float> kpb = hwt::random_normal(kBuf, 21), vpb = hwt::random_normal(kBuf, 22),
                     qb = hwt::random_normal(kBuf, 23), ob = filled(hwt::kOutSentinel),
                     lb = filled(hwt::kLseSentinel), sb = std::vector<float>(64, 0.5f);
  std::vector<std::int32_t> tb = filled<std::int32_t>(-1), slb = filled<std::int32_t>(0),
                            cub = filled<std::int32_t>(0);
  paged_kv<float> kv{
      {kpb.data(), {NP, PS, HK, D}}, {vpb.data(), {NP, PS, HK, D}}, {tb.data(), {B, MP}}, {slb.data(), {B}}};
  // attention_paged
  tensor_view<const float, 4> q4 = headwise::bshd<const float>(qb.data(), B, SQ, HQ, D);
  tensor_view<float, 4> out4 = headwise::bshd(ob.data(), B, SQ, HQ, D);
  tensor_view<float, 3> lse3 = headwise::bhs(lb.data(), B, HQ, SQ);
  // attention_paged_varlen: 2 + 2 query rows
  tensor_view<const float, 3> q3{qb.data(), {TQ, HQ, D}};
  tensor_view<float, 3> out3{ob.data(), {TQ, HQ, D}};
  tensor_view<float, 2> lse2{lb.data(), {HQ, TQ}};
  tensor_view<const std::int32_t, 1> cu_q{cub.data(), {B + 1}};
  attention_options o{};

  paged_fx() {
    const std::int32_t table[] = {0, 1, -1, 2, 3, 4};  // lengths 5 and 9; the -1 is never read
    std::copy(std::begin(table), std::end(table), tb.begin());
    slb[0] = 5;
    slb[1] = 9;
    cub[1] = 2;
    cub[2] = 4;
    o.causal = causal_mode::bottom_right;
  }
  paged_fx(const paged_fx&) = delete;
  paged_fx& operator=(const paged_fx&) = delete;
  attention_options& opts() { return o; }
  [[nodiscard]] snapshot_t snapshot() const {
    return {bytes_of(kpb), bytes_of(vpb), bytes_of(qb),  bytes_of(ob), bytes_of(lb),
            bytes_of(sb),  bytes_of(tb),  bytes_of(slb), bytes_of(cub)};
  }
};

std::vector<runner<paged_fx>> paged_runner() {
  return {{"attention_paged", "headwise::attention_paged",
           [](paged_fx& f) { headwise::attention_paged(f.q4, f.kv, f.out4, f.o, f.lse3); }}};
}
std::vector<runner<paged_fx>> paged_varlen_runner() {
  return {{"attention_paged_varlen", "headwise::attention_paged_varlen",
           [](paged_fx& f) { headwise::attention_paged_varlen(f.q3, f.cu_q, f.kv, f.out3, f.o, f.lse2); }}};
}
std::vector<runner<paged_fx>> both_paged_runners() {
  auto r = paged_runner();
  const auto v = paged_varlen_runner();
  r.insert(r.end(), v.begin(), v.end());
  return r;
}

TEST(audit, audit_paged_cache) {
  // check_paged: the same checks and names for attention_paged and attention_paged_varlen.
  using F = paged_fx;
  std::vector<bad<F>> c;
  add_view_cases<F>(c, "kv.k_pages", [](F & f) -> auto& { return f.kv.k_pages; }, {1, 1, 1, 1});
  add_view_cases<F>(c, "kv.v_pages", [](F & f) -> auto& { return f.kv.v_pages; }, {1, 1, 1, 1});
  add_view_cases<F>(c, "kv.block_table", [](F & f) -> auto& { return f.kv.block_table; }, {F::B, 0});
  add_view_cases<F>(c, "kv.seqlens", [](F & f) -> auto& { return f.kv.seqlens; }, {F::B});
  append_cases(
      c, std::vector<bad<F>>{
             {"v_pages num_pages", [](F& f) { f.kv.v_pages.shape[0] = F::NP - 1; }, "kv.v_pages.shape[0]"},
             {"v_pages page_size", [](F& f) { f.kv.v_pages.shape[1] = F::PS - 1; }, "kv.v_pages.shape[1]"},
             {"v_pages heads_kv", [](F& f) { f.kv.v_pages.shape[2] = 1; }, "kv.v_pages.shape[2]"},
             {"k_pages dim != q dim", [](F& f) { f.kv.k_pages.shape[3] = F::D - 1; }, "kv.k_pages.shape[3]"},
             {"block_table rows > batch", [](F& f) { f.kv.block_table.shape[0] = F::B + 1; },
              "kv.block_table.shape[0]"},
             {"seqlens longer than batch", [](F& f) { f.kv.seqlens.shape[0] = F::B + 1; },
              "kv.seqlens.shape[0]"},
             {"seqlens beyond capacity", [](F& f) { f.slb[1] = 13; }, "kv.seqlens[1]"},
             {"seqlens negative", [](F& f) { f.slb[0] = -1; }, "kv.seqlens[0]"},
             {"block table entry -1 for a used page", [](F& f) { f.tb[4] = -1; }, "kv.block_table[1][1]"},
             {"block table entry == num_pages", [](F& f) { f.tb[1] = F::NP; }, "kv.block_table[0][1]"},
         });
  check_cases(c, both_paged_runners());
}

TEST(audit, audit_paged_own_checks) {
  using F = paged_fx;
  std::vector<bad<F>> c;
  add_view_cases<F>(c, "q", [](F & f) -> auto& { return f.q4; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "out", [](F & f) -> auto& { return f.out4; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "lse", [](F & f) -> auto& { return f.lse3; }, {1, 1, 0});
  append_cases(c, std::vector<bad<F>>{
                      {"heads_kv not dividing heads_q",
                       [](F& f) {
                         f.kv.k_pages.shape[2] = 3;
                         f.kv.v_pages.shape[2] = 3;
                       },
                       "kv.k_pages.shape[2]"},
                      {"out batch", [](F& f) { f.out4.shape[0] = 1; }, "out.shape[0]"},
                      {"out seq", [](F& f) { f.out4.shape[1] = 1; }, "out.shape[1]"},
                      {"out heads", [](F& f) { f.out4.shape[2] = 2; }, "out.shape[2]"},
                      {"out dim", [](F& f) { f.out4.shape[3] = F::D - 1; }, "out.shape[3]"},
                      {"lse batch", [](F& f) { f.lse3.shape[0] = 1; }, "lse.shape[0]"},
                      {"lse heads", [](F& f) { f.lse3.shape[1] = 2; }, "lse.shape[1]"},
                      {"lse seq", [](F& f) { f.lse3.shape[2] = 1; }, "lse.shape[2]"},
                  });
  append_cases(c, option_cases<F>(F::HQ, true));
  auto as_f = [](std::vector<std::int32_t>& b) { return reinterpret_cast<float*>(b.data()); };
  append_cases(c,
               std::vector<bad<F>>{
                   {"out overlaps itself", [](F& f) { f.out4.stride[2] = 0; }, "out.stride"},
                   {"out in q", [](F& f) { f.out4.data = f.qb.data(); }, "out"},
                   {"out in k_pages", [](F& f) { f.out4.data = f.kpb.data() + 8; }, "out"},
                   {"out in v_pages", [](F& f) { f.out4.data = f.vpb.data(); }, "out"},
                   {"out in block_table", [as_f](F& f) { f.out4.data = as_f(f.tb); }, "out"},
                   {"out in seqlens", [as_f](F& f) { f.out4.data = as_f(f.slb); }, "out"},
                   {"out holds the sink logits",
                    [](F& f) { f.o.sink_logits = tensor_view<const float, 1>(f.ob.data(), {F::HQ}); }, "out"},
                   {"lse overlaps itself", [](F& f) { f.lse3.stride[0] = 0; }, "lse.stride"},
                   {"lse in out", [](F& f) { f.lse3.data = f.ob.data(); }, "lse"},
                   {"lse in q", [](F& f) { f.lse3.data = f.qb.data(); }, "lse"},
                   {"lse in k_pages", [](F& f) { f.lse3.data = f.kpb.data(); }, "lse"},
                   {"lse in v_pages", [](F& f) { f.lse3.data = f.vpb.data(); }, "lse"},
                   {"lse in block_table", [as_f](F& f) { f.lse3.data = as_f(f.tb); }, "lse"},
                   {"lse in seqlens", [as_f](F& f) { f.lse3.data = as_f(f.slb); }, "lse"},
                   {"lse holds the sink logits",
                    [](F& f) { f.o.sink_logits = tensor_view<const float, 1>(f.lb.data(), {F::HQ}); }, "lse"},
               });
  check_cases(c, paged_runner());
}

TEST(audit, audit_paged_varlen_own_checks) {
  using F = paged_fx;
  std::vector<bad<F>> c;
  add_view_cases<F>(c, "q", [](F & f) -> auto& { return f.q3; }, {0, 1, 1});
  add_view_cases<F>(c, "out", [](F & f) -> auto& { return f.out3; }, {0, 1, 1});
  add_view_cases<F>(c, "lse", [](F & f) -> auto& { return f.lse2; }, {1, 0});
  add_view_cases<F>(c, "cu_seqlens_q", [](F & f) -> auto& { return f.cu_q; }, {1});
  append_cases(c, std::vector<bad<F>>{
                      {"heads_kv not dividing heads_q",
                       [](F& f) {
                         f.kv.k_pages.shape[2] = 3;
                         f.kv.v_pages.shape[2] = 3;
                       },
                       "kv.k_pages.shape[2]"},
                      {"block_table rows != batch of cu_seqlens_q", [](F& f) { f.cu_q.shape[0] = F::B; },
                       "kv.block_table.shape[0]"},
                      {"out rows", [](F& f) { f.out3.shape[0] = F::TQ - 1; }, "out.shape[0]"},
                      {"out heads", [](F& f) { f.out3.shape[1] = 2; }, "out.shape[1]"},
                      {"out dim", [](F& f) { f.out3.shape[2] = F::D - 1; }, "out.shape[2]"},
                      {"cu_seqlens_q[0] != 0", [](F& f) { f.cub[0] = 1; }, "cu_seqlens_q[0]"},
                      {"cu_seqlens_q decreasing", [](F& f) { f.cub[1] = 5; }, "cu_seqlens_q[2]"},
                      {"cu_seqlens_q last != total_q", [](F& f) { f.cub[2] = 3; }, "cu_seqlens_q[2]"},
                      {"lse heads", [](F& f) { f.lse2.shape[0] = 2; }, "lse.shape[0]"},
                      {"lse rows", [](F& f) { f.lse2.shape[1] = F::TQ - 1; }, "lse.shape[1]"},
                  });
  append_cases(c, option_cases<F>(F::HQ, true));
  auto as_f = [](std::vector<std::int32_t>& b) { return reinterpret_cast<float*>(b.data()); };
  append_cases(c, std::vector<bad<F>>{
                      {"out overlaps itself", [](F& f) { f.out3.stride[1] = 0; }, "out.stride"},
                      {"out in q", [](F& f) { f.out3.data = f.qb.data(); }, "out"},
                      {"out in k_pages", [](F& f) { f.out3.data = f.kpb.data(); }, "out"},
                      {"out in v_pages", [](F& f) { f.out3.data = f.vpb.data(); }, "out"},
                      {"out in block_table", [as_f](F& f) { f.out3.data = as_f(f.tb); }, "out"},
                      {"out in seqlens", [as_f](F& f) { f.out3.data = as_f(f.slb); }, "out"},
                      {"out in cu_seqlens_q", [as_f](F& f) { f.out3.data = as_f(f.cub); }, "out"},
                      {"lse overlaps itself", [](F& f) { f.lse2.stride[0] = 0; }, "lse.stride"},
                      {"lse in out", [](F& f) { f.lse2.data = f.ob.data(); }, "lse"},
                      {"lse in cu_seqlens_q", [as_f](F& f) { f.lse2.data = as_f(f.cub); }, "lse"},
                      {"lse in block_table", [as_f](F& f) { f.lse2.data = as_f(f.tb); }, "lse"},
                  });
  check_cases(c, paged_varlen_runner());
}

// =============================================================================================
// convert
// =============================================================================================

template <class T>
struct convert_fx {
  std::vector<float> sb_ = hwt::random_normal(kBuf, 31), sb = std::vector<float>(64, 0.0f);
  std::vector<T> db = std::vector<T>(kBuf, headwise::from_float<T>(7.0f));
  tensor_view<const float, 2> src{sb_.data(), {3, 4}};
  tensor_view<T, 2> dst{db.data(), {3, 4}};

  convert_fx() = default;
  convert_fx(const convert_fx&) = delete;
  convert_fx& operator=(const convert_fx&) = delete;
  [[nodiscard]] snapshot_t snapshot() const { return {bytes_of(sb_), bytes_of(db)}; }
};

template <class T>
void check_convert() {
  using F = convert_fx<T>;
  std::vector<bad<F>> c;
  add_view_cases<F>(c, "src", [](F & f) -> auto& { return f.src; }, {0, 0});
  add_view_cases<F>(c, "dst", [](F & f) -> auto& { return f.dst; }, {0, 0});
  append_cases(c,
               std::vector<bad<F>>{
                   {"dst rows", [](F& f) { f.dst.shape[0] = 2; }, "dst.shape[0]"},
                   {"dst cols", [](F& f) { f.dst.shape[1] = 5; }, "dst.shape[1]"},
                   {"dst overlaps itself", [](F& f) { f.dst.stride[0] = 2; }, "dst.stride"},
                   {"dst in src", [](F& f) { f.dst.data = reinterpret_cast<T*>(f.sb_.data() + 2); }, "dst"},
               });
  check_cases(c, std::vector<runner<F>>{
                     {"convert", "headwise::convert", [](F& f) { headwise::convert(f.src, f.dst); }}});
}

TEST(audit, audit_convert) {
  check_convert<float>();
  check_convert<bf16>();
  check_convert<headwise::f16>();
}

// =============================================================================================
// kv_cache_append
// =============================================================================================

struct append_fx {
  static constexpr std::int64_t B = 2, CAP = 8, H = 2, D = 4, N = 3;
  std::vector<bf16> kcb = filled(bf16{0x1234}), vcb = filled(bf16{0x4321});
  std::vector<float> knb = hwt::random_normal(kBuf, 41), vnb = hwt::random_normal(kBuf, 42), sb;
  std::vector<std::int32_t> pb = filled<std::int32_t>(0);
  tensor_view<bf16, 4> k_cache = headwise::bshd(kcb.data(), B, CAP, H, D);
  tensor_view<bf16, 4> v_cache = headwise::bshd(vcb.data(), B, CAP, H, D);
  tensor_view<const std::int32_t, 1> pos{pb.data(), {B}};
  tensor_view<const float, 4> k_new = headwise::bshd<const float>(knb.data(), B, N, H, D);
  tensor_view<const float, 4> v_new = headwise::bshd<const float>(vnb.data(), B, N, H, D);

  append_fx() {
    pb[0] = 3;
    pb[1] = 5;
  }
  append_fx(const append_fx&) = delete;
  append_fx& operator=(const append_fx&) = delete;
  [[nodiscard]] snapshot_t snapshot() const {
    return {bytes_of(kcb), bytes_of(vcb), bytes_of(knb), bytes_of(vnb), bytes_of(pb)};
  }
};

TEST(audit, audit_kv_cache_append) {
  using F = append_fx;
  std::vector<bad<F>> c;
  add_view_cases<F>(c, "k_cache", [](F & f) -> auto& { return f.k_cache; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "v_cache", [](F & f) -> auto& { return f.v_cache; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "k_new", [](F & f) -> auto& { return f.k_new; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "v_new", [](F & f) -> auto& { return f.v_new; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "cache_seqlens", [](F & f) -> auto& { return f.pos; }, {F::B});
  append_cases(
      c, std::vector<bad<F>>{
             {"cache_seqlens longer than batch", [](F& f) { f.pos.shape[0] = F::B + 1; },
              "cache_seqlens.shape[0]"},
             {"v_cache batch", [](F& f) { f.v_cache.shape[0] = 1; }, "v_cache.shape[0]"},
             {"v_cache capacity", [](F& f) { f.v_cache.shape[1] = F::CAP - 1; }, "v_cache.shape[1]"},
             {"v_cache heads", [](F& f) { f.v_cache.shape[2] = 1; }, "v_cache.shape[2]"},
             {"k_new batch", [](F& f) { f.k_new.shape[0] = 1; }, "k_new.shape[0]"},
             {"k_new heads", [](F& f) { f.k_new.shape[2] = 1; }, "k_new.shape[2]"},
             {"k_new dim", [](F& f) { f.k_new.shape[3] = F::D - 1; }, "k_new.shape[3]"},
             {"v_new batch", [](F& f) { f.v_new.shape[0] = 1; }, "v_new.shape[0]"},
             {"v_new tokens", [](F& f) { f.v_new.shape[1] = F::N - 1; }, "v_new.shape[1]"},
             {"v_new heads", [](F& f) { f.v_new.shape[2] = 1; }, "v_new.shape[2]"},
             {"v_new dim", [](F& f) { f.v_new.shape[3] = F::D - 1; }, "v_new.shape[3]"},
             {"no room", [](F& f) { f.pb[1] = 6; }, "cache_seqlens[1]"},
             {"negative position", [](F& f) { f.pb[0] = -1; }, "cache_seqlens[0]"},
             {"k_cache in v_cache", [](F& f) { f.k_cache.data = f.vcb.data() + 8; }, "k_cache"},
             {"k_cache overlaps itself", [](F& f) { f.k_cache.stride[1] = 0; }, "k_cache.stride"},
             {"v_cache overlaps itself", [](F& f) { f.v_cache.stride[2] = 0; }, "v_cache.stride"},
             {"k_cache holds k_new",
              [](F& f) { f.k_new.data = reinterpret_cast<const float*>(f.kcb.data() + 16); }, "k_cache"},
             {"v_cache holds v_new",
              [](F& f) { f.v_new.data = reinterpret_cast<const float*>(f.vcb.data() + 16); }, "v_cache"},
             {"k_cache holds cache_seqlens",
              [](F& f) {
                std::memcpy(static_cast<void*>(f.kcb.data() + 8), f.pb.data(), 2 * sizeof(std::int32_t));
                f.pos.data = reinterpret_cast<const std::int32_t*>(f.kcb.data() + 8);
              },
              "k_cache"},
         });
  check_cases(c, std::vector<runner<F>>{{"kv_cache_append", "headwise::kv_cache_append", [](F& f) {
                                           headwise::kv_cache_append(f.k_cache, f.v_cache, f.pos, f.k_new,
                                                                     f.v_new);
                                         }}});
}

// =============================================================================================
// paged_kv_append (its own checks, then check_paged, whose names carry a "kv." prefix here)
// =============================================================================================

struct paged_append_fx {
  static constexpr std::int64_t B = 2, NP = 6, PS = 4, H = 2, D = 4, MP = 3, N = 2;
  std::vector<bf16> kpb = filled(bf16{0x1234}), vpb = filled(bf16{0x4321});
  std::vector<float> knb = hwt::random_normal(kBuf, 51), vnb = hwt::random_normal(kBuf, 52);
  std::vector<std::int32_t> tb = filled<std::int32_t>(-1), slb = filled<std::int32_t>(0);
  tensor_view<bf16, 4> k_pages{kpb.data(), {NP, PS, H, D}}, v_pages{vpb.data(), {NP, PS, H, D}};
  tensor_view<const std::int32_t, 2> table{tb.data(), {B, MP}};
  tensor_view<const std::int32_t, 1> seqlens{slb.data(), {B}};
  tensor_view<const float, 4> k_new = headwise::bshd<const float>(knb.data(), B, N, H, D);
  tensor_view<const float, 4> v_new = headwise::bshd<const float>(vnb.data(), B, N, H, D);

  paged_append_fx() {
    const std::int32_t t[] = {0, 1, -1, 2, 3, 4};
    std::copy(std::begin(t), std::end(t), tb.begin());
    slb[0] = 5;
    slb[1] = 9;
  }
  paged_append_fx(const paged_append_fx&) = delete;
  paged_append_fx& operator=(const paged_append_fx&) = delete;
  [[nodiscard]] snapshot_t snapshot() const {
    return {bytes_of(kpb), bytes_of(vpb), bytes_of(knb), bytes_of(vnb), bytes_of(tb), bytes_of(slb)};
  }
};

TEST(audit, audit_paged_kv_append) {
  using F = paged_append_fx;
  std::vector<bad<F>> c;
  add_view_cases<F>(c, "k_new", [](F & f) -> auto& { return f.k_new; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "v_new", [](F & f) -> auto& { return f.v_new; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "seqlens", [](F & f) -> auto& { return f.seqlens; }, {F::B});
  // The cache's own parameter names (check_paged runs with an empty prefix here).
  add_view_cases<F>(
      c, "k_pages", [](F & f) -> auto& { return f.k_pages; }, {1, 1, 1, 1});
  add_view_cases<F>(
      c, "v_pages", [](F & f) -> auto& { return f.v_pages; }, {1, 1, 1, 1});
  add_view_cases<F>(
      c, "block_table", [](F & f) -> auto& { return f.table; }, {F::B, 0});
  append_cases(
      c,
      std::vector<bad<F>>{
          {"seqlens longer than batch", [](F& f) { f.seqlens.shape[0] = F::B + 1; }, "seqlens.shape[0]"},
          {"v_pages num_pages", [](F& f) { f.v_pages.shape[0] = F::NP - 1; }, "v_pages.shape[0]"},
          {"v_pages page_size", [](F& f) { f.v_pages.shape[1] = F::PS - 1; }, "v_pages.shape[1]"},
          {"v_pages heads", [](F& f) { f.v_pages.shape[2] = 1; }, "v_pages.shape[2]"},
          {"k_pages dim != k_new dim", [](F& f) { f.k_new.shape[3] = F::D - 1; }, "k_pages.shape[3]"},
          {"block_table rows", [](F& f) { f.table.shape[0] = F::B + 1; }, "block_table.shape[0]"},
          {"current length beyond capacity", [](F& f) { f.slb[1] = 13; }, "seqlens[1]"},
          {"current length negative", [](F& f) { f.slb[0] = -2; }, "seqlens[0]"},
          {"block table entry of a used page", [](F& f) { f.tb[3] = 6; }, "block_table[1][0]"},
          {"no room for the new tokens", [](F& f) { f.slb[1] = 11; }, "seqlens[1]"},
          {"block table entry of a new page", [](F& f) { f.slb[0] = 8; },
           "block_table[0][2]"},  // tokens 8, 9: page 2
          {"k_new heads", [](F& f) { f.k_new.shape[2] = 1; }, "k_new.shape[2]"},
          {"v_new batch", [](F& f) { f.v_new.shape[0] = 1; }, "v_new.shape[0]"},
          {"v_new tokens", [](F& f) { f.v_new.shape[1] = 1; }, "v_new.shape[1]"},
          {"v_new heads", [](F& f) { f.v_new.shape[2] = 1; }, "v_new.shape[2]"},
          {"v_new dim", [](F& f) { f.v_new.shape[3] = F::D - 1; }, "v_new.shape[3]"},
          {"k_pages in v_pages", [](F& f) { f.k_pages.data = f.vpb.data() + 64; }, "k_pages"},
          {"k_pages overlaps itself", [](F& f) { f.k_pages.stride[0] = 0; }, "k_pages.stride"},
          {"v_pages overlaps itself", [](F& f) { f.v_pages.stride[1] = 0; }, "v_pages.stride"},
          {"k_pages hold k_new",
           [](F& f) { f.k_new.data = reinterpret_cast<const float*>(f.kpb.data() + 16); }, "k_pages"},
          {"v_pages hold v_new",
           [](F& f) { f.v_new.data = reinterpret_cast<const float*>(f.vpb.data() + 16); }, "v_pages"},
          {"k_pages hold the block table",
           [](F& f) {
             std::memcpy(static_cast<void*>(f.kpb.data() + 100), f.tb.data(), 6 * sizeof(std::int32_t));
             f.table.data = reinterpret_cast<const std::int32_t*>(f.kpb.data() + 100);
           },
           "k_pages"},
          {"v_pages hold seqlens",
           [](F& f) {
             std::memcpy(static_cast<void*>(f.vpb.data() + 50), f.slb.data(), 2 * sizeof(std::int32_t));
             f.seqlens.data = reinterpret_cast<const std::int32_t*>(f.vpb.data() + 50);
           },
           "v_pages"},
      });
  check_cases(c, std::vector<runner<F>>{{"paged_kv_append", "headwise::paged_kv_append", [](F& f) {
                                           headwise::paged_kv_append(f.k_pages, f.v_pages, f.table, f.seqlens,
                                                                     f.k_new, f.v_new);
                                         }}});
}

// =============================================================================================
// merge_states
// =============================================================================================

struct merge_fx {
  static constexpr std::int64_t B = 2, S = 3, H = 4, D = 8;
  std::vector<float> oab = hwt::random_normal(kBuf, 61), obb = hwt::random_normal(kBuf, 62),
                     ob = filled(hwt::kOutSentinel), lab = filled(0.5f), lbb = filled(1.5f),
                     lb = filled(hwt::kLseSentinel);
  tensor_view<const float, 4> o_a = headwise::bshd<const float>(oab.data(), B, S, H, D);
  tensor_view<const float, 4> o_b = headwise::bshd<const float>(obb.data(), B, S, H, D);
  tensor_view<float, 4> o = headwise::bshd(ob.data(), B, S, H, D);
  tensor_view<const float, 3> lse_a = headwise::bhs<const float>(lab.data(), B, H, S);
  tensor_view<const float, 3> lse_b = headwise::bhs<const float>(lbb.data(), B, H, S);
  tensor_view<float, 3> lse = headwise::bhs(lb.data(), B, H, S);

  merge_fx() = default;
  merge_fx(const merge_fx&) = delete;
  merge_fx& operator=(const merge_fx&) = delete;
  [[nodiscard]] snapshot_t snapshot() const {
    return {bytes_of(oab), bytes_of(obb), bytes_of(ob), bytes_of(lab), bytes_of(lbb), bytes_of(lb)};
  }
};

TEST(audit, audit_merge_states) {
  using F = merge_fx;
  std::vector<bad<F>> c;
  add_view_cases<F>(c, "o_a", [](F & f) -> auto& { return f.o_a; }, {0, 0, 0, 1});
  add_view_cases<F>(c, "o_b", [](F & f) -> auto& { return f.o_b; }, {0, 0, 0, 1});
  add_view_cases<F>(c, "o", [](F & f) -> auto& { return f.o; }, {0, 0, 0, 1});
  add_view_cases<F>(c, "lse_a", [](F & f) -> auto& { return f.lse_a; }, {0, 0, 0});
  add_view_cases<F>(c, "lse_b", [](F & f) -> auto& { return f.lse_b; }, {0, 0, 0});
  add_view_cases<F>(c, "lse", [](F & f) -> auto& { return f.lse; }, {0, 0, 0});
  for (std::size_t i = 0; i < 4; ++i) {
    const std::string a = index_text(static_cast<std::int64_t>(i));
    c.push_back({"o_b.shape" + a, [i](F& f) { f.o_b.shape[i] -= 1; }, "o_b.shape" + a});
    c.push_back({"o.shape" + a, [i](F& f) { f.o.shape[i] -= 1; }, "o.shape" + a});
  }
  for (std::size_t i = 0; i < 3; ++i) {
    const std::string a = index_text(static_cast<std::int64_t>(i));
    c.push_back({"lse_a.shape" + a, [i](F& f) { f.lse_a.shape[i] += 1; }, "lse_a.shape" + a});
    c.push_back({"lse_b.shape" + a, [i](F& f) { f.lse_b.shape[i] += 1; }, "lse_b.shape" + a});
    c.push_back({"lse.shape" + a, [i](F& f) { f.lse.shape[i] += 1; }, "lse.shape" + a});
  }
  append_cases(
      c,
      std::vector<bad<F>>{
          {"o overlaps itself", [](F& f) { f.o.stride[2] = 0; }, "o.stride"},
          {"lse overlaps itself", [](F& f) { f.lse.stride[1] = 0; }, "lse.stride"},
          {"o overlaps o_a (not the same view)",
           [](F& f) { f.o_a = headwise::bshd<const float>(f.ob.data() + 1, F::B, F::S, F::H, F::D); }, "o"},
          {"o is o_b", [](F& f) { f.o_b = f.o; }, "o"},
          {"o holds lse_a", [](F& f) { f.lse_a = headwise::bhs<const float>(f.ob.data(), F::B, F::H, F::S); },
           "o"},
          {"o holds lse_b", [](F& f) { f.lse_b = headwise::bhs<const float>(f.ob.data(), F::B, F::H, F::S); },
           "o"},
          {"o holds lse", [](F& f) { f.lse.data = f.ob.data() + 3; }, "o"},
          {"lse overlaps lse_a (not the same view)",
           [](F& f) { f.lse_a = headwise::bhs<const float>(f.lb.data() + 2, F::B, F::H, F::S); }, "lse"},
          {"lse is lse_b", [](F& f) { f.lse_b = f.lse; }, "lse"},
          {"lse in o_a", [](F& f) { f.lse.data = f.oab.data(); }, "lse"},
          {"lse in o_b", [](F& f) { f.lse.data = f.obb.data() + 5; }, "lse"},
      });
  check_cases(c, std::vector<runner<F>>{{"merge_states", "headwise::merge_states", [](F& f) {
                                           headwise::merge_states(f.o_a, f.lse_a, f.o_b, f.lse_b, f.o, f.lse);
                                         }}});
}

// =============================================================================================
// mla_absorbed, mla_absorbed_paged
// =============================================================================================

struct mla_fx {
  static constexpr std::int64_t B = 2, SQ = 2, H = 4, DC = 8, W = 12, SK = 5, NP = 4, PS = 4, MP = 2;
  std::vector<float> qb = hwt::random_normal(kBuf, 71), latb = hwt::random_normal(kBuf, 72),
                     ob = filled(hwt::kOutSentinel), lb = filled(hwt::kLseSentinel),
                     sb = std::vector<float>(64, 0.5f);
  std::vector<std::int32_t> tb = filled<std::int32_t>(-1), slb = filled<std::int32_t>(0);
  tensor_view<const float, 4> q = headwise::bshd<const float>(qb.data(), B, SQ, H, W);
  tensor_view<const float, 3> latent{latb.data(), {B, SK, W}}, pages{latb.data(), {NP, PS, W}};
  tensor_view<float, 4> out = headwise::bshd(ob.data(), B, SQ, H, DC);
  tensor_view<float, 3> lse = headwise::bhs(lb.data(), B, H, SQ);
  tensor_view<const std::int32_t, 2> table{tb.data(), {B, MP}};
  tensor_view<const std::int32_t, 1> seqlens{slb.data(), {B}};
  attention_options o{};

  mla_fx() {
    for (std::size_t i = 0; i < 4; ++i) tb[i] = static_cast<std::int32_t>(i);
    slb[0] = 5;
    slb[1] = 7;
    o.scale = 0.3f;
    o.causal = causal_mode::bottom_right;
  }
  mla_fx(const mla_fx&) = delete;
  mla_fx& operator=(const mla_fx&) = delete;
  attention_options& opts() { return o; }
  [[nodiscard]] snapshot_t snapshot() const {
    return {bytes_of(qb), bytes_of(latb), bytes_of(ob), bytes_of(lb),
            bytes_of(sb), bytes_of(tb),   bytes_of(slb)};
  }
};

/// The checks both MLA entry points make on q, out, lse, options and outputs.
std::vector<bad<mla_fx>> mla_common_cases(const std::string& latent_name) {
  using F = mla_fx;
  std::vector<bad<F>> c;
  add_view_cases<F>(c, "q", [](F & f) -> auto& { return f.q; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "out", [](F & f) -> auto& { return f.out; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "lse", [](F & f) -> auto& { return f.lse; }, {1, 1, 0});
  const bool paged = latent_name == "latent_pages";
  append_cases(
      c, std::vector<bad<F>>{
             {"no scale", [](F& f) { f.o.scale.reset(); }, "options.scale"},
             {"latent width != q dim", [paged](F& f) { (paged ? f.pages : f.latent).shape[2] = F::W - 1; },
              latent_name + ".shape[2]"},
             {"d_c > dim_qk", [](F& f) { f.out = headwise::bshd(f.ob.data(), F::B, F::SQ, F::H, F::W + 1); },
              "out.shape[3]"},
             {"out batch", [](F& f) { f.out.shape[0] = 1; }, "out.shape[0]"},
             {"out seq", [](F& f) { f.out.shape[1] = 1; }, "out.shape[1]"},
             {"out heads", [](F& f) { f.out.shape[2] = 2; }, "out.shape[2]"},
             {"lse batch", [](F& f) { f.lse.shape[0] = 1; }, "lse.shape[0]"},
             {"lse heads", [](F& f) { f.lse.shape[1] = 2; }, "lse.shape[1]"},
             {"lse seq", [](F& f) { f.lse.shape[2] = 1; }, "lse.shape[2]"},
             {"out overlaps itself", [](F& f) { f.out.stride[2] = 0; }, "out.stride"},
             {"out in q", [](F& f) { f.out.data = f.qb.data(); }, "out"},
             {"out in the latent", [](F& f) { f.out.data = f.latb.data() + 3; }, "out"},
             {"out holds the sink logits",
              [](F& f) { f.o.sink_logits = tensor_view<const float, 1>(f.ob.data(), {F::H}); }, "out"},
             {"lse overlaps itself", [](F& f) { f.lse.stride[1] = 0; }, "lse.stride"},
             {"lse in out", [](F& f) { f.lse.data = f.ob.data(); }, "lse"},
             {"lse in q", [](F& f) { f.lse.data = f.qb.data(); }, "lse"},
             {"lse in the latent", [](F& f) { f.lse.data = f.latb.data(); }, "lse"},
             {"lse holds the sink logits",
              [](F& f) { f.o.sink_logits = tensor_view<const float, 1>(f.lb.data(), {F::H}); }, "lse"},
         });
  append_cases(c, option_cases<F>(F::H, true));
  return c;
}

TEST(audit, audit_mla_absorbed) {
  using F = mla_fx;
  std::vector<bad<F>> c = mla_common_cases("latent");
  add_view_cases<F>(c, "latent", [](F & f) -> auto& { return f.latent; }, {1, 0, 1});
  c.push_back({"latent batch", [](F& f) { f.latent.shape[0] = 1; }, "latent.shape[0]"});
  check_cases(c, std::vector<runner<F>>{{"mla_absorbed", "headwise::mla_absorbed", [](F& f) {
                                           headwise::mla_absorbed(f.q, f.latent, f.out, f.o, f.lse);
                                         }}});
}

TEST(audit, audit_mla_absorbed_paged) {
  using F = mla_fx;
  std::vector<bad<F>> c = mla_common_cases("latent_pages");
  add_view_cases<F>(c, "latent_pages", [](F & f) -> auto& { return f.pages; }, {1, 1, 1});
  // The parameters' own names (check_paged runs with an empty prefix here).
  add_view_cases<F>(
      c, "block_table", [](F & f) -> auto& { return f.table; }, {F::B, 0});
  add_view_cases<F>(
      c, "seqlens", [](F & f) -> auto& { return f.seqlens; }, {F::B});
  auto as_f = [](std::vector<std::int32_t>& b) { return reinterpret_cast<float*>(b.data()); };
  append_cases(
      c, std::vector<bad<F>>{
             {"block_table rows", [](F& f) { f.table.shape[0] = F::B + 1; }, "block_table.shape[0]"},
             {"seqlens longer than batch", [](F& f) { f.seqlens.shape[0] = F::B + 1; }, "seqlens.shape[0]"},
             {"length beyond capacity", [](F& f) { f.slb[1] = 9; }, "seqlens[1]"},
             {"page index out of range", [](F& f) { f.tb[3] = 4; }, "block_table[1][1]"},
             {"out in block_table", [as_f](F& f) { f.out.data = as_f(f.tb); }, "out"},
             {"lse in seqlens", [as_f](F& f) { f.lse.data = as_f(f.slb); }, "lse"},
         });
  check_cases(c, std::vector<runner<F>>{{"mla_absorbed_paged", "headwise::mla_absorbed_paged", [](F& f) {
                                           headwise::mla_absorbed_paged(f.q, f.pages, f.table, f.seqlens,
                                                                        f.out, f.o, f.lse);
                                         }}});
}

// =============================================================================================
// diff_attention, reference::diff_attention
// =============================================================================================

struct diff_fx {
  static constexpr std::int64_t B = 2, SQ = 3, SK = 5, HS = 4, HN = 2, P = 2, D = 8, DV = 16;
  std::vector<float> qb = hwt::random_normal(kBuf, 81), kb = hwt::random_normal(kBuf, 82),
                     vb = hwt::random_normal(kBuf, 83), ob = filled(hwt::kOutSentinel),
                     lsb = filled(hwt::kLseSentinel), lnb = filled(hwt::kLseSentinel), tb = filled(0.5f),
                     wb = filled(1.0f), sb = std::vector<float>(64, 0.0f);
  tensor_view<const float, 4> q = headwise::bshd<const float>(qb.data(), B, SQ, HS + HN, D);
  tensor_view<const float, 4> k = headwise::bshd<const float>(kb.data(), B, SK, 2 * P, D);
  tensor_view<const float, 4> v = headwise::bshd<const float>(vb.data(), B, SK, P, DV);
  tensor_view<float, 4> out = headwise::bshd(ob.data(), B, SQ, HS, DV);
  tensor_view<float, 3> lse_s = headwise::bhs(lsb.data(), B, HS, SQ);
  tensor_view<float, 3> lse_n = headwise::bhs(lnb.data(), B, HN, SQ);
  diff_options o{};

  diff_fx() {
    o.lambda = 0.5f;
    o.lambda_init = 0.2f;
  }
  diff_fx(const diff_fx&) = delete;
  diff_fx& operator=(const diff_fx&) = delete;
  attention_options& opts() { return o; }
  void use_tokens() {
    o.lambda.reset();
    o.lambda_tokens = tensor_view<const float, 3>(tb.data(), {B, SQ, HS});
  }
  [[nodiscard]] snapshot_t snapshot() const {
    return {bytes_of(qb),  bytes_of(kb), bytes_of(vb), bytes_of(ob), bytes_of(lsb),
            bytes_of(lnb), bytes_of(tb), bytes_of(wb), bytes_of(sb)};
  }
};

std::vector<runner<diff_fx>> diff_runner() {
  return {{"diff_attention", "headwise::diff_attention",
           [](diff_fx& f) { headwise::diff_attention(f.q, f.k, f.v, f.out, f.o, f.lse_s, f.lse_n); }}};
}

TEST(audit, audit_diff_views) {
  using F = diff_fx;
  std::vector<bad<F>> c;
  add_view_cases<F>(c, "q", [](F & f) -> auto& { return f.q; }, {1, 0, 2, 1});
  add_view_cases<F>(c, "k", [](F & f) -> auto& { return f.k; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "v", [](F & f) -> auto& { return f.v; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "out", [](F & f) -> auto& { return f.out; }, {1, 0, 1, 1});
  add_view_cases<F>(c, "lse_signal", [](F & f) -> auto& { return f.lse_s; }, {1, 1, 0});
  add_view_cases<F>(c, "lse_noise", [](F & f) -> auto& { return f.lse_n; }, {1, 1, 0});
  add_view_cases<F>(c, "options.lambda_tokens",
                    [](F& f) -> tensor_view<const float, 3>& {
                      f.use_tokens();
                      return f.o.lambda_tokens;
                    },
                    {1, 0, 1});
  add_view_cases<F>(c, "options.norm_weight",
                    [](F& f) -> tensor_view<const float, 1>& {
                      f.o.norm_weight = tensor_view<const float, 1>(f.wb.data(), {F::DV});
                      return f.o.norm_weight;
                    },
                    {1});
  check_cases(c, diff_runner());
}

TEST(audit, audit_diff_shapes_options_outputs) {
  using F = diff_fx;
  std::vector<bad<F>> c = {
      {"v batch", [](F& f) { f.v.shape[0] = 1; }, "v.shape[0]"},
      {"out batch", [](F& f) { f.out.shape[0] = 1; }, "out.shape[0]"},
      {"out overlaps itself", [](F& f) { f.out.stride[2] = 0; }, "out.stride"},
      {"out in v", [](F& f) { f.out.data = f.vb.data(); }, "out"},
      {"lse_signal in k", [](F& f) { f.lse_s.data = f.kb.data(); }, "lse_signal"},
      {"lse_signal in v", [](F& f) { f.lse_s.data = f.vb.data(); }, "lse_signal"},
      {"lse_signal holds lambda_tokens",
       [](F& f) {
         f.o.lambda.reset();
         f.o.lambda_tokens = tensor_view<const float, 3>(f.lsb.data(), {F::B, F::SQ, F::HS});
       },
       "lse_signal"},
      {"lse_signal holds norm_weight",
       [](F& f) { f.o.norm_weight = tensor_view<const float, 1>(f.lsb.data() + 1, {F::DV}); }, "lse_signal"},
      {"lse_noise overlaps itself", [](F& f) { f.lse_n.stride[1] = 0; }, "lse_noise.stride"},
      {"lse_noise in k", [](F& f) { f.lse_n.data = f.kb.data(); }, "lse_noise"},
      {"lse_noise in v", [](F& f) { f.lse_n.data = f.vb.data() + 2; }, "lse_noise"},
      {"lse_noise holds lambda_tokens",
       [](F& f) {
         f.o.lambda.reset();
         f.o.lambda_tokens = tensor_view<const float, 3>(f.lnb.data(), {F::B, F::SQ, F::HS});
       },
       "lse_noise"},
      {"lse_noise holds norm_weight",
       [](F& f) { f.o.norm_weight = tensor_view<const float, 1>(f.lnb.data(), {F::DV}); }, "lse_noise"},
      {"lambda_tokens +inf",
       [](F& f) {
         f.use_tokens();
         f.tb[3] = kInf;
       },
       "options.lambda_tokens[0][0][3]"},
  };
  append_cases(c, option_cases<F>(F::HS, false));
  check_cases(c, diff_runner());
}

TEST(audit, audit_reference_diff_attention) {
  // The reference checks only the shape relations it relies on (see the doc).
  using F = diff_fx;
  const std::string grouping = "q.shape[2], out.shape[2], v.shape[2]";
  const std::vector<bad<F>> c = {
      {"hs % hn != 0",
       [](F& f) {
         f.q.shape[2] = 5;
         f.out.shape[2] = 3;
       },
       grouping},
      {"no noise head", [](F& f) { f.q.shape[2] = F::HS; }, grouping},
      {"pairs not dividing hn", [](F& f) { f.v.shape[2] = 4; }, grouping},
      {"k heads != 2 pairs", [](F& f) { f.k.shape[2] = 3; }, "k.shape[2]"},
      {"k heads != pairs with shared keys", [](F& f) { f.o.shared_keys = true; }, "k.shape[2]"},
      {"k dim != q dim", [](F& f) { f.k.shape[3] = F::D - 1; }, "k.shape[3]"},
      {"out dim != v dim", [](F& f) { f.out.shape[3] = F::DV - 1; }, "out.shape[3]"},
      {"both lambda and lambda_tokens",
       [](F& f) {
         f.o.lambda_tokens = tensor_view<const float, 3>(f.tb.data(), {F::B, F::SQ, F::HS});
       },
       "options.lambda"},
      {"neither lambda nor lambda_tokens", [](F& f) { f.o.lambda.reset(); }, "options.lambda"},
      {"no lambda_init with rms", [](F& f) { f.o.lambda_init.reset(); }, "options.lambda_init"},
  };
  check_cases(c, std::vector<runner<F>>{
                     {"reference::diff_attention", "headwise::reference::diff_attention", [](F& f) {
                        headwise::reference::diff_attention(f.q, f.k, f.v, f.out, f.o, f.lse_s, f.lse_n);
                      }}});
}

// =============================================================================================
// Size products: tensor_view::numel_checked, the function behind every "<name>.shape" overflow
// row (the per-entry-point sweeps above run it on every tensor argument)
// =============================================================================================

TEST(audit, audit_numel_checked_rejects_64_bit_overflow) {
  constexpr std::int64_t t31 = std::int64_t{1} << 31, t61 = std::int64_t{1} << 61;
  // Element count overflow: 2^31·2^31·2 = 2^63.
  EXPECT_EQ((tensor_view<const float, 3>(nullptr, {t31, t31, 2}, {2 * t31, 2, 1}).numel_checked()), -1);
  // Count fits, bytes do not: 2^61 floats are 2^63 bytes; 2^61 bf16 are 2^62 bytes.
  EXPECT_EQ((tensor_view<const float, 1>(nullptr, {t61}).numel_checked()), -1);
  EXPECT_EQ((tensor_view<const bf16, 1>(nullptr, {t61}).numel_checked()), t61);
  // Strides: the reach Σ (extent - 1)·|stride| overflows (3·2^61 + 1 elements of 4 bytes), either sign.
  EXPECT_EQ((tensor_view<const float, 4>(nullptr, {2, 2, 2, 2}, {t61, t61, t61, 1}).numel_checked()), -1);
  EXPECT_EQ((tensor_view<const float, 4>(nullptr, {2, 2, 2, 2}, {-t61, t61, -t61, 1}).numel_checked()), -1);
  EXPECT_EQ((tensor_view<const float, 1>(nullptr, {2}, {std::numeric_limits<std::int64_t>::max() / 2})
                 .numel_checked()),
            -1);
  // The largest accepted float reach: 2^61 - 2 elements past the first ((reach + 1)·4 <= 2^63 - 1).
  EXPECT_EQ((tensor_view<const float, 2>(nullptr, {2, 1}, {t61 - 2, 1}).numel_checked()), 2);
  EXPECT_EQ((tensor_view<const float, 2>(nullptr, {2, 1}, {t61 - 1, 1}).numel_checked()), -1);
  // Extreme strides without signed overflow inside the check (UBSan runs this): |INT64_MIN| has
  // no int64 value, reach + 1 past INT64_MAX; an extent-1 axis never steps, whatever its stride.
  constexpr std::int64_t i64_min = std::numeric_limits<std::int64_t>::min();
  constexpr std::int64_t i64_max = std::numeric_limits<std::int64_t>::max();
  EXPECT_EQ((tensor_view<const float, 2>(nullptr, {2, 1}, {i64_min, 1}).numel_checked()), -1);
  EXPECT_EQ((tensor_view<const bf16, 2>(nullptr, {2, 1}, {i64_max, 1}).numel_checked()), -1);
  EXPECT_EQ((tensor_view<const bf16, 2>(nullptr, {2, 1}, {-i64_max, 1}).numel_checked()), -1);
  EXPECT_EQ((tensor_view<const float, 2>(nullptr, {1, 3}, {i64_min, 1}).numel_checked()), 3);
  // An extent-1 output axis with stride INT64_MIN gives each element its own address.
  {
    dense_fx g;
    const auto q1 = headwise::bshd<const float>(g.qb.data(), 1, 3, 4, 8);
    const auto k1 = headwise::bshd<const float>(g.kb.data(), 1, 5, 2, 8);
    const auto v1 = headwise::bshd<const float>(g.vb.data(), 1, 5, 2, 8);
    auto out = headwise::bshd(g.ob.data(), 1, 3, 4, 8);
    out.stride[0] = i64_min;
    EXPECT_NO_THROW(headwise::attention(q1, k1, v1, out));
    EXPECT_TRUE(std::isfinite(g.ob[0]));
  }
  // An empty tensor has no offsets: accepted whatever its strides; a negative extent is rejected.
  EXPECT_EQ((tensor_view<const float, 2>(nullptr, {0, 5}, {kHuge, kHuge}).numel_checked()), 0);
  EXPECT_EQ((tensor_view<const float, 2>(nullptr, {-1, 5}, {5, 1}).numel_checked()), -1);
  // Through an entry point: a q of 2^16 x 2^16 x 2^16 x 2^16 elements (null data) names q.shape.
  dense_fx f;
  const std::int64_t t16 = std::int64_t{1} << 16;
  const tensor_view<const float, 4> q(nullptr, {t16, t16, t16, t16}, {t16 * t16 * t16, t16 * t16, t16, 1});
  expect_rejected(
      f, [&] { headwise::attention(q, f.k, f.v, f.out); }, "headwise::attention", "q.shape", false);
}

// =============================================================================================
// model/: rope.hpp, mla.hpp, transmla.hpp, diff.hpp
// =============================================================================================

TEST(audit, audit_model_rope_and_yarn) {
  const auto f8 = hm::rope_frequencies(8, 10000.0, hm::yarn_config{}, 1);
  std::vector<float> x(16, 1.0f);
  const std::string ar = "headwise::model::apply_rope", arb = "headwise::model::apply_rope_blocks";
  const auto il = rope_pairing::interleaved;
  EXPECT_TRUE(Rejects([&] { hm::apply_rope(x.data(), -2, 0, f8, il); }, ar, "dim"));
  EXPECT_TRUE(Rejects([&] { hm::apply_rope(nullptr, 8, 0, f8, il); }, ar, "x"));
  EXPECT_TRUE(Rejects([&] { hm::apply_rope_blocks(x.data(), 2, 7, 0, f8, il); }, arb, "dim"));
  EXPECT_TRUE(
      Rejects([&] { hm::apply_rope_blocks(x.data(), 2, 8, 0, std::span<const double>(f8.data(), 3), il); },
              arb, "freqs.size()"));
  EXPECT_TRUE(Rejects([&] { hm::apply_rope_blocks(x.data(), 2, 8, 0, f8, static_cast<rope_pairing>(5)); },
                      arb, "pairing"));
  EXPECT_TRUE(Rejects([&] { hm::apply_rope_blocks(x.data(), -1, 8, 0, f8, il); }, arb, "blocks"));
  EXPECT_TRUE(Rejects([&] { hm::apply_rope_blocks(nullptr, 2, 8, 0, f8, il); }, arb, "x"));
  EXPECT_EQ(x, std::vector<float>(16, 1.0f));

  const std::string rf = "headwise::model::rope_frequencies", ms = "headwise::model::mla_softmax_scale";
  const hm::yarn_config y{};
  EXPECT_TRUE(Rejects([&] { (void)hm::rope_frequencies(-2, 10000.0, y, 1); }, rf, "rope_dim"));
  EXPECT_TRUE(Rejects([&] { (void)hm::rope_frequencies(8, 1.0, y, 1); }, rf, "theta"));
  EXPECT_TRUE(Rejects([&] { (void)hm::rope_frequencies(8, kNaN, y, 1); }, rf, "theta"));
  EXPECT_TRUE(Rejects([&] { (void)hm::rope_frequencies(8, 10000.0, y, 0); }, rf, "max_seq_len"));
  // check_yarn, every field (shared by rope_frequencies, mla_softmax_scale and mla_config).
  auto bad_yarn = [&](auto mutate, const std::string& field) {
    hm::yarn_config b{};
    mutate(b);
    EXPECT_TRUE(Rejects([&] { (void)hm::rope_frequencies(8, 10000.0, b, 1); }, rf, "yarn." + field));
    EXPECT_TRUE(Rejects([&] { (void)hm::mla_softmax_scale(16, 8, b, 1); }, ms, "yarn." + field));
  };
  bad_yarn([](hm::yarn_config& b) { b.factor = 0.5; }, "factor");
  bad_yarn([](hm::yarn_config& b) { b.factor = kInf; }, "factor");
  bad_yarn([](hm::yarn_config& b) { b.original_max_position = 0; }, "original_max_position");
  bad_yarn([](hm::yarn_config& b) { b.beta_fast = 0; }, "beta_fast");
  bad_yarn([](hm::yarn_config& b) { b.beta_fast = kNaN; }, "beta_fast");
  bad_yarn([](hm::yarn_config& b) { b.beta_slow = -1; }, "beta_slow");
  bad_yarn([](hm::yarn_config& b) { b.mscale = kInf; }, "mscale");
  EXPECT_TRUE(Rejects([&] { (void)hm::mla_softmax_scale(-1, 8, y, 1); }, ms, "qk_nope"));
  EXPECT_TRUE(Rejects([&] { (void)hm::mla_softmax_scale(16, -2, y, 1); }, ms, "qk_rope"));
  EXPECT_TRUE(Rejects([&] { (void)hm::mla_softmax_scale(0, 0, y, 1); }, ms, "qk_nope + qk_rope"));
  EXPECT_TRUE(Rejects([&] { (void)hm::mla_softmax_scale(16, 8, y, 0); }, ms, "max_seq_len"));
}

hm::gqa_config small_gqa() {
  hm::gqa_config g;
  g.heads_q = 4;
  g.heads_kv = 2;
  g.head_dim = 8;
  g.d_model = 16;
  return g;
}
hm::gqa_weights small_gqa_weights() {
  return {matrix::Zero(32, 16), matrix::Zero(16, 16), matrix::Zero(16, 16), matrix::Zero(16, 32)};
}

TEST(audit, audit_model_gqa_and_transmla) {
  const std::string gc = "headwise::model::gqa_config", gw = "headwise::model::gqa_weights";
  auto bad_config = [&](auto mutate, const std::string& arg) {
    hm::gqa_config g = small_gqa();
    mutate(g);
    EXPECT_TRUE(Rejects([&] { g.validate(); }, gc, arg));
    EXPECT_TRUE(Rejects([&] { (void)hm::gqa_to_mla(g, small_gqa_weights()); }, gc, arg));
    EXPECT_TRUE(
        Rejects([&] { (void)hm::gqa_forward(g, small_gqa_weights(), matrix::Zero(2, 16)); }, gc, arg));
  };
  bad_config([](hm::gqa_config& g) { g.heads_q = 0; }, "config.heads_q");
  bad_config([](hm::gqa_config& g) { g.heads_kv = 0; }, "config.heads_kv");
  bad_config(
      [](hm::gqa_config& g) {
        g.rope = false;
        g.head_dim = 0;
      },
      "config.head_dim");
  bad_config([](hm::gqa_config& g) { g.d_model = 0; }, "config.d_model");
  bad_config([](hm::gqa_config& g) { g.rope_theta = 1.0; }, "config.rope_theta");
  bad_config([](hm::gqa_config& g) { g.pairing = static_cast<rope_pairing>(9); }, "config.pairing");
  auto bad_weights = [&](auto mutate, const std::string& arg) {
    hm::gqa_weights w = small_gqa_weights();
    mutate(w);
    EXPECT_TRUE(Rejects([&] { w.check(small_gqa()); }, gw, arg));
    EXPECT_TRUE(Rejects([&] { (void)hm::gqa_to_mla(small_gqa(), w); }, gw, arg));
  };
  bad_weights([](hm::gqa_weights& w) { w.w_q = matrix::Zero(31, 16); }, "weights.w_q");
  bad_weights([](hm::gqa_weights& w) { w.w_o = matrix::Zero(16, 31); }, "weights.w_o");
  EXPECT_TRUE(
      Rejects([&] { (void)hm::gqa_forward(small_gqa(), small_gqa_weights(), matrix::Zero(2, 16), -1); },
              "headwise::model::gqa_forward", "num_threads"));

  // compress_latent: weights.check of the MLA parameters, then its own checks.
  const hm::mla_parameters p = hm::gqa_to_mla(small_gqa(), small_gqa_weights());
  const std::string cl = "headwise::model::compress_latent";
  hm::mla_weights bad_w = p.weights;
  bad_w.w_o = matrix::Zero(3, 3);
  EXPECT_TRUE(Rejects([&] { (void)hm::compress_latent(p.config, bad_w, 4, matrix::Ones(4, 16)); },
                      "headwise::model::mla_weights", "weights.w_o"));
  EXPECT_TRUE(
      Rejects([&] { (void)hm::compress_latent(p.config, p.weights, -1, matrix::Ones(4, 16)); }, cl, "rank"));
  // A NaN calibration gives a covariance with no eigenbasis: the eigensolve fails.
  matrix nan_calib = matrix::Ones(4, 16);
  nan_calib(1, 3) = kNaN;
  EXPECT_TRUE(
      Rejects([&] { (void)hm::compress_latent(p.config, p.weights, 4, nan_calib); }, cl, "calibration"));
}

hm::mla_config small_mla(std::int64_t q_lora) {
  hm::mla_config m;
  m.heads = 2;
  m.d_model = 16;
  m.q_lora_rank = q_lora;
  m.kv_lora_rank = 8;
  m.qk_nope = 4;
  m.qk_rope = 4;
  m.v_head = 4;
  return m;
}
hm::mla_weights small_mla_weights(const hm::mla_config& m) {
  hm::mla_weights w;
  const std::int64_t dq = m.qk_nope + m.qk_rope;
  if (m.q_lora_rank == 0) {
    w.w_q = matrix::Constant(m.heads * dq, m.d_model, 0.01f);
  } else {
    w.w_q_a = matrix::Constant(m.q_lora_rank, m.d_model, 0.01f);
    if (m.q_norm) w.q_norm = hm::weight_vector::Ones(m.q_lora_rank);
    w.w_q_b = matrix::Constant(m.heads * dq, m.q_lora_rank, 0.01f);
  }
  w.w_kv_a = matrix::Constant(m.kv_lora_rank + m.qk_rope, m.d_model, 0.01f);
  if (m.kv_norm) w.kv_norm = hm::weight_vector::Ones(m.kv_lora_rank);
  w.w_kv_b = matrix::Constant(m.heads * (m.qk_nope + m.v_head), m.kv_lora_rank, 0.01f);
  w.w_o = matrix::Constant(m.d_model, m.heads * m.v_head, 0.01f);
  return w;
}

TEST(audit, audit_model_mla) {
  const std::string mc = "headwise::model::mla_config", mw = "headwise::model::mla_weights";
  {
    hm::mla_config m = small_mla(0);
    m.qk_rope = 0;
    m.rope_block = 2;  // a rope block without rope dims
    EXPECT_TRUE(Rejects([&] { m.validate(); }, mc, "config.rope_block"));
    m = small_mla(0);
    m.yarn.original_max_position = 0;  // check_yarn under the name config.yarn
    EXPECT_TRUE(Rejects([&] { m.validate(); }, mc, "config.yarn.original_max_position"));
  }
  auto bad_weights = [&](const hm::mla_config& m, auto mutate, const std::string& arg) {
    hm::mla_weights w = small_mla_weights(m);
    mutate(w);
    EXPECT_TRUE(Rejects([&] { w.check(m); }, mw, arg));
    EXPECT_TRUE(Rejects([&] { (void)hm::mla_layer(m, w); }, mw, arg));
  };
  const hm::mla_config plain = small_mla(0);
  bad_weights(
      plain, [](hm::mla_weights& w) { w.q_norm = hm::weight_vector::Ones(3); }, "weights.q_norm");
  bad_weights(
      plain, [](hm::mla_weights& w) { w.w_q_b = matrix::Zero(2, 2); }, "weights.w_q_b");
  const hm::mla_config lora = small_mla(6);
  bad_weights(
      lora, [](hm::mla_weights& w) { w.w_q_a = matrix::Zero(6, 15); }, "weights.w_q_a");
  bad_weights(
      lora, [](hm::mla_weights& w) { w.q_norm = hm::weight_vector::Ones(5); }, "weights.q_norm");
  bad_weights(
      lora, [](hm::mla_weights& w) { w.w_q_b = matrix::Zero(16, 5); }, "weights.w_q_b");
  hm::mla_config lora_no_norm = lora;
  lora_no_norm.q_norm = false;
  {
    hm::mla_weights w = small_mla_weights(lora);  // has a q_norm the config says is unused
    EXPECT_TRUE(Rejects([&] { w.check(lora_no_norm); }, mw, "weights.q_norm"));
  }

  // The step functions (check_tokens and the width checks).
  const hm::mla_weights w = small_mla_weights(plain);
  const std::vector<std::int64_t> pos{0, -1}, pos1{0};
  const matrix x = matrix::Ones(2, 16);
  EXPECT_TRUE(Rejects([&] { (void)hm::project_latent(plain, w, x, pos); }, "headwise::model::project_latent",
                      "positions[1]"));
  EXPECT_TRUE(Rejects([&] { (void)hm::project_queries(plain, w, matrix::Ones(2, 15), pos1); },
                      "headwise::model::project_queries", "x.cols()"));
  EXPECT_TRUE(Rejects([&] { (void)hm::project_queries(plain, w, x, pos1); },
                      "headwise::model::project_queries", "positions.size()"));
  EXPECT_TRUE(Rejects([&] { (void)hm::expand_latent(plain, w, matrix::Ones(2, 11)); },
                      "headwise::model::expand_latent", "latent.cols()"));
  EXPECT_TRUE(Rejects([&] { (void)hm::unabsorb_output(plain, w, matrix::Ones(2, 15)); },
                      "headwise::model::unabsorb_output", "o_latent.cols()"));
  EXPECT_TRUE(Rejects([&] { (void)hm::output_projection(plain, w, matrix::Ones(2, 7)); },
                      "headwise::model::output_projection", "o.cols()"));

  // latent_cache and mla_layer::forward.
  const std::string lc = "headwise::model::latent_cache";
  EXPECT_TRUE(Rejects([] { (void)hm::latent_cache<float>(0); }, lc, "width"));
  EXPECT_TRUE(Rejects([] { (void)hm::latent_cache<float>(12, -1); }, lc, "reserve_tokens"));
  hm::latent_cache<bf16> cache(plain.latent_dim());
  const hm::mla_layer layer(plain, w);
  (void)layer.forward(x, cache);
  const auto before = cache.data();
  EXPECT_TRUE(Rejects([&] { cache.truncate(-1); }, "headwise::model::latent_cache::truncate", "tokens"));
  const std::string fw = "headwise::model::mla_layer::forward";
  EXPECT_TRUE(Rejects([&] { (void)layer.forward(x, cache, static_cast<hm::mla_form>(7)); }, fw, "form"));
  EXPECT_TRUE(Rejects([&] { (void)layer.forward(x, cache, hm::mla_form::naive, -1); }, fw, "num_threads"));
  EXPECT_EQ(cache.length(), 2);
  EXPECT_TRUE(std::memcmp(before.data(), cache.data().data(), before.size() * sizeof(bf16)) == 0);
}

hm::gda_config small_gda() {
  hm::gda_config c;
  c.d_model = 16;
  c.heads_signal = 2;
  c.heads_noise = 1;
  c.kv_pairs = 1;
  c.head_dim = 4;
  return c;
}
hm::gda_weights small_gda_weights(const hm::gda_config& c) {
  hm::gda_weights w;
  const std::int64_t d = c.head_dim;
  w.w_q = matrix::Constant(c.query_heads() * d, c.d_model, 0.01f);
  w.w_k = matrix::Constant(2 * c.kv_pairs * d, c.d_model, 0.01f);
  w.w_v = matrix::Constant(c.kv_pairs * 2 * d, c.d_model, 0.01f);
  w.w_o = matrix::Constant(c.d_model, c.heads_signal * 2 * d, 0.01f);
  w.lambda_q1 = w.lambda_k1 = w.lambda_q2 = w.lambda_k2 = hm::weight_vector::Zero(d);
  w.norm_weight = hm::weight_vector::Ones(2 * d);
  return w;
}

TEST(audit, audit_model_gda) {
  const hm::gda_config cfg = small_gda();
  const hm::gda_weights w = small_gda_weights(cfg);
  const matrix x = matrix::Ones(3, 16);
  // check_gda_call through the functions not covered elsewhere.
  EXPECT_TRUE(Rejects([&] { (void)hm::gda_forward_unfused(cfg, w, matrix::Ones(3, 15)); },
                      "headwise::model::gda_forward_unfused", "x.cols()"));
  EXPECT_TRUE(Rejects([&] { (void)hm::gda_forward_unfused(cfg, w, x, -1); },
                      "headwise::model::gda_forward_unfused", "start_pos"));
  EXPECT_TRUE(Rejects([&] { (void)hm::gda_forward_unfused(cfg, w, x, 0, -1); },
                      "headwise::model::gda_forward_unfused", "num_threads"));
  EXPECT_TRUE(Rejects([&] { (void)hm::gda_project(cfg, w, matrix::Ones(3, 17)); },
                      "headwise::model::gda_project", "x.cols()"));
  // The upper bounds: reserve_tokens·(2·head_dim·kv_pairs) <= 2^40, factor·heads_signal <= 2^20.
  const std::int64_t per_token = 2 * cfg.head_dim * cfg.kv_pairs;
  EXPECT_TRUE(Rejects([&] { (void)hm::gda_cache<float>(cfg, (std::int64_t{1} << 40) / per_token + 1); },
                      "headwise::model::gda_cache", "reserve_tokens"));
  EXPECT_TRUE(
      Rejects([&] { (void)hm::grow_signal_heads(cfg, w, (std::int64_t{1} << 20) / cfg.heads_signal + 1); },
              "headwise::model::grow_signal_heads", "factor"));
  // gda_config's extent bounds (every weight stays far from 64-bit overflow).
  {
    hm::gda_config big = cfg;
    big.heads_signal = std::int64_t{1} << 21;
    EXPECT_TRUE(Rejects([&] { big.validate(); }, "headwise::model::gda_config", "config.heads_signal"));
    big = cfg;
    big.head_dim = (std::int64_t{1} << 20) / big.query_heads() + 1;
    EXPECT_TRUE(Rejects([&] { big.validate(); }, "headwise::model::gda_config", "config.head_dim"));
  }
  // gda_weights: the check that the λ vectors are finite, for each of the four.
  for (const char* name : {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"}) {
    hm::gda_weights b = w;
    hm::weight_vector& vec = std::string(name) == "lambda_q1"   ? b.lambda_q1
                             : std::string(name) == "lambda_k1" ? b.lambda_k1
                             : std::string(name) == "lambda_q2" ? b.lambda_q2
                                                                : b.lambda_k2;
    vec(2) = kNaN;
    EXPECT_TRUE(Rejects([&] { b.check(cfg); }, "headwise::model::gda_weights",
                        std::string("weights.") + name + "[2]"));
  }
  // gda_cache::append leaves the cache as it was when it rejects.
  hm::gda_cache<float> cache(cfg);
  (void)hm::gda_forward(cfg, w, x, cache);
  EXPECT_TRUE(Rejects([&] { cache.truncate(-1); }, "headwise::model::gda_cache::truncate", "tokens"));
  EXPECT_EQ(cache.length(), 3);
}

// =============================================================================================
// 64-bit indexing: KV caches whose element offsets exceed 2^32
// =============================================================================================
//
// Each tensor below spans more than 2^32 elements (tens of GiB of address space), reserved with
// PROT_NONE: no memory is committed, and only small read-write windows exist, holding the rows
// the call reads or writes (a few KiB). An offset computed in 32 bits would land in the
// reserved range and fault; one in 64 bits lands in a window. The results match the fp64
// reference, so the offsets are the right ones.

#if HEADWISE_AUDIT_SPARSE
/// Reserved, uncommitted address space with read-write windows (zero-filled).
class sparse_arena {
 public:
  explicit sparse_arena(std::size_t bytes) : size_(bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p != MAP_FAILED) base_ = static_cast<unsigned char*>(p);
  }
  ~sparse_arena() {
    if (base_ != nullptr) ::munmap(base_, size_);
  }
  sparse_arena(const sparse_arena&) = delete;
  sparse_arena& operator=(const sparse_arena&) = delete;
  [[nodiscard]] bool ok() const noexcept { return base_ != nullptr; }
  /// Makes elements [first, first + count) of T readable and writable.
  template <class T>
  [[nodiscard]] bool open(std::int64_t first, std::int64_t count) {
    const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    const std::size_t lo = static_cast<std::size_t>(first) * sizeof(T) / page * page;
    const std::size_t hi = (static_cast<std::size_t>(first + count) * sizeof(T) + page - 1) / page * page;
    return ::mprotect(base_ + lo, hi - lo, PROT_READ | PROT_WRITE) == 0;
  }
  template <class T>
  [[nodiscard]] T* data() const noexcept {
    return reinterpret_cast<T*>(base_);
  }

 private:
  unsigned char* base_ = nullptr;
  std::size_t size_;
};

/// Element offset of the far rows: above 2^32 (and not a multiple of it).
constexpr std::int64_t kFar = 3 * (std::int64_t{1} << 31) + 1024;
static_assert(kFar > (std::int64_t{1} << 32));

template <class T>
std::size_t arena_bytes(std::int64_t elements) {
  return static_cast<std::size_t>(elements) * sizeof(T);
}

/// Fills t with N(0, 1) values stored as T.
template <class T, std::size_t R>
void fill_view(tensor_view<T, R> t, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::array<std::int64_t, R> idx{};
  for (;;) {
    T* p = t.data;
    for (std::size_t i = 0; i < R; ++i) p += idx[i] * t.stride[i];
    *p = headwise::from_float<T>(nd(gen));
    std::size_t ax = R;
    while (ax-- > 0) {
      if (++idx[ax] < t.shape[ax]) break;
      idx[ax] = 0;
    }
    if (ax == static_cast<std::size_t>(-1)) return;
  }
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (const float x : v) m = std::max(m, std::abs(static_cast<double>(x)));
  return m;
}

/// paged_kv_append writes a sequence into pages 1 (at element offset kFar) and 0 through the
/// block table; attention_paged reads it back (decode and a 5-token chunk).
template <class T>
void check_far_pages() {
  constexpr std::int64_t H = 2, HQ = 4, D = 16, PS = 16, L = 20, page = PS * H * D;
  // K and V in separate reservations: outputs may not overlap, and overlap is judged on extents.
  sparse_arena ka(arena_bytes<T>(kFar + page)), va(arena_bytes<T>(kFar + page));
  if (!ka.ok() || !va.ok()) GTEST_SKIP() << "cannot reserve address space";
  for (auto* a : {&ka, &va}) {
    ASSERT_TRUE(a->template open<T>(0, page));
    ASSERT_TRUE(a->template open<T>(kFar, page));
  }
  const tensor_view<T, 4> k_pages(ka.data<T>(), {2, PS, H, D}, {kFar, H * D, D, 1});
  const tensor_view<T, 4> v_pages(va.data<T>(), {2, PS, H, D}, {kFar, H * D, D, 1});
  const std::vector<std::int32_t> table{1, 0}, empty{0}, full{static_cast<std::int32_t>(L)};
  // Values representable in T, so that the f32 reference sees exactly the stored cache.
  std::vector<float> kn(static_cast<std::size_t>(L * H * D)), vn(kn.size());
  {
    const auto ks = hwt::random_stored<T>(kn.size(), 91), vs = hwt::random_stored<T>(vn.size(), 92);
    for (std::size_t i = 0; i < kn.size(); ++i) {
      kn[i] = headwise::to_float(ks[i]);
      vn[i] = headwise::to_float(vs[i]);
    }
  }
  const tensor_view<const std::int32_t, 2> tv(table.data(), {1, 2});
  headwise::paged_kv_append(k_pages, v_pages, tv, tensor_view<const std::int32_t, 1>(empty.data(), {1}),
                            headwise::bshd<const float>(kn.data(), 1, L, H, D),
                            headwise::bshd<const float>(vn.data(), 1, L, H, D));
  // Token 0 is the first element of page 1, kFar elements into the reservation; token 16 the
  // first of page 0.
  EXPECT_EQ(headwise::to_float(ka.data<T>()[kFar]), kn[0]);
  EXPECT_EQ(headwise::to_float(va.data<T>()[kFar + page - 1]), vn[static_cast<std::size_t>(PS * H * D - 1)]);
  EXPECT_EQ(headwise::to_float(ka.data<T>()[0]), kn[static_cast<std::size_t>(PS * H * D)]);

  const paged_kv<T> kv{k_pages, v_pages, tv, tensor_view<const std::int32_t, 1>(full.data(), {1})};
  attention_options o;
  o.causal = causal_mode::bottom_right;
  for (const std::int64_t sq : {std::int64_t{1}, std::int64_t{5}}) {
    SCOPED_TRACE(std::string("seq_q ") + std::to_string(sq));
    const auto q = hwt::random_normal(static_cast<std::size_t>(sq * HQ * D), 93);
    std::vector<float> out(q.size(), hwt::kOutSentinel), ref(q.size()),
        lse(static_cast<std::size_t>(HQ * sq)), ref_lse(lse.size());
    const auto qv = headwise::bshd<const float>(q.data(), 1, sq, HQ, D);
    headwise::attention_paged(qv, kv, headwise::bshd(out.data(), 1, sq, HQ, D), o,
                              headwise::bhs(lse.data(), 1, HQ, sq));
    headwise::reference::attention(qv, headwise::bshd<const float>(kn.data(), 1, L, H, D),
                                   headwise::bshd<const float>(vn.data(), 1, L, H, D),
                                   headwise::bshd(ref.data(), 1, sq, HQ, D), o,
                                   headwise::bhs(ref_lse.data(), 1, HQ, sq));
    EXPECT_TRUE(hwt::AllClose(out, ref, 0.0, hwt::kOutTol * max_abs(vn)));
    EXPECT_TRUE(hwt::AllClose(lse, ref_lse, hwt::kLseRelTol, hwt::kLseRelTol));
  }
}

TEST(audit, audit_paged_cache_offsets_beyond_2_32_elements_f32) { check_far_pages<float>(); }
TEST(audit, audit_paged_cache_offsets_beyond_2_32_elements_bf16) { check_far_pages<bf16>(); }

TEST(audit, audit_dense_and_appended_cache_offsets_beyond_2_32_elements) {
  // kv_cache_append into a bf16 cache whose batch 1 starts kFar elements in; attention (decode
  // and prefill tiles) over it, against the reference on the same views; out written with the
  // same batch stride.
  constexpr std::int64_t B = 2, CAP = 8, H = 2, HQ = 4, D = 16, N = 5, rows = CAP * H * D;
  sparse_arena ka(arena_bytes<bf16>(kFar + rows)), va(arena_bytes<bf16>(kFar + rows));
  if (!ka.ok() || !va.ok()) GTEST_SKIP() << "cannot reserve address space";
  for (auto* a : {&ka, &va}) {
    ASSERT_TRUE(a->open<bf16>(0, rows));
    ASSERT_TRUE(a->open<bf16>(kFar, rows));
  }
  const tensor_view<bf16, 4> k_cache(ka.data<bf16>(), {B, CAP, H, D}, {kFar, H * D, D, 1});
  const tensor_view<bf16, 4> v_cache(va.data<bf16>(), {B, CAP, H, D}, {kFar, H * D, D, 1});
  fill_view(tensor_view<bf16, 4>(k_cache.data, {B, 3, H, D}, k_cache.stride), 101);
  fill_view(tensor_view<bf16, 4>(v_cache.data, {B, 3, H, D}, v_cache.stride), 102);
  const auto kn = hwt::random_normal(static_cast<std::size_t>(B * N * H * D), 103),
             vn = hwt::random_normal(kn.size(), 104);
  const std::vector<std::int32_t> pos{3, 3};
  headwise::kv_cache_append(k_cache, v_cache, tensor_view<const std::int32_t, 1>(pos.data(), {B}),
                            headwise::bshd<const float>(kn.data(), B, N, H, D),
                            headwise::bshd<const float>(vn.data(), B, N, H, D));
  for (std::int64_t t = 0; t < N; ++t)
    for (std::int64_t d = 0; d < D; ++d) {
      const auto i = static_cast<std::size_t>(((N + t) * H + 1) * D + d);  // batch 1, token t, head 1
      ASSERT_EQ(k_cache(1, 3 + t, 1, d).bits, headwise::to_bf16(kn[i]).bits);
      ASSERT_EQ(v_cache(1, 3 + t, 1, d).bits, headwise::to_bf16(vn[i]).bits);
    }
  std::vector<float> v_stored;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t j = 0; j < CAP; ++j)
      for (std::int64_t d = 0; d < D; ++d) v_stored.push_back(headwise::to_float(v_cache(b, j, 0, d)));

  for (const std::int64_t sq : {std::int64_t{1}, std::int64_t{8}}) {
    SCOPED_TRACE(std::string("seq_q ") + std::to_string(sq));
    const std::int64_t per_batch = sq * HQ * D;
    sparse_arena oa(arena_bytes<float>(kFar + per_batch));
    ASSERT_TRUE(oa.ok());
    ASSERT_TRUE(oa.open<float>(0, per_batch));
    ASSERT_TRUE(oa.open<float>(kFar, per_batch));
    const tensor_view<float, 4> out(oa.data<float>(), {B, sq, HQ, D}, {kFar, HQ * D, D, 1});
    const auto q = hwt::random_normal(static_cast<std::size_t>(B * per_batch), 105);
    std::vector<float> ref(q.size()), lse(static_cast<std::size_t>(B * HQ * sq)), ref_lse(lse.size());
    attention_options o;
    o.causal = causal_mode::bottom_right;
    const auto qv = headwise::bshd<const float>(q.data(), B, sq, HQ, D);
    headwise::attention(qv, k_cache, v_cache, out, o, headwise::bhs(lse.data(), B, HQ, sq));
    headwise::reference::attention(qv, k_cache, v_cache, headwise::bshd(ref.data(), B, sq, HQ, D), o,
                                   headwise::bhs(ref_lse.data(), B, HQ, sq));
    std::vector<float> got;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t i = 0; i < sq; ++i)
        for (std::int64_t h = 0; h < HQ; ++h)
          for (std::int64_t d = 0; d < D; ++d) got.push_back(out(b, i, h, d));
    EXPECT_TRUE(hwt::AllClose(got, ref, 0.0, hwt::kOutTol * max_abs(v_stored) * 2));
    EXPECT_TRUE(hwt::AllClose(lse, ref_lse, hwt::kLseRelTol, hwt::kLseRelTol));
  }
}

TEST(audit, audit_varlen_and_mla_paged_offsets_beyond_2_32_elements) {
  // attention_varlen over K/V rows kFar elements apart (rows at 0, kFar, 2·kFar).
  {
    constexpr std::int64_t TK = 3, TQ = 2, HK = 2, HQ = 4, D = 8;
    sparse_arena ka(arena_bytes<float>(2 * kFar + HK * D)), va(arena_bytes<float>(2 * kFar + HK * D));
    if (!ka.ok() || !va.ok()) GTEST_SKIP() << "cannot reserve address space";
    for (auto* a : {&ka, &va})
      for (std::int64_t r = 0; r < TK; ++r) ASSERT_TRUE(a->open<float>(r * kFar, HK * D));
    const tensor_view<float, 3> k(ka.data<float>(), {TK, HK, D}, {kFar, D, 1}),
        v(va.data<float>(), {TK, HK, D}, {kFar, D, 1});
    fill_view(k, 111);
    fill_view(v, 112);
    const auto q = hwt::random_normal(static_cast<std::size_t>(TQ * HQ * D), 113);
    const std::vector<std::int32_t> cu_q{0, TQ}, cu_k{0, TK};
    std::vector<float> out(q.size()), ref(q.size()), lse(static_cast<std::size_t>(HQ * TQ)),
        ref_lse(lse.size());
    attention_options o;
    o.causal = causal_mode::bottom_right;
    headwise::attention_varlen(tensor_view<const float, 3>(q.data(), {TQ, HQ, D}), k, v,
                               tensor_view<const std::int32_t, 1>(cu_q.data(), {2}),
                               tensor_view<const std::int32_t, 1>(cu_k.data(), {2}),
                               tensor_view<float, 3>(out.data(), {TQ, HQ, D}), o,
                               tensor_view<float, 2>(lse.data(), {HQ, TQ}));
    const tensor_view<const float, 4> k4(k.data, {1, TK, HK, D}, {0, kFar, D, 1}),
        v4(v.data, {1, TK, HK, D}, {0, kFar, D, 1});
    headwise::reference::attention(headwise::bshd<const float>(q.data(), 1, TQ, HQ, D), k4, v4,
                                   headwise::bshd(ref.data(), 1, TQ, HQ, D), o,
                                   headwise::bhs(ref_lse.data(), 1, HQ, TQ));
    EXPECT_TRUE(hwt::AllClose(out, ref, 0.0, 1e-4));
    EXPECT_TRUE(hwt::AllClose(lse, ref_lse, hwt::kLseRelTol, hwt::kLseRelTol));
  }
  // mla_absorbed_paged over latent pages kFar elements apart (table {1, 0}).
  {
    constexpr std::int64_t PS = 16, W = 24, DC = 16, H = 8, L = 20, SQ = 2, page = PS * W;
    sparse_arena la(arena_bytes<bf16>(kFar + page));
    if (!la.ok()) GTEST_SKIP() << "cannot reserve address space";
    ASSERT_TRUE(la.open<bf16>(0, page));
    ASSERT_TRUE(la.open<bf16>(kFar, page));
    const tensor_view<bf16, 3> pages(la.data<bf16>(), {2, PS, W}, {kFar, W, 1});
    fill_view(pages, 121);
    // The sequence's rows in order (page 1 first), as the reference's dense latent.
    std::vector<float> dense;
    for (std::int64_t j = 0; j < L; ++j)
      for (std::int64_t c = 0; c < W; ++c)
        dense.push_back(headwise::to_float(pages(j < PS ? 1 : 0, j % PS, c)));
    const std::vector<std::int32_t> table{1, 0}, lens{L};
    const auto q = hwt::random_normal(static_cast<std::size_t>(SQ * H * W), 122);
    std::vector<float> out(static_cast<std::size_t>(SQ * H * DC)), ref(out.size());
    attention_options o;
    o.scale = 0.2f;
    o.causal = causal_mode::bottom_right;
    const auto qv = headwise::bshd<const float>(q.data(), 1, SQ, H, W);
    headwise::mla_absorbed_paged(qv, pages, tensor_view<const std::int32_t, 2>(table.data(), {1, 2}),
                                 tensor_view<const std::int32_t, 1>(lens.data(), {1}),
                                 headwise::bshd(out.data(), 1, SQ, H, DC), o);
    const tensor_view<const float, 4> k(dense.data(), {1, L, 1, W}, {L * W, W, W, 1}),
        v(dense.data(), {1, L, 1, DC}, {L * W, W, W, 1});
    headwise::reference::attention(qv, k, v, headwise::bshd(ref.data(), 1, SQ, H, DC), o);
    EXPECT_TRUE(hwt::AllClose(out, ref, 0.0, 1e-4));
  }
}
#endif  // HEADWISE_AUDIT_SPARSE

// =============================================================================================
// Defects the audit found (docs/errors.md, "Defects found"), fixed: each of these inputs crashed,
// wrote before throwing or was accepted; now each is rejected before any write.
// =============================================================================================

TEST(audit, audit_fixed_kv_cache_append_checks_outputs_up_front) {
  // v_cache overlaps itself: rejected only inside the copy loop, by headwise::convert ('dst.stride'),
  // after k_cache batch 0 was written.
  append_fx f;
  f.v_cache.stride[1] = 0;
  const snapshot_t before = f.snapshot();
  EXPECT_TRUE(RejectsAny([&] { headwise::kv_cache_append(f.k_cache, f.v_cache, f.pos, f.k_new, f.v_new); },
                         "headwise::kv_cache_append"));
  EXPECT_TRUE(before == f.snapshot());
}

TEST(audit, audit_fixed_kv_cache_append_rejects_inputs_inside_the_cache) {
  // Cache (2, 8, 2, 4) f32, positions {3, 0}, 3 tokens: batch 0 writes elements [24, 48), batch 1
  // [64, 88). k_new's batch 0 is read from [100, 124), its batch 1 from [24, 48): each per-batch
  // copy is disjoint from its source, so nothing is rejected, and batch 1 copies what batch 0 has
  // just written. (cache_seqlens inside the cache is worse: the positions are re-read after the
  // writes, so the room check is bypassed and the copy lands out of bounds.)
  std::vector<float> kc(128, 0.0f), vc(128, 0.0f), vn(48, 1.0f);
  for (std::size_t i = 0; i < kc.size(); ++i) kc[i] = static_cast<float>(i);
  const std::vector<std::int32_t> pos{3, 0};
  const tensor_view<const float, 4> kn(kc.data() + 100, {2, 3, 2, 4}, {-76, 8, 4, 1});
  EXPECT_TRUE(RejectsAny(
      [&] {
        headwise::kv_cache_append(headwise::bshd(kc.data(), 2, 8, 2, 4),
                                  headwise::bshd(vc.data(), 2, 8, 2, 4),
                                  tensor_view<const std::int32_t, 1>(pos.data(), {2}), kn,
                                  headwise::bshd<const float>(vn.data(), 2, 3, 2, 4));
      },
      "headwise::kv_cache_append"));
}

TEST(audit, audit_fixed_paged_kv_append_token_count_overflow) {
  // k_new/v_new of n = 2^63 - 3 tokens (legal: a stride-0 view of one value): seqlens[b] + n
  // overflows, the room check passes and the copy writes through table entry -1, before the
  // pages (heap corruption).
  std::vector<float> kp(24), vp(24), one(1, 1.0f);
  const std::vector<std::int32_t> table{0, 1, -1}, lens{5};
  const tensor_view<const float, 4> kn(one.data(), {1, std::numeric_limits<std::int64_t>::max() - 2, 1, 1},
                                       {0, 0, 0, 1});
  EXPECT_TRUE(RejectsAny(
      [&] {
        headwise::paged_kv_append(tensor_view<float, 4>(kp.data(), {6, 4, 1, 1}),
                                  tensor_view<float, 4>(vp.data(), {6, 4, 1, 1}),
                                  tensor_view<const std::int32_t, 2>(table.data(), {1, 3}),
                                  tensor_view<const std::int32_t, 1>(lens.data(), {1}), kn, kn);
      },
      "headwise::paged_kv_append"));
}

TEST(audit, audit_fixed_reference_diff_attention_zero_pairs) {
  // v with 0 heads: hn % pairs divides by zero (SIGFPE) instead of an argument_error.
  diff_fx f;
  f.v.shape[2] = 0;
  EXPECT_TRUE(RejectsAny([&] { headwise::reference::diff_attention(f.q, f.k, f.v, f.out, f.o); },
                         "headwise::reference::diff_attention"));
}

TEST(audit, audit_fixed_gda_config_sizes_overflow) {
  // heads_signal = heads_noise = kv_pairs = 2^62: query_heads()·head_dim and friends overflow
  // (wrapping to 0), so 0-row weights pass gda_weights::check; gda_forward then divides by zero
  // inside Eigen (SIGFPE).
  hm::gda_config c = small_gda();
  c.heads_signal = c.heads_noise = c.kv_pairs = std::int64_t{1} << 62;
  c.head_dim = 2;
  hm::gda_weights w = small_gda_weights(small_gda());
  w.w_q.resize(0, 16);
  w.w_k.resize(0, 16);
  w.w_v.resize(0, 16);
  w.w_o.resize(16, 0);
  w.lambda_q1 = w.lambda_k1 = w.lambda_q2 = w.lambda_k2 = hm::weight_vector::Zero(2);
  w.norm_weight = hm::weight_vector::Ones(4);
  EXPECT_TRUE(
      RejectsAny([&] { (void)hm::gda_forward(c, w, matrix::Ones(2, 16)); }, "headwise::model::gda_config"));
}

TEST(audit, audit_fixed_latent_cache_reserve_overflow) {
  // width·reserve_tokens overflows: 2^20·2^50 wraps to 0 and is accepted; 2^31·2^31 throws
  // std::length_error from vector::reserve.
  EXPECT_TRUE(RejectsAny([] { (void)hm::latent_cache<float>(std::int64_t{1} << 20, std::int64_t{1} << 50); },
                         "headwise::model::latent_cache"));
  EXPECT_TRUE(RejectsAny([] { (void)hm::latent_cache<float>(std::int64_t{1} << 31, std::int64_t{1} << 31); },
                         "headwise::model::latent_cache"));
}

/// what() of the argument_error f() throws ("" when it throws nothing or something else).
template <class F>
std::string what_of(F&& f) {
  try {
    f();
  } catch (const argument_error& e) {
    return e.what();
  } catch (...) {
  }
  return "";
}

TEST(audit, audit_fixed_messages_name_this_functions_parameters) {
  // paged_kv_append: its own parameters, and k_new (there is no q) as the source of the dim.
  {
    paged_append_fx f;
    f.k_new.shape[3] = paged_append_fx::D - 1;
    const std::string w = what_of([&] {
      headwise::paged_kv_append(f.k_pages, f.v_pages, f.table, f.seqlens, f.k_new, f.v_new);
    });
    EXPECT_EQ(w.rfind("headwise::paged_kv_append: argument 'k_pages.shape[3] (dim_qk)': expected k_new.shape[3]", 0),
              0u)
        << w;
  }
  // mla_absorbed: out / lse overlapping the latent name 'latent' (not the engine's 'k').
  {
    mla_fx f;
    f.out.data = f.latb.data() + 3;
    const std::string w = what_of([&] { headwise::mla_absorbed(f.q, f.latent, f.out, f.o, f.lse); });
    EXPECT_NE(w.find("memory not overlapping 'latent'"), std::string::npos) << w;
  }
  {
    mla_fx f;
    f.out.data = reinterpret_cast<float*>(f.tb.data());
    const std::string w = what_of(
        [&] { headwise::mla_absorbed_paged(f.q, f.pages, f.table, f.seqlens, f.out, f.o, f.lse); });
    EXPECT_NE(w.find("memory not overlapping 'block_table'"), std::string::npos) << w;
  }
  // attention_blocked: its own name for the tensor checks too.
  {
    dense_fx f;
    f.out.shape[3] = dense_fx::D - 1;
    const std::string w = what_of([&] {
      headwise::attention_blocked(f.q, f.k, f.v, f.out, f.o, f.lse, headwise::engine::blocking{16, 16});
    });
    EXPECT_EQ(w.rfind("headwise::attention_blocked: argument 'out.shape[3] (dim_v)'", 0), 0u) << w;
  }
  // diff_attention: lse head counts say where the expected number comes from.
  {
    diff_fx f;
    f.lse_n.shape[1] = diff_fx::HN + 1;
    const std::string w =
        what_of([&] { headwise::diff_attention(f.q, f.k, f.v, f.out, f.o, f.lse_s, f.lse_n); });
    EXPECT_NE(w.find("expected q.shape[2] - out.shape[2] = 2, got 3"), std::string::npos) << w;
  }
  // attention_varlen: sink logits compared with the output heads (out.shape[1] there).
  {
    varlen_fx f;
    f.o.sink_logits = tensor_view<const float, 1>(f.sb.data(), {varlen_fx::HQ + 1});
    const std::string w = what_of(
        [&] { headwise::attention_varlen(f.q, f.k, f.v, f.cu_q, f.cu_k, f.out, f.o, f.lse); });
    EXPECT_NE(w.find("expected the output heads = 4, got 5"), std::string::npos) << w;
  }
}

TEST(audit, audit_fixed_paged_capacity_saturates) {
  // One zero-stride page of 2^59 rows and 16 table columns: max_pages_per_sequence·page_size =
  // 2^63 overflowed (to a negative capacity) and a valid call was rejected. Now it saturates and the call runs: every
  // key is the same row, so each output row is that row's value.
  std::vector<float> kp(8, 0.25f), vp(8), q(2 * 8, 0.5f), out(2 * 8, -7.0f);
  for (std::size_t i = 0; i < vp.size(); ++i) vp[i] = static_cast<float>(i);
  const std::int64_t huge = std::int64_t{1} << 59;
  const std::vector<std::int32_t> table(16, 0), lens{3};
  const headwise::paged_kv<float> kv{tensor_view<const float, 4>(kp.data(), {1, huge, 1, 8}, {0, 0, 8, 1}),
                                           tensor_view<const float, 4>(vp.data(), {1, huge, 1, 8}, {0, 0, 8, 1}),
                                           tensor_view<const std::int32_t, 2>(table.data(), {1, 16}),
                                           tensor_view<const std::int32_t, 1>(lens.data(), {1})};
  attention_options o;
  o.causal = causal_mode::bottom_right;
  ASSERT_NO_THROW(headwise::attention_paged(headwise::bshd<const float>(q.data(), 1, 1, 2, 8), kv,
                                            headwise::bshd(out.data(), 1, 1, 2, 8), o));
  for (std::size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], vp[i % 8], 1e-5) << i;
}

TEST(audit, audit_fixed_key_lane_splits_bounded) {
  // A sequence has at most 1024 decode splits, so the partial states of a zero-stride view of
  // 2^40 keys are bounded (they were 2^29 states); shorter caches get about 64 splits (a 64th
  // rounded up to a multiple of 256 keys, at least 256), never more than split_kv keys each.
  namespace eng = headwise::engine;
  eng::blocking blk{};
  blk.split_kv = 2048;
  EXPECT_EQ(eng::key_lane_split(blk, 5000), 256);     // never below 256 keys
  EXPECT_EQ(eng::key_lane_split(blk, 16384), 256);    // 64 splits
  EXPECT_EQ(eng::key_lane_split(blk, 20000), 512);    // 313 keys per 64th, rounded up to 256s
  EXPECT_EQ(eng::key_lane_split(blk, 32768), 512);    // 64 splits
  EXPECT_EQ(eng::key_lane_split(blk, 131072), 2048);  // 64 splits of split_kv
  EXPECT_EQ(eng::key_lane_split(blk, 262144), 2048);  // split_kv caps the split
  blk.split_kv = 100;
  EXPECT_EQ(eng::key_lane_split(blk, 5000), 100);  // an explicit short split_kv stays
  blk.split_kv = 2048;
  EXPECT_EQ(eng::key_lane_split(blk, 2048 * 1024), 2048);
  EXPECT_EQ(eng::key_lane_split(blk, 2048 * 1024 + 1), 2049);
  EXPECT_EQ(eng::key_lane_split(blk, std::int64_t{1} << 40), std::int64_t{1} << 30);
  EXPECT_EQ(eng::key_lane_split(blk, std::numeric_limits<std::int64_t>::max()),
            std::numeric_limits<std::int64_t>::max() / 1024 + 1);
  blk.split_kv = 0;
  EXPECT_EQ(eng::key_lane_split(blk, std::int64_t{1} << 40), 0);
  EXPECT_GE(eng::query_lane_split(blk, 1, 1, std::numeric_limits<std::int64_t>::max()), 0);
  // Query-lane items that hold all their rows (absorbed MLA: rows = heads, 576 + 512 dims):
  // work-sized splits, a multiple of block_kv, at least 512 keys (256 until 2026-12-07), at
  // most split_kv, and at most 64 splits per sequence.
  blk = eng::blocking{};
  EXPECT_EQ(eng::query_lane_split(blk, 16, 1088, 8192), 960);    // 963 keys of work, in 64s
  EXPECT_EQ(eng::query_lane_split(blk, 32, 1088, 8192), 512);    // 481 -> 448, raised to 512
  EXPECT_EQ(eng::query_lane_split(blk, 128, 1088, 8192), 512);   // 120 -> 64, raised to 512
  EXPECT_EQ(eng::query_lane_split(blk, 128, 1088, 1 << 20), 16384);  // 64 splits at most
  EXPECT_EQ(eng::query_lane_split(blk, 1, 8, 8192), 2048);       // few rows: split_kv
  blk.split_kv = 100;
  EXPECT_EQ(eng::query_lane_split(blk, 128, 1088, 8192), 128);   // split_kv 100, raised to 64 splits
  // Dense calls take at most 2^40 keys: zero-stride views could declare 2^62, where the tile
  // and split arithmetic would overflow.
  const std::int64_t too_many = (std::int64_t{1} << 40) + 1;
  {
    dense_fx f;
    f.k.shape[1] = f.v.shape[1] = too_many;
    f.k.stride[1] = f.v.stride[1] = 0;
    expect_rejected(
        f, [&] { headwise::attention(f.q, f.k, f.v, f.out, f.o, f.lse); }, "headwise::attention", "k.shape[1]",
        false);
  }
  {
    diff_fx f;
    f.k.shape[1] = f.v.shape[1] = too_many;
    f.k.stride[1] = f.v.stride[1] = 0;
    expect_rejected(
        f, [&] { headwise::diff_attention(f.q, f.k, f.v, f.out, f.o, f.lse_s, f.lse_n); }, "headwise::diff_attention",
        "k.shape[1]", false);
  }
  {
    mla_fx f;
    f.latent.shape[1] = too_many;
    f.latent.stride[1] = 0;
    expect_rejected(
        f, [&] { headwise::mla_absorbed(f.q, f.latent, f.out, f.o, f.lse); }, "headwise::mla_absorbed",
        "latent.shape[1]", false);
  }
}

TEST(audit, audit_fixed_model_config_extents_bounded) {
  // Extents near 2^62 made products wrap (empty weights accepted, then SIGFPE or length_error).
  constexpr std::int64_t big = std::int64_t{1} << 62;
  hm::mla_config m = small_mla(0);
  m.heads = big;
  EXPECT_TRUE(Rejects([&] { m.validate(); }, "headwise::model::mla_config", "config.heads"));
  m = small_mla(0);
  m.qk_nope = std::numeric_limits<std::int64_t>::max();
  EXPECT_TRUE(Rejects([&] { m.validate(); }, "headwise::model::mla_config", "config.qk_nope"));
  hm::gqa_config g = small_gqa();
  g.head_dim = big;
  EXPECT_TRUE(Rejects([&] { g.validate(); }, "headwise::model::gqa_config", "config.head_dim"));
  g = small_gqa();
  g.heads_q = g.heads_kv = big;
  EXPECT_TRUE(Rejects([&] { g.validate(); }, "headwise::model::gqa_config", "config.heads_q"));
  EXPECT_TRUE(Rejects([] { (void)hm::rope_frequencies(big, 10000.0, {}, 4096); }, "headwise::model::rope_frequencies",
                      "rope_dim"));
  EXPECT_TRUE(Rejects([] { (void)hm::mla_softmax_scale(std::numeric_limits<std::int64_t>::max(), 64, {}, 4096); },
                      "headwise::model::mla_softmax_scale", "qk_nope"));
}

TEST(audit, audit_fixed_reference_diff_views) {
  // The references check their views and optional tensors like the kernels (they indexed them
  // unchecked: null data, short lse or λ tensors, 0 KV heads for diff_transformer).
  const std::string rd = "headwise::reference::diff_attention", rt = "headwise::reference::diff_transformer";
  {
    diff_fx f;
    f.q.data = nullptr;
    EXPECT_TRUE(Rejects([&] { headwise::reference::diff_attention(f.q, f.k, f.v, f.out, f.o); }, rd, "q.data"));
  }
  {
    diff_fx f;
    f.lse_n.shape[1] = 1;
    EXPECT_TRUE(Rejects([&] { headwise::reference::diff_attention(f.q, f.k, f.v, f.out, f.o, f.lse_s, f.lse_n); },
                        rd, "lse_noise.shape[1]"));
  }
  {
    diff_fx f;
    f.use_tokens();
    f.o.lambda_tokens.shape[2] = 1;
    EXPECT_TRUE(Rejects([&] { headwise::reference::diff_attention(f.q, f.k, f.v, f.out, f.o); }, rd,
                        "options.lambda_tokens.shape[2]"));
  }
  {
    diff_fx f;
    f.v.shape[2] = 0;
    f.k.shape[2] = 0;
    f.out.shape[2] = 2;
    f.q.shape[2] = 4;
    EXPECT_TRUE(RejectsAny([&] { headwise::reference::diff_transformer(f.q, f.k, f.v, f.out, 0.5, 0.2, {}); }, rt));
  }
  {
    diff_fx f;
    f.out.shape[1] = 1;
    EXPECT_TRUE(
        Rejects([&] { headwise::reference::diff_transformer(f.q, f.k, f.v, f.out, 0.5, 0.2, {}); }, rt, "out.shape[1]"));
  }
}

}  // namespace
