// Block-sparse executor (headwise::block_sparse_attention) and the static block-mask builders,
// against the fp64 reference (headwise::reference::block_sparse_attention: the block mask
// expanded to an element predicate, then the dense reference).
#include <headwise/reference/block_sparse.hpp>
#include <headwise/variants/sparse_select.hpp>

#include "common/testing.hpp"

namespace {

using namespace hwt;
using headwise::block_mask;
using headwise::block_mask_data;

/// A hand-made mask with its own arrays: every (b, h, qb) row draws each key block as absent,
/// partial or full, and single columns from the keys of unlisted blocks.
struct random_mask {
  std::int64_t B, H, nqb, nkb, q_block, kv_block, seq_kv;
  std::vector<std::int32_t> pn, pi, fn, fi, cn, ci;

  random_mask(std::int64_t b, std::int64_t h, std::int64_t seq_q, std::int64_t skv, std::int64_t qbs,
              std::int64_t kbs, std::uint64_t seed, double p_partial = 0.35, double p_full = 0.2, double p_col = 0.05)
      : B(b), H(h), nqb((seq_q + qbs - 1) / qbs), nkb((skv + kbs - 1) / kbs), q_block(qbs), kv_block(kbs), seq_kv(skv) {
    std::mt19937_64 gen(seed);
    std::uniform_real_distribution<double> u(0, 1);
    const auto rows = static_cast<std::size_t>(B * H * nqb);
    pn.assign(rows, 0);
    fn.assign(rows, 0);
    cn.assign(rows, 0);
    pi.assign(rows * static_cast<std::size_t>(std::max<std::int64_t>(nkb, 1)), -1);
    fi = pi;
    ci.assign(rows * static_cast<std::size_t>(std::max<std::int64_t>(seq_kv, 1)), -1);
    for (std::size_t r = 0; r < rows; ++r) {
      std::vector<bool> listed(static_cast<std::size_t>(nkb), false);
      for (std::int64_t kb = 0; kb < nkb; ++kb) {
        const double x = u(gen);
        if (x < p_partial) {
          pi[r * static_cast<std::size_t>(nkb) + static_cast<std::size_t>(pn[r]++)] = static_cast<std::int32_t>(kb);
          listed[static_cast<std::size_t>(kb)] = true;
        } else if (x < p_partial + p_full) {
          fi[r * static_cast<std::size_t>(nkb) + static_cast<std::size_t>(fn[r]++)] = static_cast<std::int32_t>(kb);
          listed[static_cast<std::size_t>(kb)] = true;
        }
      }
      for (std::int64_t j = 0; j < seq_kv; ++j)
        if (!listed[static_cast<std::size_t>(j / kv_block)] && u(gen) < p_col)
          ci[r * static_cast<std::size_t>(seq_kv) + static_cast<std::size_t>(cn[r]++)] = static_cast<std::int32_t>(j);
    }
  }
  [[nodiscard]] block_mask view(bool with_full = true, bool with_cols = true) const {
    block_mask m;
    m.q_block = q_block;
    m.kv_block = kv_block;
    const std::int64_t wk = std::max<std::int64_t>(nkb, 1), wc = std::max<std::int64_t>(seq_kv, 1);
    m.kv_num_blocks = {pn.data(), {B, H, nqb}};
    m.kv_indices = {pi.data(), {B, H, nqb, wk}};
    if (with_full) {
      m.full_kv_num_blocks = {fn.data(), {B, H, nqb}};
      m.full_kv_indices = {fi.data(), {B, H, nqb, wk}};
    }
    if (with_cols) {
      m.column_count = {cn.data(), {B, H, nqb}};
      m.column_index = {ci.data(), {B, H, nqb, wc}};
    }
    return m;
  }
};

template <class KV>
compare_result run_sparse(const problem_spec& s, const block_mask& m, attention_options o, std::uint64_t seed) {
  dense_problem<KV> p(s, seed);
  o = p.fix(o);
  headwise::block_sparse_attention(p.q_view(), p.k_view(), p.v_view(), p.out_view(), m, o, p.lse_view());
  headwise::reference::block_sparse_attention(p.q_view(), p.k_view(), p.v_view(), p.ref_out_view(), m, o,
                                              p.ref_lse_view());
  return p.compare();
}

compare_result run_sparse_any(const problem_spec& s, const block_mask& m, const attention_options& o,
                              std::uint64_t seed) {
  switch (s.dtype) {
    case kv_dtype::bf16: return run_sparse<bf16>(s, m, o, seed);
    case kv_dtype::f16: return run_sparse<f16>(s, m, o, seed);
    default: return run_sparse<float>(s, m, o, seed);
  }
}

void expect_ok(const compare_result& r, const std::string& what) {
  EXPECT_LE(r.out_err, kOutTol) << what << " " << r;
  EXPECT_LE(r.lse_rel_err, kLseRelTol) << what << " " << r;
  EXPECT_EQ(r.nonfinite, 0) << what;
  EXPECT_TRUE(r.padding_intact) << what;
}

// A hand-made mask (partial, full and column entries; per batch row and head) over shapes that
// are not block multiples, every causal mode, head map and KV dtype: executor == reference.
TEST(BlockSparse, sparse_hand_made_mask_matches_reference) {
  struct shape {
    std::int64_t b, sq, skv, hq, hkv, dqk, dv, qbs, kbs;
    head_map map;
  };
  const shape shapes[] = {
      {1, 1, 1, 1, 1, 16, 16, 16, 16, head_map::interleave},       {1, 7, 7, 2, 2, 32, 32, 16, 16, head_map::interleave},
      {2, 65, 65, 4, 2, 64, 64, 32, 32, head_map::interleave},     {1, 129, 129, 2, 1, 72, 40, 64, 64, head_map::interleave},
      {1, 127, 300, 3, 3, 48, 48, 32, 48, head_map::interleave},   {2, 100, 63, 2, 4, 32, 32, 16, 8, head_map::tile},
      {1, 200, 200, 4, 4, 128, 128, 128, 128, head_map::interleave}, {1, 33, 257, 2, 2, 80, 96, 128, 64, head_map::interleave},
  };
  const causal_mode modes[] = {causal_mode::bottom_right, causal_mode::top_left, causal_mode::none};
  std::uint64_t seed = 11;
  for (const auto& sh : shapes)
    for (auto mode : modes)
      for (kv_dtype dt : {kv_dtype::f32, kv_dtype::bf16, kv_dtype::f16}) {
        problem_spec s;
        s.batch = sh.b;
        s.seq_q = sh.sq;
        s.seq_kv = sh.skv;
        s.heads_q = sh.hq;
        s.heads_kv = sh.hkv;
        s.dim_qk = sh.dqk;
        s.dim_v = sh.dv;
        s.dtype = dt;
        s.map = sh.map;
        const std::int64_t H = s.heads_out();
        for (int bcast = 0; bcast < 2; ++bcast) {
          random_mask rm(bcast ? 1 : sh.b, bcast ? 1 : H, sh.sq, sh.skv, sh.qbs, sh.kbs, ++seed);
          attention_options o;
          o.causal = mode;
          expect_ok(run_sparse_any(s, rm.view(), o, seed), s.str() + " " + options_str(o) + " q_block " +
                                                              std::to_string(sh.qbs) + " kv_block " +
                                                              std::to_string(sh.kbs) + (bcast ? " broadcast" : ""));
        }
      }
}

// The optional lists may be absent: partial blocks only, partial + full, partial + columns.
TEST(BlockSparse, sparse_optional_lists_absent) {
  problem_spec s{.batch = 1, .seq_q = 90, .seq_kv = 90, .heads_q = 2, .heads_kv = 1, .dim_qk = 32, .dim_v = 32};
  random_mask rm(1, 2, 90, 90, 32, 32, 5);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  for (auto [full, cols] : {std::pair{false, false}, {true, false}, {false, true}})
    expect_ok(run_sparse_any(s, rm.view(full, cols), o, 3), "full " + std::to_string(full) + " cols " + std::to_string(cols));
}

// Every causal block == dense causal attention (the same engine, another trip count): tight.
TEST(BlockSparse, sparse_all_blocks_equals_dense_causal) {
  for (auto mode : {causal_mode::bottom_right, causal_mode::top_left, causal_mode::none})
    for (auto [sq, skv] : {std::pair<std::int64_t, std::int64_t>{257, 257}, {64, 300}, {300, 129}})
      for (std::int64_t blk : {32, 64, 128}) {
        problem_spec s{.batch = 2, .seq_q = sq, .seq_kv = skv, .heads_q = 4, .heads_kv = 2, .dim_qk = 64, .dim_v = 64};
        dense_problem<float> p(s, 7);
        attention_options o;
        o.causal = mode;
        const block_mask_data md = headwise::causal_block_mask(sq, skv, blk, blk, mode);
        headwise::block_sparse_attention(p.q_view(), p.k_view(), p.v_view(), p.out_view(), md.view(), o, p.lse_view());
        const auto sparse = p.out_dense();
        const auto sparse_lse = p.lse;
        p.run(o);
        const auto dense = p.out_dense();
        EXPECT_TRUE(AllClose(sparse.data(), dense.data(), dense.size(), 1e-5, 1e-6))
            << causal_name(mode) << " sq " << sq << " skv " << skv << " block " << blk;
        EXPECT_TRUE(AllClose(sparse_lse.data(), p.lse.data(), p.lse.size(), 1e-6, 1e-6)) << causal_name(mode);
      }
}

// Static patterns (StreamingLLM sinks + local blocks, dilated, user-supplied) == reference, and
// their block structure.
TEST(BlockSparse, sparse_static_patterns) {
  const std::int64_t N = 500, blk = 64, nb = (N + blk - 1) / blk;
  problem_spec s{.batch = 1, .seq_q = N, .seq_kv = N, .heads_q = 2, .heads_kv = 2, .dim_qk = 32, .dim_v = 32};
  attention_options o;
  o.causal = causal_mode::bottom_right;
  const auto stream = headwise::streaming_block_mask(N, N, blk, blk, 1, 2);
  expect_ok(run_sparse_any(s, stream.view(), o, 1), "streaming");
  // Query block qb keeps block 0 and blocks qb-1, qb: the diagonal one partial, the rest full.
  for (std::int64_t qb = 0; qb < nb; ++qb) {
    EXPECT_EQ(stream.kv_num_blocks[static_cast<std::size_t>(qb)], 1) << qb;
    EXPECT_EQ(stream.kv_indices[static_cast<std::size_t>(qb * stream.kv_width)], qb) << qb;
    EXPECT_EQ(stream.full_kv_num_blocks[static_cast<std::size_t>(qb)], std::min<std::int64_t>(qb, 2)) << qb;
  }
  const auto strided = headwise::strided_block_mask(N, N, blk, blk, 3, 1);
  expect_ok(run_sparse_any(s, strided.view(), o, 2), "strided");
  for (std::int64_t qb = 0; qb < nb; ++qb)
    EXPECT_EQ(strided.full_kv_num_blocks[static_cast<std::size_t>(qb)] + strided.kv_num_blocks[static_cast<std::size_t>(qb)],
              qb / 3 + 1)
        << qb;
  std::vector<std::uint8_t> keep(static_cast<std::size_t>(2 * nb * nb));
  std::mt19937_64 gen(4);
  for (auto& x : keep) x = static_cast<std::uint8_t>(gen() % 2);
  const auto user = headwise::block_mask_from_dense(tensor_view<const std::uint8_t, 3>(keep.data(), {2, nb, nb}), N, N,
                                                    blk, blk);
  expect_ok(run_sparse_any(s, user.view(), o, 3), "user-supplied");
  // Only visible blocks are kept: none above the diagonal.
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t qb = 0; qb < nb; ++qb) {
      const std::size_t r = static_cast<std::size_t>(h * nb + qb);
      for (std::int32_t e = 0; e < user.kv_num_blocks[r]; ++e)
        EXPECT_LE(user.kv_indices[r * static_cast<std::size_t>(user.kv_width) + static_cast<std::size_t>(e)], qb);
      for (std::int32_t e = 0; e < user.full_kv_num_blocks[r]; ++e)
        EXPECT_LT(user.full_kv_indices[r * static_cast<std::size_t>(user.full_width) + static_cast<std::size_t>(e)], qb);
    }
}

// A query block with an empty list, and query rows whose listed keys all lie past their
// diagonal: out = 0, lse = -inf (no NaN).
TEST(BlockSparse, sparse_rows_without_keys) {
  problem_spec s{.batch = 1, .seq_q = 64, .seq_kv = 64, .heads_q = 1, .heads_kv = 1, .dim_qk = 16, .dim_v = 16};
  std::vector<std::int32_t> n = {0, 1}, idx = {0, 1};  // q-block 0: nothing; q-block 1: key block 1 (its diagonal)
  block_mask m;
  m.q_block = m.kv_block = 32;
  m.kv_num_blocks = {n.data(), {1, 1, 2}};
  m.kv_indices = {idx.data(), {1, 1, 2, 1}};
  dense_problem<float> p(s, 9);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  headwise::block_sparse_attention(p.q_view(), p.k_view(), p.v_view(), p.out_view(), m, o, p.lse_view());
  for (std::int64_t i = 0; i < 32; ++i) {
    EXPECT_EQ(p.lse[static_cast<std::size_t>(i)], -kInf) << i;
    for (std::int64_t d = 0; d < 16; ++d) EXPECT_EQ(p.out.at(0, i, 0, d), 0.0f);
  }
  headwise::reference::block_sparse_attention(p.q_view(), p.k_view(), p.v_view(), p.ref_out_view(), m, o,
                                              p.ref_lse_view());
  expect_ok(p.compare(), "rows without keys");
}

// Columns: consecutive runs (contiguous tiles) and scattered keys (gathered tiles) in one
// list, some past the diagonal of part of the block; GQA; with softcap and sink logits.
TEST(BlockSparse, sparse_columns_gathered_and_contiguous) {
  const std::int64_t N = 300;
  problem_spec s{.batch = 1, .seq_q = N, .seq_kv = N, .heads_q = 4, .heads_kv = 2, .dim_qk = 64, .dim_v = 64};
  block_mask_data md;
  {
    headwise::block_mask_builder bld(1, 1, N, N, 64, 64, causal_mode::bottom_right);
    for (std::int64_t qb = 0; qb < bld.num_q_blocks(); ++qb) {
      bld.add_block(0, 0, qb, qb);                                            // the diagonal block
      for (std::int64_t j = 3; j < 3 + 100 && j < qb * 64; ++j) bld.add_column(0, 0, qb, j);  // a run
      for (std::int64_t j = 1; j < N; j += 37) bld.add_column(0, 0, qb, j);  // scattered
    }
    md = std::move(bld).finish();
  }
  std::vector<float> sinks = {0.5f, -1.0f, -kInf, 2.0f};
  attention_options o;
  o.causal = causal_mode::bottom_right;
  expect_ok(run_sparse_any(s, md.view(), o, 21), "columns");
  o.softcap = 5.0f;
  o.sink_logits = tensor_view<const float, 1>(sinks.data(), {4});
  expect_ok(run_sparse_any(s, md.view(), o, 22), "columns + softcap + sink logits");
}

// One query block against a long cache: the item is cut along the keys into splits whose
// partial states are merged (the split-KV path) == reference; results do not depend on threads.
TEST(BlockSparse, sparse_split_and_thread_invariance) {
  problem_spec s{.batch = 1, .seq_q = 16, .seq_kv = 9000, .heads_q = 2, .heads_kv = 1, .dim_qk = 64, .dim_v = 64};
  random_mask rm(1, 2, 16, 9000, 64, 64, 8, 0.3, 0.3, 0.01);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  expect_ok(run_sparse_any(s, rm.view(), o, 5), "split");
  problem_spec s2{.batch = 2, .seq_q = 333, .seq_kv = 333, .heads_q = 4, .heads_kv = 2, .dim_qk = 32, .dim_v = 32};
  random_mask rm2(2, 4, 333, 333, 32, 32, 9);
  std::vector<std::vector<float>> outs;
  for (int t : {1, 2, 3, 7}) {
    dense_problem<float> p(s2, 6);
    o.num_threads = t;
    headwise::block_sparse_attention(p.q_view(), p.k_view(), p.v_view(), p.out_view(), rm2.view(), o, p.lse_view());
    outs.push_back(p.out_dense());
    outs.back().insert(outs.back().end(), p.lse.begin(), p.lse.end());
  }
  for (std::size_t i = 1; i < outs.size(); ++i) EXPECT_TRUE(BitwiseEqual(outs[0], outs[i])) << i;
}

// End to end: each adaptive selector at full coverage (gamma = 1, every vertical and slash,
// threshold = 1) feeds the executor and gives dense causal attention (GQA, both head maps).
TEST(BlockSparse, sparse_selectors_at_full_coverage_equal_dense_causal) {
  for (head_map map : {head_map::interleave, head_map::tile}) {
    problem_spec s{.batch = 2, .seq_q = 300, .seq_kv = 300, .heads_q = 4, .heads_kv = 2, .dim_qk = 32, .dim_v = 32};
    s.map = map;
    dense_problem<float> p(s, 31);
    attention_options o = p.fix({});
    o.causal = causal_mode::bottom_right;
    p.run(o);
    const auto dense = p.out_dense();
    headwise::flexprefill_options fo;
    fo.gamma = 1.0;
    fo.min_budget = 0;
    fo.block_size = 128;  // budgets count 128-token units whatever the block (the reference's //128)
    fo.heads = map;
    headwise::vertical_slash_options vo;
    vo.vertical_size = vo.slash_size = 300;
    vo.block = 32;
    vo.heads = map;
    headwise::xattention_options xo;
    xo.block = 32;
    xo.stride = 4;
    xo.threshold = 1.0;
    xo.heads = map;
    const headwise::sparse_selection sels[] = {headwise::flexprefill_select(p.q_view(), p.k_view(), fo),
                                               headwise::vertical_slash_select(p.q_view(), p.k_view(), vo),
                                               headwise::xattention_select(p.q_view(), p.k_view(), xo)};
    for (const auto& sel : sels) {
      EXPECT_EQ(sel.stats.selected, 1.0) << (&sel - sels);
      headwise::block_sparse_attention(p.q_view(), p.k_view(), p.v_view(), p.out_view(), sel.mask.view(), o,
                                       p.lse_view());
      const auto sparse = p.out_dense();
      EXPECT_TRUE(AllClose(sparse.data(), dense.data(), dense.size(), 1e-5, 1e-6)) << (&sel - sels) << " tile "
                                                                                   << (map == head_map::tile);
    }
  }
}

// Bad masks and options: argument_error naming the argument, before any work (out untouched).
TEST(BlockSparse, sparse_bad_input) {
  problem_spec s{.batch = 1, .seq_q = 64, .seq_kv = 64, .heads_q = 2, .heads_kv = 2, .dim_qk = 16, .dim_v = 16};
  dense_problem<float> p(s, 1);
  std::vector<std::int32_t> n = {1, 2}, idx = {0, 0, 0, 1}, fn = {0, 0}, fi = {0, 0, 0, 0}, cn = {0, 0}, ci(128, 0);
  auto base = [&] {
    block_mask m;
    m.q_block = m.kv_block = 32;
    m.kv_num_blocks = {n.data(), {1, 1, 2}};
    m.kv_indices = {idx.data(), {1, 1, 2, 2}};
    m.full_kv_num_blocks = {fn.data(), {1, 1, 2}};
    m.full_kv_indices = {fi.data(), {1, 1, 2, 2}};
    m.column_count = {cn.data(), {1, 1, 2}};
    m.column_index = {ci.data(), {1, 1, 2, 64}};
    return m;
  };
  attention_options causal;
  causal.causal = causal_mode::bottom_right;
  auto expect_error = [&](const block_mask& m, const attention_options& o, const std::string& arg) {
    const auto before = p.out.buf;
    try {
      headwise::block_sparse_attention(p.q_view(), p.k_view(), p.v_view(), p.out_view(), m, o, p.lse_view());
      ADD_FAILURE() << "no error for " << arg;
    } catch (const headwise::argument_error& e) {
      EXPECT_NE(std::string(e.what()).find(arg), std::string::npos) << e.what();
    }
    EXPECT_TRUE(BitwiseEqual(before, p.out.buf)) << arg;
  };
  // The base mask is valid.
  headwise::block_sparse_attention(p.q_view(), p.k_view(), p.v_view(), p.out_view(), base(), causal, p.lse_view());

  auto m = base();
  m.q_block = 0;
  expect_error(m, causal, "mask.q_block");
  m = base();
  m.kv_block = -3;
  expect_error(m, causal, "mask.kv_block");
  idx[3] = 2;  // key block 2 of 2
  expect_error(base(), causal, "mask.kv_indices[0,0,1][1]");
  idx[3] = -1;
  expect_error(base(), causal, "mask.kv_indices[0,0,1][1]");
  idx[3] = 0;  // repeat: not increasing
  expect_error(base(), causal, "mask.kv_indices[0,0,1][1]");
  idx[3] = 1;
  n[1] = 3;  // more than the width
  expect_error(base(), causal, "mask.kv_num_blocks[0,0,1]");
  n[1] = -1;
  expect_error(base(), causal, "mask.kv_num_blocks[0,0,1]");
  n[1] = 2;
  fn[0] = 1;  // block 0 of q-block 0 in both lists
  expect_error(base(), causal, "mask.full_kv_indices[0,0,0][0]");
  fn[0] = 0;
  cn[1] = 1;
  ci[64] = 40;  // inside listed block 1
  expect_error(base(), causal, "mask.column_index[0,0,1][0]");
  ci[64] = 64;  // past seq_kv
  expect_error(base(), causal, "mask.column_index[0,0,1][0]");
  cn[1] = 0;
  m = base();
  m.kv_num_blocks.shape[2] = 3;
  expect_error(m, causal, "mask.kv_num_blocks.shape[2]");
  m = base();
  m.kv_num_blocks.shape[1] = 3;  // neither 1 nor the 2 output heads
  expect_error(m, causal, "mask.kv_num_blocks.shape[1]");
  m = base();
  m.full_kv_indices = {};
  expect_error(m, causal, "mask.full_kv_indices");
  m = base();
  m.kv_indices.shape[3] = 1;
  expect_error(m, causal, "mask.kv_num_blocks[0,0,1]");
  attention_options w = causal;
  w.window_left = 10;
  expect_error(base(), w, "options.window_left");
  w = causal;
  w.sink_tokens = 4;
  expect_error(base(), w, "options.sink_tokens");
  // The output may not alias the mask's arrays.
  m = base();
  tensor_view<float, 4> bad_out(reinterpret_cast<float*>(ci.data()), {1, 64, 2, 16});
  try {
    headwise::block_sparse_attention(p.q_view(), p.k_view(), p.v_view(), bad_out, base(), causal);
    ADD_FAILURE() << "no error for an aliasing out";
  } catch (const headwise::argument_error& e) {
    EXPECT_NE(std::string(e.what()).find("out"), std::string::npos) << e.what();
  }
  // Builders.
  EXPECT_THROW((void)headwise::causal_block_mask(10, 10, 0, 16), headwise::argument_error);
  EXPECT_THROW((void)headwise::streaming_block_mask(10, 10, 16, 16, -1, 1), headwise::argument_error);
  EXPECT_THROW((void)headwise::streaming_block_mask(10, 10, 16, 16, 1, 0), headwise::argument_error);
  EXPECT_THROW((void)headwise::strided_block_mask(10, 10, 16, 16, 0), headwise::argument_error);
  std::vector<std::uint8_t> keep(4);
  EXPECT_THROW((void)headwise::block_mask_from_dense(tensor_view<const std::uint8_t, 3>(keep.data(), {1, 2, 2}), 10, 10,
                                                     16, 16),
               headwise::argument_error);
}

}  // namespace
