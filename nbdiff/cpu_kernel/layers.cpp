// Registers torch.ops.nbdiff.decoder_layers: the decoder layers of a Llama/Qwen2 model over a few
// rows, as nbdiff/cpu_kernel/fast_forward.py's `_lean` runs them from Python, in one call.
//
// Why: in a one-token forward on a CPU the products read the weights at the memory's speed; what is
// left is about forty small tensor operations per layer, and from Python each costs the
// interpreter, the argument parsing and the dispatcher. Here the same ATen operations run in the
// same order on tensors of the same shapes and layouts (so every value has the bits it has in
// transformers' modules), without the Python around them; the products go straight to the
// few-row kernel (the bits small_m_linear gives). With `fused` (what nbdiff runs) the elementwise
// steps (RMSNorm around torch's sum, rotary, gate * up, the residual adds) are plain loops that
// make the same roundings (below), and the rotated keys go straight into a GrowingLayer's room.
//
// What each layer does (transformers' LlamaDecoderLayer / Qwen2DecoderLayer with sdpa attention
// and a DynamicLayer cache, shapes for B rows of n tokens, H heads of d, G key/value heads):
//   h = rmsnorm(x)                          x: [B, n, hidden]
//   q, k, v = h Wq^T + bq, ...              [B, n, H*d], [B, n, G*d] x2 -> [B, H|G, n, d]
//   q, k = rotary(q), rotary(k)             (q * cos) + (rotate_half(q) * sin)
//   k, v = cat(cache_k, k), cat(cache_v, v) along the columns (DynamicLayer.update), or, where the
//          cache has room (used >= 0: nbdiff.decode.context.GrowingLayer), k and v written into
//          columns [used, used + n) of it in place and the attention over its first used + n
//          columns (a strided view: SDPA gives it the bits it gives the contiguous cat, tested)
//   a = sdpa(q, k, v, mask)                 grouped heads as transformers' sdpa_attention_forward picks
//   x = x + a Wo^T; x = x + down(silu(gate(rmsnorm(x))) * up(...))
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fp32_rows.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

// y_i = x W_i^T + b_i for each weight (fp32 or bf16; the biases fp32), every output its own contiguous
// tensor shaped like x with N_i features; one parallel_for over all the weights' output columns (as
// small_m_linear_multi).
std::vector<at::Tensor> products(const at::Tensor& x, const std::vector<const at::Tensor*>& ws,
                                 const std::vector<const OptTensor*>& bs, int64_t isa) {
  const int64_t K = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  const size_t S = ws.size();
  std::vector<at::Tensor> ys;
  std::vector<int64_t> start(S + 1, 0);
  auto shape = x.sizes().vec();
  for (size_t s = 0; s < S; ++s) {
    shape.back() = ws[s]->size(0);
    ys.push_back(at::empty(shape, x.options()));
    start[s + 1] = start[s] + ws[s]->size(0);
  }
  const float* xp = x2.data_ptr<float>();
  at::parallel_for(0, start[S], 64, [&](int64_t a, int64_t b) {
    for (size_t s = 0; s < S; ++s) {
      const int64_t n0 = std::max(a, start[s]), n1 = std::min(b, start[s + 1]);
      if (n0 < n1) {
        const float* bp = bs[s]->has_value() ? (*bs[s])->data_ptr<float>() : nullptr;
        nbdiff_kernel::fp32_rows(xp, M, K, *ws[s], bp, n0 - start[s], n1 - start[s], start[s + 1] - start[s],
                                 ys[s].data_ptr<float>(), isa);
      }
    }
  });
  return ys;
}

// LlamaRMSNorm.forward for fp32: weight * (x * rsqrt(mean(x^2) + eps))
at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const at::Tensor variance = x.pow(2).mean({-1}, true);
  return w * (x * at::rsqrt(variance + eps));
}

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

// The fused forms below (fused = true) replace torch's elementwise kernels by plain loops that make
// the same roundings in the same order: every value is one IEEE multiply, add or divide of the same
// fp32 operands (this file is compiled with -ffp-contract=off, so no multiply-add is fused, and -O3
// without -ffast-math reorders nothing); a negation or a copy is exact. The reduction (RMSNorm's
// sum) and the transcendental function (silu's exp) stay torch's own. tests/test_fast_forward.py
// compares the logits of both forms on tiny Llama and Qwen2 models and on SmolLM2.

// rmsnorm with the elementwise parts in loops around torch's own sum. torch's mean over the last
// dimension (fp32, CPU) is sum(...).div_(N) (aten mean_out), x.pow(2) is x * x; then variance + eps in
// fp32 (the scalar rounded to fp32), rsqrt as 1 / sqrt (both correctly rounded: torch's scalar and
// AVX kernels for the few rows here; checked against numpy's fp32 for 1 to 256 rows), x * r, w * that.
at::Tensor rmsnorm_fused(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t H = x.size(-1), rows = x.numel() / H;
  at::Tensor out = at::empty(x.sizes(), x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0, N = x.numel(); i < N; ++i) op[i] = xp[i] * xp[i];  // x^2, in out until the sum has read it
  const at::Tensor sums = out.sum({-1}, true);  // [B, n, 1]
  const float* sp = sums.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float e = static_cast<float>(eps), count = static_cast<float>(H);
  for (int64_t r = 0; r < rows; ++r) {
    const float variance = sp[r] / count;
    const float scale = 1.0f / std::sqrt(variance + e);
    const float* xr = xp + r * H;
    float* orow = op + r * H;
    for (int64_t j = 0; j < H; ++j) orow[j] = wp[j] * (xr[j] * scale);
  }
  return out;
}

// (src * cos) + (rotate_half(src) * sin) into dst: src and dst [B, H, n, d] with any strides but a
// last one of 1, cos and sin [B or 1, 1, n, d] contiguous. rotate_half(src)[j] is -src[j + d/2] for
// j < d/2, else src[j - d/2].
void rotary_into(const at::Tensor& src, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& dst) {
  const int64_t B = src.size(0), H = src.size(1), n = src.size(2), d = src.size(3), half = d / 2;
  const int64_t cb = cos.size(0) == 1 ? 0 : n * d;
  const float* sp = src.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* np = sin.data_ptr<float>();
  float* dp = dst.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < n; ++t) {
        const float* x = sp + b * src.stride(0) + h * src.stride(1) + t * src.stride(2);
        float* y = dp + b * dst.stride(0) + h * dst.stride(1) + t * dst.stride(2);
        const float* c = cp + b * cb + t * d;
        const float* s = np + b * cb + t * d;
        for (int64_t j = 0; j < half; ++j) y[j] = (x[j] * c[j]) + ((-x[j + half]) * s[j]);
        for (int64_t j = half; j < d; ++j) y[j] = (x[j] * c[j]) + (x[j - half] * s[j]);
      }
}

// a = a + b (residual + a product's output), written into b (a fresh tensor of the same shape).
at::Tensor add_into(const at::Tensor& a, const at::Tensor& b) {
  const float* ap = a.data_ptr<float>();
  float* bp = b.data_ptr<float>();
  for (int64_t i = 0, N = b.numel(); i < N; ++i) bp[i] = ap[i] + bp[i];
  return b;
}

// params: 16 per layer (input norm, q, q bias, k, k bias, v, v bias, o, o bias, post-attention norm, gate,
// gate bias, up, up bias, down, down bias; a missing bias is None);
// eps: the two norms' epsilons per layer; keys/values: the cache's tensors per layer (DynamicLayer's:
// an empty 1-D tensor before the first update), or with used >= 0 each layer's room [B, G, capacity, d]
// whose first `used` columns are the cache (capacity >= used + n: the caller grows it). gqa: 0 = no grouping or sdpa's enable_gqa, 1 = one
// query packed as [B, G, H/G, d] (transformers' pack_gqa), 2 = keys/values repeated (repeat_kv).
// Returns x after the last layer, then each layer's keys and values after the update (with used >= 0:
// views of the rooms' first used + n columns); with `states`, then every layer's output (the hidden states
// transformers returns after the embeddings; exact mode's trained drafter reads them).
std::vector<at::Tensor> decoder_layers(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin,
                                       const OptTensor& mask, const c10::List<OptTensor>& params_list,
                                       at::ArrayRef<double> eps, at::TensorList keys, at::TensorList values,
                                       int64_t head_dim, int64_t groups, int64_t gqa, bool enable_gqa,
                                       bool is_causal, double scaling, int64_t used, bool fused, int64_t isa,
                                       bool states) {
  const int64_t layers = keys.size();
  TORCH_CHECK(params_list.size() == static_cast<size_t>(16 * layers) && values.size() == keys.size() &&
                  eps.size() == static_cast<size_t>(2 * layers),
              "decoder_layers: 16 parameters and 2 epsilons per layer, one key and value tensor per layer");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 3, "decoder_layers: fp32 x of [B, n, hidden]");
  std::vector<OptTensor> params(params_list.begin(), params_list.end());
  const int64_t B = x_in.size(0), n = x_in.size(1);
  if (fused) {  // the loops read plain contiguous fp32 memory
    TORCH_CHECK(x_in.is_contiguous() && B * n <= 256 && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 4 &&
                    (cos.size(0) == 1 || cos.size(0) == B) && cos.size(1) == 1 && cos.size(2) == n &&
                    cos.size(3) == head_dim && sin.sizes() == cos.sizes(),
                "decoder_layers: fused needs a contiguous x of at most 256 rows and fp32 cos/sin of [B or 1, 1, n, head_dim]");
    for (int64_t l = 0; l < layers; ++l)
      for (int i : {0, 9})
        TORCH_CHECK(params[16 * l + i].has_value() && params[16 * l + i]->is_contiguous() &&
                        params[16 * l + i]->scalar_type() == at::kFloat,
                    "decoder_layers: fused needs contiguous fp32 norm weights");
  }
  std::vector<at::Tensor> out(1 + 2 * layers);
  if (states) out.reserve(1 + 3 * layers);  // then every layer's output after the caches (no copy: each is a fresh tensor)
  at::Tensor x = x_in;
  const at::Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();
  for (int64_t l = 0; l < layers; ++l) {
    const OptTensor* p = &params[16 * l];
    at::Tensor h = fused ? rmsnorm_fused(x, *p[0], eps[2 * l]) : rmsnorm(x, *p[0], eps[2 * l]);
    auto qkv = products(h, {&p[1].value(), &p[3].value(), &p[5].value()}, {&p[2], &p[4], &p[6]}, isa);
    at::Tensor q = qkv[0].view({B, n, -1, head_dim}).transpose(1, 2);  // [B, H, n, d]
    at::Tensor k = qkv[1].view({B, n, -1, head_dim}).transpose(1, 2);  // [B, G, n, d]
    at::Tensor v = qkv[2].view({B, n, -1, head_dim}).transpose(1, 2);
    if (fused) {
      at::Tensor rq = at::empty_like(q);  // q's layout, as torch's q * cos leaves it
      rotary_into(q, cos_c, sin_c, rq);
      q = rq;
    } else {
      q = (q * cos) + (rotate_half(q) * sin);
    }
    if (used < 0) {
      if (fused) {
        at::Tensor rk = at::empty_like(k);
        rotary_into(k, cos_c, sin_c, rk);
        k = rk;
      } else {
        k = (k * cos) + (rotate_half(k) * sin);
      }
      k = at::cat({keys[l], k}, -2);
      v = at::cat({values[l], v}, -2);
    } else {
      TORCH_CHECK(keys[l].dim() == 4 && keys[l].size(2) >= used + n && values[l].size(2) >= used + n,
                  "decoder_layers: a room needs used + n columns");
      if (fused) {
        rotary_into(k, cos_c, sin_c, keys[l].narrow(2, used, n));  // straight into the room
      } else {
        keys[l].narrow(2, used, n).copy_((k * cos) + (rotate_half(k) * sin));
      }
      values[l].narrow(2, used, n).copy_(v);
      k = keys[l].narrow(2, 0, used + n);
      v = values[l].narrow(2, 0, used + n);
    }
    out[1 + 2 * l] = k;
    out[2 + 2 * l] = v;
    at::Tensor query = q, key = k, value = v;
    OptTensor m = mask;
    if (gqa == 1) {  // pack_gqa: one query, [B, H, 1, d] -> [B, G, H/G, d]; a per-head mask likewise
      query = q.reshape({B, q.size(1) / groups, groups, head_dim});
      if (m.has_value() && m->size(1) != 1) m = m->reshape({B, m->size(1) / groups, groups, m->size(-1)});
    } else if (gqa == 2) {  // repeat_kv
      key = k.unsqueeze(2).expand({B, k.size(1), groups, k.size(2), head_dim}).reshape({B, k.size(1) * groups, k.size(2), head_dim});
      value = v.unsqueeze(2).expand({B, v.size(1), groups, v.size(2), head_dim}).reshape({B, v.size(1) * groups, v.size(2), head_dim});
    }
    at::Tensor a = at::scaled_dot_product_attention(query, key, value, m, 0.0, is_causal, scaling, enable_gqa);
    a = a.reshape({a.size(0), -1, n, value.size(-1)}).transpose(1, 2).contiguous();
    a = a.reshape({B, n, -1}).contiguous();
    at::Tensor o = products(a, {&p[7].value()}, {&p[8]}, isa)[0];
    x = fused ? add_into(x, o) : x + o;
    h = fused ? rmsnorm_fused(x, *p[9], eps[2 * l + 1]) : rmsnorm(x, *p[9], eps[2 * l + 1]);
    auto gu = products(h, {&p[10].value(), &p[12].value()}, {&p[11], &p[13]}, isa);
    at::Tensor g;
    if (fused) {  // silu in place (torch's kernel, the same bits as out of place), then gate * up in a loop
      g = at::silu_(gu[0]);
      float* gp = g.data_ptr<float>();
      const float* up = gu[1].data_ptr<float>();
      for (int64_t i = 0, N = g.numel(); i < N; ++i) gp[i] = gp[i] * up[i];
    } else {
      g = at::silu(gu[0]) * gu[1];
    }
    at::Tensor down = products(g, {&p[14].value()}, {&p[15]}, isa)[0];
    x = fused ? add_into(x, down) : x + down;
    if (states) out.push_back(x);  // the next layer writes only into new tensors, never into x
  }
  out[0] = x;
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nbdiff, m) {
  m.def("decoder_layers(Tensor x, Tensor cos, Tensor sin, Tensor? mask, Tensor?[] params, float[] eps, Tensor[] keys, "
        "Tensor[] values, int head_dim, int groups, int gqa, bool enable_gqa, bool is_causal, float scaling, int used, bool fused, int isa, "
        "bool states=False) -> Tensor[]");
  m.impl("decoder_layers", c10::DispatchKey::CPU, TORCH_FN(decoder_layers));
}
