// Attention inside small windows on the CPU (AVX-512), forward only, for calls without
// gradients: winattn.ops.backends.cpu_kernel compiles this file on first use and documents it.
//
// One (window, head) pair at a time: K and V converted to float32, 16 queries in the vector
// lanes so that the softmax over keys runs across registers with no horizontal reductions,
// the products on float32 FMAs (on Sapphire Rapids VDPBF16PS issues at half the FMA rate, so
// bf16 dot products do not pay here). Exponentials below 2^-126 of the row's largest are
// flushed to zero (as winattn's other CPU paths do, docs/fast-path.md item 8); with bf16
// inputs the probabilities are rounded to bf16 before the product with V, as PyTorch's SDPA
// kernel and winattn's matmul attention round them.
//
// Layouts: q, k, v (rows, heads, N, 32) with any strides but a unit one over the 32 dims;
// out (rows, N, heads, 32) contiguous; mask_t (mask_rows, mask_heads, N keys, N queries)
// float32 contiguous, the additive mask transposed, row r using mask_t[r % mask_rows].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <stdint.h>
#include <math.h>

typedef uint16_t bf16;


static inline __m512 exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2hi = _mm512_set1_ps(0.693359375f);
    const __m512 ln2lo = _mm512_set1_ps(-2.12194440e-4f);
    __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2hi, x);
    r = _mm512_fnmadd_ps(n, ln2lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    __m512 r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
}

static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8) {
        for (int j = 0; j < 4; ++j) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    }
    for (int j = 0; j < 8; ++j) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

static inline void load_row(const void* src, int is_bf16, __m512* lo, __m512* hi) {
    if (is_bf16) {
        __m512i w = _mm512_loadu_si512(src);
        *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
        *hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
    } else {
        *lo = _mm512_loadu_ps((const float*)src);
        *hi = _mm512_loadu_ps((const float*)src + 16);
    }
}

static void window_attention_rows(const void* q, const void* k, const void* v, void* out, int is_bf16,
               const float* maskT, int64_t mask_rows, int64_t mask_heads,
               int64_t pair0, int64_t pair1, int64_t heads, int64_t N,
               int64_t qs0, int64_t qs1, int64_t qs2,
               int64_t ks0, int64_t ks1, int64_t ks2,
               int64_t vs0, int64_t vs1, int64_t vs2, float scale)
{
    const int64_t es = is_bf16 ? 2 : 4;
    float Kf[64][32] __attribute__((aligned(64)));   // [key][dim]
    float Vf[64][32] __attribute__((aligned(64)));   // [key][dim]
    float Qt[32][16] __attribute__((aligned(64)));   // [dim][query lane]
    float S[64][16] __attribute__((aligned(64)));    // [key][query lane]
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t pair = pair0; pair < pair1; ++pair) {
        {
            const int64_t r = pair / heads, h = pair % heads;
            const char* qb = (const char*)q + (r * qs0 + h * qs1) * es;
            const char* kb = (const char*)k + (r * ks0 + h * ks1) * es;
            const char* vb = (const char*)v + (r * vs0 + h * vs1) * es;
            for (int64_t j = 0; j < N; ++j) {
                __m512 lo, hi;
                load_row(kb + j * ks2 * es, is_bf16, &lo, &hi);
                _mm512_store_ps(Kf[j], lo); _mm512_store_ps(Kf[j] + 16, hi);
                load_row(vb + j * vs2 * es, is_bf16, &lo, &hi);
                _mm512_store_ps(Vf[j], lo); _mm512_store_ps(Vf[j] + 16, hi);
            }
            const float* mT = NULL;
            if (maskT) mT = maskT + ((r % mask_rows) * mask_heads + (mask_heads > 1 ? h : 0)) * N * N;
            for (int64_t i0 = 0; i0 < N; i0 += 16) {
                int64_t nq = N - i0 < 16 ? N - i0 : 16;
                __mmask16 qmask = nq >= 16 ? 0xFFFF : (__mmask16)((1u << nq) - 1);
                {   // Qt: queries i0.. as lanes, fp32, pre-scaled
                    __m512i a[16], b[16];
                    for (int u = 0; u < 16; ++u) {
                        __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
                        if (u < nq) load_row(qb + (i0 + u) * qs2 * es, is_bf16, &lo, &hi);
                        a[u] = _mm512_castps_si512(lo); b[u] = _mm512_castps_si512(hi);
                    }
                    transpose16(a); transpose16(b);
                    for (int d = 0; d < 16; ++d) {
                        _mm512_store_ps(Qt[d], _mm512_castsi512_ps(a[d]));
                        _mm512_store_ps(Qt[d + 16], _mm512_castsi512_ps(b[d]));
                    }
                }
                __m512 mx = _mm512_set1_ps(-INFINITY);
                for (int64_t j = 0; j < N; j += 8) {
                    int nk = (int)(N - j < 8 ? N - j : 8);
                    __m512 acc[8];
                    #pragma GCC unroll 8
                    for (int u = 0; u < 8; ++u) acc[u] = _mm512_setzero_ps();
                    int64_t jj[8];
                    for (int u = 0; u < 8; ++u) jj[u] = j + (u < nk ? u : 0);
                    #pragma GCC unroll 32
                    for (int d = 0; d < 32; ++d) {
                        __m512 qd = _mm512_load_ps(Qt[d]);
                        #pragma GCC unroll 8
                        for (int u = 0; u < 8; ++u)
                            acc[u] = _mm512_fmadd_ps(qd, _mm512_set1_ps(Kf[jj[u]][d]), acc[u]);
                    }
                    for (int u = 0; u < nk; ++u) {
                        __m512 x = _mm512_mul_ps(acc[u], vscale);
                        if (mT) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(qmask, mT + (j + u) * N + i0));
                        mx = _mm512_max_ps(mx, x);
                        _mm512_store_ps(S[j + u], x);
                    }
                }
                __m512 sum = _mm512_setzero_ps();
                for (int64_t j = 0; j < N; ++j) {
                    __m512 e = exp512(_mm512_sub_ps(_mm512_load_ps(S[j]), mx));
                    sum = _mm512_add_ps(sum, e);
                    _mm512_store_ps(S[j], e);
                }
                // The row sums' reciprocals, applied to the output; with bf16 inputs the
                // exponentials (at most 1) are rounded to bf16 for the product with V, as
                // PyTorch's SDPA kernel rounds them.
                float inv[16] __attribute__((aligned(64)));
                _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), sum));
                if (is_bf16) {
                    for (int64_t j = 0; j < N; ++j) {
                        __m256bh e = _mm512_cvtneps_pbh(_mm512_load_ps(S[j]));
                        _mm512_store_ps(S[j], _mm512_castsi512_ps(_mm512_slli_epi32(
                            _mm512_cvtepu16_epi32((__m256i)e), 16)));
                    }
                }
                // O[i][:] = sum_j P[i][j] V[j][:], eight queries at a time.
                for (int64_t a0 = 0; a0 < nq; a0 += 8) {
                    __m512 o[8][2];
                    #pragma GCC unroll 8
                    for (int a = 0; a < 8; ++a) { o[a][0] = _mm512_setzero_ps(); o[a][1] = _mm512_setzero_ps(); }
                    for (int64_t j = 0; j < N; ++j) {
                        __m512 v0 = _mm512_load_ps(Vf[j]), v1 = _mm512_load_ps(Vf[j] + 16);
                        #pragma GCC unroll 8
                        for (int a = 0; a < 8; ++a) {
                            __m512 p = _mm512_set1_ps(S[j][a0 + a]);
                            o[a][0] = _mm512_fmadd_ps(p, v0, o[a][0]);
                            o[a][1] = _mm512_fmadd_ps(p, v1, o[a][1]);
                        }
                    }
                    for (int a = 0; a < 8 && a0 + a < nq; ++a) {
                        int64_t i = i0 + a0 + a;
                        const __m512 norm = _mm512_set1_ps(inv[a0 + a]);
                        o[a][0] = _mm512_mul_ps(o[a][0], norm);
                        o[a][1] = _mm512_mul_ps(o[a][1], norm);
                        if (is_bf16) {
                            bf16* orow = (bf16*)out + ((r * N + i) * heads + h) * 32;
                            _mm512_storeu_si512(orow, (__m512i)_mm512_cvtne2ps_pbh(o[a][1], o[a][0]));
                        } else {
                            float* orow = (float*)out + ((r * N + i) * heads + h) * 32;
                            _mm512_storeu_ps(orow, o[a][0]); _mm512_storeu_ps(orow + 16, o[a][1]);
                        }
                    }
                }
            }
        }
    }
}


// (rows, heads, N, 32) q, k, v -> (rows, N, heads, 32); which calls fit is cpu_kernel.py's.
at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& mask_t, double scale) {
    TORCH_CHECK(q.size(-1) == 32 && q.size(2) <= 64, "window_attention kernel: head_dim 32, N <= 64");
    TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1, "unit last stride");
    TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "one dtype");
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat, "bf16 or float32");
    const int64_t rows = q.size(0), heads = q.size(1), N = q.size(2);
    auto out = at::empty({rows, N, heads, 32}, q.options());
    const float* mask = nullptr;
    int64_t mask_rows = 1, mask_heads = 1;
    if (mask_t.has_value()) {
        TORCH_CHECK(mask_t->scalar_type() == at::kFloat && mask_t->is_contiguous(), "float32 mask");
        mask = mask_t->data_ptr<float>();
        mask_rows = mask_t->size(0);
        mask_heads = mask_t->size(1);
    }
    const int is_bf16 = q.scalar_type() == at::kBFloat16;
    const void* qp = q.data_ptr();
    const void* kp = k.data_ptr();
    const void* vp = v.data_ptr();
    void* op = out.data_ptr();
    const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
    at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
        window_attention_rows(qp, kp, vp, op, is_bf16, mask, mask_rows, mask_heads, begin, end,
                              heads, N, qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1],
                              vs[2], (float)scale);
    });
    return out;
}

// An operator of PyTorch's dispatcher (torch.ops.winattn_cpu.window_attention), so that FLOP
// counters and dispatch modes see it; its fake (meta) function is registered in cpu_kernel.py.
TORCH_LIBRARY(winattn_cpu, m) {
    m.def("window_attention(Tensor q, Tensor k, Tensor v, Tensor? mask_t, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(winattn_cpu, CPU, m) { m.impl("window_attention", &forward); }
