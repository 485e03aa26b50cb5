// FOAM's fused CPU step without torch: the math, the readable and portable code, the bf16-moment tiles and the
// choice of instruction set. foam_cpu.cpp binds it to torch (tensors, threads); foam_simd.h holds the
// explicit-SIMD code. Nothing here allocates anything of parameter size.
//
// Layout: a folded tensor is `rows` rows of n columns; its moments are rows x K, K = ceil(n / B), the last
// block of a row ragged (averaged over its own entries) when B does not divide n. An unfolded tensor (1-D, or
// B = 1) is stepped as AdamW, element by element.
#pragma once

#include <c10/util/Half.h>  // the fp16 <-> fp32 conversions only

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// The explicit-SIMD paths need gcc's per-function target pragmas (clang and others get the portable code).
// FOAM_PORTABLE_ONLY builds as those do: the tests compile the configuration of ARM and clang builds with it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FOAM_PORTABLE_ONLY)
#define FOAM_HAVE_SIMD 1
#include <immintrin.h>
#else
#define FOAM_HAVE_SIMD 0
#endif

// The portable code is compiled once per instruction set. With the explicit-SIMD paths, as three entry points
// the chosen instruction set picks (Portable<S> below), so that lowering it (set_isa, FOAM_CPU_ISA) also runs the
// portable code a smaller CPU runs. Without them (clang on x86), gcc-style target_clones pick from the CPU alone.
// By feature, not by "arch=haswell": a resolver matches arch= names with __builtin_cpu_is, which no AMD CPU passes.
#define FOAM_TARGET_AVX512 __attribute__((target("avx512f")))
#define FOAM_TARGET_AVX2 __attribute__((target("avx2")))
#if !FOAM_HAVE_SIMD && defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FOAM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FOAM_CLONES
#endif
#define FOAM_INLINE inline __attribute__((always_inline))

namespace foam {
namespace {

// Parameter storage types: T is what is stored, C what the step computes in (fp64 for fp64 parameters, else
// fp32). Loads widen to C; stores round from C (bf16 round-to-nearest-even as c10::BFloat16, NaN -> 0x7FC0).
struct F32 {
  using T = float;
  using C = float;
  static FOAM_INLINE float load(float x) { return x; }
  static FOAM_INLINE float store(float x) { return x; }
};
struct F64 {
  using T = double;
  using C = double;
  static FOAM_INLINE double load(double x) { return x; }
  static FOAM_INLINE double store(double x) { return x; }
};
struct BF16 {
  using T = uint16_t;
  using C = float;
  static FOAM_INLINE float load(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static FOAM_INLINE uint16_t store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16;
    return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  }
};
// bf16 weights under weight_rounding="stochastic": loaded as BF16, so a kernel computes, lane for lane, what it
// computes for fp32 weights of the same values; stored only by stochastic_round (below), which needs each entry's
// index (Hyper::weight_index). There is no store(): a path that would round them to nearest does not compile.
struct StochasticBF16 {
  using T = uint16_t;
  using C = float;
  static FOAM_INLINE float load(uint16_t h) { return BF16::load(h); }
};
struct F16 {
  using T = uint16_t;
  using C = float;
  static FOAM_INLINE float load(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
  static FOAM_INLINE uint16_t store(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
};

// The step's constants in the compute type.
template <typename C>
struct Hyper {
  C decay;       // 1 - lr * weight_decay
  C beta2;
  C lerp_w;      // 1 - beta1, the weight of torch.lerp_
  C one_m_b2;    // 1 - beta2
  C rho, rho2;   // res_scale and its square
  C eps_bc2;     // eps * sqrt(1 - beta2^t): eps moved inside, so that one division suffices
  C step_c;      // -lr * scale / (1 - beta1^t) * sqrt(1 - beta2^t)
  bool mean_sq;  // g̃⁽²⁾ = blockmean(G⊙G) (else g̃⊙g̃)
  // StochasticBF16 weights only: the weights' rounding offset this step (rounding_offset(step, 2)), and the flat
  // index, in the parameter, of the first weight a call is given: entry (row, column) of a call's rows of n columns
  // is weight_index + row·n + column. A caller that hands a kernel part of a row as a tensor of its own moves it
  // (from_entry).
  uint32_t weight_offset = 0;
  int64_t weight_index = 0;
};

// h for a call given the weights from entry `offset` of the caller's own on.
template <typename C>
FOAM_INLINE Hyper<C> from_entry(const Hyper<C>& h, int64_t offset) {
  Hyper<C> moved = h;
  moved.weight_index += offset;
  return moved;
}

// torch.lerp's formula (aten/src/ATen/native/Lerp.h), so that the moments match the reference path.
template <typename C>
FOAM_INLINE C lerp(C self, C end, C w) {
  return std::abs(w) < C(0.5) ? self + w * (end - self) : end - (end - self) * (C(1) - w);
}

// Σx and Σx² of a block's cnt entries, each read as C through load (a storage type's S::load). Left to right in
// runs of kSumRun entries, as the SIMD code adds each lane, and the runs' sums added pairwise: the rounding error
// then grows with log(cnt), not with cnt (left to right, the mean of a block of 65536 equal fp32 values was off
// by 6e-4 relative). A block of up to kSumRun entries is added left to right.
constexpr int64_t kSumRun = 32;
constexpr int kMaxPairwiseDepth = 64;  // partial sums held at once: one per bit of the run count

template <typename C, typename X, typename Load>
FOAM_INLINE void sums_left_to_right(const X* __restrict x, int64_t cnt, const Load& load, C& s, C& q) {
  s = 0;
  q = 0;
  for (int64_t b = 0; b < cnt; ++b) {
    const C value = load(x[b]);
    s += value;
    q += value * value;
  }
}

// Pairwise without recursion (a call per run cost 6x the portable step at B = 64): run r's sums are merged with
// the partial sums of 1, 2, 4, ... runs before it, one per trailing one bit of r (a binary counter); the partials
// left at the end, at most one per bit of the run count, are added from the smallest.
template <typename C, typename Sums>
FOAM_INLINE void add_runs_pairwise(int64_t runs, const Sums& run_sums, C& s, C& q) {
  C partial_s[kMaxPairwiseDepth], partial_q[kMaxPairwiseDepth];
  int depth = 0;
  for (int64_t r = 0; r < runs; ++r) {
    C run_s, run_q;
    run_sums(r, run_s, run_q);
    for (int64_t k = r; k & 1; k >>= 1) {
      --depth;
      run_s = partial_s[depth] + run_s;
      run_q = partial_q[depth] + run_q;
    }
    partial_s[depth] = run_s;
    partial_q[depth] = run_q;
    ++depth;
  }
  s = partial_s[depth - 1];
  q = partial_q[depth - 1];
  for (int d = depth - 2; d >= 0; --d) {
    s = partial_s[d] + s;
    q = partial_q[d] + q;
  }
}

template <typename C, typename X, typename Load>
FOAM_INLINE void block_sums(const X* __restrict x, int64_t cnt, const Load& load, C& s, C& q) {
  if (cnt <= kSumRun) return sums_left_to_right(x, cnt, load, s, q);  // every block of B <= 32
  const auto run_sums = [&](int64_t r, C& run_s, C& run_q) {
    sums_left_to_right(x + r * kSumRun, std::min(kSumRun, cnt - r * kSumRun), load, run_s, run_q);
  };
  add_runs_pairwise((cnt + kSumRun - 1) / kSumRun, run_sums, s, q);
}

// ---------------------------------------------------------------------------------------------- readable path
// The reference for every other path in this file and in foam_simd.h, and what they use for row tails: the
// blocks of one row starting at column c0 (a multiple of B) up to n, each line a line of FOAM's algorithm box.
template <typename S>
FOAM_INLINE void fold_span(const typename S::T* __restrict gr, typename S::T* __restrict wr,
                           typename S::C* __restrict mr, typename S::C* __restrict vr, int64_t c0, int64_t n,
                           int64_t B, const Hyper<typename S::C>& h) {
  using C = typename S::C;
  for (int64_t c = c0; c < n; c += B) {
    const int64_t cnt = std::min(B, n - c);  // < B only for the ragged last block of a row
    C s, q;                                  // ΣG and ΣG⊙G over the block
    block_sums(gr + c, cnt, [](typename S::T x) { return S::load(x); }, s, q);
    const C cf = static_cast<C>(cnt);
    const C gm = s / cf;                          // g̃ = blockmean(G)
    const C g2 = h.mean_sq ? q / cf : gm * gm;    // g̃⁽²⁾
    const C mk = lerp(mr[c / B], gm, h.lerp_w);  // m̃ ← lerp(m̃, g̃, 1−β1)
    const C vk = vr[c / B] * h.beta2 + h.one_m_b2 * g2;  // ṽ ← β2 ṽ + (1−β2) g̃⁽²⁾
    mr[c / B] = mk;
    vr[c / B] = vk;
    for (int64_t b = 0; b < cnt; ++b) {
      // R = G − unfold(g̃), taken as 0 when ρ = 0 (ρ²·R⊙R would be 0·inf = NaN where R⊙R overflows).
      const C r = h.rho != 0 ? S::load(gr[c + b]) - gm : C(0);
      const C M = mk + h.rho * r;         // M = unfold(m̃) + ρR
      const C V = vk + h.rho2 * (r * r);  // V = unfold(ṽ) + ρ²R⊙R
      // W ← W(1−γλ) − γα M̂ / (√V̂ + ε), the bias corrections folded into step_c and eps_bc2.
      wr[c + b] = S::store(S::load(wr[c + b]) * h.decay + h.step_c * (M / (std::sqrt(V) + h.eps_bc2)));
    }
  }
}

// ---------------------------------------------------------------------------------------- stochastic rounding
// state_dtype="bfloat16": moments are stored in bf16 and stochastically rounded, exactly foam_hf.precision's
// store_moment; so are bf16 weights under weight_rounding="stochastic" (store_weight, salt 2). The dither of entry i
// (its flat index in the moment tensor, or in the parameter) is a counter hash of (i, step, salt):
// h = i·0x9E3779B1 + offset (mod 2^32), h ^= h >> 16, h *= 0x7FEB352D, h ^= h >> 15, dither = h & 0xFFFF, with
// offset = step·0x85EBCA77 + salt·0xC2B2AE3D; finite values become (bits(x) + dither) >> 16, non-finite ones
// round to nearest (NaN -> 0x7FC0). stochastic_round below is the readable and portable version (gcc vectorises
// it, poorly: ~3x slower than foam_simd.h's explicit AVX2 one on AMD Zen 1, ~3x slower than its AVX-512 one on
// AMD Zen 5).
FOAM_INLINE uint32_t rounding_offset(int64_t step, int64_t salt) {
  return static_cast<uint32_t>(step) * UINT32_C(0x85EBCA77) + static_cast<uint32_t>(salt) * UINT32_C(0xC2B2AE3D);
}

// `count` entries from flat index first_index on; count < 2^32 (the loop runs on 32-bit lanes). Inlined into the
// code of each instruction set; stochastic_round below is its out-of-line entry.
FOAM_INLINE void stochastic_round_run(const float* __restrict src, uint16_t* __restrict dst, int64_t count,
                                      int64_t first_index, uint32_t offset) {
  // i·0x9E3779B1 + offset (mod 2^32) advanced by addition from entry to entry: one multiply per entry fewer.
  uint32_t h_index = static_cast<uint32_t>(first_index) * UINT32_C(0x9E3779B1) + offset;
  const uint32_t n = static_cast<uint32_t>(count);
  for (uint32_t j = 0; j < n; ++j, h_index += UINT32_C(0x9E3779B1)) {
    uint32_t h = h_index;
    h ^= h >> 16;
    h *= UINT32_C(0x7FEB352D);
    h ^= h >> 15;
    uint32_t bits;
    std::memcpy(&bits, &src[j], sizeof(bits));
    const bool finite = (bits & UINT32_C(0x7F800000)) != UINT32_C(0x7F800000);
    const bool nan = (bits & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000);
    // ±inf keep their bits (the low half is zero); NaN becomes 0x7FC0, as BF16::store rounds it.
    const uint32_t rounded = nan ? UINT32_C(0x7FC00000) : (finite ? bits + (h & UINT32_C(0xFFFF)) : bits);
    dst[j] = static_cast<uint16_t>(rounded >> 16);
  }
}

FOAM_INLINE void widen_bf16_run(const uint16_t* __restrict src, float* __restrict dst, int64_t count) {
  for (int64_t j = 0; j < count; ++j) dst[j] = BF16::load(src[j]);
}

// The portable widening and rounding as functions (Bf16Ops of the portable instruction set, and the tests').
FOAM_CLONES void stochastic_round(const float* __restrict src, uint16_t* __restrict dst, int64_t count,
                                  int64_t first_index, uint32_t offset) {
  stochastic_round_run(src, dst, count, first_index, offset);
}
FOAM_CLONES void widen_bf16(const uint16_t* __restrict src, float* __restrict dst, int64_t count) {
  widen_bf16_run(src, dst, count);
}

// dst <- src rounded to bf16 as bf16 weights are stored (BF16::store: to nearest even, NaN -> 0x7FC0). Only
// the tests call it (round_bf16_nearest in foam_cpu.cpp), to hold each implementation's rounding to the rule.
void round_bf16_nearest(const float* __restrict src, uint16_t* __restrict dst, int64_t count) {
  for (int64_t j = 0; j < count; ++j) dst[j] = BF16::store(src[j]);
}

// The widening and the rounding of a run, per instruction set (Bf16Ops{widen_bf16, stochastic_round} here).
using WidenFn = void (*)(const uint16_t*, float*, int64_t);
using RoundFn = void (*)(const float*, uint16_t*, int64_t, int64_t, uint32_t);
struct Bf16Ops {
  WidenFn widen;
  RoundFn round;
};

// The portable widening and rounding, inlined into the caller: compiled for the caller's instruction set.
struct InlineBf16Ops {
  FOAM_INLINE void widen(const uint16_t* src, float* dst, int64_t count) const { widen_bf16_run(src, dst, count); }
  FOAM_INLINE void round(const float* src, uint16_t* dst, int64_t count, int64_t first_index, uint32_t offset) const {
    stochastic_round_run(src, dst, count, first_index, offset);
  }
};

// `len` StochasticBF16 weights at w (their gradient at g; `index` the flat index of w[0] in the call's tensor)
// through fp32 copies: G and W widened into `copies` (room for 2·len floats) by `ops`, `step(g32, w32)` steps the
// copies with the fp32 code, and the new W is stochastically rounded back. The path of the weights a kernel does
// not round in place: row tails, the portable code's AdamW runs and the SIMD code's widest blocks (which take the
// SIMD widening and rounding: the portable ones made a B=2048 step 1.1-1.4x slower on AMD Zen 4).
template <typename Step, typename Ops = InlineBf16Ops>
FOAM_INLINE void step_fp32_copies(const uint16_t* g, uint16_t* w, int64_t len, int64_t index, const Hyper<float>& h,
                                  float* copies, const Step& step, const Ops& ops = {}) {
  float* g32 = copies;
  float* w32 = copies + len;
  ops.widen(g, g32, len);
  ops.widen(w, w32, len);
  step(g32, w32);
  ops.round(w32, w, len, h.weight_index + index, h.weight_offset);
}

// The row tail of StochasticBF16 weights, columns [c0, n) of one row (c0 a multiple of B): fold_span over fp32
// copies; `index` is the flat index of gr[0] in the call's tensor. The kernels that round the rest of a row in
// place leave it its tail, which is under a vector, a chunk or a block of at most kStagedMax columns: the copies
// stay on the stack up to kRoundedTail columns.
constexpr int64_t kRoundedTail = 1024;
FOAM_INLINE void fold_span_rounded(const uint16_t* gr, uint16_t* wr, float* mr, float* vr, int64_t c0, int64_t n,
                                   int64_t B, const Hyper<float>& h, int64_t index) {
  const int64_t len = n - c0;
  float stack_copies[2 * kRoundedTail];
  std::vector<float> heap_copies(len > kRoundedTail ? 2 * len : 0);
  float* copies = len > kRoundedTail ? heap_copies.data() : stack_copies;
  step_fp32_copies(gr + c0, wr + c0, len, index + c0, h, copies, [&](const float* g32, float* w32) {
    fold_span<F32>(g32, w32, mr + c0 / B, vr + c0 / B, 0, len, B, h);  // c0 / B: the blocks are the row's
  });
}

// fold_span for any storage; StochasticBF16 through fold_span_rounded (`index` as there).
template <typename S>
FOAM_INLINE void fold_row_tail(const typename S::T* gr, typename S::T* wr, typename S::C* mr, typename S::C* vr,
                               int64_t c0, int64_t n, int64_t B, const Hyper<typename S::C>& h, int64_t index) {
  if constexpr (std::is_same_v<S, StochasticBF16>) fold_span_rounded(gr, wr, mr, vr, c0, n, B, h, index);
  else fold_span<S>(gr, wr, mr, vr, c0, n, B, h);
}

// ---------------------------------------------------------------------------------------------- portable path
// The same math in loops the compiler vectorises (the path without explicit SIMD: other architectures, x86
// without AVX2+FMA+F16C, fp64, and block sizes the SIMD code does not specialise).
constexpr int64_t kTile = 1024;  // columns per tile: a tile of G, W and its block values stay in L1

// s += x[0] + ... + x[BS-1] and q += x[0]² + ... + x[BS-1]², added left to right as fold_span adds them.
template <typename C, std::size_t... I>
FOAM_INLINE void unrolled_block_sums(const C* __restrict x, C& s, C& q, std::index_sequence<I...>) {
  ((s += x[I]), ...);
  ((q += x[I] * x[I]), ...);
}

// Rows [r0, r1) of a folded tensor whose block size BS is known at compile time (a power of two, so that
// g̃ = s / B is exactly s · (1/B)), with the second-moment mode known too. Each tile of whole blocks is two
// loops without a branch or a call in their bodies, both of which compilers vectorise: the first steps one
// block per iteration (BS interleaved loads, one lane per block: AArch64's ld2/ld4, x86's permutes) and keeps
// g̃, m̃ and ṽ of the tile's blocks; the second unfolds them over the tile's entries and updates W (for blocks of
// up to 8 entries outside the AVX-512 build, a loop that unfolds and a flat one that updates). The ragged last block
// of a row goes to fold_span.
template <typename S, int BS, bool MeanSq, bool WideVectors>
FOAM_INLINE void fold_rows_blocked(const typename S::T* __restrict g, typename S::T* __restrict w,
                                   typename S::C* __restrict m, typename S::C* __restrict v, int64_t r0, int64_t r1,
                                   int64_t n, const Hyper<typename S::C>& h) {
  static_assert(BS > 1 && (BS & (BS - 1)) == 0, "fold_rows_blocked: BS must be a power of two");
  using C = typename S::C;
  constexpr int64_t B = BS;
  constexpr int64_t kTileBlocks = kTile / B > 0 ? kTile / B : 1;
  constexpr C inv_b = C(1) / C(B);
  const int64_t K = (n + B - 1) / B;
  const int64_t whole = n / B;  // blocks of B entries; a ragged one follows when B does not divide n
  alignas(64) C g_mean[kTileBlocks], m_new[kTileBlocks], v_new[kTileBlocks];
  // Blocks of up to 8 entries, in the builds for 128- and 256-bit vectors (WideVectors: the AVX-512 build): the
  // block values are unfolded over the tile's entries first, so that the update is one flat loop. Read at k from an
  // inner loop of B entries, they kept gcc from vectorising it there. On AMD Zen 4, in cache, B = 2..8
  // (benchmarks/bench_kernel_compute.py --fp64): the SSE2 build's fp32 took 2.6-2.8 ns an entry, 1.0-1.3 unfolded;
  // fp64 4.1-4.2 ns, 2.7-2.8 unfolded; the AVX2 build's fp64 4.0-4.2 ns, 1.5-1.7 unfolded. The AVX-512 build
  // vectorises the inner loop (fp64 1.1-1.2 ns; unfolded, 1.3-1.6x that in a one-thread loop over a 1024² tensor),
  // and from B = 16 on every build does (unfolded, the SSE2 build's fp32 took 1.17x as long there).
  constexpr bool kUnfoldFirst = !WideVectors && B <= 8;
  alignas(64) C eg[kUnfoldFirst ? kTileBlocks * B : 1], em[kUnfoldFirst ? kTileBlocks * B : 1],
      ev[kUnfoldFirst ? kTileBlocks * B : 1];
  // 16-bit G and W go through tiles in the compute type (widened before the loops, W narrowed after them): loaded
  // and stored in the loops themselves, they kept gcc from vectorising those below B = 16 (~10x slower).
  // StochasticBF16 weights are narrowed by stochastic_round.
  constexpr bool kWiden = !std::is_same_v<typename S::T, C>;
  constexpr bool kStochastic = std::is_same_v<S, StochasticBF16>;
  alignas(64) C g_wide[kWiden ? kTileBlocks * B : 1], w_wide[kWiden ? kTileBlocks * B : 1];
  const C decay = h.decay, rho = h.rho, rho2 = h.rho2, eps_bc2 = h.eps_bc2, step_c = h.step_c;
  const C lerp_w = h.lerp_w, beta2 = h.beta2, one_m_b2 = h.one_m_b2;
  const bool lerp_from_self = std::abs(lerp_w) < C(0.5);  // lerp's branch, the same for every block
  const bool with_residual = rho != 0;                    // as fold_span: R is 0 when ρ = 0

  for (int64_t row = r0; row < r1; ++row) {
    const typename S::T* __restrict gr = g + row * n;
    typename S::T* __restrict wr = w + row * n;
    C* __restrict mr = m + row * K;
    C* __restrict vr = v + row * K;
    for (int64_t k0 = 0; k0 < whole; k0 += kTileBlocks) {
      const int64_t blocks = std::min(kTileBlocks, whole - k0);
      const typename S::T* __restrict gt = gr + k0 * B;
      typename S::T* __restrict wt = wr + k0 * B;
      C* __restrict mt = mr + k0;
      C* __restrict vt = vr + k0;
      const C* __restrict gc;  // the tile's G and W in the compute type
      C* __restrict wc;
      if constexpr (kWiden) {
        for (int64_t j = 0; j < blocks * B; ++j) g_wide[j] = S::load(gt[j]);
        for (int64_t j = 0; j < blocks * B; ++j) w_wide[j] = S::load(wt[j]);
        gc = g_wide;
        wc = w_wide;
      } else {
        gc = gt;
        wc = wt;
      }
      // g̃, g̃⁽²⁾ and the moments, a block per iteration.
      for (int64_t k = 0; k < blocks; ++k) {
        C s = 0, q = 0;
        unrolled_block_sums(gc + k * B, s, q, std::make_index_sequence<BS>{});
        const C gm = s * inv_b;                        // g̃ = blockmean(G)
        const C g2 = MeanSq ? q * inv_b : gm * gm;     // g̃⁽²⁾
        const C m_old = mt[k];                         // m̃ ← lerp(m̃, g̃, 1−β1), lerp's formula
        const C mk = lerp_from_self ? m_old + lerp_w * (gm - m_old) : gm - (gm - m_old) * (C(1) - lerp_w);
        const C vk = vt[k] * beta2 + one_m_b2 * g2;    // ṽ ← β2 ṽ + (1−β2) g̃⁽²⁾
        mt[k] = mk;
        vt[k] = vk;
        g_mean[k] = gm;
        m_new[k] = mk;
        v_new[k] = vk;
      }
      // R, M, V and the weight update of entry j of block k (its block values unfolded at j, or read at k).
      const auto update = [&](int64_t j, C gm, C mk, C vk) {
        const C residual = gc[j] - gm;                // R = G − unfold(g̃)
        const C r = with_residual ? residual : C(0);  // loaded either way: a select, not a branch
        const C M = mk + rho * r;                     // M = unfold(m̃) + ρR
        const C V = vk + rho2 * (r * r);              // V = unfold(ṽ) + ρ²R⊙R
        wc[j] = wc[j] * decay + step_c * (M / (std::sqrt(V) + eps_bc2));
      };
      if constexpr (kUnfoldFirst) {
        for (int64_t k = 0; k < blocks; ++k) {
          for (int64_t b = 0; b < B; ++b) {
            eg[k * B + b] = g_mean[k];
            em[k * B + b] = m_new[k];
            ev[k * B + b] = v_new[k];
          }
        }
        for (int64_t j = 0; j < blocks * B; ++j) update(j, eg[j], em[j], ev[j]);
      } else {
        for (int64_t k = 0; k < blocks; ++k) {
          for (int64_t b = 0; b < B; ++b) update(k * B + b, g_mean[k], m_new[k], v_new[k]);
        }
      }
      if constexpr (kStochastic) {
        stochastic_round_run(w_wide, wt, blocks * B, h.weight_index + row * n + k0 * B, h.weight_offset);
      } else if constexpr (kWiden) {
        for (int64_t j = 0; j < blocks * B; ++j) wt[j] = S::store(w_wide[j]);
      }
    }
    if (whole * B < n) fold_row_tail<S>(gr, wr, mr, vr, whole * B, n, B, h, row * n);
  }
}

// Rows [r0, r1) of a folded tensor with any block size B (a runtime value): tiles whose element loops the
// compiler vectorises, the per-block work in between left scalar.
template <typename S>
FOAM_INLINE void fold_rows_impl(const typename S::T* __restrict g, typename S::T* __restrict w,
                                typename S::C* __restrict m, typename S::C* __restrict v, int64_t r0, int64_t r1,
                                int64_t n, int64_t B, const Hyper<typename S::C>& h) {
  using C = typename S::C;
  constexpr bool kStochastic = std::is_same_v<S, StochasticBF16>;  // the new weights are rounded a tile at a time
  constexpr int64_t kBuffers = kStochastic ? 5 : 4;
  const int64_t K = (n + B - 1) / B;
  const int64_t tile_blocks = std::max<int64_t>(1, kTile / B);
  const int64_t T = std::min(tile_blocks * B, n);  // a tile never spans more than its row: B >= n is one block
  C stack_buf[kBuffers * kTile];
  std::vector<C> heap_buf;
  C* buf = stack_buf;
  if (T > kTile) {  // only when B > kTile and rows are longer than kTile: one block per tile
    heap_buf.resize(kBuffers * T);
    buf = heap_buf.data();
  }
  C* __restrict gf = buf;          // G of the tile, in the compute type
  C* __restrict eg = buf + T;      // unfold(g̃)
  C* __restrict em = buf + 2 * T;  // unfold(m̃)
  C* __restrict ev = buf + 3 * T;  // unfold(ṽ)
  C* __restrict nw = kStochastic ? buf + 4 * T : nullptr;  // StochasticBF16: the new weights, before rounding
  const C decay = h.decay, rho = h.rho, rho2 = h.rho2, eps_bc2 = h.eps_bc2, step_c = h.step_c;

  for (int64_t row = r0; row < r1; ++row) {
    const typename S::T* gr = g + row * n;
    typename S::T* wr = w + row * n;
    C* mr = m + row * K;
    C* vr = v + row * K;
    for (int64_t k0 = 0; k0 < K; k0 += tile_blocks) {
      const int64_t k1 = std::min(K, k0 + tile_blocks);
      const int64_t c0 = k0 * B;
      const int64_t len = std::min(n, k1 * B) - c0;
      for (int64_t j = 0; j < len; ++j) gf[j] = S::load(gr[c0 + j]);
      // g̃, g̃⁽²⁾, then the moments; broadcast back over the tile.
      for (int64_t kk = 0; kk < k1 - k0; ++kk) {
        const int64_t start = kk * B;
        const int64_t cnt = std::min(B, len - start);
        C s, q;
        block_sums(gf + start, cnt, [](C x) { return x; }, s, q);
        const C c = static_cast<C>(cnt);
        const C gm = s / c;
        const C g2 = h.mean_sq ? q / c : gm * gm;
        const C mk = lerp(mr[k0 + kk], gm, h.lerp_w);
        const C vk = vr[k0 + kk] * h.beta2 + h.one_m_b2 * g2;
        mr[k0 + kk] = mk;
        vr[k0 + kk] = vk;
        for (int64_t b = 0; b < cnt; ++b) {
          eg[start + b] = gm;
          em[start + b] = mk;
          ev[start + b] = vk;
        }
      }
      for (int64_t j = 0; j < len; ++j) {
        const C residual = gf[j] - eg[j];
        const C r = rho != 0 ? residual : C(0);  // as fold_span: R is 0 when ρ = 0
        const C M = em[j] + rho * r;
        const C V = ev[j] + rho2 * (r * r);
        const C new_w = S::load(wr[c0 + j]) * decay + step_c * (M / (std::sqrt(V) + eps_bc2));
        if constexpr (kStochastic) nw[j] = new_w;
        else wr[c0 + j] = S::store(new_w);
      }
      if constexpr (kStochastic) {
        stochastic_round_run(nw, wr + c0, len, h.weight_index + row * n + c0, h.weight_offset);
      }
    }
  }
}

template <typename S, int BS, bool WideVectors>
FOAM_INLINE void fold_rows_blocked_dispatch(const typename S::T* g, typename S::T* w, typename S::C* m,
                                            typename S::C* v, int64_t r0, int64_t r1, int64_t n,
                                            const Hyper<typename S::C>& h) {
  if (h.mean_sq) return fold_rows_blocked<S, BS, true, WideVectors>(g, w, m, v, r0, r1, n, h);
  return fold_rows_blocked<S, BS, false, WideVectors>(g, w, m, v, r0, r1, n, h);
}

// WideVectors: the AVX-512 build (fold_rows_blocked lays its loops out for the vector width).
template <typename S, bool WideVectors>
FOAM_INLINE void fold_rows_dispatch(const typename S::T* g, typename S::T* w, typename S::C* m, typename S::C* v,
                                    int64_t r0, int64_t r1, int64_t n, int64_t B, const Hyper<typename S::C>& h) {
  switch (B) {
    case 2: return fold_rows_blocked_dispatch<S, 2, WideVectors>(g, w, m, v, r0, r1, n, h);
    case 4: return fold_rows_blocked_dispatch<S, 4, WideVectors>(g, w, m, v, r0, r1, n, h);
    case 8: return fold_rows_blocked_dispatch<S, 8, WideVectors>(g, w, m, v, r0, r1, n, h);
    case 16: return fold_rows_blocked_dispatch<S, 16, WideVectors>(g, w, m, v, r0, r1, n, h);
    case 32: return fold_rows_blocked_dispatch<S, 32, WideVectors>(g, w, m, v, r0, r1, n, h);
    default: return fold_rows_impl<S>(g, w, m, v, r0, r1, n, B, h);
  }
}

// Unfolded tensors: AdamW on elements [i0, i1), op for op as torch's single-tensor AdamW (eps moved inside).
template <typename S>
FOAM_INLINE void adamw_impl(const typename S::T* __restrict g, typename S::T* __restrict w,
                            typename S::C* __restrict m, typename S::C* __restrict v, int64_t i0, int64_t i1,
                            const Hyper<typename S::C>& h) {
  using C = typename S::C;
  for (int64_t i = i0; i < i1; ++i) {
    const C x = S::load(g[i]);
    const C mi = lerp(m[i], x, h.lerp_w);
    const C vi = v[i] * h.beta2 + h.one_m_b2 * x * x;
    m[i] = mi;
    v[i] = vi;
    w[i] = S::store(S::load(w[i]) * h.decay + h.step_c * (mi / (std::sqrt(vi) + h.eps_bc2)));
  }
}

// adamw_impl for any storage; StochasticBF16 weights through fp32 copies of runs of at most kRoundedTail elements
// (the same values: AdamW is element-wise).
template <typename S>
FOAM_INLINE void adamw_entries(const typename S::T* g, typename S::T* w, typename S::C* m, typename S::C* v,
                               int64_t i0, int64_t i1, const Hyper<typename S::C>& h) {
  if constexpr (std::is_same_v<S, StochasticBF16>) {
    float copies[2 * kRoundedTail];
    for (int64_t first = i0; first < i1; first += kRoundedTail) {
      const int64_t count = std::min(i1 - first, kRoundedTail);
      step_fp32_copies(g + first, w + first, count, first, h, copies, [&](const float* g32, float* w32) {
        adamw_impl<F32>(g32, w32, m + first, v + first, 0, count, h);
      });
    }
  } else {
    adamw_impl<S>(g, w, m, v, i0, i1, h);
  }
}

template <typename S>
using FoldFn = void (*)(const typename S::T*, typename S::T*, typename S::C*, typename S::C*, int64_t, int64_t,
                        int64_t, int64_t, const Hyper<typename S::C>&);
template <typename S>
using AdamwFn = void (*)(const typename S::T*, typename S::T*, typename S::C*, typename S::C*, int64_t, int64_t,
                         const Hyper<typename S::C>&);

// The instruction sets, in the order a CPU gains them: Portable<S>'s entry points and current_isa() use them.
enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The entry points of the portable code, one per instruction set the explicit-SIMD code has (Portable<S>::fold[isa],
// ::adamw[isa]): a target attribute each, as target_clones would give them, but picked by the chosen instruction set
// (a template cannot carry target_clones; its body is inlined into each). kPortable's is the baseline build.
template <typename S>
struct Portable;
#define FOAM_PORTABLE_ENTRY(S, NAME, TARGET, WIDE)                                                                     \
  TARGET void fold_rows_##S##_##NAME(const S::T* g, S::T* w, S::C* m, S::C* v, int64_t r0, int64_t r1, int64_t n,      \
                                     int64_t B, const Hyper<S::C>& h) {                                                \
    fold_rows_dispatch<S, WIDE>(g, w, m, v, r0, r1, n, B, h);                                                          \
  }                                                                                                                    \
  TARGET void adamw_##S##_##NAME(const S::T* g, S::T* w, S::C* m, S::C* v, int64_t i0, int64_t i1,                     \
                                 const Hyper<S::C>& h) {                                                               \
    adamw_entries<S>(g, w, m, v, i0, i1, h);                                                                           \
  }
#if FOAM_HAVE_SIMD
#define FOAM_ENTRY(S)                                                                                                  \
  FOAM_PORTABLE_ENTRY(S, portable, , false)                                                                            \
  FOAM_PORTABLE_ENTRY(S, avx2, FOAM_TARGET_AVX2, false)                                                                \
  FOAM_PORTABLE_ENTRY(S, avx512, FOAM_TARGET_AVX512, true)                                                             \
  template <>                                                                                                          \
  struct Portable<S> {                                                                                                 \
    static constexpr FoldFn<S> fold[] = {fold_rows_##S##_portable, fold_rows_##S##_avx2, fold_rows_##S##_avx512};      \
    static constexpr AdamwFn<S> adamw[] = {adamw_##S##_portable, adamw_##S##_avx2, adamw_##S##_avx512};                \
  };
#else
#define FOAM_ENTRY(S)                                                                                                  \
  FOAM_PORTABLE_ENTRY(S, portable, FOAM_CLONES, false)                                                                 \
  template <>                                                                                                          \
  struct Portable<S> {                                                                                                 \
    static constexpr FoldFn<S> fold[] = {fold_rows_##S##_portable};                                                    \
    static constexpr AdamwFn<S> adamw[] = {adamw_##S##_portable};                                                      \
  };
#endif
FOAM_ENTRY(F32)
FOAM_ENTRY(BF16)
FOAM_ENTRY(F16)
FOAM_ENTRY(F64)
FOAM_ENTRY(StochasticBF16)
#undef FOAM_ENTRY
#undef FOAM_PORTABLE_ENTRY

// The fp32 kernels step bf16 moments through a tile of fp32 copies that stays in L1: widen a run of moments,
// step the columns they cover, round the run back. Memory traffic is that of stepping bf16 moments in place
// (2 + 2 bytes per moment entry), and nothing larger than the tile is allocated. AVX2's fold_chunk block sizes
// skip the tile (fold_bf16_fn): they widen and round the moments in the step's registers, 8 at a time, which
// took 0.90-0.92x the tile's time per entry with the AVX2 code on AMD Zen 5. (An earlier attempt measured
// slower than the tile on AMD Zen 1; it was not re-measured there.)
constexpr int64_t kMomentTile = 512;

struct RoundingOffsets {
  uint32_t exp_avg, exp_avg_sq;  // rounding_offset(step, 0) and rounding_offset(step, 1)
};

// Rows [r0, r1) of a folded tensor with bf16 moments in one pass, rounding them in the step's registers (AVX2's
// fold_chunk; bit for bit the tile's result).
template <typename S>
using FoldBf16Fn = void (*)(const typename S::T*, typename S::T*, uint16_t*, uint16_t*, int64_t, int64_t, int64_t,
                            int64_t, const Hyper<float>&, RoundingOffsets);

template <typename S>
void fold_rows_bf16_moments(FoldFn<S> fold, Bf16Ops ops, const typename S::T* g, typename S::T* w, uint16_t* m,
                            uint16_t* v, int64_t r0, int64_t r1, int64_t n, int64_t B, const Hyper<float>& h,
                            RoundingOffsets offsets) {
  const int64_t K = (n + B - 1) / B;
  float m_tile[kMomentTile], v_tile[kMomentTile];
  for (int64_t row = r0; row < r1; ++row) {
    for (int64_t k0 = 0; k0 < K; k0 += kMomentTile) {
      const int64_t count = std::min(K - k0, kMomentTile);
      const int64_t first = row * K + k0;  // flat index of the run's first moment entry
      const int64_t c0 = k0 * B;
      ops.widen(m + first, m_tile, count);
      ops.widen(v + first, v_tile, count);
      // The run's columns as a one-row tensor of their own: c0 is a multiple of B, so the blocks are the same.
      fold(g + row * n + c0, w + row * n + c0, m_tile, v_tile, 0, 1, std::min(n, (k0 + count) * B) - c0, B,
           from_entry(h, row * n + c0));
      ops.round(m_tile, m + first, count, first, offsets.exp_avg);
      ops.round(v_tile, v + first, count, first, offsets.exp_avg_sq);
    }
  }
}

template <typename S>
void adamw_bf16_moments(AdamwFn<S> adamw, Bf16Ops ops, const typename S::T* g, typename S::T* w, uint16_t* m,
                        uint16_t* v, int64_t i0, int64_t i1, const Hyper<float>& h, RoundingOffsets offsets) {
  float m_tile[kMomentTile], v_tile[kMomentTile];
  for (int64_t first = i0; first < i1; first += kMomentTile) {
    const int64_t count = std::min(i1 - first, kMomentTile);
    ops.widen(m + first, m_tile, count);
    ops.widen(v + first, v_tile, count);
    adamw(g + first, w + first, m_tile, v_tile, 0, count, from_entry(h, first));
    ops.round(m_tile, m + first, count, first, offsets.exp_avg);
    ops.round(v_tile, v + first, count, first, offsets.exp_avg_sq);
  }
}

// ------------------------------------------------------------------------------ stochastically rounded bf16 weights
// weight_rounding="stochastic" (foam_hf.precision.store_weight): the new weights of a bf16 tensor are rounded as bf16
// moments are (stochastic_round), with salt 2 and the dither of entry i a hash of its flat index in the parameter.
// They are stored as StochasticBF16: every kernel loads them as bf16 and computes what it computes for fp32 weights
// (the same sums in the same order), so that a step's new weights are exactly the rule's rounding of its fp32
// twin's. The kernels stage a run of new weights in fp32 (a tile, a batch of blocks or a block) and round the run
// (fold_rows_blocked, fold_rows_impl, adamw_entries; foam_simd.h's store_staged); their row tails go through fp32
// copies (fold_row_tail). The SIMD code's blocks wider than it stages go one block at a time through fp32 copies
// (below), stepped by the fp32 kernel. (The first version put every tensor through fp32 tiles: 1.5-1.8x the
// round-to-nearest step. Staged, it is 1.0-1.16x at B = 2..16 with AVX2 and AVX-512, and at B = 32 1.06-1.10x with
// AVX-512 (fold_pairwise_32 gives the fp32 code the pairs' sums) but 1.3x with AVX2, whose fp32 sums there are
// lane-wise (fold_wide), not pairs, on AMD Zen 4.)

// Rows [r0, r1) of a folded StochasticBF16 tensor whose blocks are wider than the SIMD code stages, a block at a
// time: G and W of the block widened into fp32 copies (8 bytes per column of a block, allocated once a call),
// stepped as a one-row tensor by `fold` (the fp32 kernel, whose values per block do not depend on the columns
// around it) and rounded back.
inline void fold_rows_rounded_weights(FoldFn<F32> fold, Bf16Ops ops, const uint16_t* g, uint16_t* w, float* m,
                                      float* v, int64_t r0, int64_t r1, int64_t n, int64_t B, const Hyper<float>& h) {
  const int64_t K = (n + B - 1) / B;
  std::vector<float> copies(2 * std::min(B, n));
  for (int64_t row = r0; row < r1; ++row) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t len = std::min(n, (k + 1) * B) - k * B;  // < B only for a ragged last block
      const int64_t first = row * n + k * B;                  // flat index of the block's first entry in the call
      const auto step = [&](const float* g32, float* w32) {
        fold(g32, w32, m + row * K + k, v + row * K + k, 0, 1, len, B, h);
      };
      step_fp32_copies(g + first, w + first, len, first, h, copies.data(), step, ops);
    }
  }
}

}  // namespace
}  // namespace foam

#if FOAM_HAVE_SIMD
// The explicit-SIMD code, once per instruction set (fp32 compute only).
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#define FOAM_SIMD_NS simd_avx512
#define FOAM_SIMD_LANES 16
#include "foam_simd.h"
#undef FOAM_SIMD_NS
#undef FOAM_SIMD_LANES
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FOAM_SIMD_NS simd_avx2
#define FOAM_SIMD_LANES 8
#include "foam_simd.h"
#undef FOAM_SIMD_NS
#undef FOAM_SIMD_LANES
#pragma GCC pop_options
#endif

namespace foam {
namespace {

// ------------------------------------------------------------------------------------------- instruction set
// Which implementation runs: the best the CPU (and the OS, for the AVX-512 state) supports, unless set_isa
// lowered it (tests and benchmarks run each path this way; FOAM_CPU_ISA does it from the environment).
const char* const kIsaNames[] = {"portable", "avx2", "avx512"};

int best_isa() {
#if FOAM_HAVE_SIMD
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f")) return kAvx512;
  if (avx2) return kAvx2;
#endif
  return kPortable;
}

std::atomic<int> g_isa{-1};

int current_isa() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = best_isa();
    g_isa.store(isa);
  }
  return isa;
}

// False when this CPU cannot run `name` (or no such implementation exists).
bool set_isa(const std::string& name) {
  for (int i = 0; i <= best_isa(); ++i) {
    if (name == kIsaNames[i]) {
      g_isa.store(i);
      return true;
    }
  }
  return false;
}

template <typename S>
FoldFn<S> fold_fn() {
  if constexpr (std::is_same_v<typename S::C, float>) {
    switch (current_isa()) {
#if FOAM_HAVE_SIMD
      case kAvx512: return simd_avx512::fold_rows<S>;
      case kAvx2: return simd_avx2::fold_rows<S>;
#endif
      default: break;
    }
  }
  return Portable<S>::fold[current_isa()];  // without the SIMD code current_isa() is kPortable, its one entry
}

// The one-pass fold with bf16 moments where this implementation has one for block size B, else nullptr (then
// fold_rows_bf16_moments's tile). Only AVX2's: on AVX-512 the tile measured as fast, on Zen 5.
template <typename S>
FoldBf16Fn<S> fold_bf16_fn(int64_t B) {
#if FOAM_HAVE_SIMD
  if constexpr (std::is_same_v<typename S::C, float>) {
    if (current_isa() == kAvx2 && simd_avx2::folds_bf16_in_registers<S>(B)) return simd_avx2::fold_rows_bf16<S>;
  }
#endif
  (void)B;
  return nullptr;
}

Bf16Ops bf16_ops() {
  switch (current_isa()) {
#if FOAM_HAVE_SIMD
    case kAvx512: return {simd_avx512::widen_bf16, simd_avx512::stochastic_round};
    case kAvx2: return {simd_avx2::widen_bf16, simd_avx2::stochastic_round};
#endif
    default: return {widen_bf16, stochastic_round};
  }
}

using RoundNearestFn = void (*)(const float*, uint16_t*, int64_t);
RoundNearestFn round_nearest_fn() {
  switch (current_isa()) {
#if FOAM_HAVE_SIMD
    case kAvx512: return simd_avx512::round_bf16_nearest;
    case kAvx2: return simd_avx2::round_bf16_nearest;
#endif
    default: return round_bf16_nearest;
  }
}

template <typename S>
AdamwFn<S> adamw_fn() {
  if constexpr (std::is_same_v<typename S::C, float>) {
    switch (current_isa()) {
#if FOAM_HAVE_SIMD
      case kAvx512: return simd_avx512::adamw<S>;
      case kAvx2: return simd_avx2::adamw<S>;
#endif
      default: break;
    }
  }
  return Portable<S>::adamw[current_isa()];
}

}  // namespace
}  // namespace foam
