// The two products of one-token decode attention on a CPU (evaluation/native.py builds this file; the packed
// attention, evaluation/attention.py, calls them): scores = q . k over the head dimension, and the value rows
// weighted by the softmax of those scores. PyTorch's bmm runs them as one tiny (groups x head_dim) matrix product
// per row and key/value head, slower on a static cache's columns than these loops, which read each key and
// value row once for every query head that shares it. Each sum runs in a fixed order over the head dimension
// (scores) or over the columns (values), whatever the batch.
//
// Where the CPU has AVX2 and FMA and the head dimension is a multiple of 8, the scores run eight columns at a
// time: eight 8-lane partial sums over the head dimension, added across their lanes together at the end (one
// horizontal sum per output is what made the plain loop 3x slower: 268 against 87 us a call at the smoke
// shapes). Every output goes through the
// same instructions, in its own accumulator, wherever its column falls in a block (a block past the last column
// repeats the last key row and stores nothing for it), so a row's scores do not depend on the batch or the span.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

void check(const torch::Tensor& packed, const torch::Tensor& cache, int64_t lo, int64_t hi) {
  TORCH_CHECK(packed.dim() == 4 && cache.dim() == 4, "decode attention: 4-dim tensors expected");
  TORCH_CHECK(packed.scalar_type() == torch::kFloat && cache.scalar_type() == torch::kFloat,
              "decode attention: float32 expected");
  TORCH_CHECK(packed.device().is_cpu() && cache.device().is_cpu(), "decode attention: CPU tensors expected");
  TORCH_CHECK(packed.is_contiguous() && cache.stride(3) == 1, "decode attention: contiguous rows expected");
  TORCH_CHECK(packed.size(0) == cache.size(0) && packed.size(1) == cache.size(1), "decode attention: shapes differ");
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= cache.size(2), "decode attention: columns out of range");
}

#if defined(__AVX2__) && defined(__FMA__)
// The lane sums of eight 8-lane vectors: lane j of the result is the sum of a[j]'s lanes.
inline __m256 lane_sums(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// out[t] = q . k[t] for t < cols, eight columns at a time (dim a multiple of 8; k's rows kt floats apart).
void scores_by_8(const float* q, const float* k, int64_t kt, int64_t dim, int64_t cols, float* out) {
  for (int64_t t0 = 0; t0 < cols; t0 += 8) {
    const float* rows[8];
    for (int64_t j = 0; j < 8; ++j) rows[j] = k + std::min(t0 + j, cols - 1) * kt;
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; d += 8) {
      const __m256 x = _mm256_loadu_ps(q + d);
      for (int64_t j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(rows[j] + d), acc[j]);
    }
    float sums[8];
    _mm256_storeu_ps(sums, lane_sums(acc));
    for (int64_t j = 0; j < 8 && t0 + j < cols; ++j) out[t0 + j] = sums[j];
  }
}
#endif

}  // namespace

// q: (batch, kv_heads, groups, head_dim), contiguous; k: (batch, kv_heads, kv_len, head_dim), each row contiguous.
// Returns (batch, kv_heads, groups, hi - lo): q[b, h, g] . k[b, h, lo + t].
torch::Tensor scores(const torch::Tensor& q, const torch::Tensor& k, int64_t lo, int64_t hi) {
  check(q, k, lo, hi);
  TORCH_CHECK(q.size(3) == k.size(3), "decode attention: head dims differ");
  const int64_t heads = q.size(1), groups = q.size(2), dim = q.size(3), cols = hi - lo;
  auto out = torch::empty({q.size(0), heads, groups, cols}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t kb = k.stride(0), kh = k.stride(1), kt = k.stride(2);
  at::parallel_for(0, q.size(0) * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* qi = qp + i * groups * dim;
      const float* ki = kp + (i / heads) * kb + (i % heads) * kh + lo * kt;
      float* oi = op + i * groups * cols;
#if defined(__AVX2__) && defined(__FMA__)
      if (dim % 8 == 0) {
        for (int64_t g = 0; g < groups; ++g) scores_by_8(qi + g * dim, ki, kt, dim, cols, oi + g * cols);
        continue;
      }
#endif
      for (int64_t t = 0; t < cols; ++t) {
        const float* kr = ki + t * kt;
        for (int64_t g = 0; g < groups; ++g) {
          const float* qg = qi + g * dim;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < dim; ++d) acc += qg[d] * kr[d];
          oi[g * cols + t] = acc;
        }
      }
    }
  });
  return out;
}

// p: (batch, kv_heads, groups, cols), contiguous; v: (batch, kv_heads, kv_len, head_dim), each row contiguous.
// Returns (batch, kv_heads, groups, head_dim): the sum over t of p[b, h, g, t] * v[b, h, lo + t].
torch::Tensor weighted(const torch::Tensor& p, const torch::Tensor& v, int64_t lo) {
  check(p, v, lo, lo + p.size(3));
  const int64_t heads = p.size(1), groups = p.size(2), cols = p.size(3), dim = v.size(3);
  auto out = torch::zeros({p.size(0), heads, groups, dim}, p.options());
  const float* pp = p.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t vb = v.stride(0), vh = v.stride(1), vt = v.stride(2);
  at::parallel_for(0, p.size(0) * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* pi = pp + i * groups * cols;
      const float* vi = vp + (i / heads) * vb + (i % heads) * vh + lo * vt;
      float* oi = op + i * groups * dim;
      for (int64_t t = 0; t < cols; ++t) {
        const float* vr = vi + t * vt;
        for (int64_t g = 0; g < groups; ++g) {
          const float w = pi[g * cols + t];
          float* og = oi + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) og[d] += w * vr[d];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores", &scores, "q . k for one-token decode attention");
  m.def("weighted", &weighted, "value rows weighted by attention probabilities");
}
