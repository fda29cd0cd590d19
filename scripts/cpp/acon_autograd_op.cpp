// ACON-C as a C++ autograd function around the suite's C++ kernels (acon/fused/acon_cpu.cpp), for
// scripts/bench_eager_overhead.py: the same kernel calls as acon.fused.ops.NativeAconC, with autograd's
// bookkeeping in C++ instead of Python. The kernels are passed as function pointers (from the ctypes library
// acon.fused.native loaded), so one build serves every kernel build; plan = {forward kernel, backward kernel,
// N, C, S, per-sample β, blocks, threads} as acon.fused.native.Plan gives them. p1, p2 and β: contiguous fp32.
#include <torch/extension.h>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Forward = void (*)(const void*, void*, const float*, const float*, const float*, int64_t, int64_t, int64_t,
                         int, int64_t, int);
using Backward = void (*)(const void*, const void*, void*, float*, float*, float*, const float*, const float*,
                          const float*, int64_t, int64_t, int64_t, int, int64_t, int);

struct AconC : public torch::autograd::Function<AconC> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& p1, const Tensor& p2,
                        const Tensor& beta, std::vector<int64_t> plan) {
    ctx->save_for_backward({x, p1, p2, beta});
    Tensor y = at::empty_like(x);
    reinterpret_cast<Forward>(plan[0])(x.data_ptr(), y.data_ptr(), p1.data_ptr<float>(), p2.data_ptr<float>(),
                                       beta.data_ptr<float>(), plan[2], plan[3], plan[4], int(plan[5]), plan[6],
                                       int(plan[7]));
    ctx->saved_data["plan"] = std::move(plan);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto plan = ctx->saved_data["plan"].toIntVector();
    const Tensor &x = saved[0], &p1 = saved[1], &p2 = saved[2], &beta = saved[3];
    Tensor dy = grads[0];
    if (!dy.strides().equals(x.strides())) dy = at::empty_like(x).copy_(dy);  // the kernels need x's strides
    Tensor dx = at::empty_like(x), g1 = at::empty_like(p1), g2 = at::empty_like(p2), gb = at::empty_like(beta);
    reinterpret_cast<Backward>(plan[1])(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), g1.data_ptr<float>(),
                                        g2.data_ptr<float>(), gb.data_ptr<float>(), p1.data_ptr<float>(),
                                        p2.data_ptr<float>(), beta.data_ptr<float>(), plan[2], plan[3], plan[4],
                                        int(plan[5]), plan[6], int(plan[7]));
    return {dx, g1, g2, gb, Tensor()};
  }
};

Tensor acon_c(const Tensor& x, const Tensor& p1, const Tensor& p2, const Tensor& beta, std::vector<int64_t> plan) {
  return AconC::apply(x, p1, p2, beta, std::move(plan));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("acon_c", &acon_c, "ACON-C through a C++ autograd function"); }
