// The dense arithmetic of the Llama-style block LLaDA and Dream share, called from C++.
//
// Each function is the composition of vdiff_worker/models/layers.py's functions it names,
// the same ATen ops in the same order, so its outputs are those of the Python block bit for
// bit; what it saves is the Python between the ops, which bounds a small model's pass (a
// 32-token pass of llada-tiny spends more there than in arithmetic). Attention stays in
// Python (layers.attend: the cache slots, masks and backends are defined once, there).
#include <torch/extension.h>

#include <vector>

using at::Tensor;
using c10::optional;

namespace {

// layers.rms_norm
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  if (x.scalar_type() == at::kFloat) {
    return weight * at::rms_norm(x, {weight.size(0)}, c10::nullopt, eps);
  }
  return weight * at::rms_norm(x.to(at::kFloat), {weight.size(0)}, c10::nullopt, eps)
                      .to(x.scalar_type());
}

// layers.apply_rope
Tensor apply_rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  if (x.scalar_type() == cos.scalar_type()) {
    return x * cos + x.roll({half}, {-1}) * sin;
  }
  const Tensor xt = x.to(cos.scalar_type());
  return (xt * cos + xt.roll({half}, {-1}) * sin).to(x.scalar_type());
}

}  // namespace

// layers.qkv_heads(layers.linear(layers.rms_norm(h))): rotated queries [B, H, L, D],
// rotated keys and values [B, H_kv, L, D].
std::vector<Tensor> attention_input(const Tensor& h, const Tensor& norm, const Tensor& qkv,
                                    const optional<Tensor>& qkv_bias, double eps, int64_t heads,
                                    int64_t kv_heads, const Tensor& cos, const Tensor& sin) {
  const int64_t batch = h.size(0), length = h.size(1);
  const Tensor x =
      at::linear(rms_norm(h, norm, eps), qkv, qkv_bias).view({batch, length, heads + 2 * kv_heads, -1});
  const Tensor qk = apply_rope(x.slice(2, 0, heads + kv_heads), cos, sin);
  return {qk.slice(2, 0, heads).transpose(1, 2), qk.slice(2, heads).transpose(1, 2),
          x.slice(2, heads + kv_heads).transpose(1, 2)};
}

// The rest of layers.llama_block after attention: the output projection of the merged heads
// added to the residual ``h`` (already picked to the attending rows), then the SwiGLU MLP.
Tensor block_output(const Tensor& h, const Tensor& att, const Tensor& out,
                    const optional<Tensor>& out_bias, const Tensor& norm, const Tensor& gate_up,
                    const optional<Tensor>& gate_up_bias, const Tensor& down,
                    const optional<Tensor>& down_bias, double eps) {
  const Tensor merged = att.transpose(1, 2).reshape({att.size(0), att.size(2), -1});
  const Tensor r = h + at::linear(merged, out, out_bias);
  const std::vector<Tensor> parts =
      at::linear(rms_norm(r, norm, eps), gate_up, gate_up_bias).chunk(2, -1);
  return r + at::linear(at::silu(parts[0]) * parts[1], down, down_bias);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_input", &attention_input);
  m.def("block_output", &block_output);
}
