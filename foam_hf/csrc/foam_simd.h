// Explicit SIMD for FOAM's fused CPU step, fp32 compute. Included twice by foam_kernel.h, inside a
// `#pragma GCC target` region, with FOAM_SIMD_NS and FOAM_SIMD_LANES set: AVX-512 (16 lanes) and AVX2 (8).
// The math is that of fold_span / adamw_impl (foam_kernel.h), one vector at a time; row tails go to fold_span
// (fold_row_tail).
//
// Two ways to find the block means:
//  * in-register butterflies (fold_small, B = 2, 4, 8 and 16 with AVX-512, and 32: bf16's pairs of vectors
//    hold a block of 32 in 16 lanes, and fp32 weights are permuted into that order, fold_pairwise_32): one vector
//    holds whole blocks,
//    every lane ends up holding its block's sum (the sum and its unfold in one), the moments are loaded
//    expanded (lane i gets m̃[i / B]) and stored compacted. Cheap where lane-crossing permutes are (Intel, and
//    AMD Zen 4/5 at 512 bits).
//  * across vectors (fold_chunk, AVX2 only, B = 2, 4, 8, 16, and 32 for bf16): 8 blocks at a time, horizontal
//    adds leave the 8 block sums in one vector, the moments are updated a whole vector at a time and unfolded
//    by in-lane shuffles or broadcasts. AMD Zen (1 and 2) splits 256-bit lane-crossing permutes (vpermps,
//    vperm2f128) into several micro-ops, and the butterfly path needs 4 of them per 8 columns at B = 4 and 8
//    (there, B = 8 ran slower than B = 4).
// For other B that are multiples of the lane count, fold_wide: a block is a run of vectors, one horizontal
// reduction and a scalar moment update per block.
// bf16 parameters are loaded and stored two vectors at a time (PairBf16), in an order that never crosses
// 128-bit lanes; the block sums and the moments' order follow it. bf16 moments (state_dtype="bfloat16") go
// through an fp32 tile (foam_kernel.h), except in fold_chunk, which widens and rounds them in its registers.
// bf16 weights under weight_rounding="stochastic" (StochasticBF16) must get the fp32 code's sums: they take the
// pairs where those add the same columns in the same order (B = 2..32 with AVX-512, 2..8 with AVX2), the fp32
// code's lane-wise layout elsewhere, and always stage their new weights for stochastic_round(_pairs).

namespace foam {
namespace {
namespace FOAM_SIMD_NS {

// This instruction set, whose build of the portable code the block sizes without SIMD code take.
constexpr Isa kThisIsa = FOAM_SIMD_LANES == 16 ? kAvx512 : kAvx2;

// Defined with the rest of the bf16 rounding, below.
void stochastic_round(const float* __restrict src, uint16_t* __restrict dst, int64_t count, int64_t first_index,
                      uint32_t offset);
void stochastic_round_pairs(const float* __restrict staged, uint16_t* __restrict dst, int64_t count,
                            int64_t first_index, uint32_t offset);
void widen_bf16(const uint16_t* __restrict src, float* __restrict dst, int64_t count);

#if FOAM_SIMD_LANES == 16
struct V {
  using vec = __m512;
  static constexpr int N = 16;
  static FOAM_INLINE vec load(const float* p) { return _mm512_loadu_ps(p); }
  static FOAM_INLINE void store(float* p, vec x) { _mm512_storeu_ps(p, x); }
  static FOAM_INLINE vec set1(float x) { return _mm512_set1_ps(x); }
  static FOAM_INLINE vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static FOAM_INLINE vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static FOAM_INLINE vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static FOAM_INLINE vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }  // a·b + c, one rounding
  static FOAM_INLINE vec fnma(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c − a·b, likewise
  static FOAM_INLINE vec div(vec a, vec b) { return _mm512_div_ps(a, b); }
  static FOAM_INLINE vec sqrt(vec a) { return _mm512_sqrt_ps(a); }
  static FOAM_INLINE vec bit_and(vec a, vec mask) {  // AVX-512F has no float and: through the integer one
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_castps_si512(mask)));
  }
  static FOAM_INLINE float reduce(vec a) { return _mm512_reduce_add_ps(a); }
  // Every lane gets the sum of its aligned group of B lanes (B = 1, 2, 4, 8, 16): butterflies, so the lanes
  // of a group hold bit-identical sums (a + b == b + a). This is the block sum and its unfold in one.
  template <int B>
  static FOAM_INLINE vec group_sum(vec x) {
    if (B >= 2) x = add(x, _mm512_permute_ps(x, 0xB1));         // lanes [1,0,3,2] in each 128-bit quarter
    if (B >= 4) x = add(x, _mm512_permute_ps(x, 0x4E));         // lanes [2,3,0,1] in each quarter
    if (B >= 8) x = add(x, _mm512_shuffle_f32x4(x, x, 0xB1));   // quarters [1,0,3,2]
    if (B >= 16) x = add(x, _mm512_shuffle_f32x4(x, x, 0x4E));  // quarters [2,3,0,1]
    return x;
  }
  // Lane i gets p[i / B], B = 2^L (reads exactly N / B floats): unfold of a run of folded moments. Loads and stores of
  // the moments have their exact width, never a masked 512-bit access: a masked store followed by a masked load
  // of the next, disjoint moments blocks store forwarding and cost ~40% of the B = 4 step.
  template <int L>  // L = log2(B)
  static FOAM_INLINE vec expand(const float* p) {
    constexpr int count = N >> L;
    if (count == 1) return _mm512_set1_ps(*p);
    if (count == 16) return _mm512_loadu_ps(p);  // L = 0: one block per lane
    __m512 x;
    if (count == 8) x = _mm512_castps256_ps512(_mm256_loadu_ps(p));
    else if (count == 4) x = _mm512_castps128_ps512(_mm_loadu_ps(p));
    else x = _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_permutexvar_ps(_mm512_srli_epi32(iota, L), x);
  }
  // p[i] = x[i * B] for i < N / B: the fold of lanes that expand() produced (writes exactly N / B floats).
  template <int L>
  static FOAM_INLINE void compact_store(float* p, vec x) {
    constexpr int count = N >> L;
    if (count == 1) {
      _mm_store_ss(p, _mm512_castps512_ps128(x));
      return;
    }
    if (count == 16) return _mm512_storeu_ps(p, x);  // L = 0
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 y = _mm512_permutexvar_ps(_mm512_slli_epi32(iota, L), x);
    if (count == 8) _mm256_storeu_ps(p, _mm512_castps512_ps256(y));
    else if (count == 4) _mm_storeu_ps(p, _mm512_castps512_ps128(y));
    else _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_castps_si128(_mm512_castps512_ps128(y)));
  }
};
// Storage conversions, as F32/BF16/F16::load/store lane-wise.
template <typename S>
struct Ld;
template <>
struct Ld<F32> {
  static FOAM_INLINE __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static FOAM_INLINE void store(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
};
template <>
struct Ld<BF16> {
  static FOAM_INLINE __m512 load(const uint16_t* p) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  // Each lane rounded to bf16 as BF16::store (to nearest even, NaN -> 0x7FC0), its bits in the upper 16 bits of
  // the lane (the lower 16 are not cleared): rounded_high. The one rounding rule of this file's bf16 stores, in
  // two parts, so that a store of several vectors can test them for NaN at once and skip the fix-up, which is
  // ~6% of the AVX2 bf16 step, when there is none (nearly always): rounded_high_finite (right for every value
  // but NaN, which it may turn into anything) and nan_fixed (NaN lanes of x get 0x7FC0).
  static FOAM_INLINE __m512i rounded_high_finite(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  }
  static FOAM_INLINE __m512i nan_fixed(__m512 x, __m512i r) {
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  }
  static FOAM_INLINE __m512i rounded_high(__m512 x) { return nan_fixed(x, rounded_high_finite(x)); }
  static FOAM_INLINE void store(uint16_t* p, __m512 x) {
    const __m512i r = _mm512_srli_epi32(rounded_high(x), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
};
template <>
struct Ld<F16> {  // the hardware conversions (round to nearest even, as c10's)
  static FOAM_INLINE __m512 load(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static FOAM_INLINE void store(uint16_t* p, __m512 x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
};
// bf16 parameters two vectors at a time (32 columns), split by the parity of their columns: each 32-bit lane of
// a load holds two adjacent columns, so a shift widens the even one into an fp32 lane (even) and a mask the odd
// one (odd); narrowing is the same two steps back and one bitwise select. No shuffle, nothing crosses a lane.
// Lane k of even + odd holds columns 2k and 2k + 1, so a block of B columns is B/2 adjacent lanes of that sum,
// and both vectors unfold the same block values. Lane-wise loads and stores (Ld<BF16>) take a cross-lane
// widening or narrowing each: on AMD Zen 5 those cost the bf16 step ~25%. Rounding: Ld<BF16>::rounded_high.
struct PairBf16 {
  static FOAM_INLINE void load(const uint16_t* p, __m512& even, __m512& odd) {
    const __m512i x = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static FOAM_INLINE void store(uint16_t* p, __m512 even, __m512 odd) {
    // 0xD8: bitwise "mask ? odd's bits : even's bits shifted down", the mask holding each lane's upper half.
    const __m512i upper = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m512i hi_even = Ld<BF16>::rounded_high_finite(even), hi_odd = Ld<BF16>::rounded_high_finite(odd);
    if (__builtin_expect(_mm512_cmp_ps_mask(even, odd, _CMP_UNORD_Q) != 0, 0)) {  // a NaN in either
      hi_even = Ld<BF16>::nan_fixed(even, hi_even);
      hi_odd = Ld<BF16>::nan_fixed(odd, hi_odd);
    }
    _mm512_storeu_si512(p, _mm512_ternarylogic_epi32(_mm512_srli_epi32(hi_even, 16), hi_odd, upper, 0xD8));
  }
};
#else
struct V {
  using vec = __m256;
  static constexpr int N = 8;
  static FOAM_INLINE vec load(const float* p) { return _mm256_loadu_ps(p); }
  static FOAM_INLINE void store(float* p, vec x) { _mm256_storeu_ps(p, x); }
  static FOAM_INLINE vec set1(float x) { return _mm256_set1_ps(x); }
  static FOAM_INLINE vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static FOAM_INLINE vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static FOAM_INLINE vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static FOAM_INLINE vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }  // a·b + c, one rounding
  static FOAM_INLINE vec fnma(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }  // c − a·b, likewise
  static FOAM_INLINE vec div(vec a, vec b) { return _mm256_div_ps(a, b); }
  static FOAM_INLINE vec sqrt(vec a) { return _mm256_sqrt_ps(a); }
  static FOAM_INLINE vec bit_and(vec a, vec mask) { return _mm256_and_ps(a, mask); }
  static FOAM_INLINE float reduce(vec a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  template <int B>  // as the AVX-512 version, B = 2, 4, 8
  static FOAM_INLINE vec group_sum(vec x) {
    if (B >= 2) x = add(x, _mm256_permute_ps(x, 0xB1));
    if (B >= 4) x = add(x, _mm256_permute_ps(x, 0x4E));
    if (B >= 8) x = add(x, _mm256_permute2f128_ps(x, x, 0x01));
    return x;
  }
  template <int L>
  static FOAM_INLINE vec expand(const float* p) {
    constexpr int count = N >> L;
    __m128 x;
    if (count == 4) x = _mm_loadu_ps(p);
    else if (count == 2) x = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    else x = _mm_load_ss(p);
    const __m256i iota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(x), _mm256_srli_epi32(iota, L));
  }
  template <int L>
  static FOAM_INLINE void compact_store(float* p, vec x) {
    constexpr int count = N >> L;
    const __m256i iota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m128 y = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(x, _mm256_slli_epi32(iota, L)));
    if (count == 4) _mm_storeu_ps(p, y);
    else if (count == 2) _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_castps_si128(y));
    else _mm_store_ss(p, y);
  }
};
template <typename S>
struct Ld;
template <>
struct Ld<F32> {
  static FOAM_INLINE __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static FOAM_INLINE void store(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
};
template <>
struct Ld<BF16> {
  static FOAM_INLINE __m256 load(const uint16_t* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  // As the AVX-512 version: each lane rounded as BF16::store, its bits in the upper 16 bits of the lane.
  static FOAM_INLINE __m256i rounded_high_finite(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
  }
  static FOAM_INLINE __m256i nan_fixed(__m256 x, __m256i r) {
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan);
  }
  static FOAM_INLINE __m256i rounded_high(__m256 x) { return nan_fixed(x, rounded_high_finite(x)); }
  static FOAM_INLINE void store(uint16_t* p, __m256 x) {
    const __m256i r = _mm256_srli_epi32(rounded_high(x), 16);
    // 8 x u32 (each < 2^16) -> 8 x u16: pack within 128-bit halves (in-lane, cheap), store the two halves.
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
};
template <>
struct Ld<F16> {
  static FOAM_INLINE __m256 load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static FOAM_INLINE void store(uint16_t* p, __m256 x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
};
// bf16 parameters two vectors at a time (16 columns), split by the parity of their columns; see the AVX-512
// version.
struct PairBf16 {
  static FOAM_INLINE void load(const uint16_t* p, __m256& even, __m256& odd) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static FOAM_INLINE void store(uint16_t* p, __m256 even, __m256 odd) {
    // 16-bit words: the even columns' from the lower halves, the odd ones' from the upper halves (0xAA).
    __m256i hi_even = Ld<BF16>::rounded_high_finite(even), hi_odd = Ld<BF16>::rounded_high_finite(odd);
    if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(even, odd, _CMP_UNORD_Q)) != 0, 0)) {  // a NaN in either
      hi_even = Ld<BF16>::nan_fixed(even, hi_even);
      hi_odd = Ld<BF16>::nan_fixed(odd, hi_odd);
    }
    const __m256i words = _mm256_blend_epi16(_mm256_srli_epi32(hi_even, 16), hi_odd, 0xAA);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), words);
  }
};
#endif
template <>
struct Ld<StochasticBF16> {  // loaded as bf16; stored by store_staged only (stochastic_round needs the indices)
  static FOAM_INLINE auto load(const uint16_t* p) { return Ld<BF16>::load(p); }
};
using vec = V::vec;

// Software prefetch of the streams a loop walks, kPrefetchBytes ahead of the current vector. One core here
// draws far less bandwidth than it could from the hardware prefetchers alone on FOAM's two-and-a-half streams
// (G and W read, W written; the moments are B times smaller): with this hint a step took ~0.6x the time it
// took without on the 8 x 1024x1024 benchmark on an AVX-512 Xeon (docs/benchmarks.md), where the arithmetic
// is not the limit. Prefetches never fault, so running past the end of a tensor is harmless.
constexpr int64_t kPrefetchBytes = 4096;
template <typename T>
FOAM_INLINE void prefetch_ahead(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// A float whose bits are all ones when the residual enters the step (ρ ≠ 0), else +0.0.
FOAM_INLINE float residual_mask_bits(float rho) {
  const uint32_t bits = rho != 0.0f ? UINT32_C(0xFFFFFFFF) : 0;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The step's constants, broadcast.
struct VHyper {
  vec decay, rho, rho2, eps_bc2, step_c, beta2, one_m_b2, lerp_w, one_m_lerp_w;
  vec residual_mask;  // all bits set, or none when ρ = 0 (then R is taken as 0, as the readable path skips it)
  bool small_w, mean_sq;
  explicit VHyper(const Hyper<float>& h)
      : decay(V::set1(h.decay)), rho(V::set1(h.rho)), rho2(V::set1(h.rho2)), eps_bc2(V::set1(h.eps_bc2)),
        step_c(V::set1(h.step_c)), beta2(V::set1(h.beta2)), one_m_b2(V::set1(h.one_m_b2)),
        lerp_w(V::set1(h.lerp_w)), one_m_lerp_w(V::set1(1.0f - h.lerp_w)),
        residual_mask(V::set1(residual_mask_bits(h.rho))), small_w(std::abs(h.lerp_w) < 0.5f),
        mean_sq(h.mean_sq) {}
};

// lerp(self, end, w) as torch computes it; the branch on w is loop-invariant.
FOAM_INLINE vec lerp_v(vec self, vec end, const VHyper& c) {
  const vec d = V::sub(end, self);
  return c.small_w ? V::fma(c.lerp_w, d, self) : V::fnma(d, c.one_m_lerp_w, end);
}

// W(1−γλ) − γα M̂ / (√V̂ + ε) with R = G − g̃, M = m̃ + ρR, V = ṽ + ρ²R⊙R (all unfolded, lane-wise). With ρ = 0, R
// is masked to 0: ρ²·(R⊙R) would be 0·inf = NaN where R⊙R overflows, and the readable path adds no residual.
FOAM_INLINE vec new_weight(vec g, vec gm, vec mk, vec vk, vec w, const VHyper& c) {
  const vec r = V::bit_and(V::sub(g, gm), c.residual_mask);
  const vec M = V::fma(c.rho, r, mk);
  const vec Vv = V::fma(c.rho2, V::mul(r, r), vk);
  // The exact square root and division: replacing them by the hardware estimates refined by a Newton step made
  // the AVX2 step slower, not faster, on AMD Zen 1 (their extra multiplies compete for the same two pipes).
  return V::fma(w, c.decay, V::mul(c.step_c, V::div(M, V::add(V::sqrt(Vv), c.eps_bc2))));
}

// Staged stores of 16-bit weights. Rounding a new weight right after its square root and division queues the
// rounding's integer ops behind them, where they hold the scheduler entries the next updates need: the AVX2
// bf16 step ran at 1.3x its fp32 step so, and at ~1.1x when the loops first write the new weights of a batch of
// kStagedColumns in fp32 (to a buffer in L1) and store_staged then rounds and stores the batch.
constexpr int64_t kStagedColumns = 256;
constexpr int64_t kStagedMax = 1024;  // columns: the widest batch fold_wide_span stages (one block of that size)
// Rounds and stores `count` new weights at w from `staged`, in the order the first loop wrote them: for pairs
// (PairBf16) each pair's even then odd vector, else lane-wise. StochasticBF16 weights are stochastically rounded,
// `index` being the flat index of w[0] in the call's tensor.
template <typename S, bool kPairs>
FOAM_INLINE void store_staged(typename S::T* w, const float* staged, int64_t count, const Hyper<float>& h,
                              int64_t index) {
  if constexpr (std::is_same_v<S, StochasticBF16>) {
    if constexpr (kPairs) stochastic_round_pairs(staged, w, count, h.weight_index + index, h.weight_offset);
    else stochastic_round(staged, w, count, h.weight_index + index, h.weight_offset);
  } else if constexpr (kPairs) {
    for (int64_t j = 0; j < count; j += 2 * V::N) {
      PairBf16::store(w + j, V::load(staged + j), V::load(staged + j + V::N));
    }
  } else {
    for (int64_t j = 0; j < count; j += V::N) Ld<S>::store(w + j, V::load(staged + j));
  }
}

// B = 2^L divides the lane count: each vector holds N / B whole blocks.
template <typename S, int L>
void fold_small(const typename S::T* g, typename S::T* w, float* m, float* v, int64_t r0, int64_t r1, int64_t n,
                const Hyper<float>& h) {
  constexpr int64_t B = int64_t{1} << L;
  const int64_t K = (n + B - 1) / B;
  const int64_t nv = n / V::N * V::N;  // columns in whole vectors; the rest (and any ragged block) is the tail
  const VHyper c(h);
  const vec inv_b = V::set1(1.0f / static_cast<float>(B));  // exact: B is a power of two
  for (int64_t row = r0; row < r1; ++row) {
    const typename S::T* gr = g + row * n;
    typename S::T* wr = w + row * n;
    float* mr = m + row * K;
    float* vr = v + row * K;
    for (int64_t j = 0; j < nv; j += V::N) {
      prefetch_ahead(gr + j);
      prefetch_ahead(wr + j);
      const vec x = Ld<S>::load(gr + j);
      const vec gm = V::mul(V::template group_sum<B>(x), inv_b);  // unfold(g̃)
      const vec g2 = c.mean_sq ? V::mul(V::template group_sum<B>(V::mul(x, x)), inv_b) : V::mul(gm, gm);
      const vec mk = lerp_v(V::template expand<L>(mr + j / B), gm, c);  // unfold(m̃ ← lerp(m̃, g̃, 1−β1))
      const vec vk = V::fma(V::template expand<L>(vr + j / B), c.beta2, V::mul(c.one_m_b2, g2));
      V::template compact_store<L>(mr + j / B, mk);
      V::template compact_store<L>(vr + j / B, vk);
      Ld<S>::store(wr + j, new_weight(x, gm, mk, vk, Ld<S>::load(wr + j), c));
    }
    fold_span<S>(gr, wr, mr, vr, nv, n, B, h);
  }
}

#if FOAM_SIMD_LANES == 16
// The block values of a PairBf16-ordered pair (xe: a run of 2N columns' even ones, xo: its odd ones), B = 2^L: g̃
// unfolded over the pair's lanes (each block in B/2 adjacent lanes), and m̃, ṽ updated at mj, vj and unfolded.
// fold_small_pairs and its fp32 twin at B = 32, fold_pairwise_32, both call it: one piece of code, the same bits.
template <int L>
FOAM_INLINE void pair_block_values(vec xe, vec xo, float* mj, float* vj, const VHyper& c, vec inv_b, vec& gm, vec& mk,
                                   vec& vk) {
  constexpr int H = 1 << (L - 1);  // lanes per block in even + odd
  gm = V::mul(V::template group_sum<H>(V::add(xe, xo)), inv_b);  // unfold(g̃), in pair columns
  const vec squares = V::add(V::mul(xe, xe), V::mul(xo, xo));  // each rounded, as fold_small's (no FMA)
  const vec g2 = c.mean_sq ? V::mul(V::template group_sum<H>(squares), inv_b) : V::mul(gm, gm);
  mk = lerp_v(V::template expand<L - 1>(mj), gm, c);  // unfold(m̃ ← lerp(m̃, g̃, 1−β1))
  vk = V::fma(V::template expand<L - 1>(vj), c.beta2, V::mul(c.one_m_b2, g2));
  V::template compact_store<L - 1>(mj, mk);
  V::template compact_store<L - 1>(vj, vk);
}

// fp32 weights at B = 32, two vectors a block, with the sums fold_small_pairs takes for bf16 weights at B = 32:
// the block's even and odd columns (two permutes) added lane-wise, each square rounded, then the butterflies of
// 16 lanes. So StochasticBF16 weights take fold_small_pairs at B = 32 with this as their fp32 twin, and stage
// their new weights as pairs (fold_wide's lane-wise layout took 1.4x the time of rounding to nearest there).
void fold_pairwise_32(const float* g, float* w, float* m, float* v, int64_t r0, int64_t r1, int64_t n,
                      const Hyper<float>& h) {
  constexpr int64_t B = 32;
  const int64_t K = (n + B - 1) / B;
  const int64_t nb = n / B * B;  // columns in whole blocks; the rest (a ragged block) is the tail
  const VHyper c(h);
  const vec inv_b = V::set1(1.0f / static_cast<float>(B));
  const __m512i even_columns = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd_columns = _mm512_add_epi32(even_columns, _mm512_set1_epi32(1));
  for (int64_t row = r0; row < r1; ++row) {
    const float* gr = g + row * n;
    float* wr = w + row * n;
    float* mr = m + row * K;
    float* vr = v + row * K;
    for (int64_t j = 0; j < nb; j += B) {
      prefetch_ahead(gr + j);
      prefetch_ahead(wr + j);
      prefetch_ahead(gr + j + V::N);
      prefetch_ahead(wr + j + V::N);
      const vec x0 = V::load(gr + j), x1 = V::load(gr + j + V::N);
      const vec xe = _mm512_permutex2var_ps(x0, even_columns, x1), xo = _mm512_permutex2var_ps(x0, odd_columns, x1);
      vec gm, mk, vk;  // one block: every lane holds its values
      pair_block_values<5>(xe, xo, mr + j / B, vr + j / B, c, inv_b, gm, mk, vk);
      V::store(wr + j, new_weight(x0, gm, mk, vk, V::load(wr + j), c));
      V::store(wr + j + V::N, new_weight(x1, gm, mk, vk, V::load(wr + j + V::N), c));
    }
    fold_span<F32>(gr, wr, mr, vr, nb, n, B, h);
  }
}

// fold_small for bf16 parameters, a PairBf16 (32 columns) at a time: even + odd holds each block in B/2 adjacent
// lanes, so its sums and moments are fold_small's at B/2 over that vector, and both halves of the pair unfold
// the same g̃, m̃ and ṽ. The new weights of a batch of pairs are staged (store_staged): 0.80-0.86x the time of
// rounding each pair as it is computed. B = 2 .. 32
// (a block of 32 is one pair: 16 lanes of even + odd); at B = 32 this took 0.72x fold_wide's time.
// The sums are those of the fp32 code (fold_small up to B = 16, fold_pairwise_32 at 32): the butterflies add the
// same pairs of columns in the same order, and each square is rounded before it is added, as there (an FMA would
// differ only where a bf16 value's square, exact in fp32 otherwise, under- or overflows). So S = StochasticBF16
// takes this code at every B it is dispatched for (2..32), with its last columns (fewer than a pair) stepped as the
// fp32 code steps them.
template <typename S, int L>
void fold_small_pairs(const uint16_t* g, uint16_t* w, float* m, float* v, int64_t r0, int64_t r1, int64_t n,
                      const Hyper<float>& h) {
  constexpr int64_t B = int64_t{1} << L;
  constexpr int64_t kPair = 2 * V::N;
  constexpr bool kStochastic = std::is_same_v<S, StochasticBF16>;
  const int64_t K = (n + B - 1) / B;
  const int64_t np = n / kPair * kPair;  // columns in whole pairs; the rest (and any ragged block) is the tail
  alignas(64) float staged[kStagedColumns];
  const VHyper c(h);
  const vec inv_b = V::set1(1.0f / static_cast<float>(B));  // exact: B is a power of two
  for (int64_t row = r0; row < r1; ++row) {
    const uint16_t* gr = g + row * n;
    uint16_t* wr = w + row * n;
    float* mr = m + row * K;
    float* vr = v + row * K;
    for (int64_t j0 = 0; j0 < np; j0 += kStagedColumns) {
      const int64_t j1 = std::min(np, j0 + kStagedColumns);
      for (int64_t j = j0; j < j1; j += kPair) {
        prefetch_ahead(gr + j);
        prefetch_ahead(wr + j);
        vec xe, xo, we, wo;
        PairBf16::load(gr + j, xe, xo);
        PairBf16::load(wr + j, we, wo);
        vec gm, mk, vk;
        pair_block_values<L>(xe, xo, mr + j / B, vr + j / B, c, inv_b, gm, mk, vk);
        V::store(staged + (j - j0), new_weight(xe, gm, mk, vk, we, c));
        V::store(staged + (j - j0) + V::N, new_weight(xo, gm, mk, vk, wo, c));
      }
      store_staged<S, true>(wr + j0, staged, j1 - j0, h, row * n + j0);
    }
    if constexpr (kStochastic) {  // the last columns as an fp32 row of their own, through the fp32 code's own
      if (np < n) {
        float copies[2 * kPair];
        const auto step = [&](const float* g32, float* w32) {
          if constexpr (B == 32) fold_pairwise_32(g32, w32, mr + np / B, vr + np / B, 0, 1, n - np, h);
          else fold_small<F32, L>(g32, w32, mr + np / B, vr + np / B, 0, 1, n - np, h);  // np / B: the row's blocks
        };
        const Bf16Ops ops{widen_bf16, stochastic_round};
        step_fp32_copies(gr + np, wr + np, n - np, row * n + np, h, copies, step, ops);
      }
    } else {
      fold_span<S>(gr, wr, mr, vr, np, n, B, h);
    }
  }
}
#endif

// Each lane's Σx and Σx² over columns [j0, j1) (whole steps of kStep columns), left to right.
template <typename S, bool kPairs>
FOAM_INLINE void wide_sums_left_to_right(const typename S::T* gr, const typename S::T* wr, int64_t j0, int64_t j1,
                                         vec& s, vec& q) {
  constexpr int64_t kStep = kPairs ? 2 * V::N : V::N;
  s = V::set1(0.0f);
  q = V::set1(0.0f);
  for (int64_t j = j0; j < j1; j += kStep) {
    prefetch_ahead(gr + j);
    prefetch_ahead(wr + j);
    if constexpr (kPairs) {
      vec even, odd;
      PairBf16::load(gr + j, even, odd);
      s = V::add(s, V::add(even, odd));
      q = V::add(q, V::fma(even, even, V::mul(odd, odd)));
    } else {
      const vec x = Ld<S>::load(gr + j);
      s = V::add(s, x);
      q = V::add(q, V::mul(x, x));
    }
  }
}

// Whole blocks of one row, columns [c0, c1), B a multiple of the lane count: a block is B / N vectors; one
// reduction and a scalar moment update each. bf16 parameters go a PairBf16 at a time where B is a multiple of
// two vectors (kPairs): the sums then take the block's columns in another order.
// `index`: the flat index of gr[0] in the call's tensor.
template <typename S, bool kPairs>
FOAM_INLINE void fold_wide_span(const typename S::T* gr, typename S::T* wr, float* mr, float* vr, int64_t c0,
                                int64_t c1, int64_t B, const VHyper& c, const Hyper<float>& h, int64_t index) {
  constexpr int64_t kStep = kPairs ? 2 * V::N : V::N;
  // 16-bit weights: the new weights of a batch of whole blocks (~kStagedColumns, up to kStagedMax for
  // B = kStagedMax) are staged (store_staged). Larger blocks round to nearest as they go (fold_wide steps such
  // StochasticBF16 blocks otherwise).
  constexpr bool kStaged = !std::is_same_v<S, F32>;
  alignas(64) float staged[kStaged ? kStagedMax : 1];
  const bool stage = kStaged && B <= kStagedMax;
  // Whole blocks; unstaged, the span in one batch (one loop, as without batches).
  const int64_t batch = stage ? std::max<int64_t>(B, kStagedColumns / B * B) : std::max<int64_t>(B, c1 - c0);
  const float bf = static_cast<float>(B);
  for (int64_t b0 = c0; b0 < c1; b0 += batch) {
    const int64_t b1 = std::min(c1, b0 + batch);
    for (int64_t cb = b0; cb < b1; cb += B) {
      vec s, q;  // each lane's ΣG and ΣG⊙G over the block
      if (B <= kSumRun * kStep) {
        wide_sums_left_to_right<S, kPairs>(gr, wr, cb, cb + B, s, q);
      } else {  // as block_sums adds a wide block (foam_kernel.h): runs of kSumRun steps of kStep columns, pairwise
        const auto run_sums = [&](int64_t r, vec& run_s, vec& run_q) {
          const int64_t j0 = cb + r * kSumRun * kStep;
          wide_sums_left_to_right<S, kPairs>(gr, wr, j0, std::min(cb + B, j0 + kSumRun * kStep), run_s, run_q);
        };
        add_runs_pairwise((B + kSumRun * kStep - 1) / (kSumRun * kStep), run_sums, s, q);
      }
      const float gm = V::reduce(s) / bf;
      const float g2 = h.mean_sq ? V::reduce(q) / bf : gm * gm;
      const float mk = lerp(mr[cb / B], gm, h.lerp_w);
      const float vk = vr[cb / B] * h.beta2 + h.one_m_b2 * g2;
      mr[cb / B] = mk;
      vr[cb / B] = vk;
      const vec gmv = V::set1(gm), mkv = V::set1(mk), vkv = V::set1(vk);
      for (int64_t j = cb; j < cb + B; j += kStep) {
        if constexpr (kPairs) {
          vec xe, xo, we, wo;
          PairBf16::load(gr + j, xe, xo);
          PairBf16::load(wr + j, we, wo);
          const vec new_even = new_weight(xe, gmv, mkv, vkv, we, c), new_odd = new_weight(xo, gmv, mkv, vkv, wo, c);
          if (stage) {
            V::store(staged + (j - b0), new_even);
            V::store(staged + (j - b0) + V::N, new_odd);
          } else {
            PairBf16::store(wr + j, new_even, new_odd);
          }
        } else {
          const vec new_w = new_weight(Ld<S>::load(gr + j), gmv, mkv, vkv, Ld<S>::load(wr + j), c);
          if (stage) V::store(staged + (j - b0), new_w);
          else if constexpr (!std::is_same_v<S, StochasticBF16>) Ld<S>::store(wr + j, new_w);  // (always staged)
        }
      }
    }
    if (stage) store_staged<S, kPairs>(wr + b0, staged, b1 - b0, h, index + b0);
  }
}

template <typename S>
void fold_rows(const typename S::T* g, typename S::T* w, float* m, float* v, int64_t r0, int64_t r1, int64_t n,
               int64_t B, const Hyper<float>& h);

template <typename S>
void fold_wide(const typename S::T* g, typename S::T* w, float* m, float* v, int64_t r0, int64_t r1, int64_t n,
               int64_t B, const Hyper<float>& h) {
  if constexpr (std::is_same_v<S, StochasticBF16>) {
    if (B > kStagedMax) {  // blocks wider than fold_wide_span stages: one block at a time through fp32 copies
      return fold_rows_rounded_weights(fold_rows<F32>, {widen_bf16, stochastic_round}, g, w, m, v, r0, r1, n, B, h);
    }
  }
  const int64_t K = (n + B - 1) / B;
  const int64_t nb = n / B * B;  // columns in whole blocks
  const VHyper c(h);
  const bool pairs = std::is_same_v<S, BF16> && B % (2 * V::N) == 0;
  for (int64_t row = r0; row < r1; ++row) {
    const typename S::T* gr = g + row * n;
    typename S::T* wr = w + row * n;
    if (pairs) {
      if constexpr (std::is_same_v<S, BF16>) {
        fold_wide_span<S, true>(gr, wr, m + row * K, v + row * K, 0, nb, B, c, h, row * n);
      }
    } else {
      fold_wide_span<S, false>(gr, wr, m + row * K, v + row * K, 0, nb, B, c, h, row * n);
    }
    fold_row_tail<S>(gr, wr, m + row * K, v + row * K, nb, n, B, h, row * n);
  }
}

// -------------------------------------------------------------- widening and stochastic rounding of bf16 moments
// foam_kernel.h's widen_bf16 and stochastic_round (the reference), a vector at a time. gcc vectorises the
// rounding loop itself, but it ran ~3x slower than this on AMD Zen 1 (AVX2: chains of blends, and an in-lane
// pack fixed up by a lane-crossing permute) and ~3x slower on AMD Zen 5 (AVX-512: the bf16-state step's extra
// cost per entry at B=4 was 158 ps with it and is 48 ps with this).
void widen_bf16(const uint16_t* __restrict src, float* __restrict dst, int64_t count) {
  int64_t j = 0;
  for (; j + V::N <= count; j += V::N) V::store(dst + j, Ld<BF16>::load(src + j));
  for (; j < count; ++j) dst[j] = BF16::load(src[j]);
}

// dst <- src rounded to bf16 by the two ways this file stores bf16 weights, for the tests (foam_kernel.h's
// round_bf16_nearest is the rule): runs of 2N entries through PairBf16 (the run's even and odd entries as its
// two vectors), then N at a time through Ld<BF16>::store, then BF16::store.
void round_bf16_nearest(const float* __restrict src, uint16_t* __restrict dst, int64_t count) {
  int64_t j = 0;
  for (; j + 2 * V::N <= count; j += 2 * V::N) {
    alignas(64) float even[V::N], odd[V::N];
    for (int k = 0; k < V::N; ++k) {
      even[k] = src[j + 2 * k];
      odd[k] = src[j + 2 * k + 1];
    }
    PairBf16::store(dst + j, V::load(even), V::load(odd));
  }
  for (; j + V::N <= count; j += V::N) Ld<BF16>::store(dst + j, V::load(src + j));
  for (; j < count; ++j) dst[j] = BF16::store(src[j]);
}

#if FOAM_SIMD_LANES == 16
using ivec = __m512i;
FOAM_INLINE ivec iota_times(uint32_t k) {  // lane i holds i·k (mod 2^32)
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(static_cast<int>(k)));
}
FOAM_INLINE ivec add_lanes(ivec a, ivec b) { return _mm512_add_epi32(a, b); }
FOAM_INLINE ivec broadcast(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }

// The rounded bits of the 16 entries of x, each in the lower half of its lane; `hash` holds i·0x9E3779B1 + offset
// for their flat indices i.
FOAM_INLINE ivec stochastic_round_bits(vec x, ivec hash) {
  ivec h = _mm512_xor_si512(hash, _mm512_srli_epi32(hash, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7FEB352D));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
  const ivec bits = _mm512_castps_si512(x);
  const ivec dither = _mm512_and_si512(h, _mm512_set1_epi32(0xFFFF));
  // Finite values get the dither; ±inf keep their bits (the low half is zero); NaN becomes 0x7FC0. A vector of
  // finite values (|x| < inf, false for NaN), nearly every one, skips the last two rules.
  const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
  if (__builtin_expect(finite == 0xFFFF, 1)) return _mm512_srli_epi32(_mm512_add_epi32(bits, dither), 16);
  const ivec r = _mm512_srli_epi32(_mm512_mask_add_epi32(bits, finite, bits, dither), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// `hash` holds i·0x9E3779B1 + offset for the flat indices i of the 16 entries of x.
FOAM_INLINE void stochastic_round_vector(uint16_t* p, vec x, ivec hash) {
  const ivec r = stochastic_round_bits(x, hash);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));  // 16 x u32 (< 2^16) -> u16
}
// 32 bf16 values at p from the rounded bits of their even and odd columns (PairBf16's order): in-lane, no shuffle.
FOAM_INLINE void store_bits_of_pair(uint16_t* p, ivec even, ivec odd) {
  _mm512_storeu_si512(p, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
}
#else
using ivec = __m256i;
FOAM_INLINE ivec iota_times(uint32_t k) {
  return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(k)));
}
FOAM_INLINE ivec add_lanes(ivec a, ivec b) { return _mm256_add_epi32(a, b); }
FOAM_INLINE ivec broadcast(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }

// The rounded bits of the 8 entries of x, each in the lower half of its lane; `hash` holds i·0x9E3779B1 + offset
// for their flat indices i.
FOAM_INLINE ivec stochastic_round_bits(vec x, ivec hash) {
  ivec h = _mm256_xor_si256(hash, _mm256_srli_epi32(hash, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7FEB352D));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
  const ivec bits = _mm256_castps_si256(x);
  const ivec dither = _mm256_and_si256(h, _mm256_set1_epi32(0xFFFF));
  // Finite values get the dither; ±inf keep their bits (the low half is zero); NaN becomes 0x7FC0. A vector of
  // finite values (|x| < inf, false for NaN), nearly every one, skips the last two rules.
  const vec abs_x = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
  const vec finite = _mm256_cmp_ps(abs_x, _mm256_set1_ps(INFINITY), _CMP_LT_OQ);
  if (__builtin_expect(_mm256_movemask_ps(finite) == 0xFF, 1)) {
    return _mm256_srli_epi32(_mm256_add_epi32(bits, dither), 16);
  }
  const ivec r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_and_si256(_mm256_castps_si256(finite), dither)), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}

// `hash` holds i·0x9E3779B1 + offset for the flat indices i of the 8 entries of x.
FOAM_INLINE void stochastic_round_vector(uint16_t* p, vec x, ivec hash) {
  const ivec r = stochastic_round_bits(x, hash);
  // 8 x u32 (each < 2^16) -> 8 x u16: pack within 128-bit halves (in-lane, cheap), store the two halves.
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
// 16 bf16 values at p from the rounded bits of their even and odd columns (PairBf16's order): in-lane, no shuffle.
FOAM_INLINE void store_bits_of_pair(uint16_t* p, ivec even, ivec odd) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_or_si256(even, _mm256_slli_epi32(odd, 16)));
}
// Two vectors (16 entries) at once: one in-lane pack of both and one exchange of the middle quarters.
FOAM_INLINE void stochastic_round_pair(uint16_t* p, vec x0, vec x1, ivec hash0, ivec hash1) {
  const ivec packed = _mm256_packus_epi32(stochastic_round_bits(x0, hash0), stochastic_round_bits(x1, hash1));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
}
#endif

void stochastic_round(const float* __restrict src, uint16_t* __restrict dst, int64_t count, int64_t first_index,
                      uint32_t offset) {
  const uint32_t golden = UINT32_C(0x9E3779B1);
  const uint32_t first_hash = static_cast<uint32_t>(first_index) * golden + offset;
  ivec hash = add_lanes(broadcast(first_hash), iota_times(golden));
  const ivec stride = broadcast(golden * static_cast<uint32_t>(V::N));  // V::N entries further
  int64_t j = 0;
#if FOAM_SIMD_LANES == 8
  for (; j + 2 * V::N <= count; j += 2 * V::N) {
    const ivec next = add_lanes(hash, stride);
    stochastic_round_pair(dst + j, V::load(src + j), V::load(src + j + V::N), hash, next);
    hash = add_lanes(next, stride);
  }
#endif
  for (; j + V::N <= count; j += V::N, hash = add_lanes(hash, stride)) {
    stochastic_round_vector(dst + j, V::load(src + j), hash);
  }
  if (j < count) stochastic_round_run(src + j, dst + j, count - j, first_index + j, offset);
}

// stochastic_round of `count` entries (a multiple of 2N) staged as PairBf16 pairs: each run of 2N columns as its N
// even columns, then its N odd ones. Each entry gets the dither of its own flat index, as stochastic_round gives it.
void stochastic_round_pairs(const float* __restrict staged, uint16_t* __restrict dst, int64_t count,
                            int64_t first_index, uint32_t offset) {
  const uint32_t golden = UINT32_C(0x9E3779B1);
  // Lane k of a run's even vector is entry first_index + j + 2k; of its odd vector, the one after it.
  ivec hash_even = add_lanes(broadcast(static_cast<uint32_t>(first_index) * golden + offset), iota_times(2 * golden));
  const ivec to_odd = broadcast(golden);
  const ivec stride = broadcast(golden * static_cast<uint32_t>(2 * V::N));  // 2N entries further
  for (int64_t j = 0; j < count; j += 2 * V::N, hash_even = add_lanes(hash_even, stride)) {
    const ivec even = stochastic_round_bits(V::load(staged + j), hash_even);
    const ivec odd = stochastic_round_bits(V::load(staged + j + V::N), add_lanes(hash_even, to_odd));
    store_bits_of_pair(dst + j, even, odd);
  }
}

#if FOAM_SIMD_LANES == 8
// ------------------------------------------------------------ AVX2, B = 2, 4, 8: 8 blocks across vectors
// One chunk = 8 blocks = 8B columns = B vectors. Horizontal adds (which stay inside 128-bit halves) leave the
// 8 block sums in one vector; the moments are loaded in that lane order (one permute per moment vector),
// updated 8 blocks at a time, put back in order and stored at full width; the update of each vector of
// columns gets its blocks' values by an in-lane shuffle (B = 2, 4) or a broadcast (B = 8).
//
// Lane L of the sums vector holds block moment_order<B>[L]:
//   B = 1: the vector itself (bf16 at B = 2, below), [0 .. 7];
//   B = 2: hadd(x0, x1) gives blocks [0 1 4 5 | 2 3 6 7];
//   B = 4: hadd(hadd(x0, x1), hadd(x2, x3)) gives [0 2 4 6 | 1 3 5 7];
//   B = 8: hadd trees then one exchange of halves (sum_each_of_8) give [0 .. 7].
template <int B>
constexpr bool kMomentsInOrder = B == 1 || B == 8;
template <int B>
FOAM_INLINE __m256i moment_order() {
  if (B == 2) return _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  return _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
}
template <int B>
FOAM_INLINE __m256i moment_order_inverse() {
  if (B == 2) return _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);  // its own inverse
  return _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
}
// 8 moments from fp32 or bf16 storage, in moment_order<B>; and back, bf16 stochastically rounded in the
// registers with `hash` holding i·0x9E3779B1 + offset for their flat indices i (stochastic_round's rule).
template <int B, typename M>
FOAM_INLINE vec load_moments(const M* p) {
  vec x;
  if constexpr (std::is_same_v<M, float>) x = V::load(p);
  else x = Ld<BF16>::load(p);
  if constexpr (kMomentsInOrder<B>) return x;
  return _mm256_permutevar8x32_ps(x, moment_order<B>());
}
template <int B, typename M>
FOAM_INLINE void store_moments(M* p, vec x, ivec hash) {
  if constexpr (!kMomentsInOrder<B>) x = _mm256_permutevar8x32_ps(x, moment_order_inverse<B>());
  if constexpr (std::is_same_v<M, float>) V::store(p, x);
  else stochastic_round_vector(p, x, hash);
}

// The sums of the lanes of each of y[0..7], in order: s[k] = Σ_lanes y[k].
FOAM_INLINE vec sum_each_of_8(const vec* y) {
  const vec t0 = _mm256_hadd_ps(_mm256_hadd_ps(y[0], y[1]), _mm256_hadd_ps(y[2], y[3]));  // [y0..y3 lo | hi]
  const vec t1 = _mm256_hadd_ps(_mm256_hadd_ps(y[4], y[5]), _mm256_hadd_ps(y[6], y[7]));  // [y4..y7 lo | hi]
  return V::add(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// Block sums of the chunk's B vectors x[0..B), in moment_order<B>.
template <int B>
FOAM_INLINE vec chunk_sums(const vec* x) {
  if constexpr (B == 1) return x[0];
  if constexpr (B == 2) return _mm256_hadd_ps(x[0], x[1]);
  if constexpr (B == 4) return _mm256_hadd_ps(_mm256_hadd_ps(x[0], x[1]), _mm256_hadd_ps(x[2], x[3]));
  return sum_each_of_8(x);
}

// Vector i of a chunk gets its lanes' g̃, m̃ or ṽ out of the chunk's vector of 8 by an in-lane shuffle
// (B = 2: lanes [0 0 1 1] of each half, +2 for i = 1; B = 4: lane i of each half). B = 8 broadcasts lane i
// from a copy in memory instead: a load, where a register broadcast would cross halves (slow on Zen).
template <int B>
FOAM_INLINE vec unfold_lanes(vec x, int i, const float* copy) {
  if constexpr (B == 1) return x;
  if constexpr (B == 2)
    return _mm256_permutevar_ps(x, _mm256_add_epi32(_mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1), _mm256_set1_epi32(2 * i)));
  if constexpr (B == 4) return _mm256_permutevar_ps(x, _mm256_set1_epi32(i));
  return _mm256_broadcast_ss(copy + i);
}

// M: the moments' storage, float, or uint16_t for bf16 moments (state_dtype="bfloat16"). Those are widened and
// stochastically rounded in the registers of the step, each entry exactly as fold_rows_bf16_moments's tile
// (widen_bf16, the fp32 step, stochastic_round) would: the chunks and the row tail fall on the same columns.
template <typename S, int B, typename M = float>
void fold_chunk(const typename S::T* g, typename S::T* w, M* m, M* v, int64_t r0, int64_t r1, int64_t n,
                const Hyper<float>& h, RoundingOffsets offsets = {}) {
  constexpr bool kBf16Moments = std::is_same_v<M, uint16_t>;
  constexpr int64_t kChunk = 8 * B;
  // bf16 parameters go through PairBf16 (a chunk is a whole number of its 16-column pairs): even + odd holds
  // each block in B/2 adjacent lanes, so the sums, moments and unfolds are those of B/2 over that sum, and both
  // vectors of a pair unfold the same values. At B = 16 and 32 (any parameter dtype) a block is 2 or 4 whole
  // vectors; their lane-wise sum is one vector per block, and the rest is B = 8's. Up to B = 8 the pairs' sums
  // are the fp32 code's own (the same columns added in the same order, each square rounded), so StochasticBF16
  // weights take them there; at B = 16 the fp32 code adds other columns first, and they go lane-wise.
  constexpr bool kPairs = std::is_same_v<S, BF16> || (std::is_same_v<S, StochasticBF16> && B <= 8);
  constexpr int kGroup = B >= 16 ? B / 8 : (kPairs ? 2 : 1);  // vectors added lane-wise
  constexpr int kSumB = B / kGroup;                            // the block size whose code the sums take
  const int64_t K = (n + B - 1) / B;
  const int64_t nc = n / kChunk * kChunk;  // columns in whole chunks; the rest is the portable tail
  const VHyper c(h);
  const vec inv_b = V::set1(1.0f / static_cast<float>(B));  // exact: B is a power of two
  const uint32_t golden = UINT32_C(0x9E3779B1);
  const ivec stride = broadcast(8 * golden);  // 8 moments further
  const ivec exp_avg_sq_minus_exp_avg = broadcast(offsets.exp_avg_sq - offsets.exp_avg);
  for (int64_t row = r0; row < r1; ++row) {
    const typename S::T* gr = g + row * n;
    typename S::T* wr = w + row * n;
    M* mr = m + row * K;
    M* vr = v + row * K;
    // exp_avg's hash of the chunk's 8 moments (exp_avg_sq's differs by the offsets); unused for fp32 moments.
    ivec hash = add_lanes(broadcast(static_cast<uint32_t>(row * K) * golden + offsets.exp_avg), iota_times(golden));
    // bf16 weights (pairs, or StochasticBF16 lane-wise): the new weights of a batch of chunks are staged
    // (store_staged).
    constexpr bool kStaged = kPairs || std::is_same_v<S, StochasticBF16>;
    constexpr int64_t kBatch = kChunk > kStagedColumns ? kChunk : kStagedColumns;  // columns
    alignas(32) float staged[kStaged ? kBatch : 1];
    const int64_t batch = kStaged ? kBatch : nc;  // other weights: the whole row in one batch, as one loop
    for (int64_t j0 = 0; j0 < nc; j0 += batch) {
      const int64_t j1 = std::min(nc, j0 + batch);
      for (int64_t j = j0; j < j1; j += kChunk, hash = add_lanes(hash, stride)) {
        constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(typename S::T));  // entries per cache line
        for (int64_t p = 0; p < kChunk; p += kLine) {
          prefetch_ahead(gr + j + p);
          prefetch_ahead(wr + j + p);
        }
        vec x[B], y[kSumB], y2[kSumB];
        if constexpr (kPairs) {
          for (int i = 0; i < B; i += 2) PairBf16::load(gr + j + 8 * i, x[i], x[i + 1]);
        } else {
          for (int i = 0; i < B; ++i) x[i] = Ld<S>::load(gr + j + 8 * i);
        }
        for (int u = 0; u < kSumB; ++u) {
          y[u] = x[kGroup * u];
          y2[u] = V::mul(x[kGroup * u], x[kGroup * u]);
          for (int t = 1; t < kGroup; ++t) {
            y[u] = V::add(y[u], x[kGroup * u + t]);
            // Pairs: each square rounded, as the fp32 code's hadd adds them (chunk_sums); else one FMA.
            const vec x_t = x[kGroup * u + t];
            y2[u] = kPairs ? V::add(y2[u], V::mul(x_t, x_t)) : V::fma(x_t, x_t, y2[u]);
          }
        }
        const vec gm = V::mul(chunk_sums<kSumB>(y), inv_b);                                 // g̃ of 8 blocks
        const vec g2 = c.mean_sq ? V::mul(chunk_sums<kSumB>(y2), inv_b) : V::mul(gm, gm);  // g̃⁽²⁾
        const vec mk = lerp_v(load_moments<kSumB>(mr + j / B), gm, c);   // m̃ ← lerp(m̃, g̃, 1−β1)
        const vec vk = V::fma(load_moments<kSumB>(vr + j / B), c.beta2, V::mul(c.one_m_b2, g2));
        store_moments<kSumB>(mr + j / B, mk, hash);
        store_moments<kSumB>(vr + j / B, vk, add_lanes(hash, exp_avg_sq_minus_exp_avg));
        alignas(32) float copy[3][8];  // used by kSumB = 8 only
        if constexpr (kSumB == 8) {
          V::store(copy[0], gm);
          V::store(copy[1], mk);
          V::store(copy[2], vk);
        }
        // R, M, V and the new weights, vector by vector (vector i holds the blocks of summed vector i / kGroup),
        // each weight loaded just before its update.
        const auto updated = [&](int i, vec wi) {
          const int u = i / kGroup;
          return new_weight(x[i], unfold_lanes<kSumB>(gm, u, copy[0]), unfold_lanes<kSumB>(mk, u, copy[1]),
                            unfold_lanes<kSumB>(vk, u, copy[2]), wi, c);
        };
        if constexpr (kPairs) {
          for (int i = 0; i < B; i += 2) {
            vec we, wo;
            PairBf16::load(wr + j + 8 * i, we, wo);
            V::store(staged + (j - j0) + 8 * i, updated(i, we));
            V::store(staged + (j - j0) + 8 * i + 8, updated(i + 1, wo));
          }
        } else if constexpr (kStaged) {
          for (int i = 0; i < B; ++i) V::store(staged + (j - j0) + 8 * i, updated(i, Ld<S>::load(wr + j + 8 * i)));
        } else {
          for (int i = 0; i < B; ++i) Ld<S>::store(wr + j + 8 * i, updated(i, Ld<S>::load(wr + j + 8 * i)));
        }
      }
      if constexpr (kStaged) store_staged<S, kPairs>(wr + j0, staged, j1 - j0, h, row * n + j0);
    }
    if constexpr (kBf16Moments) {  // the tail's (at most 8) moments through fp32 copies, as the tile's
      if (nc < n) {
        const int64_t k0 = nc / B, count = K - k0;
        float m_tail[8], v_tail[8];
        widen_bf16(mr + k0, m_tail, count);
        widen_bf16(vr + k0, v_tail, count);
        fold_row_tail<S>(gr + nc, wr + nc, m_tail, v_tail, 0, n - nc, B, h, row * n + nc);
        stochastic_round_run(m_tail, mr + k0, count, row * K + k0, offsets.exp_avg);
        stochastic_round_run(v_tail, vr + k0, count, row * K + k0, offsets.exp_avg_sq);
      }
    } else {
      fold_row_tail<S>(gr, wr, mr, vr, nc, n, B, h, row * n);
    }
  }
}

// Rows [r0, r1) with bf16 moments, rounded in registers: fold_chunk's block sizes (fold_rows's AVX2 cases).
template <typename S>
void fold_rows_bf16(const typename S::T* g, typename S::T* w, uint16_t* m, uint16_t* v, int64_t r0, int64_t r1,
                    int64_t n, int64_t B, const Hyper<float>& h, RoundingOffsets offsets) {
  switch (B) {
    case 2: return fold_chunk<S, 2>(g, w, m, v, r0, r1, n, h, offsets);
    case 4: return fold_chunk<S, 4>(g, w, m, v, r0, r1, n, h, offsets);
    case 8: return fold_chunk<S, 8>(g, w, m, v, r0, r1, n, h, offsets);
    case 16: return fold_chunk<S, 16>(g, w, m, v, r0, r1, n, h, offsets);
    case 32:
      if constexpr (std::is_same_v<S, BF16>) return fold_chunk<S, 32>(g, w, m, v, r0, r1, n, h, offsets);
      break;
    default: break;
  }
}
// Whether fold_rows_bf16 steps block size B for parameters S.
template <typename S>
constexpr bool folds_bf16_in_registers(int64_t B) {
  return B == 2 || B == 4 || B == 8 || B == 16 || (B == 32 && std::is_same_v<S, BF16>);
}
#endif

template <typename S>
void fold_rows(const typename S::T* g, typename S::T* w, float* m, float* v, int64_t r0, int64_t r1, int64_t n,
               int64_t B, const Hyper<float>& h) {
#if FOAM_SIMD_LANES == 8
  switch (B) {
    case 2: return fold_chunk<S, 2>(g, w, m, v, r0, r1, n, h);
    case 4: return fold_chunk<S, 4>(g, w, m, v, r0, r1, n, h);
    case 8: return fold_chunk<S, 8>(g, w, m, v, r0, r1, n, h);
    case 16: return fold_chunk<S, 16>(g, w, m, v, r0, r1, n, h);
    case 32:  // 32 vectors of columns and 32 of weights per chunk spill; fp32 runs faster one block at a time
      if constexpr (std::is_same_v<S, BF16>) return fold_chunk<S, 32>(g, w, m, v, r0, r1, n, h);
      break;
    default: break;
  }
#else
  if constexpr (std::is_same_v<S, BF16> || std::is_same_v<S, StochasticBF16>) {
    switch (B) {
      case 2: return fold_small_pairs<S, 1>(g, w, m, v, r0, r1, n, h);
      case 4: return fold_small_pairs<S, 2>(g, w, m, v, r0, r1, n, h);
      case 8: return fold_small_pairs<S, 3>(g, w, m, v, r0, r1, n, h);
      case 16: return fold_small_pairs<S, 4>(g, w, m, v, r0, r1, n, h);
      case 32: return fold_small_pairs<S, 5>(g, w, m, v, r0, r1, n, h);
      default: break;
    }
  }
  if constexpr (std::is_same_v<S, F32>) {
    if (B == 32) return fold_pairwise_32(g, w, m, v, r0, r1, n, h);  // the sums of fold_small_pairs at B = 32
  }
  if constexpr (!std::is_same_v<S, StochasticBF16>) {  // (fold_small_pairs took its B = 2 .. 32)
    switch (B) {
      case 2: return fold_small<S, 1>(g, w, m, v, r0, r1, n, h);
      case 4: return fold_small<S, 2>(g, w, m, v, r0, r1, n, h);
      case 8: return fold_small<S, 3>(g, w, m, v, r0, r1, n, h);
      case 16: return fold_small<S, 4>(g, w, m, v, r0, r1, n, h);
      default: break;
    }
  }
#endif
  if (B % V::N == 0) return fold_wide<S>(g, w, m, v, r0, r1, n, B, h);
  return Portable<S>::fold[kThisIsa](g, w, m, v, r0, r1, n, B, h);  // e.g. B = 3: the portable tile code
}

// Unfolded tensors: AdamW on elements [i0, i1), as adamw_impl.
template <typename S>
void adamw(const typename S::T* g, typename S::T* w, float* m, float* v, int64_t i0, int64_t i1,
           const Hyper<float>& h) {
  const VHyper c(h);
  // 16-bit weights: the new weights of a batch are staged (store_staged); fp32 weights in one loop.
  constexpr bool kStaged = !std::is_same_v<S, F32>;
  alignas(64) float staged[kStaged ? kStagedColumns : 1];
  const int64_t nv = i0 + (i1 - i0) / V::N * V::N;  // whole vectors
  const int64_t batch = kStaged ? kStagedColumns : std::max<int64_t>(nv - i0, 1);
  for (int64_t b0 = i0; b0 < nv; b0 += batch) {
    const int64_t b1 = std::min(nv, b0 + batch);
    for (int64_t i = b0; i < b1; i += V::N) {
      prefetch_ahead(g + i);
      prefetch_ahead(w + i);
      prefetch_ahead(m + i);
      prefetch_ahead(v + i);
      const vec x = Ld<S>::load(g + i);
      const vec mi = lerp_v(V::load(m + i), x, c);
      const vec vi = V::fma(V::load(v + i), c.beta2, V::mul(V::mul(c.one_m_b2, x), x));
      V::store(m + i, mi);
      V::store(v + i, vi);
      const vec upd = V::mul(c.step_c, V::div(mi, V::add(V::sqrt(vi), c.eps_bc2)));
      const vec new_w = V::fma(Ld<S>::load(w + i), c.decay, upd);
      if constexpr (kStaged) V::store(staged + (i - b0), new_w);
      else Ld<S>::store(w + i, new_w);
    }
    if constexpr (kStaged) store_staged<S, false>(w + b0, staged, b1 - b0, h, b0);
  }
  adamw_entries<S>(g, w, m, v, nv, i1, h);
}

}  // namespace FOAM_SIMD_NS
}  // namespace
}  // namespace foam
