// Concurrent calls from several std::threads (issue 7, item 2): every kernel is called from 4
// threads at once, (a) each thread on its own inputs and (b) all threads on the same read-only
// inputs with separate outputs, and every result must be bitwise equal to the same call made
// serially beforehand. The kernels keep no global state, so this must hold whatever the
// interleaving; run under ThreadSanitizer (a build with OpenMP off, see below), it also shows
// that no call writes memory another call reads.
//
// The cases: attention f32 and bf16 prefill (GQA, causal, window, sinks, softcap, LSE), decode
// with split-KV (the default blocking's splits, about 64 of at least 256 keys, and
// attention_blocked with short splits, f32 and f16), attention_paged (bf16 pages, decode and a causal chunk), mla_absorbed
// (a split decode over the latent cache) and diff_attention (GDA, RMSNorm, both LSEs).
//
// ThreadSanitizer (OpenMP off: libgomp is not instrumented):
//   cmake -S . -B build/tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="-fsanitize=thread -O1 -g"
//         -DHEADWISE_USE_OPENMP=OFF -DHEADWISE_TEST_ARCHES= -DHEADWISE_BUILD_BENCHMARKS=OFF
//         -DHEADWISE_BUILD_EXAMPLES=OFF
//   cmake --build build/tsan --target headwise_concurrency_test
//   TSAN_OPTIONS=halt_on_error=1 build/tsan/tests/headwise_concurrency_test
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <latch>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/testing.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using namespace hwt;
using headwise::diff_norm;
using headwise::diff_options;

constexpr int kThreads = 4;
constexpr int kIterations = 2;

/// One kernel call: runs it into fresh outputs and returns them (out, then the LSEs).
using call_fn = std::function<std::vector<float>()>;
/// Builds a call on its own inputs drawn from `seed`.
using maker_fn = std::function<call_fn(std::uint64_t seed)>;

template <class T>
std::vector<T> random_storage(std::size_t n, std::uint64_t seed, float stddev = 1.0f) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> nd(0.0f, stddev);
  std::vector<T> v(n);
  for (auto& x : v) x = headwise::from_float<T>(nd(gen));
  return v;
}

std::size_t sz(std::int64_t n) { return static_cast<std::size_t>(n); }

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

struct dense_shape {
  std::int64_t batch, seq_q, seq_kv, heads_q, heads_kv, dim, dim_v;
};

/// headwise::attention (or attention_blocked when blk is given) on contiguous BSHD inputs.
template <class KV>
maker_fn dense_case(dense_shape s, attention_options o, std::optional<headwise::engine::blocking> blk = {}) {
  return [=](std::uint64_t seed) -> call_fn {
    struct inputs {
      std::vector<float> q;
      std::vector<KV> k, v;
    };
    auto in = std::make_shared<const inputs>(inputs{
        random_storage<float>(sz(s.batch * s.seq_q * s.heads_q * s.dim), seed),
        random_storage<KV>(sz(s.batch * s.seq_kv * s.heads_kv * s.dim), seed + 1),
        random_storage<KV>(sz(s.batch * s.seq_kv * s.heads_kv * s.dim_v), seed + 2)});
    return [=]() {
      std::vector<float> out(sz(s.batch * s.seq_q * s.heads_q * s.dim_v)), lse(sz(s.batch * s.heads_q * s.seq_q));
      const auto q = headwise::bshd<const float>(in->q.data(), s.batch, s.seq_q, s.heads_q, s.dim);
      const auto k = headwise::bshd<const KV>(in->k.data(), s.batch, s.seq_kv, s.heads_kv, s.dim);
      const auto v = headwise::bshd<const KV>(in->v.data(), s.batch, s.seq_kv, s.heads_kv, s.dim_v);
      const auto ov = headwise::bshd(out.data(), s.batch, s.seq_q, s.heads_q, s.dim_v);
      const auto lv = headwise::bhs(lse.data(), s.batch, s.heads_q, s.seq_q);
      if (blk) headwise::attention_blocked(q, k, v, ov, o, lv, *blk);
      else headwise::attention(q, k, v, ov, o, lv);
      out.insert(out.end(), lse.begin(), lse.end());
      return out;
    };
  };
}

/// headwise::attention_paged over bf16 pages, pages of each sequence scattered in the pool.
maker_fn paged_case(std::int64_t seq_q, attention_options o) {
  return [=](std::uint64_t seed) -> call_fn {
    constexpr std::int64_t B = 2, ps = 16, max_pages = 5, pages = 12, hq = 4, hkv = 2, d = 32, dv = 32;
    struct inputs {
      std::vector<float> q;
      std::vector<bf16> k, v;
      std::vector<std::int32_t> table, lens;
    };
    inputs in{random_storage<float>(sz(B * seq_q * hq * d), seed),
              random_storage<bf16>(sz(pages * ps * hkv * d), seed + 1),
              random_storage<bf16>(sz(pages * ps * hkv * dv), seed + 2),
              {},
              {37 + static_cast<std::int32_t>(seed % 5), 64}};
    std::vector<std::int32_t> perm(pages);
    for (std::int32_t i = 0; i < pages; ++i) perm[sz(i)] = i;
    std::shuffle(perm.begin(), perm.end(), std::mt19937_64(seed + 3));
    in.table.assign(perm.begin(), perm.begin() + B * max_pages);
    auto shared = std::make_shared<const inputs>(std::move(in));
    return [=]() {
      std::vector<float> out(sz(B * seq_q * hq * dv)), lse(sz(B * hq * seq_q));
      const headwise::paged_kv<bf16> kv{headwise::bshd<const bf16>(shared->k.data(), pages, ps, hkv, d),
                                        headwise::bshd<const bf16>(shared->v.data(), pages, ps, hkv, dv),
                                        tensor_view<const std::int32_t, 2>(shared->table.data(), {B, max_pages}),
                                        tensor_view<const std::int32_t, 1>(shared->lens.data(), {B})};
      headwise::attention_paged(headwise::bshd<const float>(shared->q.data(), B, seq_q, hq, d), kv,
                                headwise::bshd(out.data(), B, seq_q, hq, dv), o,
                                headwise::bhs(lse.data(), B, hq, seq_q));
      out.insert(out.end(), lse.begin(), lse.end());
      return out;
    };
  };
}

/// headwise::mla_absorbed: a decode step over a latent cache long enough to be split.
maker_fn mla_case() {
  return [](std::uint64_t seed) -> call_fn {
    constexpr std::int64_t B = 1, sq = 1, skv = 2100, h = 16, dc = 32, dr = 8;
    struct inputs {
      std::vector<float> q, latent;
    };
    auto in = std::make_shared<const inputs>(inputs{random_storage<float>(sz(B * sq * h * (dc + dr)), seed, 0.3f),
                                                    random_storage<float>(sz(B * skv * (dc + dr)), seed + 1)});
    return [=]() {
      std::vector<float> out(sz(B * sq * h * dc)), lse(sz(B * h * sq));
      attention_options o;
      o.scale = 0.125f;
      o.causal = causal_mode::bottom_right;
      headwise::mla_absorbed(headwise::bshd<const float>(in->q.data(), B, sq, h, dc + dr),
                             tensor_view<const float, 3>(in->latent.data(), {B, skv, dc + dr}),
                             headwise::bshd(out.data(), B, sq, h, dc), o, headwise::bhs(lse.data(), B, h, sq));
      out.insert(out.end(), lse.begin(), lse.end());
      return out;
    };
  };
}

/// headwise::diff_attention: GDA (2 signal heads per noise head), RMSNorm, causal, both LSEs.
maker_fn diff_case() {
  return [](std::uint64_t seed) -> call_fn {
    constexpr std::int64_t B = 1, sq = 40, skv = 40, hs = 4, hn = 2, pairs = 2, d = 16, dv = 32;
    struct inputs {
      std::vector<float> q;
      std::vector<bf16> k, v;
      std::vector<float> weight;
    };
    auto in = std::make_shared<const inputs>(inputs{random_storage<float>(sz(B * sq * (hs + hn) * d), seed),
                                                    random_storage<bf16>(sz(B * skv * 2 * pairs * d), seed + 1),
                                                    random_storage<bf16>(sz(B * skv * pairs * dv), seed + 2),
                                                    random_storage<float>(sz(dv), seed + 3)});
    return [=]() {
      std::vector<float> out(sz(B * sq * hs * dv)), ls(sz(B * hs * sq)), ln(sz(B * hn * sq));
      diff_options o;
      o.causal = causal_mode::bottom_right;
      o.lambda = 0.6f;
      o.lambda_init = 0.2f;
      o.norm_weight = tensor_view<const float, 1>(in->weight.data(), {dv});
      headwise::diff_attention(headwise::bshd<const float>(in->q.data(), B, sq, hs + hn, d),
                               headwise::bshd<const bf16>(in->k.data(), B, skv, 2 * pairs, d),
                               headwise::bshd<const bf16>(in->v.data(), B, skv, pairs, dv),
                               headwise::bshd(out.data(), B, sq, hs, dv), o, headwise::bhs(ls.data(), B, hs, sq),
                               headwise::bhs(ln.data(), B, hn, sq));
      out.insert(out.end(), ls.begin(), ls.end());
      out.insert(out.end(), ln.begin(), ln.end());
      return out;
    };
  };
}

// Options and shapes of the attention cases.
attention_options prefill_options() {
  attention_options o;
  o.causal = causal_mode::bottom_right;
  return o;
}
attention_options banded_options() {
  attention_options o;
  o.causal = causal_mode::top_left;
  o.window_left = 17;
  o.sink_tokens = 2;
  o.softcap = 20.0f;
  o.num_threads = 2;
  return o;
}
constexpr dense_shape kPrefill{2, 48, 53, 8, 2, 32, 32};
constexpr dense_shape kDecodeLong{2, 1, 2100, 8, 2, 64, 64};  // split by default (9 splits of 256 keys)
constexpr dense_shape kDecodeShort{2, 2, 300, 8, 2, 64, 48};  // split every 64 keys (blocked)

headwise::engine::blocking short_splits() {
  headwise::engine::blocking b;
  b.split_kv = 64;
  b.decode_block_kv = 16;
  b.decode_block_kv16 = 16;
  return b;
}

// ---------------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------------

/// Runs every call serially once for the expected results, then from kThreads threads at once
/// (kIterations rounds each, each thread starting at another call so that different kernels
/// overlap), and checks every concurrent result bitwise against the serial one.
///   shared_inputs = false: thread t's calls have their own inputs (seed 1000 + t);
///   shared_inputs = true:  every thread runs the same call objects (same inputs, own outputs).
void expect_concurrent_equals_serial(const std::vector<std::pair<std::string, maker_fn>>& cases, bool shared_inputs) {
  const std::size_t n = cases.size();
  std::vector<std::vector<call_fn>> calls(kThreads);
  std::vector<std::vector<std::vector<float>>> expected(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    for (std::size_t c = 0; c < n; ++c) {
      if (shared_inputs && t > 0) {
        calls[sz(t)].push_back(calls[0][c]);
        expected[sz(t)].push_back(expected[0][c]);
      } else {
        calls[sz(t)].push_back(cases[c].second(1000 + static_cast<std::uint64_t>(shared_inputs ? 0 : t)));
        expected[sz(t)].push_back(calls[sz(t)].back()());
      }
    }
  }

  std::vector<std::vector<std::string>> errors(kThreads);
  std::latch start(kThreads);
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t)
    pool.emplace_back([&, t] {
      start.arrive_and_wait();
      for (int it = 0; it < kIterations; ++it)
        for (std::size_t i = 0; i < n; ++i) {
          const std::size_t c = (i + sz(t)) % n;
          const std::vector<float> got = calls[sz(t)][c]();
          const std::vector<float>& want = expected[sz(t)][c];
          if (got.size() != want.size() || std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) != 0) {
            std::size_t first = 0;
            while (first < got.size() && first < want.size() &&
                   std::memcmp(&got[first], &want[first], sizeof(float)) == 0)
              ++first;
            errors[sz(t)].push_back(cases[c].first + ": thread " + std::to_string(t) + " round " +
                                    std::to_string(it) + " differs from the serial call at element " +
                                    std::to_string(first));
          }
        }
    });
  for (auto& th : pool) th.join();
  for (const auto& e : errors)
    for (const auto& msg : e) ADD_FAILURE() << msg;
}

void both_modes(const std::vector<std::pair<std::string, maker_fn>>& cases) {
  {
    SCOPED_TRACE("own inputs per thread");
    expect_concurrent_equals_serial(cases, false);
  }
  {
    SCOPED_TRACE("shared read-only inputs");
    expect_concurrent_equals_serial(cases, true);
  }
}

TEST(Concurrency, concurrent_attention_f32_prefill_and_split_decode) {
  both_modes({{"attention f32 prefill", dense_case<float>(kPrefill, prefill_options())},
              {"attention f32 banded", dense_case<float>(kPrefill, banded_options())},
              {"attention f32 decode (default splits)", dense_case<float>(kDecodeLong, prefill_options())},
              {"attention_blocked f32 decode (64-key splits)",
               dense_case<float>(kDecodeShort, prefill_options(), short_splits())}});
}

TEST(Concurrency, concurrent_attention_bf16_f16_prefill_and_split_decode) {
  both_modes({{"attention bf16 prefill", dense_case<bf16>(kPrefill, prefill_options())},
              {"attention bf16 banded", dense_case<bf16>(kPrefill, banded_options())},
              {"attention bf16 decode (default splits)", dense_case<bf16>(kDecodeLong, prefill_options())},
              {"attention_blocked f16 decode (64-key splits)",
               dense_case<f16>(kDecodeShort, banded_options(), short_splits())}});
}

TEST(Concurrency, concurrent_attention_paged) {
  both_modes({{"attention_paged bf16 decode", paged_case(1, prefill_options())},
              {"attention_paged bf16 causal chunk", paged_case(5, banded_options())}});
}

TEST(Concurrency, concurrent_mla_absorbed) { both_modes({{"mla_absorbed split decode", mla_case()}}); }

TEST(Concurrency, concurrent_diff_attention) { both_modes({{"diff_attention GDA rms", diff_case()}}); }

TEST(Concurrency, concurrent_mixed_kernels) {
  both_modes({{"attention f32 prefill", dense_case<float>(kPrefill, prefill_options())},
              {"attention bf16 decode (default splits)", dense_case<bf16>(kDecodeLong, prefill_options())},
              {"attention_paged bf16 causal chunk", paged_case(5, banded_options())},
              {"mla_absorbed split decode", mla_case()},
              {"diff_attention GDA rms", diff_case()}});
}

#if defined(_OPENMP)
// Calls made by the threads of the caller's own OpenMP team: headwise then runs each call on
// its calling thread, in place (no region of its own), with that thread's scratch, and must
// not index anything by the caller's omp_get_thread_num() (3 here, not 0: the pool threads'
// own scratch holds one workspace, so such an index reads past it and crashes the test).
// Equal to the same calls made outside any region (float ==, as the other tests' memcmp but
// for the sign of zero).
TEST(Concurrency, calls_inside_an_openmp_parallel_region) {
  const std::vector<std::pair<std::string, maker_fn>> cases = {
      {"attention f32 decode (default splits)", dense_case<float>(kDecodeLong, prefill_options())},
      {"attention_blocked f16 decode (64-key splits)", dense_case<f16>(kDecodeShort, banded_options(), short_splits())},
      {"attention_paged bf16 causal chunk", paged_case(5, banded_options())},
      {"mla_absorbed split decode", mla_case()},
      {"diff_attention GDA rms", diff_case()}};
  std::vector<call_fn> calls;
  std::vector<std::vector<float>> expected;
  for (const auto& c : cases) {
    calls.push_back(c.second(2000));
    expected.push_back(calls.back()());
  }
  std::vector<std::vector<std::string>> errors(kThreads);
  int team = 0;
#pragma omp parallel num_threads(kThreads)
  {
    const int t = omp_get_thread_num();
#pragma omp single
    team = omp_get_num_threads();
    for (std::size_t i = 0; i < calls.size(); ++i) {
      const std::size_t c = (i + sz(t)) % calls.size();
      const std::vector<float> got = calls[c]();
      if (got != expected[c]) errors[sz(t)].push_back(cases[c].first + ": OpenMP thread " + std::to_string(t));
    }
  }
  EXPECT_EQ(team, kThreads) << "the region did not get its threads; the test ran fewer callers";
  for (const auto& e : errors)
    for (const auto& msg : e) ADD_FAILURE() << msg << " differs from the serial call";
}
#endif

}  // namespace
