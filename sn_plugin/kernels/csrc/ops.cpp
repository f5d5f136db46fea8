// CPU implementations of the sn_plugin ops (schemas: sn_plugin/kernels/ops.py): argument
// checks, then the kernels of the best CPU capability this machine has (kernels_*.cpp).
//
//   moments(x)            per-(n, c) IN mean and variance
//   normalize(...)        LN/BN statistics, mixing, y; the BN statistics come from the batch,
//                         from batch_mean/batch_var/batch_count (SyncSN, already reduced over the
//                         processes) or from the running statistics
//   forward(...)          moments + normalize on this call's batch: (y, mean_in, ln, bn stats);
//                         mean_in is (N, 0) for one value per (n, c) (the means are x)
//   update_running_stats  the running statistics' moving average (in place)
//   backward_reduce(...)  per-row sums and their reductions: row_grads (3, N, C) =
//                         [dL/dmean, dL/dvar, var_in], ln_grad (2, N), bn_grad (2, C) (to be
//                         all-reduced for SyncSN), and the parameter gradients
//   backward_dx(...)      dx from those
//   backward(...)         backward_reduce + backward_dx on this call's batch
#include <Python.h>

#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "sn_cpu.h"

namespace sn_plugin {
namespace {

const CpuKernels* choose_kernels() {
  const std::string capability = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
  if (capability == "AVX512" && kernels_avx512() != nullptr) {
    return kernels_avx512();
  }
  if ((capability == "AVX512" || capability == "AVX2") && kernels_avx2() != nullptr) {
    return kernels_avx2();
  }
  return kernels_default();
}

const CpuKernels& kernels() {
  static const CpuKernels* chosen = choose_kernels();
  return *chosen;
}

const char* chosen_capability() {
  const CpuKernels* chosen = &kernels();
  if (chosen == kernels_avx512()) {
    return "AVX512";
  }
  return chosen == kernels_avx2() ? "AVX2" : "DEFAULT";
}

void check_input(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous(),
              "sn_plugin: the input must be a contiguous (N, C, *) tensor, got sizes ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "sn_plugin: the input must be floating point, got ", x.scalar_type());
}

void check_stats(const Tensor& t, at::IntArrayRef sizes, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous() && t.sizes() == sizes,
              "sn_plugin: ", name, " must be a contiguous float64 tensor of sizes ", sizes,
              ", got ", t.scalar_type(), " ", t.sizes());
}

void check_per_channel(const OptTensor& t, int64_t C, const char* name) {
  TORCH_CHECK(!t.has_value() || (t->numel() == C && t->is_contiguous()),
              "sn_plugin: ", name, " must be a contiguous tensor of ", C, " values");
}

void check_layer(const Tensor& x, const Tensor& mean_logits, const Tensor& var_logits,
                 const OptTensor& weight, const OptTensor& batch_count) {
  check_input(x);
  const int64_t K = mean_logits.numel();
  TORCH_CHECK((K == 2 || K == 3) && var_logits.numel() == K,
              "sn_plugin: mean_logits and var_logits must both have 3 entries [IN, LN, BN] or 2 "
              "[IN, LN], got ", K, " and ", var_logits.numel());
  check_per_channel(weight, x.size(1), "weight");
  TORCH_CHECK(!batch_count.has_value() || (batch_count->numel() == 1 &&
                                           batch_count->scalar_type() == at::kDouble),
              "sn_plugin: batch_count must hold one float64 value");
}

void check_grad(const Tensor& grad_out, const Tensor& x) {
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.is_contiguous(),
              "sn_plugin: grad_out must be contiguous with the input's sizes and dtype");
}

std::tuple<Tensor, Tensor> moments(const Tensor& x, bool unbiased) {
  check_input(x);
  return kernels().moments(x, unbiased);
}

std::tuple<Tensor, Tensor, Tensor> normalize(
    const Tensor& x, const Tensor& mean_in, const Tensor& var_in, const OptTensor& batch_mean,
    const OptTensor& batch_var, const OptTensor& batch_count, const Tensor& mean_logits,
    const Tensor& var_logits, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool batch_stats, double eps,
    bool unbiased, bool has_in) {
  check_layer(x, mean_logits, var_logits, weight, batch_count);
  const int64_t N = x.size(0), C = x.size(1);
  check_stats(mean_in, {N, C}, "mean_in");
  check_stats(var_in, {N, C}, "var_in");
  check_per_channel(bias, C, "bias");
  check_per_channel(batch_mean, C, "batch_mean");
  check_per_channel(batch_var, C, "batch_var");
  TORCH_CHECK(batch_mean.has_value() == batch_var.has_value() &&
                  batch_mean.has_value() == batch_count.has_value(),
              "sn_plugin: batch_mean, batch_var and batch_count go together");
  const bool bn_from_running = mean_logits.numel() == 3 && !batch_stats;
  TORCH_CHECK(!bn_from_running || (running_mean.has_value() && running_var.has_value()),
              "sn_plugin: running statistics are needed when batch_stats is false");
  check_per_channel(running_mean, C, "running_mean");
  check_per_channel(running_var, C, "running_var");
  return kernels().normalize(x, mean_in, var_in, batch_mean, batch_var, batch_count, mean_logits,
                             var_logits, weight, bias, running_mean, running_var, batch_stats,
                             eps, unbiased, has_in);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(
    const Tensor& x, const Tensor& mean_logits, const Tensor& var_logits, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool batch_stats, double eps, bool unbiased, bool has_in) {
  check_layer(x, mean_logits, var_logits, weight, std::nullopt);
  const int64_t C = x.size(1);
  check_per_channel(bias, C, "bias");
  const bool bn_from_running = mean_logits.numel() == 3 && !batch_stats;
  TORCH_CHECK(!bn_from_running || (running_mean.has_value() && running_var.has_value()),
              "sn_plugin: running statistics are needed when batch_stats is false");
  check_per_channel(running_mean, C, "running_mean");
  check_per_channel(running_var, C, "running_var");
  return kernels().forward(x, mean_logits, var_logits, weight, bias, running_mean, running_var,
                           batch_stats, eps, unbiased, has_in);
}

void update_running_stats(const Tensor& running_mean, const Tensor& running_var,
                          const Tensor& bn_stats, const OptTensor& batch_count,
                          int64_t num_samples, int64_t spatial_size, double momentum,
                          bool unbiased) {
  const int64_t C = running_mean.numel();
  check_per_channel(running_mean, C, "running_mean");
  check_per_channel(running_var, C, "running_var");
  check_stats(bn_stats, {2, C}, "bn_stats");
  TORCH_CHECK(!batch_count.has_value() || (batch_count->numel() == 1 &&
                                           batch_count->scalar_type() == at::kDouble),
              "sn_plugin: batch_count must hold one float64 value");
  kernels().update_running_stats(running_mean, running_var, bn_stats, batch_count, num_samples,
                                 spatial_size, momentum, unbiased);
}

// values_kept_no_means: the fused forward's (N, 0) mean_in of one value per (n, c) is accepted.
void check_saved(const Tensor& x, const Tensor& mean_in, const Tensor& ln_stats,
                 const Tensor& bn_stats, bool values_kept_no_means = false) {
  const int64_t N = x.size(0), C = x.size(1);
  const bool no_means = values_kept_no_means && spatial_size(x) == 1 && mean_in.dim() == 2 &&
                        mean_in.size(1) == 0;
  check_stats(mean_in, {N, no_means ? 0 : C}, "mean_in");
  check_stats(ln_stats, {2, N}, "ln_stats");
  check_stats(bn_stats, {2, C}, "bn_stats");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_reduce(
    const Tensor& grad_out, const Tensor& x, const Tensor& mean_in, const Tensor& ln_stats,
    const Tensor& bn_stats, const OptTensor& batch_count, const Tensor& mean_logits,
    const Tensor& var_logits, const OptTensor& weight, bool batch_stats, double eps,
    bool unbiased, bool has_in) {
  check_layer(x, mean_logits, var_logits, weight, batch_count);
  check_grad(grad_out, x);
  check_saved(x, mean_in, ln_stats, bn_stats);
  return kernels().backward_reduce(grad_out, x, mean_in, ln_stats, bn_stats, batch_count,
                                   mean_logits, var_logits, weight, batch_stats, eps, unbiased,
                                   has_in);
}

Tensor backward_dx(const Tensor& grad_out, const Tensor& x, const Tensor& mean_in,
                   const Tensor& row_grads, const Tensor& ln_grad, const Tensor& bn_grad,
                   const Tensor& ln_stats, const Tensor& bn_stats, const OptTensor& batch_count,
                   const Tensor& mean_logits, const Tensor& var_logits, const OptTensor& weight,
                   bool batch_stats, double eps, bool unbiased, bool has_in) {
  check_layer(x, mean_logits, var_logits, weight, batch_count);
  check_grad(grad_out, x);
  check_saved(x, mean_in, ln_stats, bn_stats);
  const int64_t N = x.size(0), C = x.size(1);
  check_stats(row_grads, {3, N, C}, "row_grads");
  check_stats(ln_grad, {2, N}, "ln_grad");
  check_stats(bn_grad, {2, C}, "bn_grad");
  return kernels().backward_dx(grad_out, x, mean_in, row_grads, ln_grad, bn_grad, ln_stats,
                               bn_stats, batch_count, mean_logits, var_logits, weight,
                               batch_stats, eps, unbiased, has_in);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& mean_in, const Tensor& ln_stats,
    const Tensor& bn_stats, const Tensor& mean_logits, const Tensor& var_logits,
    const OptTensor& weight, bool batch_stats, double eps, bool unbiased, bool has_in,
    bool input_grad) {
  check_layer(x, mean_logits, var_logits, weight, std::nullopt);
  check_grad(grad_out, x);
  check_saved(x, mean_in, ln_stats, bn_stats, /*values_kept_no_means=*/true);
  return kernels().backward(grad_out, x, mean_in, ln_stats, bn_stats, mean_logits, var_logits,
                            weight, batch_stats, eps, unbiased, has_in, input_grad);
}

// Autograd of the fused forward, for every device (it redispatches to the CPU or CUDA kernels).
// In C++ because the Python route (torch.library.register_autograd) costs about 100 us a call
// in argument handling, a quarter of a small layer's time.
using ForwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, bool, double, bool, bool);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const OptTensor&, bool, double, bool, bool, bool);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

class ForwardFunction : public torch::autograd::Function<ForwardFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& mean_logits,
      const Tensor& var_logits, const OptTensor& weight, const OptTensor& bias,
      const OptTensor& running_mean, const OptTensor& running_var, bool batch_stats, double eps,
      bool unbiased, bool has_in) {
    static const auto op = find_op<ForwardSignature>("sn_plugin::forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean_in, ln_stats, bn_stats] = op.call(x, mean_logits, var_logits, weight, bias,
                                                    running_mean, running_var, batch_stats, eps,
                                                    unbiased, has_in);
    // x and O(N*C) statistics only: as little as BatchNorm keeps.
    ctx->save_for_backward({x, mean_in, ln_stats, bn_stats, mean_logits, var_logits,
                            weight.value_or(Tensor())});
    ctx->saved_data["flags"] = c10::List<bool>({batch_stats, unbiased, has_in});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias_dtype"] = bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : -1;
    ctx->mark_non_differentiable({mean_in, ln_stats, bn_stats});
    return {y, mean_in, ln_stats, bn_stats};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = find_op<BackwardSignature>("sn_plugin::backward");
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const OptTensor weight = saved[6].defined() ? OptTensor(saved[6]) : std::nullopt;
    const auto flags = ctx->saved_data["flags"].toBoolList();
    const Tensor grad_y = grads[0].to(x.scalar_type()).contiguous();
    auto [grad_x, grad_mean_logits, grad_var_logits, grad_weight, grad_bias] =
        op.call(grad_y, x, saved[1], saved[2], saved[3], saved[4], saved[5], weight, flags[0],
                ctx->saved_data["eps"].toDouble(), flags[1], flags[2], ctx->needs_input_grad(0));
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    return {ctx->needs_input_grad(0) ? grad_x : Tensor(),
            grad_mean_logits,
            grad_var_logits,
            weight.has_value() ? grad_weight.to(weight->scalar_type()) : Tensor(),
            bias_dtype >= 0 ? grad_bias.to(static_cast<at::ScalarType>(bias_dtype)) : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_autograd(
    const Tensor& x, const Tensor& mean_logits, const Tensor& var_logits, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool batch_stats, double eps, bool unbiased, bool has_in) {
  auto out = ForwardFunction::apply(x, mean_logits, var_logits, weight, bias, running_mean,
                                    running_var, batch_stats, eps, unbiased, has_in);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_plugin, Autograd, m) { m.impl("forward", &forward_autograd); }

TORCH_LIBRARY_IMPL(sn_plugin, CPU, m) {
  m.impl("moments", &moments);
  m.impl("normalize", &normalize);
  m.impl("forward", &forward);
  m.impl("update_running_stats", &update_running_stats);
  m.impl("backward_reduce", &backward_reduce);
  m.impl("backward_dx", &backward_dx);
  m.impl("backward", &backward);
}

}  // namespace sn_plugin

// Importing the module registers the kernels above (the ops themselves are defined in Python).
namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(sn_plugin::chosen_capability());
}

PyMethodDef module_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU instruction set the SN kernels run with (AVX512, AVX2 or DEFAULT)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "sn_plugin's CPU kernels (registered with torch.library on import).", -1,
                          module_methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
