// Fused CPU step of FOAM (folded-state Adam, arXiv 2512.07112).
//
// One pass per folded tensor: each row of G and W is read once, in tiles that stay in L1; the block means
// (ragged last block averaged over its own entries), the folded moments and the new weights are computed
// in that pass, and nothing of parameter size is allocated. Unfolded tensors (1-D, or block_size == 1)
// take the plain AdamW update. The Python reference is foam_hf.optim._single_tensor_foam; the tests hold
// this file to it.
//
// Vectorisation: the hot loops are plain loops over contiguous float buffers that gcc/clang vectorise.
// They are compiled once per instruction set with target_clones (AVX-512, AVX2+FMA, baseline x86-64) and
// picked at load time by the CPU, so the object is safe on any x86-64 and still uses the wide units where
// they exist. Other architectures get the portable build. Threads: at::parallel_for over rows.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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
void run_tensor(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v, bool folded,
                int64_t B, const Hyper& h,
                void (*fold_fn)(const typename S::T*, typename S::T*, float*, float*, int64_t, int64_t, int64_t,
                                int64_t, const Hyper&),
                void (*adamw_fn)(const typename S::T*, typename S::T*, float*, float*, int64_t, int64_t,
                                 const Hyper&)) {
  using T = typename S::T;
  const T* gp = reinterpret_cast<const T*>(g.const_data_ptr());
  T* wp = reinterpret_cast<T*>(p.data_ptr());
  float* mp = m.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  if (folded) {
    const int64_t n = p.size(-1);
    const int64_t rows = p.numel() / n;
    const int64_t grain = std::max<int64_t>(1, 32768 / n);  // ~32k elements per task
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { fold_fn(gp, wp, mp, vp, r0, r1, n, B, h); });
  } else {
    at::parallel_for(0, p.numel(), 32768, [&](int64_t i0, int64_t i1) { adamw_fn(gp, wp, mp, vp, i0, i1, h); });
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
      case at::kFloat: run_tensor<F32>(p, g, m, v, folded, block_size, h, fold_rows_F32, adamw_F32); break;
      case at::kBFloat16: run_tensor<BF16>(p, g, m, v, folded, block_size, h, fold_rows_BF16, adamw_BF16); break;
      case at::kHalf: run_tensor<F16>(p, g, m, v, folded, block_size, h, fold_rows_F16, adamw_F16); break;
      default:
        TORCH_CHECK(false, "foam fused CPU step: params[", i, "] has dtype ", p.scalar_type(),
                    "; the fused kernel supports float32, bfloat16 and float16.");
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "FOAM fused CPU step (see foam_hf/_fused_cpu.py)";
  module.def("fused_step", &fused_step, "One fused FOAM step over lists of tensors (in place).");
}
