// Fused CPU step of FOAM (folded-state Adam, arXiv 2512.07112).
//
// One pass per folded tensor: each row of G and W is read once; the block means (ragged last block
// averaged over its own entries), the folded moments and the new weights are computed in that pass, and
// nothing of parameter size is allocated. Unfolded tensors (1-D, or block_size == 1) take the plain AdamW
// update. The Python reference is foam_hf.optim._single_tensor_foam; the tests hold this file to it.
//
// Two implementations of the same math:
//  * the portable one (fold_rows_impl, adamw_impl, fold_span): plain loops over float buffers. The element
//    loops vectorise under gcc/clang; they are compiled per instruction set with target_clones where that
//    exists. It is the reference for the explicit-SIMD code and the path on other architectures, on x86
//    without AVX2+FMA+F16C, and for block sizes the SIMD code does not specialise (e.g. B = 3).
//  * the explicit-SIMD one (the FOAM_SIMD_BODY section at the end of this file, compiled twice: AVX-512
//    with 16 lanes and AVX2 with 8 lanes, chosen at run time from the CPU's features). For B in {2, 4, 8}
//    (and 16 with AVX-512) one vector holds whole blocks: block sums are in-register butterflies that leave
//    every lane holding its block's sum (sum and unfold in one), the moments are loaded expanded (lane i
//    gets m̃[i / B]) and stored compacted. For B a multiple of the lane count, a block is a run of vectors:
//    vector sums, one horizontal reduction and a scalar moment update per block. The ragged tail of a row
//    (n not a multiple of the vector or of B) is done by the portable fold_span.
// Why explicit SIMD: the per-block phase of the portable code is scalar (short sums, two divisions, a
// branchy lerp, broadcast stores) and for small B it cost several times the element loop.
// Threads: at::parallel_for over rows (folded) or elements (unfolded); the build passes -fopenmp when torch
// uses OpenMP, without which at::parallel_for runs everything on the calling thread.
#ifndef FOAM_SIMD_BODY

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// The explicit-SIMD paths need gcc's per-function target pragmas (clang and others get the portable code).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FOAM_HAVE_SIMD 1
#include <immintrin.h>
#else
#define FOAM_HAVE_SIMD 0
#endif

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FOAM_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define FOAM_CLONES
#endif
#define FOAM_INLINE inline __attribute__((always_inline))

namespace {

// Storage types: load to fp32, store rounded from fp32 (bf16 round-to-nearest-even as c10::BFloat16).
struct F32 {
  using T = float;
  static FOAM_INLINE float load(float x) { return x; }
  static FOAM_INLINE float store(float x) { return x; }
};
struct BF16 {
  using T = uint16_t;
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
struct F16 {
  using T = uint16_t;
  static FOAM_INLINE float load(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
  static FOAM_INLINE uint16_t store(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
};

struct Hyper {
  float decay;      // 1 - lr * weight_decay
  float beta1, beta2;
  float lerp_w;     // 1 - beta1, the weight of torch.lerp_
  float one_m_b2;   // 1 - beta2
  float rho, rho2;  // res_scale and its square
  float eps_bc2;    // eps * sqrt(1 - beta2^t): eps moved inside, so that one division suffices
  float step_c;     // -lr * scale / (1 - beta1^t) * sqrt(1 - beta2^t)
  bool mean_sq;
};

// torch.lerp's formula (aten/src/ATen/native/Lerp.h), so that the moments match the reference path.
FOAM_INLINE float lerp(float self, float end, float w) {
  return std::abs(w) < 0.5f ? self + w * (end - self) : end - (end - self) * (1.0f - w);
}

// The plain per-block reference: blocks of row gr/wr starting at column c0 (a multiple of B) up to n, the
// last one ragged if B does not divide n; mr/vr are the row's moments. The SIMD paths use it for row tails.
template <typename S>
FOAM_INLINE void fold_span(const typename S::T* __restrict gr, typename S::T* __restrict wr, float* __restrict mr,
                           float* __restrict vr, int64_t c0, int64_t n, int64_t B, const Hyper& h) {
  for (int64_t c = c0; c < n; c += B) {
    const int64_t cnt = std::min(B, n - c);
    float s = 0.0f, q = 0.0f;
    for (int64_t b = 0; b < cnt; ++b) {
      const float x = S::load(gr[c + b]);
      s += x;
      q += x * x;
    }
    const float cf = static_cast<float>(cnt);
    const float gm = s / cf;                          // g̃
    const float g2 = h.mean_sq ? q / cf : gm * gm;    // g̃⁽²⁾
    const float mk = lerp(mr[c / B], gm, h.lerp_w);  // m̃ ← lerp(m̃, g̃, 1−β1)
    const float vk = vr[c / B] * h.beta2 + h.one_m_b2 * g2;
    mr[c / B] = mk;
    vr[c / B] = vk;
    for (int64_t b = 0; b < cnt; ++b) {
      const float r = S::load(gr[c + b]) - gm;
      const float M = mk + h.rho * r;
      const float V = vk + h.rho2 * (r * r);
      wr[c + b] = S::store(S::load(wr[c + b]) * h.decay + h.step_c * (M / (std::sqrt(V) + h.eps_bc2)));
    }
  }
}

constexpr int64_t kTile = 1024;  // columns per tile: 4 fp32 buffers of this size stay in L1

// Rows [r0, r1) of a folded tensor; BS > 0 is a compile-time block size, 0 means "use B".
template <typename S, int BS>
FOAM_INLINE void fold_rows_impl(const typename S::T* __restrict g, typename S::T* __restrict w,
                                float* __restrict m, float* __restrict v, int64_t r0, int64_t r1, int64_t n,
                                int64_t B_rt, const Hyper& h) {
  const int64_t B = BS > 0 ? BS : B_rt;
  const int64_t K = (n + B - 1) / B;
  const int64_t tile_blocks = std::max<int64_t>(1, kTile / B);
  const int64_t T = tile_blocks * B;
  float stack_buf[4 * kTile];
  std::vector<float> heap_buf;
  float* buf = stack_buf;
  if (T > kTile) {  // only when B > kTile: one block per tile
    heap_buf.resize(4 * T);
    buf = heap_buf.data();
  }
  float* __restrict gf = buf;          // G of the tile, in fp32
  float* __restrict eg = buf + T;      // unfold(g̃)
  float* __restrict em = buf + 2 * T;  // unfold(m̃)
  float* __restrict ev = buf + 3 * T;  // unfold(ṽ)
  const float decay = h.decay, rho = h.rho, rho2 = h.rho2, eps_bc2 = h.eps_bc2, step_c = h.step_c;

  for (int64_t row = r0; row < r1; ++row) {
    const typename S::T* gr = g + row * n;
    typename S::T* wr = w + row * n;
    float* mr = m + row * K;
    float* vr = v + row * K;
    for (int64_t k0 = 0; k0 < K; k0 += tile_blocks) {
      const int64_t k1 = std::min(K, k0 + tile_blocks);
      const int64_t c0 = k0 * B;
      const int64_t len = std::min(n, k1 * B) - c0;
      for (int64_t j = 0; j < len; ++j) gf[j] = S::load(gr[c0 + j]);
      // g̃, g̃⁽²⁾, then m̃ ← lerp(m̃, g̃, 1−β1), ṽ ← β2 ṽ + (1−β2) g̃⁽²⁾; broadcast back over the tile.
      for (int64_t kk = 0; kk < k1 - k0; ++kk) {
        const int64_t start = kk * B;
        const int64_t cnt = std::min(B, len - start);  // < B only for the ragged last block of a row
        float s = 0.0f, q = 0.0f;
        if (BS > 0 && cnt == BS) {
          for (int64_t b = 0; b < BS; ++b) {
            const float x = gf[start + b];
            s += x;
            q += x * x;
          }
        } else {
          for (int64_t b = 0; b < cnt; ++b) {
            const float x = gf[start + b];
            s += x;
            q += x * x;
          }
        }
        const float c = static_cast<float>(cnt);
        const float gm = s / c;
        const float g2 = h.mean_sq ? q / c : gm * gm;
        const float mk = lerp(mr[k0 + kk], gm, h.lerp_w);
        const float vk = vr[k0 + kk] * h.beta2 + h.one_m_b2 * g2;
        mr[k0 + kk] = mk;
        vr[k0 + kk] = vk;
        if (BS > 0 && cnt == BS) {
          for (int64_t b = 0; b < BS; ++b) {
            eg[start + b] = gm;
            em[start + b] = mk;
            ev[start + b] = vk;
          }
        } else {
          for (int64_t b = 0; b < cnt; ++b) {
            eg[start + b] = gm;
            em[start + b] = mk;
            ev[start + b] = vk;
          }
        }
      }
      // R = G − unfold(g̃); M = unfold(m̃) + ρR; V = unfold(ṽ) + ρ²R⊙R; W ← W(1−γλ) − γα M̂ / (√V̂ + ε).
      for (int64_t j = 0; j < len; ++j) {
        const float r = gf[j] - eg[j];
        const float M = em[j] + rho * r;
        const float V = ev[j] + rho2 * (r * r);
        const float wv = S::load(wr[c0 + j]) * decay + step_c * (M / (std::sqrt(V) + eps_bc2));
        wr[c0 + j] = S::store(wv);
      }
    }
  }
}

template <typename S>
FOAM_INLINE void fold_rows_dispatch(const typename S::T* g, typename S::T* w, float* m, float* v, int64_t r0,
                                    int64_t r1, int64_t n, int64_t B, const Hyper& h) {
  switch (B) {
    case 2: return fold_rows_impl<S, 2>(g, w, m, v, r0, r1, n, B, h);
    case 4: return fold_rows_impl<S, 4>(g, w, m, v, r0, r1, n, B, h);
    case 8: return fold_rows_impl<S, 8>(g, w, m, v, r0, r1, n, B, h);
    case 16: return fold_rows_impl<S, 16>(g, w, m, v, r0, r1, n, B, h);
    case 32: return fold_rows_impl<S, 32>(g, w, m, v, r0, r1, n, B, h);
    default: return fold_rows_impl<S, 0>(g, w, m, v, r0, r1, n, B, h);
  }
}

// Unfolded tensors: AdamW, elements [i0, i1).
template <typename S>
FOAM_INLINE void adamw_impl(const typename S::T* __restrict g, typename S::T* __restrict w, float* __restrict m,
                            float* __restrict v, int64_t i0, int64_t i1, const Hyper& h) {
  const float decay = h.decay, eps_bc2 = h.eps_bc2, step_c = h.step_c, lw = h.lerp_w;
  const float b2 = h.beta2, omb2 = h.one_m_b2;
  for (int64_t i = i0; i < i1; ++i) {
    const float x = S::load(g[i]);
    const float mi = lerp(m[i], x, lw);
    const float vi = v[i] * b2 + omb2 * x * x;
    m[i] = mi;
    v[i] = vi;
    w[i] = S::store(S::load(w[i]) * decay + step_c * (mi / (std::sqrt(vi) + eps_bc2)));
  }
}

// The per-instruction-set entry points (target_clones cannot be put on templates).
#define FOAM_ENTRY(S)                                                                                          \
  FOAM_CLONES void fold_rows_##S(const S::T* g, S::T* w, float* m, float* v, int64_t r0, int64_t r1, int64_t n, \
                                 int64_t B, const Hyper& h) {                                                  \
    fold_rows_dispatch<S>(g, w, m, v, r0, r1, n, B, h);                                                        \
  }                                                                                                            \
  FOAM_CLONES void adamw_##S(const S::T* g, S::T* w, float* m, float* v, int64_t i0, int64_t i1,                \
                             const Hyper& h) {                                                                 \
    adamw_impl<S>(g, w, m, v, i0, i1, h);                                                                      \
  }
FOAM_ENTRY(F32)
FOAM_ENTRY(BF16)
FOAM_ENTRY(F16)
#undef FOAM_ENTRY

template <typename S>
using FoldFn = void (*)(const typename S::T*, typename S::T*, float*, float*, int64_t, int64_t, int64_t, int64_t,
                        const Hyper&);
template <typename S>
using AdamwFn = void (*)(const typename S::T*, typename S::T*, float*, float*, int64_t, int64_t, const Hyper&);
template <typename S>
struct Portable;
template <>
struct Portable<F32> {
  static constexpr FoldFn<F32> fold = fold_rows_F32;
  static constexpr AdamwFn<F32> adamw = adamw_F32;
};
template <>
struct Portable<BF16> {
  static constexpr FoldFn<BF16> fold = fold_rows_BF16;
  static constexpr AdamwFn<BF16> adamw = adamw_BF16;
};
template <>
struct Portable<F16> {
  static constexpr FoldFn<F16> fold = fold_rows_F16;
  static constexpr AdamwFn<F16> adamw = adamw_F16;
};

}  // namespace

#if FOAM_HAVE_SIMD
// The explicit-SIMD code, once per instruction set: the FOAM_SIMD_BODY section at the end of this file.
#define FOAM_SIMD_BODY 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#define FOAM_SIMD_NS simd_avx512
#define FOAM_SIMD_LANES 16
#include __FILE__
#undef FOAM_SIMD_NS
#undef FOAM_SIMD_LANES
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FOAM_SIMD_NS simd_avx2
#define FOAM_SIMD_LANES 8
#include __FILE__
#undef FOAM_SIMD_NS
#undef FOAM_SIMD_LANES
#pragma GCC pop_options
#endif

namespace {

// Which implementation runs: the best the CPU (and the OS, for the AVX-512 state) supports, unless set_isa
// lowered it (the tests run every path this way).
enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
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

template <typename S>
FoldFn<S> fold_fn() {
  switch (current_isa()) {
#if FOAM_HAVE_SIMD
    case kAvx512: return simd_avx512::fold_rows<S>;
    case kAvx2: return simd_avx2::fold_rows<S>;
#endif
    default: return Portable<S>::fold;
  }
}

template <typename S>
AdamwFn<S> adamw_fn() {
  switch (current_isa()) {
#if FOAM_HAVE_SIMD
    case kAvx512: return simd_avx512::adamw<S>;
    case kAvx2: return simd_avx2::adamw<S>;
#endif
    default: return Portable<S>::adamw;
  }
}

template <typename S>
void run_tensor(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v, bool folded,
                int64_t B, const Hyper& h) {
  using T = typename S::T;
  const T* gp = reinterpret_cast<const T*>(g.const_data_ptr());
  T* wp = reinterpret_cast<T*>(p.data_ptr());
  float* mp = m.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  if (folded) {
    const int64_t n = p.size(-1);
    const int64_t rows = p.numel() / n;
    const int64_t grain = std::max<int64_t>(1, 32768 / n);  // ~32k elements per task
    const FoldFn<S> fold = fold_fn<S>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { fold(gp, wp, mp, vp, r0, r1, n, B, h); });
  } else {
    const AdamwFn<S> adamw = adamw_fn<S>();
    at::parallel_for(0, p.numel(), 32768, [&](int64_t i0, int64_t i1) { adamw(gp, wp, mp, vp, i0, i1, h); });
  }
}

void check_tensor(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), "foam fused CPU step: ", what, "[", i, "] is on ", t.device(),
              "; the fused CPU kernel needs CPU tensors.");
  TORCH_CHECK(t.is_contiguous(), "foam fused CPU step: ", what, "[", i, "] must be contiguous.");
  TORCH_CHECK(!t.is_sparse(), "foam fused CPU step: ", what, "[", i, "] must be dense.");
}

}  // namespace

// One FOAM step over a group's tensors; increments each state_steps[i] (a float32 scalar tensor) in place.
void fused_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& state_steps, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t block_size, double scale, double res_scale, bool mean_sq) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count &&
                  state_steps.size() == count,
              "foam fused CPU step: the five tensor lists must have the same length.");
  TORCH_CHECK(block_size >= 1, "foam fused CPU step: block_size must be >= 1, got ", block_size);
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const at::Tensor& m = exp_avgs[i];
    const at::Tensor& v = exp_avg_sqs[i];
    const at::Tensor& s = state_steps[i];
    check_tensor(p, "params", i);
    check_tensor(g, "grads", i);
    check_tensor(m, "exp_avgs", i);
    check_tensor(v, "exp_avg_sqs", i);
    TORCH_CHECK(g.scalar_type() == p.scalar_type() && g.sizes() == p.sizes(), "foam fused CPU step: grads[", i,
                "] must have the dtype and shape of its parameter.");
    TORCH_CHECK(m.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
                "foam fused CPU step: moments must be float32.");
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device().is_cpu(),
                "foam fused CPU step: state_steps[", i, "] must be a float32 scalar CPU tensor.");
    const bool folded = block_size > 1 && p.dim() >= 2 && p.numel() > 0;
    const int64_t expected = folded ? p.numel() / p.size(-1) * ((p.size(-1) + block_size - 1) / block_size)
                                    : p.numel();
    TORCH_CHECK(m.numel() == expected && v.numel() == expected, "foam fused CPU step: moments of params[", i,
                "] hold ", m.numel(), " entries, expected ", expected, ".");

    // The step counter and the bias corrections, in double as the Python paths compute them.
    float* sp = s.data_ptr<float>();
    *sp += 1.0f;
    const double step = static_cast<double>(*sp);
    const double bc1 = 1.0 - std::pow(beta1, step);
    const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, step));
    const double step_size = lr / bc1;
    Hyper h;
    h.decay = static_cast<float>(1.0 - lr * weight_decay);
    h.beta1 = static_cast<float>(beta1);
    h.beta2 = static_cast<float>(beta2);
    h.lerp_w = static_cast<float>(1.0 - beta1);
    h.one_m_b2 = static_cast<float>(1.0 - beta2);
    h.rho = static_cast<float>(res_scale);
    h.rho2 = static_cast<float>(res_scale * res_scale);
    h.eps_bc2 = static_cast<float>(eps * bc2_sqrt);
    h.step_c = static_cast<float>(-step_size * (folded ? scale : 1.0) * bc2_sqrt);
    h.mean_sq = mean_sq;
    if (p.numel() == 0) continue;

    switch (p.scalar_type()) {
      case at::kFloat: run_tensor<F32>(p, g, m, v, folded, block_size, h); break;
      case at::kBFloat16: run_tensor<BF16>(p, g, m, v, folded, block_size, h); break;
      case at::kHalf: run_tensor<F16>(p, g, m, v, folded, block_size, h); break;
      default:
        TORCH_CHECK(false, "foam fused CPU step: params[", i, "] has dtype ", p.scalar_type(),
                    "; the fused kernel supports float32, bfloat16 and float16.");
    }
  }
}

// bf16 moment storage: dst ← stochastically rounded src, exactly foam_hf.rounding.store_moment's arithmetic.
// The dither of entry i is a counter hash of (i, step, salt): h = i·0x9E3779B1 + offset (mod 2^32), then
// h ^= h >> 16, h *= 0x7FEB352D, h ^= h >> 15, dither = h & 0xFFFF; finite values become
// (bits(x) + dither) >> 16, non-finite ones round to nearest (NaN -> 0x7FC0). The loop vectorises.
namespace {
FOAM_CLONES void stochastic_round_span(const float* __restrict src, uint16_t* __restrict dst, int64_t i0, int64_t i1,
                                       uint32_t offset) {
  for (int64_t i = i0; i < i1; ++i) {
    uint32_t h = static_cast<uint32_t>(i) * UINT32_C(0x9E3779B1) + offset;
    h ^= h >> 16;
    h *= UINT32_C(0x7FEB352D);
    h ^= h >> 15;
    uint32_t bits;
    std::memcpy(&bits, &src[i], sizeof(bits));
    const bool finite = (bits & UINT32_C(0x7F800000)) != UINT32_C(0x7F800000);
    const uint16_t sr = static_cast<uint16_t>((bits + (h & UINT32_C(0xFFFF))) >> 16);
    dst[i] = finite ? sr : BF16::store(src[i]);
  }
}
}  // namespace

void stochastic_round_bf16(const at::Tensor& src, const at::Tensor& dst, int64_t step, int64_t salt) {
  TORCH_CHECK(src.scalar_type() == at::kFloat && dst.scalar_type() == at::kBFloat16 && src.is_contiguous() &&
                  dst.is_contiguous() && src.device().is_cpu() && dst.device().is_cpu() &&
                  src.numel() == dst.numel(),
              "foam stochastic_round_bf16: needs contiguous CPU float32 src and bfloat16 dst of one size.");
  const uint32_t offset = static_cast<uint32_t>(step) * UINT32_C(0x85EBCA77) + static_cast<uint32_t>(salt) * UINT32_C(0xC2B2AE3D);
  const float* sp = src.data_ptr<float>();
  uint16_t* dp = reinterpret_cast<uint16_t*>(dst.data_ptr());
  at::parallel_for(0, src.numel(), 32768, [&](int64_t i0, int64_t i1) { stochastic_round_span(sp, dp, i0, i1, offset); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "FOAM fused CPU step (see foam_hf/_fused_cpu.py)";
  module.def("fused_step", &fused_step, "One fused FOAM step over lists of tensors (in place).");
  module.def("stochastic_round_bf16", &stochastic_round_bf16,
             "dst (bf16) <- src (fp32) stochastically rounded with the (index, step, salt) counter hash.");
  module.def("isa", [] { return std::string(kIsaNames[current_isa()]); }, "The implementation in use.");
  module.def("openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether this build runs at::parallel_for on OpenMP threads (else on the calling thread only).");
  module.def("available_isas", [] {
    std::vector<std::string> names;
    for (int i = 0; i <= best_isa(); ++i) names.emplace_back(kIsaNames[i]);
    return names;
  }, "The implementations this CPU can run, slowest first.");
  module.def("set_isa", [](const std::string& name) {
    for (int i = 0; i <= best_isa(); ++i) {
      if (name == kIsaNames[i]) {
        g_isa.store(i);
        return;
      }
    }
    TORCH_CHECK(false, "foam fused CPU step: implementation '", name, "' is not available on this CPU.");
  }, "Use another available implementation (for tests and benchmarks).");
}

#else  // FOAM_SIMD_BODY
// ------------------------------------------------------------------------------------------------------------
// Explicit SIMD, compiled once per instruction set (included above with FOAM_SIMD_NS and FOAM_SIMD_LANES set,
// inside a `#pragma GCC target` region). The math is that of fold_span / adamw_impl, one vector at a time;
// row tails go to those portable functions.
namespace {
namespace FOAM_SIMD_NS {

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
  static FOAM_INLINE vec div(vec a, vec b) { return _mm512_div_ps(a, b); }
  static FOAM_INLINE vec sqrt(vec a) { return _mm512_sqrt_ps(a); }
  static FOAM_INLINE float reduce(vec a) { return _mm512_reduce_add_ps(a); }
  // Every lane gets the sum of its aligned group of B lanes (B = 2, 4, 8, 16): butterflies, so the lanes of
  // a group hold bit-identical sums (a + b == b + a). This is the block sum and its unfold in one.
  template <int B>
  static FOAM_INLINE vec group_sum(vec x) {
    if (B >= 2) x = add(x, _mm512_permute_ps(x, 0xB1));         // lanes [1,0,3,2] in each 128-bit quarter
    if (B >= 4) x = add(x, _mm512_permute_ps(x, 0x4E));         // lanes [2,3,0,1] in each quarter
    if (B >= 8) x = add(x, _mm512_shuffle_f32x4(x, x, 0xB1));   // quarters [1,0,3,2]
    if (B >= 16) x = add(x, _mm512_shuffle_f32x4(x, x, 0x4E));  // quarters [2,3,0,1]
    return x;
  }
  // Lane i gets p[i / B] (reads exactly N / B floats): unfold of a run of folded moments. Loads and stores of
  // the moments have their exact width, never a masked 512-bit access: a masked store followed by a masked load
  // of the next, disjoint moments blocks store forwarding and cost ~40% of the B = 4 step.
  template <int L>  // L = log2(B)
  static FOAM_INLINE vec expand(const float* p) {
    constexpr int count = N >> L;
    if (count == 1) return _mm512_set1_ps(*p);
    __m512 x;
    if (count == 8) x = _mm512_castps256_ps512(_mm256_loadu_ps(p));
    else if (count == 4) x = _mm512_castps128_ps512(_mm_loadu_ps(p));
    else x = _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p))));
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
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 y = _mm512_permutexvar_ps(_mm512_slli_epi32(iota, L), x);
    if (count == 8) _mm256_storeu_ps(p, _mm512_castps512_ps256(y));
    else if (count == 4) _mm_storeu_ps(p, _mm512_castps512_ps128(y));
    else _mm_store_sd(reinterpret_cast<double*>(p), _mm_castps_pd(_mm512_castps512_ps128(y)));
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
  static FOAM_INLINE void store(uint16_t* p, __m512 x) {  // round to nearest even; NaN -> 0x7FC0
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
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
  static FOAM_INLINE vec div(vec a, vec b) { return _mm256_div_ps(a, b); }
  static FOAM_INLINE vec sqrt(vec a) { return _mm256_sqrt_ps(a); }
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
    else if (count == 2) x = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
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
    else if (count == 2) _mm_store_sd(reinterpret_cast<double*>(p), _mm_castps_pd(y));
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
  static FOAM_INLINE void store(uint16_t* p, __m256 x) {  // round to nearest even; NaN -> 0x7FC0
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    // 8 x u32 (each < 2^16) -> 8 x u16: pack within 128-bit halves, then gather the two low quadwords.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
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
#endif
using vec = V::vec;

// Software prefetch of the streams a loop walks, kPrefetchBytes ahead of the current vector. One core here
// draws far less bandwidth than it could from the hardware prefetchers alone on FOAM's two-and-a-half streams
// (G and W read, W written; the moments are B times smaller): with this hint a step takes ~0.6x the time it
// took without on the 8 x 1024x1024 benchmark (docs/benchmarks.md), where the arithmetic is not the limit.
// Prefetches never fault, so running past the end of a tensor is harmless.
constexpr int64_t kPrefetchBytes = 4096;
template <typename T>
FOAM_INLINE void prefetch_ahead(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// The step's constants, broadcast.
struct VHyper {
  vec decay, rho, rho2, eps_bc2, step_c, beta2, one_m_b2, lerp_w, one_m_lerp_w;
  bool small_w, mean_sq;
  explicit VHyper(const Hyper& h)
      : decay(V::set1(h.decay)), rho(V::set1(h.rho)), rho2(V::set1(h.rho2)), eps_bc2(V::set1(h.eps_bc2)),
        step_c(V::set1(h.step_c)), beta2(V::set1(h.beta2)), one_m_b2(V::set1(h.one_m_b2)),
        lerp_w(V::set1(h.lerp_w)), one_m_lerp_w(V::set1(1.0f - h.lerp_w)), small_w(std::abs(h.lerp_w) < 0.5f),
        mean_sq(h.mean_sq) {}
};

// lerp(self, end, w) as torch computes it; the branch on w is loop-invariant.
FOAM_INLINE vec lerp_v(vec self, vec end, const VHyper& c) {
  const vec d = V::sub(end, self);
  return c.small_w ? V::add(self, V::mul(c.lerp_w, d)) : V::sub(end, V::mul(d, c.one_m_lerp_w));
}

// W(1−γλ) − γα M̂ / (√V̂ + ε) with R = G − g̃, M = m̃ + ρR, V = ṽ + ρ²R⊙R (all unfolded, lane-wise).
FOAM_INLINE vec new_weight(vec g, vec gm, vec mk, vec vk, vec w, const VHyper& c) {
  const vec r = V::sub(g, gm);
  const vec M = V::add(mk, V::mul(c.rho, r));
  const vec Vv = V::add(vk, V::mul(c.rho2, V::mul(r, r)));
  return V::add(V::mul(w, c.decay), V::mul(c.step_c, V::div(M, V::add(V::sqrt(Vv), c.eps_bc2))));
}

// B = 2^L divides the lane count: each vector holds N / B whole blocks.
template <typename S, int L>
void fold_small(const typename S::T* g, typename S::T* w, float* m, float* v, int64_t r0, int64_t r1, int64_t n,
                const Hyper& h) {
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
      const vec vk = V::add(V::mul(V::template expand<L>(vr + j / B), c.beta2), V::mul(c.one_m_b2, g2));
      V::template compact_store<L>(mr + j / B, mk);
      V::template compact_store<L>(vr + j / B, vk);
      Ld<S>::store(wr + j, new_weight(x, gm, mk, vk, Ld<S>::load(wr + j), c));
    }
    fold_span<S>(gr, wr, mr, vr, nv, n, B, h);
  }
}

// B a multiple of the lane count: a block is B / N vectors; one reduction and a scalar moment update each.
template <typename S>
void fold_wide(const typename S::T* g, typename S::T* w, float* m, float* v, int64_t r0, int64_t r1, int64_t n,
               int64_t B, const Hyper& h) {
  const int64_t K = (n + B - 1) / B;
  const int64_t nb = n / B * B;  // columns in whole blocks
  const VHyper c(h);
  const float bf = static_cast<float>(B);
  for (int64_t row = r0; row < r1; ++row) {
    const typename S::T* gr = g + row * n;
    typename S::T* wr = w + row * n;
    float* mr = m + row * K;
    float* vr = v + row * K;
    for (int64_t c0 = 0; c0 < nb; c0 += B) {
      vec s = V::set1(0.0f), q = V::set1(0.0f);
      for (int64_t j = c0; j < c0 + B; j += V::N) {
        prefetch_ahead(gr + j);
        prefetch_ahead(wr + j);
        const vec x = Ld<S>::load(gr + j);
        s = V::add(s, x);
        q = V::add(q, V::mul(x, x));
      }
      const float gm = V::reduce(s) / bf;
      const float g2 = h.mean_sq ? V::reduce(q) / bf : gm * gm;
      const float mk = lerp(mr[c0 / B], gm, h.lerp_w);
      const float vk = vr[c0 / B] * h.beta2 + h.one_m_b2 * g2;
      mr[c0 / B] = mk;
      vr[c0 / B] = vk;
      const vec gmv = V::set1(gm), mkv = V::set1(mk), vkv = V::set1(vk);
      for (int64_t j = c0; j < c0 + B; j += V::N)
        Ld<S>::store(wr + j, new_weight(Ld<S>::load(gr + j), gmv, mkv, vkv, Ld<S>::load(wr + j), c));
    }
    fold_span<S>(gr, wr, mr, vr, nb, n, B, h);
  }
}

template <typename S>
void fold_rows(const typename S::T* g, typename S::T* w, float* m, float* v, int64_t r0, int64_t r1, int64_t n,
               int64_t B, const Hyper& h) {
  switch (B) {
    case 2: return fold_small<S, 1>(g, w, m, v, r0, r1, n, h);
    case 4: return fold_small<S, 2>(g, w, m, v, r0, r1, n, h);
    case 8: return fold_small<S, 3>(g, w, m, v, r0, r1, n, h);
#if FOAM_SIMD_LANES == 16
    case 16: return fold_small<S, 4>(g, w, m, v, r0, r1, n, h);
#endif
    default:
      if (B % V::N == 0) return fold_wide<S>(g, w, m, v, r0, r1, n, B, h);
      return Portable<S>::fold(g, w, m, v, r0, r1, n, B, h);  // e.g. B = 3: the portable tile code
  }
}

// Unfolded tensors: AdamW on elements [i0, i1), as adamw_impl.
template <typename S>
void adamw(const typename S::T* g, typename S::T* w, float* m, float* v, int64_t i0, int64_t i1, const Hyper& h) {
  const VHyper c(h);
  int64_t i = i0;
  for (; i + V::N <= i1; i += V::N) {
    prefetch_ahead(g + i);
    prefetch_ahead(w + i);
    prefetch_ahead(m + i);
    prefetch_ahead(v + i);
    const vec x = Ld<S>::load(g + i);
    const vec mi = lerp_v(V::load(m + i), x, c);
    const vec vi = V::add(V::mul(V::load(v + i), c.beta2), V::mul(V::mul(c.one_m_b2, x), x));
    V::store(m + i, mi);
    V::store(v + i, vi);
    const vec upd = V::mul(c.step_c, V::div(mi, V::add(V::sqrt(vi), c.eps_bc2)));
    Ld<S>::store(w + i, V::add(V::mul(Ld<S>::load(w + i), c.decay), upd));
  }
  adamw_impl<S>(g, w, m, v, i, i1, h);
}

}  // namespace FOAM_SIMD_NS
}  // namespace

#endif  // FOAM_SIMD_BODY
