// Fused CPU step of FOAM (folded-state Adam, arXiv 2512.07112): the torch bindings.
//
// One pass per folded tensor: each row of G and W is read once; the block means (ragged last block averaged
// over its own entries), the folded moments and the new weights are computed in that pass, and nothing of
// parameter size is allocated. Unfolded tensors (1-D, or block_size == 1) take the plain AdamW update. The
// Python reference is foam_hf.functional._single_tensor_foam; the tests hold this kernel to it.
//
// The kernel itself lives in foam_kernel.h (readable path, portable path, bf16 moments, choice of instruction
// set) and foam_simd.h (AVX-512 and AVX2). Here: checks, the step counter and bias corrections, threads.
// Threads: one at::parallel_for per step, each thread stepping its share of every tensor (rows when folded,
// elements when not; see Share); the build passes -fopenmp when torch uses OpenMP, without which
// at::parallel_for runs everything on the calling thread.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <functional>
#include <optional>

#include "foam_kernel.h"

namespace {
using namespace foam;

constexpr int64_t kGrain = 32768;  // elements: a tensor under this goes whole to one thread
constexpr int64_t kWeightSalt = 2;  // the dither salt of bf16 weights (moments: 0 and 1)

// The threads meet once per step, not once per tensor: fused_step opens one parallel region for the whole list,
// and each thread steps its Share of every tensor, a contiguous run of rows (folded) or elements (unfolded).
// One region per tensor cost a fork and a join each, and every join waits for the slower thread.
struct Share {
  int64_t index;  // this thread's share: index of count
  int64_t count;
};

// The units [begin, end) of `range` that `share` steps: range * index / count .. range * (index + 1) / count, cut
// at multiples of `align`; a range under `grain` units goes whole to share `job % count` (a tensor, `job` its
// place in the list, so that small tensors spread over the threads).
template <typename Fn>
void for_share(int64_t range, int64_t grain, int64_t align, Share share, size_t job, const Fn& fn) {
  if (range <= grain) {
    if (static_cast<int64_t>(job % static_cast<size_t>(share.count)) == share.index && range > 0) fn(0, range);
    return;
  }
  const auto cut = [&](int64_t i) { return std::min(range, range * i / share.count / align * align); };
  const int64_t begin = cut(share.index);
  const int64_t end = share.index + 1 == share.count ? range : cut(share.index + 1);
  if (begin < end) fn(begin, end);
}

constexpr int64_t kElementAlign = 64;  // unfolded shares start on whole vectors (and cache lines)

// A block wider than its row of n entries is the whole row (folding._within_row): one block either way, and
// (n + B - 1) / B cannot overflow however large block_size is.
int64_t block_within_row(int64_t block_size, int64_t n) { return std::min(block_size, n); }

template <typename S>
void run_tensor(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v, bool folded,
                int64_t block_size, const Hyper<typename S::C>& h, RoundingOffsets offsets,
                std::optional<uint32_t> weight_rounding, Share share, size_t job) {
  if constexpr (std::is_same_v<S, BF16>) {
    if (weight_rounding) {  // weight_rounding="stochastic": *weight_rounding is the weights' rounding offset
      Hyper<float> rounding = h;
      rounding.weight_offset = *weight_rounding;
      return run_tensor<StochasticBF16>(p, g, m, v, folded, block_size, rounding, offsets, std::nullopt, share, job);
    }
  }
  using T = typename S::T;
  using C = typename S::C;
  const T* gp = reinterpret_cast<const T*>(g.const_data_ptr());
  T* wp = reinterpret_cast<T*>(p.data_ptr());
  const bool bf16_moments = m.scalar_type() == at::kBFloat16;
  const Bf16Ops ops = bf16_ops();
  if (folded) {
    const int64_t n = p.size(-1);
    const int64_t B = block_within_row(block_size, n);
    const int64_t rows = p.numel() / n;
    const int64_t grain = std::max<int64_t>(1, kGrain / n);
    const FoldFn<S> fold = fold_fn<S>();
    if constexpr (std::is_same_v<C, float>) {
      if (bf16_moments) {
        uint16_t* mp = reinterpret_cast<uint16_t*>(m.data_ptr());
        uint16_t* vp = reinterpret_cast<uint16_t*>(v.data_ptr());
        if (const FoldBf16Fn<S> one_pass = fold_bf16_fn<S>(B)) {
          for_share(rows, grain, 1, share, job, [&](int64_t r0, int64_t r1) {
            one_pass(gp, wp, mp, vp, r0, r1, n, B, h, offsets);
          });
          return;
        }
        for_share(rows, grain, 1, share, job, [&](int64_t r0, int64_t r1) {
          fold_rows_bf16_moments<S>(fold, ops, gp, wp, mp, vp, r0, r1, n, B, h, offsets);
        });
        return;
      }
    }
    C* mp = reinterpret_cast<C*>(m.data_ptr());
    C* vp = reinterpret_cast<C*>(v.data_ptr());
    for_share(rows, grain, 1, share, job, [&](int64_t r0, int64_t r1) { fold(gp, wp, mp, vp, r0, r1, n, B, h); });
  } else {
    const AdamwFn<S> adamw = adamw_fn<S>();
    if constexpr (std::is_same_v<C, float>) {
      if (bf16_moments) {
        uint16_t* mp = reinterpret_cast<uint16_t*>(m.data_ptr());
        uint16_t* vp = reinterpret_cast<uint16_t*>(v.data_ptr());
        for_share(p.numel(), kGrain, kElementAlign, share, job, [&](int64_t i0, int64_t i1) {
          adamw_bf16_moments<S>(adamw, ops, gp, wp, mp, vp, i0, i1, h, offsets);
        });
        return;
      }
    }
    C* mp = reinterpret_cast<C*>(m.data_ptr());
    C* vp = reinterpret_cast<C*>(v.data_ptr());
    for_share(p.numel(), kGrain, kElementAlign, share, job,
              [&](int64_t i0, int64_t i1) { adamw(gp, wp, mp, vp, i0, i1, h); });
  }
}

void check_tensor(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), "foam fused CPU step: ", what, "[", i, "] is on ", t.device(),
              "; the fused CPU kernel needs CPU tensors.");
  TORCH_CHECK(t.is_contiguous(), "foam fused CPU step: ", what, "[", i, "] must be contiguous.");
  TORCH_CHECK(!t.is_sparse(), "foam fused CPU step: ", what, "[", i, "] must be dense.");
}

// The parameter dtypes the kernel steps, and the moments it keeps for each: float32 or bfloat16 moments (state
// dtype "bfloat16"), float64 ones for float64 parameters. Both fused_step's checks and covers() ask these.
bool supported_param_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble;
}

bool supported_moments(at::ScalarType param, at::ScalarType moments) {
  return param == at::kDouble ? moments == at::kDouble : (moments == at::kFloat || moments == at::kBFloat16);
}

// Whether p's moments are folded (block means over its last dimension) or kept whole (AdamW's update).
bool folds(const at::Tensor& p, int64_t block_size) { return block_size > 1 && p.dim() >= 2 && p.numel() > 0; }

// The step's constants, computed in double as the Python paths compute them, then cast to the compute type.
template <typename C>
Hyper<C> make_hyper(double step, double lr, double beta1, double beta2, double eps, double weight_decay,
                    double scale, double res_scale, bool mean_sq, bool folded) {
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, step));
  const double step_size = lr / bc1;
  Hyper<C> h;
  h.decay = static_cast<C>(1.0 - lr * weight_decay);
  h.beta2 = static_cast<C>(beta2);
  h.lerp_w = static_cast<C>(1.0 - beta1);
  h.one_m_b2 = static_cast<C>(1.0 - beta2);
  h.rho = static_cast<C>(res_scale);
  h.rho2 = static_cast<C>(res_scale * res_scale);
  h.eps_bc2 = static_cast<C>(eps * bc2_sqrt);
  h.step_c = static_cast<C>(-step_size * (folded ? scale : 1.0) * bc2_sqrt);
  h.mean_sq = mean_sq;
  return h;
}

}  // namespace

// One FOAM step over a group's tensors; increments each state_steps[i] (a float32 scalar tensor) in place.
// Moments: float32 (any parameter dtype but float64), bfloat16 (state_dtype="bfloat16", same), or float64 for
// float64 parameters. stochastic_weights: bf16 weights are stochastically rounded (weight_rounding="stochastic").
void fused_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& state_steps, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t block_size, double scale, double res_scale, bool mean_sq,
                bool stochastic_weights) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count &&
                  state_steps.size() == count,
              "foam fused CPU step: the five tensor lists must have the same length.");
  TORCH_CHECK(block_size >= 1, "foam fused CPU step: block_size must be >= 1, got ", block_size);
  std::vector<std::function<void(Share)>> jobs;
  jobs.reserve(count);
  int64_t total = 0;
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
    const bool moments_ok = m.scalar_type() == v.scalar_type() && supported_moments(p.scalar_type(), m.scalar_type());
    TORCH_CHECK(moments_ok, "foam fused CPU step: params[", i, "] is ", p.scalar_type(), " and its moments ",
                m.scalar_type(), "/", v.scalar_type(),
                "; the kernel takes float32 or bfloat16 moments, float64 ones for float64 parameters.");
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device().is_cpu(),
                "foam fused CPU step: state_steps[", i, "] must be a float32 scalar CPU tensor.");
    const bool folded = folds(p, block_size);
    const int64_t n = p.dim() > 0 ? p.size(-1) : 1;
    const int64_t B = folded ? block_within_row(block_size, n) : 1;
    const int64_t expected = folded ? p.numel() / n * ((n + B - 1) / B) : p.numel();
    TORCH_CHECK(m.numel() == expected && v.numel() == expected, "foam fused CPU step: moments of params[", i,
                "] hold ", m.numel(), " entries, expected ", expected, ".");
    TORCH_CHECK(supported_param_dtype(p.scalar_type()), "foam fused CPU step: params[", i, "] has dtype ",
                p.scalar_type(),
                "; the fused kernel supports float32, bfloat16, float16 and float64.");
  }
  // Every tensor passed its checks: only now does anything change (a failed check leaves all as it was).
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const at::Tensor& m = exp_avgs[i];
    const at::Tensor& v = exp_avg_sqs[i];
    const bool folded = folds(p, block_size);
    float* sp = state_steps[i].data_ptr<float>();
    *sp += 1.0f;
    const double step = static_cast<double>(*sp);
    const RoundingOffsets offsets{rounding_offset(static_cast<int64_t>(step), 0),
                                  rounding_offset(static_cast<int64_t>(step), 1)};
    // bf16 weights under weight_rounding="stochastic" are rounded with salt 2 (foam_hf.precision.WEIGHT_SALT).
    const std::optional<uint32_t> weight_rounding =
        stochastic_weights && p.scalar_type() == at::kBFloat16
            ? std::optional<uint32_t>(rounding_offset(static_cast<int64_t>(step), kWeightSalt))
            : std::nullopt;
    if (p.numel() == 0) continue;
    const size_t job = jobs.size();
    total += p.numel();
    // The job of a tensor stored as S (F32, BF16, F16, F64): its constants now, its share of the rows later.
    const auto add_job = [&](auto storage) {
      using S = decltype(storage);
      const auto h = make_hyper<typename S::C>(step, lr, beta1, beta2, eps, weight_decay, scale, res_scale,
                                               mean_sq, folded);
      jobs.emplace_back([=, &p, &g, &m, &v](Share share) {
        run_tensor<S>(p, g, m, v, folded, block_size, h, offsets, weight_rounding, share, job);
      });
    };
    switch (p.scalar_type()) {
      case at::kFloat: add_job(F32{}); break;
      case at::kBFloat16: add_job(BF16{}); break;
      case at::kHalf: add_job(F16{}); break;
      case at::kDouble: add_job(F64{}); break;
      default: TORCH_INTERNAL_ASSERT(false, "dtype checked above");
    }
  }
  // One parallel region (none below kGrain elements in all): share t of every tensor runs on thread t.
  const int64_t threads = total > kGrain ? std::max<int64_t>(1, at::get_num_threads()) : 1;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (const auto& run : jobs) run(Share{t, threads});
    }
  });
}

// dst (bf16) <- src (fp32) stochastically rounded, the kernel's own rounding of bf16 moments (foam_kernel.h; the
// explicit AVX2 and AVX-512 versions under those implementations), over a whole tensor: the tests hold it to
// foam_hf.precision.store_moment bit for bit.
void stochastic_round_bf16(const at::Tensor& src, const at::Tensor& dst, int64_t step, int64_t salt) {
  TORCH_CHECK(src.scalar_type() == at::kFloat && dst.scalar_type() == at::kBFloat16 && src.is_contiguous() &&
                  dst.is_contiguous() && src.device().is_cpu() && dst.device().is_cpu() &&
                  src.numel() == dst.numel(),
              "foam stochastic_round_bf16: needs contiguous CPU float32 src and bfloat16 dst of one size.");
  const uint32_t offset = rounding_offset(step, salt);
  const RoundFn round = bf16_ops().round;
  const float* sp = src.data_ptr<float>();
  uint16_t* dp = reinterpret_cast<uint16_t*>(dst.data_ptr());
  at::parallel_for(0, src.numel(), kGrain,
                   [&](int64_t i0, int64_t i1) { round(sp + i0, dp + i0, i1 - i0, i0, offset); });
}

// dst (bf16) <- src (fp32) rounded to nearest even, by the current implementation's bf16 weight stores (both of
// them on the SIMD paths): the tests hold it to round-to-nearest-even written from its definition.
void round_bf16_nearest_tensor(const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(src.scalar_type() == at::kFloat && dst.scalar_type() == at::kBFloat16 && src.is_contiguous() &&
                  dst.is_contiguous() && src.device().is_cpu() && dst.device().is_cpu() &&
                  src.numel() == dst.numel(),
              "foam round_bf16_nearest: needs contiguous CPU float32 src and bfloat16 dst of one size.");
  round_nearest_fn()(src.data_ptr<float>(), reinterpret_cast<uint16_t*>(dst.data_ptr()), src.numel());
}

// Whether fused_step steps every params[i] with moments of exp_avgs[i]'s dtype: the rule of
// foam_hf._fused_cpu.fused_supported (a dense, contiguous CPU tensor of float32, bfloat16, float16 or float64;
// float32 or bfloat16 moments, float64 ones for float64 parameters), asked of a whole list in one call. The
// Python-type test (plain tensors only) stays in Python, before this is called.
bool covers(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& exp_avgs) {
  if (params.size() != exp_avgs.size()) return false;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (!p.device().is_cpu() || p.layout() != at::kStrided || !p.is_contiguous()) return false;
    if (!supported_param_dtype(p.scalar_type()) || !supported_moments(p.scalar_type(), exp_avgs[i].scalar_type())) {
      return false;
    }
  }
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "FOAM fused CPU step (see foam_hf/_fused_cpu.py)";
  module.def("fused_step", &fused_step, "One fused FOAM step over lists of tensors (in place).");
  module.def("covers", &covers, "Whether fused_step steps every parameter with its moments' dtype.");
  module.def("stochastic_round_bf16", &stochastic_round_bf16,
             "dst (bf16) <- src (fp32) stochastically rounded with the (index, step, salt) counter hash.");
  module.def("round_bf16_nearest", &round_bf16_nearest_tensor,
             "dst (bf16) <- src (fp32) rounded to nearest even by the kernel's bf16 weight stores.");
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
    TORCH_CHECK(set_isa(name), "foam fused CPU step: implementation '", name, "' is not available on this CPU.");
  }, "Use another available implementation (for tests and benchmarks).");
}
