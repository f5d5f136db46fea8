// Declarations shared by the op registration (ops.cpp) and the per-CPU-capability
// kernel files (kernels_*.cpp). The schemas of the ops live in sn_plugin/kernels/ops.py;
// the signatures below follow them (Tensor? -> optional<Tensor>, float -> double, int -> int64_t).
//
// Conventions of every op: x is a contiguous (N, C, *) tensor (S = the product of its spatial
// sizes, 1 for an (N, C) input), the per-(n, c) and per-layer statistics are float64 tensors, and
//   ln_stats (2, N) = [mean_ln; var_ln], bn_stats (2, C) = [mean_bn; var_bn] (the BN
//   statistics the layer used: batch or running, zeros without a BN branch),
//   batch_count: the number of samples M of the BN branch as a 0-d float64 tensor (SyncSN,
//   where it comes from other processes); absent, it is this call's N.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace sn_plugin {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// The per-capability implementation of every op (see ops.cpp for what each computes).
struct CpuKernels {
  std::tuple<Tensor, Tensor> (*moments)(const Tensor& x, bool unbiased);
  std::tuple<Tensor, Tensor, Tensor> (*normalize)(
      const Tensor& x, const Tensor& mean_in, const Tensor& var_in, const OptTensor& batch_mean,
      const OptTensor& batch_var, const OptTensor& batch_count, const Tensor& mean_logits,
      const Tensor& var_logits, const OptTensor& weight, const OptTensor& bias,
      const OptTensor& running_mean, const OptTensor& running_var, bool batch_stats, double eps,
      bool unbiased, bool has_in);
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*forward)(
      const Tensor& x, const Tensor& mean_logits, const Tensor& var_logits, const OptTensor& weight,
      const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
      bool batch_stats, double eps, bool unbiased, bool has_in);
  void (*update_running_stats)(
      const Tensor& running_mean, const Tensor& running_var, const Tensor& bn_stats,
      const OptTensor& batch_count, int64_t num_samples, int64_t spatial_size, double momentum,
      bool unbiased);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> (*backward_reduce)(
      const Tensor& grad_out, const Tensor& x, const Tensor& mean_in, const Tensor& ln_stats,
      const Tensor& bn_stats, const OptTensor& batch_count, const Tensor& mean_logits,
      const Tensor& var_logits, const OptTensor& weight, bool batch_stats, double eps,
      bool unbiased, bool has_in);
  Tensor (*backward_dx)(
      const Tensor& grad_out, const Tensor& x, const Tensor& mean_in, const Tensor& row_grads,
      const Tensor& ln_grad, const Tensor& bn_grad, const Tensor& ln_stats, const Tensor& bn_stats,
      const OptTensor& batch_count, const Tensor& mean_logits, const Tensor& var_logits,
      const OptTensor& weight, bool batch_stats, double eps, bool unbiased, bool has_in);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> (*backward)(
      const Tensor& grad_out, const Tensor& x, const Tensor& mean_in, const Tensor& ln_stats,
      const Tensor& bn_stats, const Tensor& mean_logits, const Tensor& var_logits,
      const OptTensor& weight, bool batch_stats, double eps, bool unbiased, bool has_in,
      bool input_grad);
};

// nullptr where the build or the compiler has no such variant.
const CpuKernels* kernels_default();
const CpuKernels* kernels_avx2();
const CpuKernels* kernels_avx512();

// S: the values of one (n, c), the product of x's sizes after the first two.
inline int64_t spatial_size(const Tensor& x) {
  int64_t s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    s *= x.size(d);
  }
  return s;
}

}  // namespace sn_plugin
