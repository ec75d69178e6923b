// Paged attention on the CPU: one call per layer for a whole batch of query tokens over their
// sequences' cached K/V blocks, read in place (no gather copy). Same contract as the Triton kernel
// (kernels/paged_attention.py) and the torch reference (kernels/paged_attention_ref.py).
//
// One work item per (sequence, kv head): the group's query heads share every K/V row they read.
// Two passes per query token: scores for every visible key (then an fp32 softmax), then the
// probability-weighted sum of V. Rows are converted to fp32 once per item and reused by the whole
// group; the inner loops over head_dim are plain fp32 loops the compiler vectorizes. Built with
// -ffast-math (compile only, never linked with it: no process-wide FTZ/DAZ) so that the dot-product
// reductions vectorize and expf comes from glibc's vector math library; every value is finite.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// One K or V row as fp32. Rows are contiguous in every layout the engine uses: that loop vectorizes.
template <typename scalar_t>
inline void load_row(const scalar_t* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d * stride]);
  }
}

template <typename scalar_t>
void attend(const scalar_t* q, int64_t q_tok_stride, int64_t q_head_stride, const scalar_t* k,
            const scalar_t* v, const int64_t* cache_strides, const int32_t* block_table,
            int64_t block_size, int64_t seq_len, int64_t q_len, int64_t first_head, int64_t group,
            int64_t head_dim, float scale, scalar_t* out, int64_t out_tok_stride,
            int64_t out_head_stride) {
  // cache_strides: block, slot, (kv head already applied by the caller), dim
  const int64_t sb = cache_strides[0], ss = cache_strides[1], sd = cache_strides[2];
  std::vector<float> qf(group * head_dim), row(head_dim), acc(group * head_dim);
  std::vector<float> scores(group * seq_len);
  for (int64_t i = 0; i < q_len; ++i) {
    const int64_t visible = seq_len - q_len + i + 1;
    for (int64_t h = 0; h < group; ++h) {
      const scalar_t* qrow = q + i * q_tok_stride + (first_head + h) * q_head_stride;
      for (int64_t d = 0; d < head_dim; ++d) qf[h * head_dim + d] = static_cast<float>(qrow[d]) * scale;
    }
    for (int64_t t = 0; t < visible; ++t) {
      const scalar_t* krow = k + block_table[t / block_size] * sb + (t % block_size) * ss;
      load_row(krow, sd, head_dim, row.data());
      for (int64_t h = 0; h < group; ++h) {
        const float* qh = qf.data() + h * head_dim;
        float dot = 0.f;
        for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * row[d];
        scores[h * seq_len + t] = dot;
      }
    }
    std::vector<float> inv_sum(group);
    for (int64_t h = 0; h < group; ++h) {
      float* s = scores.data() + h * seq_len;
      float m = std::numeric_limits<float>::lowest();  // finite: built with -ffast-math
      for (int64_t t = 0; t < visible; ++t) m = std::max(m, s[t]);
      float sum = 0.f;
      for (int64_t t = 0; t < visible; ++t) {
        s[t] = std::exp(s[t] - m);
        sum += s[t];
      }
      inv_sum[h] = 1.f / sum;
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t t = 0; t < visible; ++t) {
      const scalar_t* vrow = v + block_table[t / block_size] * sb + (t % block_size) * ss;
      load_row(vrow, sd, head_dim, row.data());
      for (int64_t h = 0; h < group; ++h) {
        const float p = scores[h * seq_len + t];
        float* a = acc.data() + h * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) a[d] += p * row[d];
      }
    }
    for (int64_t h = 0; h < group; ++h) {
      scalar_t* orow = out + i * out_tok_stride + (first_head + h) * out_head_stride;
      for (int64_t d = 0; d < head_dim; ++d)
        orow[d] = static_cast<scalar_t>(acc[h * head_dim + d] * inv_sum[h]);
    }
  }
}

}  // namespace

// q, out [num_tokens, H, D]; k_cache, v_cache [num_blocks, block_size, KVH, D] (any strides);
// block_tables int32 [num_seqs, max_blocks]; query_start_loc int32 [num_seqs + 1]; seq_lens int32.
void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                     const at::Tensor& seq_lens, double scale, at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [num_tokens, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "caches must be 4-d, alike");
  TORCH_CHECK(k_cache.strides() == v_cache.strides(), "k and v caches must share strides");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == out.scalar_type(),
              "q, caches and out must share a dtype");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q and out rows must be contiguous");
  auto bt = block_tables.contiguous();
  auto qsl = query_start_loc.contiguous();
  auto lens = seq_lens.contiguous();
  TORCH_CHECK(bt.scalar_type() == at::kInt && qsl.scalar_type() == at::kInt &&
                  lens.scalar_type() == at::kInt, "block_tables, query_start_loc, seq_lens: int32");
  const int64_t num_seqs = lens.size(0);
  const int64_t num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head shapes mismatch");
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = bt.size(1);
  const int32_t* bt_p = bt.data_ptr<int32_t>();
  const int32_t* qsl_p = qsl.data_ptr<int32_t>();
  const int32_t* lens_p = lens.data_ptr<int32_t>();
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(lens_p[s] >= qsl_p[s + 1] - qsl_p[s], "seq_len shorter than its query");
    TORCH_CHECK((lens_p[s] + block_size - 1) / block_size <= max_blocks, "block table too short");
  }
  const int64_t cache_strides[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(3)};
  const int64_t kv_head_stride = k_cache.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    const scalar_t* q_p = q.data_ptr<scalar_t>();
    const scalar_t* k_p = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_p = v_cache.data_ptr<scalar_t>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t s = item / num_kv_heads, g = item % num_kv_heads;
        const int64_t q_start = qsl_p[s], q_len = qsl_p[s + 1] - qsl_p[s];
        if (q_len == 0) continue;
        attend<scalar_t>(q_p + q_start * q.stride(0), q.stride(0), q.stride(1),
                         k_p + g * kv_head_stride, v_p + g * kv_head_stride, cache_strides,
                         bt_p + s * max_blocks, block_size, lens_p[s], q_len, g * group, group,
                         head_dim, static_cast<float>(scale), out_p + q_start * out.stride(0),
                         out.stride(0), out.stride(1));
      }
    });
  });
}

// RMSNorm over the last dimension of contiguous rows: out = x / sqrt(mean(x^2) + eps) * weight, in
// fp32 and rounded once, as torch's own. torch's CPU rms_norm runs several passes and ops (13.6 us
// for one 576-wide bf16 row here, 74.5 us for 300 rows); this loop takes 1.1 / 30.9 us. The engine
// calls it twice per layer and step.
template <typename scalar_t>
void rms_rows(const scalar_t* x, const scalar_t* w, scalar_t* out, int64_t rows, int64_t n,
              float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> wf(n);
    for (int64_t d = 0; d < n; ++d) wf[d] = static_cast<float>(w[d]);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * n;
      float sum = 0.f;
      for (int64_t d = 0; d < n; ++d) {
        const float v = static_cast<float>(xr[d]);
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
      scalar_t* o = out + r * n;
      for (int64_t d = 0; d < n; ++d) o[d] = static_cast<scalar_t>(static_cast<float>(xr[d]) * inv * wf[d]);
    }
  });
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: contiguous tensors only");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight must share a dtype");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "rms_norm: weight must be [x.size(-1)]");
  auto out = torch::empty_like(x);
  const int64_t rows = n ? x.numel() / n : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                       rows, n, static_cast<float>(eps));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over block tables (CPU)");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension of contiguous rows (CPU)");
}
