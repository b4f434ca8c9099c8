/// @file
/// @brief The two register-blocked microkernels, S = Q·Kᵀ and O = α·O + P·V, lanes = query rows.
///
/// Layout ("query-lane"): the query rows of a work item (query positions x the query heads of
/// one KV group) run across SIMD lanes. Q is packed once per work item D-major, Q_buf[d][r];
/// S and P are key-major, S_buf[j][r]; O is accumulated dim-major, O_buf[c][r]. K and V are
/// read in place, row by row: each K[j][d] and V[j][c] is one broadcast FMA operand, shared by
/// every lane (every query row and every query head of the group). No horizontal reduction,
/// no K/V transposition, and no padding of dim_qk / dim_v: only the lane count is padded (the
/// phased one-vector Q·Kᵀ kernel runs the dims left over by its phases in phase 0).
///
/// Items of one lane vector have their own pair (engine::query_lanes::o_rows / q_quads): P·V
/// into a row-major O (pv_tile_o_rows), and on AVX-512 Q·Kᵀ with Q in quads (qk_tile_quads,
/// each key's dims four at a time, folded per key), so that one load feeds several FMAs.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "arch.hpp"
#include "diagnostics.hpp"
#include "memory.hpp"

#if defined(__clang__)
#define HEADWISE_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define HEADWISE_UNROLL _Pragma("GCC unroll 32")
#else
#define HEADWISE_UNROLL
#endif

// A skeleton shared by several kernels, inlined into each (so each keeps its own registers).
#if defined(__GNUC__) || defined(__clang__)
#define HEADWISE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define HEADWISE_ALWAYS_INLINE inline
#endif

HEADWISE_DIAGNOSTICS_PUSH

namespace headwise::tile {

/// Register tile of Rows x Vecs float vectors (shape in the type, as ThunderKittens' rt): the
/// accumulators of a microkernel. Its loops are fully unrolled so it never leaves registers.
template <int Rows, int Vecs, class Arch>
struct reg_tile {
  static_assert(Rows > 0 && Vecs > 0, "reg_tile: empty shape");
  using batch = xsimd::batch<float, Arch>;
  static constexpr int rows = Rows;
  static constexpr int vecs = Vecs;
  batch v[Rows][Vecs];
};

/// One row of a register tile: Vecs float vectors (a microkernel's vector operand).
template <int Vecs, class Arch>
struct reg_vec {
  static_assert(Vecs > 0, "reg_vec: empty shape");
  using batch = xsimd::batch<float, Arch>;
  static constexpr int vecs = Vecs;
  batch v[Vecs];
};

/// S_buf[j][r] = Σ_d K[j][d] · Q_buf[d][r] for Rows keys and Vecs lane vectors.
/// s: (Rows, ld_s) key-major; k: Rows rows of dim_qk at stride ld_k; q: (dim_qk, ld_q) aligned.
/// With Prefetch, the Rows rows that follow at the same stride (the next block of keys, or
/// past the tile's last block the next tile's first rows; with more lane vectors than a block
/// holds the tile's keys are passed again from L2, and only the first pass needs the fetch)
/// are fetched into L1, a line per row
/// ahead of each chunk of 16 dims, in step with the FMAs (a test per dim instead cost Q·Kᵀ
/// alone 6-9% on the development VM): an item that streams the cache once (absorbed MLA
/// with many heads) otherwise waits on each block's first touch of its rows, six short
/// streams the hardware prefetchers do not follow. Only addresses are formed (as integers,
/// never dereferenced), so rows past the end of the data cost a wasted prefetch at most.
template <int Rows, int Vecs, class Arch, bool Prefetch = false>
inline void mma_abt(float* s, std::ptrdiff_t ld_s, const float* k, std::ptrdiff_t ld_k, const float* q,
                    std::ptrdiff_t ld_q, std::ptrdiff_t dim_qk) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr std::ptrdiff_t w = B::size;
  reg_tile<Rows, Vecs, Arch> acc;  // (Rows keys, Vecs·lanes query rows)
  HEADWISE_UNROLL
  for (int r = 0; r < Rows; ++r)
    HEADWISE_UNROLL
    for (int v = 0; v < Vecs; ++v) acc.v[r][v] = B(0.0f);
  // Prefetch: chunks of 16 dims, each led by one line of each next row; else one chunk.
  const std::ptrdiff_t chunk = Prefetch ? 16 : dim_qk;
  for (std::ptrdiff_t d0 = 0; d0 < dim_qk; d0 += chunk) {
    if constexpr (Prefetch) {
      const std::uintptr_t next = reinterpret_cast<std::uintptr_t>(k) + static_cast<std::uintptr_t>(Rows * ld_k) * sizeof(float);
      HEADWISE_UNROLL
      for (int r = 0; r < Rows; ++r)
        __builtin_prefetch(reinterpret_cast<const void*>(next + static_cast<std::uintptr_t>(r * ld_k + d0) * sizeof(float)), 0, 3);
    }
    const std::ptrdiff_t d1 = std::min(dim_qk, d0 + chunk);
    for (std::ptrdiff_t d = d0; d < d1; ++d) {
      reg_vec<Vecs, Arch> q_reg;  // (1, Vecs·lanes)
      HEADWISE_UNROLL
      for (int v = 0; v < Vecs; ++v) q_reg.v[v] = B::load_aligned(q + d * ld_q + v * w);
      HEADWISE_UNROLL
      for (int r = 0; r < Rows; ++r) {
        const B k_bc(k[r * ld_k + d]);  // broadcast K[j][d]
        HEADWISE_UNROLL
        for (int v = 0; v < Vecs; ++v) acc.v[r][v] = tile::fma<Arch>(k_bc, q_reg.v[v], acc.v[r][v]);
      }
    }
  }
  HEADWISE_UNROLL
  for (int r = 0; r < Rows; ++r)
    HEADWISE_UNROLL
    for (int v = 0; v < Vecs; ++v) acc.v[r][v].store_aligned(s + r * ld_s + v * w);
}

/// S_buf[j][r] = Σ_d K[j][d] · Q_buf[d][r] for Rows keys and one lane vector, the dim loop
/// split into Phases interleaved partial sums (dims d ≡ p mod Phases), added at the end. The
/// accumulators fill the register file with only Rows row offsets live: a Rows·Phases-key
/// block of mma_abt<.., 1> needs as many offsets as keys, and past the general registers the
/// compiler reloads them from the stack, a load per broadcast.
template <int Rows, int Phases, class Arch>
inline void mma_abt_phased(float* s, std::ptrdiff_t ld_s, const float* k, std::ptrdiff_t ld_k, const float* q, std::ptrdiff_t ld_q,
                           std::ptrdiff_t dim_qk) noexcept {
  using B = xsimd::batch<float, Arch>;
  reg_tile<Phases, Rows, Arch> acc;  // (phase, key)
  HEADWISE_UNROLL
  for (int p = 0; p < Phases; ++p)
    HEADWISE_UNROLL
    for (int r = 0; r < Rows; ++r) acc.v[p][r] = B(0.0f);
  std::ptrdiff_t d = 0;
  for (; d + Phases <= dim_qk; d += Phases) {
    HEADWISE_UNROLL
    for (int p = 0; p < Phases; ++p) {
      const B q_reg = B::load_aligned(q + (d + p) * ld_q);
      HEADWISE_UNROLL
      for (int r = 0; r < Rows; ++r) acc.v[p][r] = tile::fma<Arch>(B(k[r * ld_k + d + p]), q_reg, acc.v[p][r]);
    }
  }
  for (; d < dim_qk; ++d) {
    const B q_reg = B::load_aligned(q + d * ld_q);
    HEADWISE_UNROLL
    for (int r = 0; r < Rows; ++r) acc.v[0][r] = tile::fma<Arch>(B(k[r * ld_k + d]), q_reg, acc.v[0][r]);
  }
  HEADWISE_UNROLL
  for (int r = 0; r < Rows; ++r) {
    B sum = acc.v[0][r];
    HEADWISE_UNROLL
    for (int p = 1; p < Phases; ++p) sum += acc.v[p][r];
    sum.store_aligned(s + r * ld_s);
  }
}

/// O_buf[c][r] = α[r]·O_buf[c][r] + Σ_j V[j][c] · P_buf[j][r] for Rows value dims c and Vecs
/// lane vectors, over n keys. o: (Rows, ld_o) aligned; v: n rows at stride ld_v (offset to
/// the first dim c); p: (n, ld_p) aligned; alpha: lanes (aligned), the running-max rescale.
template <int Rows, int Vecs, class Arch>
inline void mma_ab(float* o, std::ptrdiff_t ld_o, const float* alpha, const float* v, std::ptrdiff_t ld_v,
                   const float* p, std::ptrdiff_t ld_p, std::ptrdiff_t n) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr std::ptrdiff_t w = B::size;
  reg_tile<Rows, Vecs, Arch> acc;  // (Rows dims, Vecs·lanes query rows)
  {
    reg_vec<Vecs, Arch> a_reg;
    HEADWISE_UNROLL
    for (int u = 0; u < Vecs; ++u) a_reg.v[u] = B::load_aligned(alpha + u * w);
    HEADWISE_UNROLL
    for (int r = 0; r < Rows; ++r)
      HEADWISE_UNROLL
      for (int u = 0; u < Vecs; ++u) acc.v[r][u] = B::load_aligned(o + r * ld_o + u * w) * a_reg.v[u];
  }
  for (std::ptrdiff_t j = 0; j < n; ++j) {
    reg_vec<Vecs, Arch> p_reg;  // (1, Vecs·lanes)
    HEADWISE_UNROLL
    for (int u = 0; u < Vecs; ++u) p_reg.v[u] = B::load_aligned(p + j * ld_p + u * w);
    HEADWISE_UNROLL
    for (int r = 0; r < Rows; ++r) {
      const B v_bc(v[j * ld_v + r]);  // broadcast V[j][c]
      HEADWISE_UNROLL
      for (int u = 0; u < Vecs; ++u) acc.v[r][u] = tile::fma<Arch>(v_bc, p_reg.v[u], acc.v[r][u]);
    }
  }
  HEADWISE_UNROLL
  for (int r = 0; r < Rows; ++r)
    HEADWISE_UNROLL
    for (int u = 0; u < Vecs; ++u) acc.v[r][u].store_aligned(o + r * ld_o + u * w);
}

namespace detail {
using mma_abt_fn = void (*)(float*, std::ptrdiff_t, const float*, std::ptrdiff_t, const float*, std::ptrdiff_t,
                            std::ptrdiff_t) noexcept;
using mma_ab_fn = void (*)(float*, std::ptrdiff_t, const float*, const float*, std::ptrdiff_t, const float*,
                           std::ptrdiff_t, std::ptrdiff_t) noexcept;

template <class Arch, int MaxRows, int MaxVecs, bool Prefetch, std::size_t... I>
constexpr std::array<mma_abt_fn, sizeof...(I)> make_abt(std::index_sequence<I...>) {
  return {&mma_abt<static_cast<int>(I) / MaxVecs + 1, static_cast<int>(I) % MaxVecs + 1, Arch, Prefetch>...};
}
template <class Arch, int MaxRows, int MaxVecs, std::size_t... I>
constexpr std::array<mma_ab_fn, sizeof...(I)> make_ab(std::index_sequence<I...>) {
  return {&mma_ab<static_cast<int>(I) / MaxVecs + 1, static_cast<int>(I) % MaxVecs + 1, Arch>...};
}
}  // namespace detail

/// The register blocking (keys or value dims) x (lane vectors) of the query-lane microkernels
/// for a work item of `nvec` lane vectors: the arch's default block, or, for one or two lane
/// vectors (decode-like items: absorbed MLA, a few heads), more keys/dims per block so that the
/// accumulators still fill the register file (24 on AVX-512, 12 otherwise).
template <class Arch>
struct lane_blocking {
  using T = arch_traits<Arch>;
  static constexpr int acc = T::rows_blk * T::vecs_blk;
  static constexpr int narrow_rows = acc;      ///< nvec == 1 (Q·Kᵀ: narrow_rows / 3 keys x 3 phases)
  static constexpr int half_rows = acc / 2;    ///< nvec == 2 (when the default block is wider)
};

namespace detail {
/// Runs kernel table `table` (R x V instantiations) over an (n x nvec) tile in blocks of R x V.
template <int R, int V, class Table, class Call>
inline void for_blocks(const Table& table, std::ptrdiff_t n, std::ptrdiff_t nvec, Call&& call) noexcept {
  for (std::ptrdiff_t v0 = 0; v0 < nvec; v0 += V) {
    const std::ptrdiff_t nv = std::min<std::ptrdiff_t>(V, nvec - v0);
    for (std::ptrdiff_t j0 = 0; j0 < n; j0 += R) {
      const std::ptrdiff_t nr = std::min<std::ptrdiff_t>(R, n - j0);
      call(table[static_cast<std::size_t>((nr - 1) * V + (nv - 1))], j0, v0);
    }
  }
}

template <class Arch, int R, int V, bool Prefetch = false>
inline void qk_blocks(float* s, std::ptrdiff_t ld_s, const float* k, std::ptrdiff_t ld_k, const float* q,
                      std::ptrdiff_t ld_q, std::ptrdiff_t dim_qk, std::ptrdiff_t n, std::ptrdiff_t nvec) noexcept {
  constexpr std::ptrdiff_t w = arch_traits<Arch>::lanes;
  static constexpr auto table = make_abt<Arch, R, V, Prefetch>(std::make_index_sequence<R * V>{});
  for_blocks<R, V>(table, n, nvec, [&](mma_abt_fn f, std::ptrdiff_t j0, std::ptrdiff_t v0) {
    f(s + j0 * ld_s + v0 * w, ld_s, k + j0 * ld_k, ld_k, q + v0 * w, ld_q, dim_qk);
  });
}

template <class Arch, int R, int V>
inline void pv_blocks(float* o, std::ptrdiff_t ld_o, const float* alpha, const float* v, std::ptrdiff_t ld_v,
                      const float* p, std::ptrdiff_t ld_p, std::ptrdiff_t dim_v, std::ptrdiff_t n,
                      std::ptrdiff_t nvec) noexcept {
  constexpr std::ptrdiff_t w = arch_traits<Arch>::lanes;
  static constexpr auto table = make_ab<Arch, R, V>(std::make_index_sequence<R * V>{});
  for_blocks<R, V>(table, dim_v, nvec, [&](mma_ab_fn f, std::ptrdiff_t c0, std::ptrdiff_t v0) {
    f(o + c0 * ld_o + v0 * w, ld_o, alpha + v0 * w, v + c0, ld_v, p + v0 * w, ld_p, n);
  });
}
}  // namespace detail

/// S = Q·Kᵀ over a whole tile: n keys x nvec lane vectors, blocked by lane_blocking (full
/// blocks take the widest kernel, edges a narrower instantiation). stream: the tile's rows
/// are read from memory for the first time here and the rows that follow them come next
/// (an item that holds all its sequence's query rows): blocks of several lane vectors
/// prefetch their next block (mma_abt's Prefetch). The S bits are the same either way.
template <class Arch>
inline void qk_tile(float* s, std::ptrdiff_t ld_s, const float* k, std::ptrdiff_t ld_k, const float* q,
                    std::ptrdiff_t ld_q, std::ptrdiff_t dim_qk, std::ptrdiff_t n, std::ptrdiff_t nvec,
                    bool stream = false) noexcept {
  using T = arch_traits<Arch>;
  using L = lane_blocking<Arch>;
  if (nvec == 1) {  // blocks of narrow_rows / 3 keys x 3 phases, the rest (< that) in one block
    static_assert(L::narrow_rows % 3 == 0, "qk_tile: narrow_rows must split into 3 phases");
    constexpr int rows = L::narrow_rows / 3;
    std::ptrdiff_t j = 0;
    for (; j + rows <= n; j += rows) mma_abt_phased<rows, 3, Arch>(s + j * ld_s, ld_s, k + j * ld_k, ld_k, q, ld_q, dim_qk);
    if (j < n) detail::qk_blocks<Arch, rows, 1>(s + j * ld_s, ld_s, k + j * ld_k, ld_k, q, ld_q, dim_qk, n - j, nvec);
  } else if (nvec == 2 && T::vecs_blk > 2) {
    if (stream) {
      detail::qk_blocks<Arch, L::half_rows, 2, true>(s, ld_s, k, ld_k, q, ld_q, dim_qk, n, nvec);
    } else {
      detail::qk_blocks<Arch, L::half_rows, 2>(s, ld_s, k, ld_k, q, ld_q, dim_qk, n, nvec);
    }
  } else if (stream) {
    detail::qk_blocks<Arch, T::rows_blk, T::vecs_blk, true>(s, ld_s, k, ld_k, q, ld_q, dim_qk, n, nvec);
  } else {
    detail::qk_blocks<Arch, T::rows_blk, T::vecs_blk>(s, ld_s, k, ld_k, q, ld_q, dim_qk, n, nvec);
  }
}

/// O = α·O + P·V over a whole tile: dim_v dims x nvec lane vectors, n keys.
template <class Arch>
inline void pv_tile(float* o, std::ptrdiff_t ld_o, const float* alpha, const float* v, std::ptrdiff_t ld_v,
                    const float* p, std::ptrdiff_t ld_p, std::ptrdiff_t dim_v, std::ptrdiff_t n,
                    std::ptrdiff_t nvec) noexcept {
  using T = arch_traits<Arch>;
  using L = lane_blocking<Arch>;
  if (nvec == 1) {
    detail::pv_blocks<Arch, L::narrow_rows, 1>(o, ld_o, alpha, v, ld_v, p, ld_p, dim_v, n, nvec);
  } else if (nvec == 2 && T::vecs_blk > 2) {
    detail::pv_blocks<Arch, L::half_rows, 2>(o, ld_o, alpha, v, ld_v, p, ld_p, dim_v, n, nvec);
  } else {
    detail::pv_blocks<Arch, T::rows_blk, T::vecs_blk>(o, ld_o, alpha, v, ld_v, p, ld_p, dim_v, n, nvec);
  }
}

}  // namespace headwise::tile

namespace headwise::tile {

/// Keeps a vector that several FMAs read in a register. GCC otherwise folds its load into
/// each FMA as a memory operand (equivalent, and "free" in its cost model), which turns one
/// load into Rows or KU loads per step: qk_rows was bound by loads, not FMAs, before this
/// (docs/benchmarks.md, "2026-12-06 (night)"). An empty asm statement that claims to change
/// the register: no instruction, only a value the compiler cannot rematerialize from memory.
template <class Arch>
inline void keep_in_register(xsimd::batch<float, Arch>& x) noexcept {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  auto r = static_cast<typename xsimd::batch<float, Arch>::register_type>(x);
  asm("" : "+v"(r));
  x = xsimd::batch<float, Arch>(r);
#else
  (void)x;
#endif
}

/// The register-tile loop of both row-major P·V kernels (mma_ab_o_rows, mma_ab_rows):
/// acc[r][u] = α[r]·O[r][u], then for each key j < n, acc[r][u] += P(r, j)·V(j, u) (one fma per
/// key, in key order), then O = acc. o: (Rows, ld_o) aligned; row(j): key j's value row (its
/// first element for these Vecs vectors; may prefetch), load(row, u): its vector u as floats,
/// p_at(r, j): P(r, j). PinV keeps the V vectors in registers (keep_in_register).
template <int Rows, int Vecs, class Arch, bool PinV, class Row, class Load, class PAt>
HEADWISE_ALWAYS_INLINE void mma_ab_rows_loop(float* o, std::ptrdiff_t ld_o, const float* alpha, std::ptrdiff_t n, Row&& row,
                             Load&& load, PAt&& p_at) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr std::ptrdiff_t w = B::size;
  reg_tile<Rows, Vecs, Arch> acc;  // (Rows query rows, Vecs vectors of value dims)
  HEADWISE_UNROLL
  for (int r = 0; r < Rows; ++r) {
    const B a(alpha[r]);
    HEADWISE_UNROLL
    for (int u = 0; u < Vecs; ++u) acc.v[r][u] = B::load_aligned(o + r * ld_o + u * w) * a;
  }
  for (std::ptrdiff_t j = 0; j < n; ++j) {
    const auto vj = row(j);
    reg_vec<Vecs, Arch> v_reg;  // V[j][these Vecs vectors]
    HEADWISE_UNROLL
    for (int u = 0; u < Vecs; ++u) {
      v_reg.v[u] = load(vj, u);
      if constexpr (PinV) keep_in_register(v_reg.v[u]);
    }
    HEADWISE_UNROLL
    for (int r = 0; r < Rows; ++r) {
      const B p_bc(p_at(r, j));  // broadcast P(r, j)
      HEADWISE_UNROLL
      for (int u = 0; u < Vecs; ++u) acc.v[r][u] = tile::fma<Arch>(p_bc, v_reg.v[u], acc.v[r][u]);
    }
  }
  HEADWISE_UNROLL
  for (int r = 0; r < Rows; ++r)
    HEADWISE_UNROLL
    for (int u = 0; u < Vecs; ++u) acc.v[r][u].store_aligned(o + r * ld_o + u * w);
}

/// Row-major P·V for items of one lane vector of query rows: O_buf[r][c] = α[r]·O_buf[r][c] +
/// Σ_j P_buf[j][r] · V[j][c] for Rows rows and Vecs vectors of value dims, over n keys; with
/// Tail, the last vector is only `tail` dims wide (masked or buffered loads, never past the
/// row). o: (Rows, ld_o) aligned, row-major; v: n rows at stride ld_v (offset to the first
/// dim); p: (n, ld_p) key-major S/P buffer (offset to row 0); alpha: Rows values. Per key it
/// loads Vecs V vectors and broadcasts Rows P values for Rows·Vecs FMAs, where mma_ab<.., 1>
/// (dim-major O, one lane vector) broadcasts a V value for every FMA. Each O element gets the
/// same products in the same order as in mma_ab (α·O, then fma over j), so the same bits.
template <int Rows, int Vecs, bool Tail, class Arch>
inline void mma_ab_o_rows(float* o, std::ptrdiff_t ld_o, const float* alpha, const float* v, std::ptrdiff_t ld_v,
                          const float* p, std::ptrdiff_t ld_p, std::ptrdiff_t n, int tail) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr std::ptrdiff_t w = B::size;
  mma_ab_rows_loop<Rows, Vecs, Arch, true>(
      o, ld_o, alpha, n, [&](std::ptrdiff_t j) { return v + j * ld_v; },
      [&](const float* x, int u) {
        if constexpr (Tail) {
          if (u == Vecs - 1) return load_partial<Arch>(x + u * w, tail);
        }
        return B::load_unaligned(x + u * w);
      },
      [&](int r, std::ptrdiff_t j) { return p[j * ld_p + r]; });
}

namespace detail {
using mma_ab_o_rows_fn = void (*)(float*, std::ptrdiff_t, const float*, const float*, std::ptrdiff_t, const float*,
                                  std::ptrdiff_t, std::ptrdiff_t, int) noexcept;
template <class Arch, bool Tail, int MaxRows, int MaxVecs, std::size_t... I>
constexpr std::array<mma_ab_o_rows_fn, sizeof...(I)> make_ab_o_rows(std::index_sequence<I...>) {
  return {&mma_ab_o_rows<static_cast<int>(I) / MaxVecs + 1, static_cast<int>(I) % MaxVecs + 1, Tail, Arch>...};
}
}  // namespace detail

/// Row-major P·V over a whole tile (mma_ab_o_rows): rows query rows x dim_v value dims, n keys;
/// o: (rows, ld_o), ld_o >= dim_v rounded up to whole vectors. Blocks of value dims outer, row
/// blocks inner, so that a block's V columns (n keys x a few vectors) stay in L1 for every row.
template <class Arch>
inline void pv_tile_o_rows(float* o, std::ptrdiff_t ld_o, const float* alpha, const float* v, std::ptrdiff_t ld_v,
                           const float* p, std::ptrdiff_t ld_p, std::ptrdiff_t rows, std::ptrdiff_t dim_v,
                           std::ptrdiff_t n) noexcept {
  using T = arch_traits<Arch>;
  constexpr int R = T::vregs >= 32 ? 8 : 4, V = T::vregs >= 32 ? 3 : 2;
  constexpr std::ptrdiff_t w = T::lanes;
  static constexpr auto table = detail::make_ab_o_rows<Arch, false, R, V>(std::make_index_sequence<R * V>{});
  static constexpr auto tails = detail::make_ab_o_rows<Arch, true, R, 1>(std::make_index_sequence<R>{});
  const std::ptrdiff_t full = dim_v / w;
  const int tail = static_cast<int>(dim_v - full * w);
  for (std::ptrdiff_t c0 = 0; c0 < full; c0 += V) {
    const std::ptrdiff_t nv = std::min<std::ptrdiff_t>(V, full - c0);
    for (std::ptrdiff_t r0 = 0; r0 < rows; r0 += R) {
      const std::ptrdiff_t nr = std::min<std::ptrdiff_t>(R, rows - r0);
      table[static_cast<std::size_t>((nr - 1) * V + (nv - 1))](o + r0 * ld_o + c0 * w, ld_o, alpha + r0, v + c0 * w,
                                                               ld_v, p + r0, ld_p, n, 0);
    }
  }
  if (tail > 0)
    for (std::ptrdiff_t r0 = 0; r0 < rows; r0 += R) {
      const std::ptrdiff_t nr = std::min<std::ptrdiff_t>(R, rows - r0);
      tails[static_cast<std::size_t>(nr - 1)](o + r0 * ld_o + full * w, ld_o, alpha + r0, v + full * w, ld_v, p + r0,
                                              ld_p, n, tail);
    }
}


/// Key-lane P·V: O_buf[r][c] = α[r]·O_buf[r][c] + Σ_j P_buf[r][j] · V[j][c0 + c] for Rows query
/// rows and Vecs vectors of value dims, over n keys. o: (Rows, ld_o) aligned; p: (Rows, ld_p);
/// v[j]: key j's value row in its storage dtype T, read in place (converted as loaded; any
/// row order: dense, paged or gathered), Vecs full vectors from element c0; alpha: Rows.
/// next (optional): rows read after these (nullptr entries: none); with key j, the same
/// elements of next[j] are prefetched into L2, so the fetch runs alongside the FMAs.
template <int Rows, int Vecs, class Arch, class T>
inline void mma_ab_rows(float* o, std::ptrdiff_t ld_o, const float* alpha, const void* const* v, std::ptrdiff_t c0,
                        const float* p, std::ptrdiff_t ld_p, std::ptrdiff_t n, const void* const* next) noexcept {
  constexpr std::ptrdiff_t w = arch_traits<Arch>::lanes;
  mma_ab_rows_loop<Rows, Vecs, Arch, false>(
      o, ld_o, alpha, n,
      [&](std::ptrdiff_t j) {
        const T* vj = static_cast<const T*>(v[j]) + c0;
        if (next != nullptr && next[j] != nullptr)
          prefetch_l2(static_cast<const T*>(next[j]) + c0, Vecs * w * static_cast<std::ptrdiff_t>(sizeof(T)));
        return vj;
      },
      [](const T* x, int u) { return load_as_float<Arch>(x + u * w); },
      [&](int r, std::ptrdiff_t j) { return p[r * ld_p + j]; });
}

namespace detail {
using mma_ab_rows_fn = void (*)(float*, std::ptrdiff_t, const float*, const void* const*, std::ptrdiff_t,
                                const float*, std::ptrdiff_t, std::ptrdiff_t, const void* const*) noexcept;
template <class Arch, class VT, int MaxRows, int MaxVecs, std::size_t... I>
constexpr std::array<mma_ab_rows_fn, sizeof...(I)> make_ab_rows(std::index_sequence<I...>) {
  return {&mma_ab_rows<static_cast<int>(I) / MaxVecs + 1, static_cast<int>(I) % MaxVecs + 1, Arch, VT>...};
}
}  // namespace detail

/// Key-lane P·V over a whole tile: rows x (dv_vecs vectors of value dims), n keys; v[j] is key
/// j's value row in storage dtype VT; next (optional, n entries): rows to prefetch into L2
/// (mma_ab_rows), once.
template <class Arch, class VT>
inline void pv_tile_rows(float* o, std::ptrdiff_t ld_o, const float* alpha, const void* const* v, const float* p,
                         std::ptrdiff_t ld_p, std::ptrdiff_t rows, std::ptrdiff_t dv_vecs, std::ptrdiff_t n,
                         const void* const* next = nullptr) noexcept {
  using T = arch_traits<Arch>;
  constexpr int R = T::vregs >= 32 ? 4 : 2, V = T::vregs >= 32 ? 4 : 4;
  static constexpr auto table = detail::make_ab_rows<Arch, VT, R, V>(std::make_index_sequence<R * V>{});
  for (std::ptrdiff_t r0 = 0; r0 < rows; r0 += R) {
    const std::ptrdiff_t nr = std::min<std::ptrdiff_t>(R, rows - r0);
    for (std::ptrdiff_t c0 = 0; c0 < dv_vecs; c0 += V) {
      const std::ptrdiff_t nv = std::min<std::ptrdiff_t>(V, dv_vecs - c0);
      table[static_cast<std::size_t>((nr - 1) * V + (nv - 1))](o + r0 * ld_o + c0 * T::lanes, ld_o, alpha + r0, v,
                                                               c0 * T::lanes, p + r0 * ld_p, ld_p, n,
                                                               r0 == 0 ? next : nullptr);
    }
  }
}

#if XSIMD_WITH_AVX512F
/// AVX-512 fold, first half: four vectors -> one whose 128-bit block b holds, in order, the
/// sums of block b of v0, v1, v2, v3 (pair sums by unpack, then quad sums by shuffle).
inline __m512 fold4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) noexcept {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  return _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
}
/// AVX-512 fold, second half: four fold4 results (of v[0..3], v[4..7], ...) -> lane i = Σ v[i].
inline __m512 fold_quads(__m512 u0, __m512 u1, __m512 u2, __m512 u3) noexcept {
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u2, u3, 0x88), _mm512_shuffle_f32x4(u2, u3, 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xDD));
}
#endif

#if XSIMD_WITH_AVX512F
/// Q·Kᵀ for one AVX-512 vector of 16 query rows with Q in quads (pack: quad_index): step t of
/// the dim loop holds 4 vectors, vector g lane 4b + e = Q[row 4b + g][4t + e]. Each key's dims
/// 4t..4t+3 are loaded once, broadcast to the four 128-bit blocks (one load, vbroadcastf32x4),
/// and feed 4 FMAs, one per vector g: per step Keys + 4 loads for 4·Keys FMAs, where the
/// broadcast kernels (mma_abt_phased) load once per FMA. Block b of key j's accumulator g
/// sums row 4b + g over the dims of each residue e; fold4 adds the four e's of the four g's
/// into one vector, lane 4b + g = S[j][4b + g]. A tail of dim % 4 dims is loaded masked
/// (a 512-bit masked load and a block shuffle: AVX512F alone, no VL).
/// s: (Keys, ld_s) key-major, aligned; k: Keys rows at stride ld_k; q: quad-packed, aligned.
template <int Keys>
inline void mma_abt_quads(float* s, std::ptrdiff_t ld_s, const float* k, std::ptrdiff_t ld_k, const float* q,
                          std::ptrdiff_t dim) noexcept {
  __m512 acc[Keys][4];
  HEADWISE_UNROLL
  for (int j = 0; j < Keys; ++j)
    HEADWISE_UNROLL
    for (int g = 0; g < 4; ++g) acc[j][g] = _mm512_setzero_ps();
  auto step = [&](std::ptrdiff_t t, auto load4) {
    __m512 qv[4];
    HEADWISE_UNROLL
    for (int g = 0; g < 4; ++g) qv[g] = _mm512_load_ps(q + (t * 4 + g) * 16);
    HEADWISE_UNROLL
    for (int j = 0; j < Keys; ++j) {
      const __m512 kb = load4(k + j * ld_k + 4 * t);
      HEADWISE_UNROLL
      for (int g = 0; g < 4; ++g) acc[j][g] = _mm512_fmadd_ps(kb, qv[g], acc[j][g]);
    }
  };
  const std::ptrdiff_t steps = dim / 4;
  for (std::ptrdiff_t t = 0; t < steps; ++t)
    step(t, [](const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); });
  if (const int tail = static_cast<int>(dim - steps * 4); tail > 0) {  // AVX512F only (no VL)
    const __mmask16 m = static_cast<__mmask16>((1u << tail) - 1u);
    step(steps, [m](const float* p) {
      const __m512 x = _mm512_maskz_loadu_ps(m, p);
      return _mm512_shuffle_f32x4(x, x, 0);
    });
  }
  HEADWISE_UNROLL
  for (int j = 0; j < Keys; ++j) _mm512_store_ps(s + j * ld_s, fold4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]));
}

/// Index of Q[row r][dim d] in the quad-packed Q of mma_abt_quads (16 rows, dims padded to 4).
constexpr std::ptrdiff_t quad_index(std::ptrdiff_t r, std::ptrdiff_t d) noexcept {
  return ((d / 4) * 4 + r % 4) * 16 + (r / 4) * 4 + d % 4;
}

/// S = Q·Kᵀ for n keys and one AVX-512 vector of rows, Q quad-packed (mma_abt_quads): blocks
/// of 6 keys (24 accumulators, 4 Q vectors, 1 key broadcast), the rest in one smaller block.
inline void qk_tile_quads(float* s, std::ptrdiff_t ld_s, const float* k, std::ptrdiff_t ld_k, const float* q,
                          std::ptrdiff_t dim, std::ptrdiff_t n) noexcept {
  using fn = void (*)(float*, std::ptrdiff_t, const float*, std::ptrdiff_t, const float*, std::ptrdiff_t) noexcept;
  static constexpr std::array<fn, 5> rest{&mma_abt_quads<1>, &mma_abt_quads<2>, &mma_abt_quads<3>,
                                          &mma_abt_quads<4>, &mma_abt_quads<5>};
  std::ptrdiff_t j = 0;
  for (; j + 6 <= n; j += 6) mma_abt_quads<6>(s + j * ld_s, ld_s, k + j * ld_k, ld_k, q, dim);
  if (j < n) rest[static_cast<std::size_t>(n - j - 1)](s + j * ld_s, ld_s, k + j * ld_k, ld_k, q, dim);
}
#endif

/// lanes vectors -> one vector of their horizontal sums (lane i = Σ v[i]): fold4/fold_quads on
/// AVX-512, xsimd's haddp where the arch has it, a lane-by-lane reduction elsewhere.
template <class Arch>
inline xsimd::batch<float, Arch> fold_lanes(const xsimd::batch<float, Arch>* v) noexcept {
  using B = xsimd::batch<float, Arch>;
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512_v<Arch>) {
    return fold_quads(fold4(v[0], v[1], v[2], v[3]), fold4(v[4], v[5], v[6], v[7]), fold4(v[8], v[9], v[10], v[11]),
                      fold4(v[12], v[13], v[14], v[15]));
  } else
#endif
  if constexpr (std::is_base_of_v<xsimd::avx, Arch> || std::is_base_of_v<xsimd::sse3, Arch>) {
    return xsimd::haddp(v);
  } else {
    alignas(64) float out[B::size];
    for (std::size_t i = 0; i < B::size; ++i) out[i] = xsimd::hadd(v[i]);
    return B::load_aligned(out);
  }
}

/// Key-lane S = Q·Kᵀ for Rows query rows and n <= lanes keys: S[r][j] = Σ_d Q[r][d]·K[j][d]
/// for j < n, 0 for n <= j < lanes. q: (Rows, ld_q) aligned, zero-padded to whole vectors past
/// dim; k[j]: key j's row in its storage dtype T, read in place (converted as loaded, never
/// transposed; any row order). Each (row, key) dot product accumulates along the row in one vector;
/// the lanes vectors of a row fold into one vector of S (fold_lanes). next (optional): rows
/// read after these (nullptr entries: none), prefetched into L2 as keys j are computed.
template <int Rows, class Arch, class T>
inline void qk_rows(float* s, std::ptrdiff_t ld_s, const float* q, std::ptrdiff_t ld_q, const void* const* k,
                    std::ptrdiff_t n, std::ptrdiff_t dim, const void* const* next) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr std::ptrdiff_t w = B::size;
  const std::ptrdiff_t full = dim / w * w;
  const int tail = static_cast<int>(dim - full);
  const std::ptrdiff_t row_bytes = dim * static_cast<std::ptrdiff_t>(sizeof(T));
  auto prefetch_next = [&](std::ptrdiff_t j) {
    if (next != nullptr && next[j] != nullptr) prefetch_l2(next[j], row_bytes);
  };
  // KU keys at a time: each Q vector is loaded once for all of them, Rows·KU accumulators.
  constexpr int KU = Rows <= 4 ? 4 : 2;
  // AVX-512 with 4-key blocks: each block's accumulators fold at once (fold4) into one vector
  // per row, instead of waiting in acc for the whole fold: 4 vectors per row to keep, not 16;
  // the same additions in the same order (fold_lanes), so the same S.
#if XSIMD_WITH_AVX512F
  constexpr bool quads = is_avx512_v<Arch> && KU == 4 && w == 16;
#else
  constexpr bool quads = false;
#endif
  B acc[Rows][quads ? 4 : w];
  std::ptrdiff_t j = 0;
  for (; j + KU <= n; j += KU) {
    reg_tile<Rows, KU, Arch> a;
    const T* kr[KU];
    HEADWISE_UNROLL
    for (int u = 0; u < KU; ++u) kr[u] = static_cast<const T*>(k[j + u]);
    for (int u = 0; u < KU; ++u) prefetch_next(j + u);
    HEADWISE_UNROLL
    for (int r = 0; r < Rows; ++r)
      HEADWISE_UNROLL
      for (int u = 0; u < KU; ++u) a.v[r][u] = B(0.0f);
    auto step = [&](std::ptrdiff_t c, auto load) {
      reg_vec<KU, Arch> x;
      HEADWISE_UNROLL
      for (int u = 0; u < KU; ++u) {
        x.v[u] = load(kr[u] + c);
        keep_in_register(x.v[u]);
      }
      HEADWISE_UNROLL
      for (int r = 0; r < Rows; ++r) {
        B qv = B::load_aligned(q + r * ld_q + c);
        keep_in_register(qv);
        HEADWISE_UNROLL
        for (int u = 0; u < KU; ++u) a.v[r][u] = tile::fma<Arch>(qv, x.v[u], a.v[r][u]);
      }
    };
    for (std::ptrdiff_t c = 0; c < full; c += w) step(c, [](const T* p) { return load_as_float<Arch>(p); });
    if (tail > 0) step(full, [tail](const T* p) { return load_as_float_partial<Arch>(p, tail); });
#if XSIMD_WITH_AVX512F
    if constexpr (quads) {
      HEADWISE_UNROLL
      for (int r = 0; r < Rows; ++r) acc[r][j / 4] = fold4(a.v[r][0], a.v[r][1], a.v[r][2], a.v[r][3]);
    } else
#endif
    {
      HEADWISE_UNROLL
      for (int r = 0; r < Rows; ++r)
        HEADWISE_UNROLL
        for (int u = 0; u < KU; ++u) acc[r][j + u] = a.v[r][u];
    }
  }
  B rest[Rows][quads ? 4 : 1];  // quads: the last, partial block's keys (zeros past n)
  if constexpr (quads) {
    for (int r = 0; r < Rows; ++r)
      for (int u = 0; u < 4; ++u) rest[r][u] = B(0.0f);
  } else {
    (void)rest;
  }
  const std::ptrdiff_t j_rest = j;
  for (; j < n; ++j) {
    reg_vec<Rows, Arch> a;
    HEADWISE_UNROLL
    for (int r = 0; r < Rows; ++r) a.v[r] = B(0.0f);
    const T* k0 = static_cast<const T*>(k[j]);
    prefetch_next(j);
    for (std::ptrdiff_t c = 0; c < full; c += w) {
      const B x0 = load_as_float<Arch>(k0 + c);
      HEADWISE_UNROLL
      for (int r = 0; r < Rows; ++r) a.v[r] = tile::fma<Arch>(B::load_aligned(q + r * ld_q + c), x0, a.v[r]);
    }
    if (tail > 0) {
      const B x0 = load_as_float_partial<Arch>(k0 + full, tail);
      HEADWISE_UNROLL
      for (int r = 0; r < Rows; ++r) a.v[r] = tile::fma<Arch>(B::load_aligned(q + r * ld_q + full), x0, a.v[r]);
    }
    HEADWISE_UNROLL
    for (int r = 0; r < Rows; ++r) {
      if constexpr (quads) {
        rest[r][j - j_rest] = a.v[r];
      } else {
        acc[r][j] = a.v[r];
      }
    }
  }
#if XSIMD_WITH_AVX512F
  if constexpr (quads) {
    std::ptrdiff_t q4 = j_rest / 4;
    if (j > j_rest) {
      HEADWISE_UNROLL
      for (int r = 0; r < Rows; ++r) acc[r][q4] = fold4(rest[r][0], rest[r][1], rest[r][2], rest[r][3]);
      ++q4;
    }
    for (; q4 < 4; ++q4)
      HEADWISE_UNROLL
      for (int r = 0; r < Rows; ++r) acc[r][q4] = B(0.0f);
    HEADWISE_UNROLL
    for (int r = 0; r < Rows; ++r)
      B(fold_quads(acc[r][0], acc[r][1], acc[r][2], acc[r][3])).store_aligned(s + r * ld_s);
  } else
#endif
  {
    for (; j < w; ++j)
      HEADWISE_UNROLL
      for (int r = 0; r < Rows; ++r) acc[r][j] = B(0.0f);
    HEADWISE_UNROLL
    for (int r = 0; r < Rows; ++r) fold_lanes<Arch>(acc[r]).store_aligned(s + r * ld_s);
  }
}

namespace detail {
using qk_rows_fn = void (*)(float*, std::ptrdiff_t, const float*, std::ptrdiff_t, const void* const*, std::ptrdiff_t,
                            std::ptrdiff_t, const void* const*) noexcept;
template <class Arch, class KT, std::size_t... I>
constexpr std::array<qk_rows_fn, sizeof...(I)> make_qk_rows(std::index_sequence<I...>) {
  return {&qk_rows<static_cast<int>(I) + 1, Arch, KT>...};
}
}  // namespace detail

/// Key-lane S = Q·Kᵀ over a whole tile: rows query rows x n keys, S (rows, ld_s) row-major with
/// keys n..round_up(n, lanes) set to 0; k[j] is key j's row in storage dtype KT, read in place;
/// next (optional, n entries): rows to prefetch into L2 (qk_rows), once.
template <class Arch, class KT>
inline void qk_tile_rows(float* s, std::ptrdiff_t ld_s, const float* q, std::ptrdiff_t ld_q, const void* const* k,
                         std::ptrdiff_t rows, std::ptrdiff_t n, std::ptrdiff_t dim,
                         const void* const* next = nullptr) noexcept {
  constexpr int R = arch_traits<Arch>::vregs >= 32 ? 8 : 4;  // accumulators: 2·R vectors
  constexpr std::ptrdiff_t w = arch_traits<Arch>::lanes;
  static constexpr auto table = detail::make_qk_rows<Arch, KT>(std::make_index_sequence<R>{});
  for (std::ptrdiff_t r0 = 0; r0 < rows; r0 += R) {
    const std::ptrdiff_t nr = std::min<std::ptrdiff_t>(R, rows - r0);
    for (std::ptrdiff_t j0 = 0; j0 < n; j0 += w)
      table[static_cast<std::size_t>(nr - 1)](s + r0 * ld_s + j0, ld_s, q + r0 * ld_q, ld_q, k + j0,
                                              std::min<std::ptrdiff_t>(w, n - j0), dim,
                                              r0 == 0 && next != nullptr ? next + j0 : nullptr);
  }
}

}  // namespace headwise::tile

HEADWISE_DIAGNOSTICS_POP
