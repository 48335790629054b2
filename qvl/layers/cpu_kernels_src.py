"""The C++ source of qvl's own CPU kernels (qvl.layers.quant_kernels compiles it on first use).

Plain C ABI, no torch headers (compiles in ~2 s with g++ -O3, no -march: each function carries its own
ISA through `target` attributes and is only called after the run-time check `qk_has_avx512bf16()`;
the scalar paths and the dequantizers are `target_clones` (AVX-512 / AVX2 / baseline, picked by the
loader from the CPU). Every kernel writes bf16 (optional fp32 bias added in fp32, rounded once), sums in
fp32, and splits the output columns over `nthreads` std::threads.

  qk_int4(x, w, s, z, zc, y, bias, M, N, K, group, isa, nthreads)   4-bit, chunked nibble layout
  qk_int8(x, w, s, y, bias, M, N, K, group, isa, nthreads)          (q − z) int8, per row or per group
  qk_bf16(x, w, y, bias, M, N, K, nthreads)                         bf16 weight in 16-row panels (LM head)
  qk_dequant4 / qk_dequant8(..., out, ..., n0, n1)                  rows of W = (q − z)·s as bf16
Return 0, or -1 (shape refused) / -2 (ISA missing): the caller falls back, never guesses.
"""

SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <immintrin.h>

namespace {

inline uint16_t f32_to_bf16(float f) {                       // round to nearest even (no NaNs here)
    uint32_t u; std::memcpy(&u, &f, 4);
    return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// Where results go: y (M, N) bf16 = value + bias[n] (bias may be null), rounded once.
struct Out {
    uint16_t* y; const float* bias; int N;
    void put(int m, int n, float v) const { y[size_t(m) * N + n] = f32_to_bf16(bias ? v + bias[n] : v); }
};

inline float bf16_to_f32(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }

// Integer weights are stored in panels of 16 output rows, like the bf16 ones below: per step of the
// input dim, the 16 rows' values lie side by side in 32 bytes (int8: 2 columns; int4: 4 columns, columns
// k, k+1 in the low nibbles and k+2, k+3 in the high ones), so one load widens to 16 rows x 2 columns of
// bf16 and each vdpbf16ps takes a broadcast pair of x: no horizontal sums, every weight vector serves
// all input rows of a tile, and a panel is one sequential stream (8 separate short row streams, the
// first layout: gate/up_proj, 768-byte int4 rows, ran at 2.7 GB/s inside the model).
inline size_t at8(int n, int k, int K) { return (size_t(n / 16) * (K / 2) + k / 2) * 32 + (n % 16) * 2 + k % 2; }
inline size_t at4(int n, int k, int K) { return (size_t(n / 16) * (K / 4) + k / 4) * 32 + (n % 16) * 2 + k % 2; }
inline int nib4(const uint8_t* w, int n, int k, int K) { const uint8_t b = w[at4(n, k, K)]; return k % 4 < 2 ? b & 15 : b >> 4; }

// ---- scalar reference (any CPU): same math, fp32 accumulation ---------------------------------------
void int4_scalar(const uint16_t* x, const uint8_t* w, const float* s, const uint8_t* z, int zc,
                 Out y, int M, int N, int K, int group, int n0, int n1) {
    const int G = K / group;
    for (int m = 0; m < M; ++m)
        for (int n = n0; n < n1; ++n) {
            float tot = 0.f;
            for (int g = 0; g < G; ++g) {
                float acc = 0.f;
                const float zz = float(z ? z[size_t(g) * N + n] : zc);
                for (int k = g * group; k < (g + 1) * group; ++k) {
                    const int q = nib4(w, n, k, K);
                    acc += bf16_to_f32(x[size_t(m) * K + k]) * (float(q) - zz);
                }
                tot += acc * s[size_t(g) * N + n];
            }
            y.put(m, n, tot);
        }
}

void int8_scalar(const uint16_t* x, const int8_t* w, const float* s, Out y, int M, int N, int K,
                 int group, int n0, int n1) {
    const int G = K / group;
    for (int m = 0; m < M; ++m)
        for (int n = n0; n < n1; ++n) {
            float tot = 0.f;
            for (int g = 0; g < G; ++g) {
                float acc = 0.f;
                for (int k = g * group; k < (g + 1) * group; ++k)
                    acc += bf16_to_f32(x[size_t(m) * K + k]) * float(w[at8(n, k, K)]);
                tot += acc * s[size_t(g) * N + n];
            }
            y.put(m, n, tot);
        }
}

// ---- AVX-512 BF16: weights widened to exact bf16 integers in registers, vdpbf16ps -----------------
#define QK_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// int4: (0x4300 | q) is the bf16 of 128 + q exactly (q < 128), so a group's dot is dot(x, 128 + q) minus
// (128 + z) * sum(x over the group) (xs); lanes are the panel's 16 output rows, scales and zeros loaded
// as vectors.
template <int NB, int MT>
QK_TARGET void int4_panels(const uint16_t* x, const uint8_t* w, const float* s, const uint8_t* z, int zc,
                           const float* xs, Out y, int N, int K, int group, int p0, int m0) {
    const int G = K / group;
    const size_t stride = size_t(K / 4) * 32;                       // bytes per panel
    const __m512i lo_mask = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
    __m512 tot[NB][MT];
    for (int a = 0; a < NB; ++a) for (int b = 0; b < MT; ++b) tot[a][b] = _mm512_setzero_ps();
    for (int g = 0; g < G; ++g) {
        __m512 acc[NB][MT];
        for (int a = 0; a < NB; ++a) for (int b = 0; b < MT; ++b) acc[a][b] = _mm512_setzero_ps();
        for (int k = g * group; k < (g + 1) * group; k += 4) {
            __m512i x01[MT], x23[MT];
            for (int b = 0; b < MT; ++b) {
                int32_t p[2];
                std::memcpy(p, x + size_t(m0 + b) * K + k, 8);
                x01[b] = _mm512_set1_epi32(p[0]);
                x23[b] = _mm512_set1_epi32(p[1]);
            }
            for (int a = 0; a < NB; ++a) {
                const __m256i raw = _mm256_loadu_si256((const __m256i*)(w + (p0 + a) * stride + size_t(k / 4) * 32));
                const __m512i v = _mm512_cvtepu8_epi16(raw);
                const __m512i lo = _mm512_ternarylogic_epi32(v, lo_mask, magic, 0xEA);   // (v & 15) | magic
                const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(v, 4), magic);
                for (int b = 0; b < MT; ++b) {
                    acc[a][b] = _mm512_dpbf16_ps(acc[a][b], (__m512bh)lo, (__m512bh)x01[b]);
                    acc[a][b] = _mm512_dpbf16_ps(acc[a][b], (__m512bh)hi, (__m512bh)x23[b]);
                }
            }
        }
        for (int a = 0; a < NB; ++a) {
            const size_t gn = size_t(g) * N + (p0 + a) * 16;
            const __m512 sv = _mm512_loadu_ps(s + gn);
            const __m512 zv = z ? _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(z + gn)))),
                                                _mm512_set1_ps(128.f))
                                : _mm512_set1_ps(128.f + float(zc));
            const __m512 szv = _mm512_mul_ps(sv, zv);
            for (int b = 0; b < MT; ++b)
                tot[a][b] = _mm512_fnmadd_ps(szv, _mm512_set1_ps(xs[size_t(m0 + b) * G + g]),
                                             _mm512_fmadd_ps(acc[a][b], sv, tot[a][b]));
        }
    }
    for (int a = 0; a < NB; ++a)
        for (int b = 0; b < MT; ++b) {
            alignas(64) float out[16];
            _mm512_store_ps(out, tot[a][b]);
            for (int i = 0; i < 16; ++i) y.put(m0 + b, (p0 + a) * 16 + i, out[i]);
        }
}

// int8: (q − z) as int8 -> int32 -> fp32 -> bf16 (exact for |v| <= 256), 16 rows x 2 columns per load.
template <int NB, int MT>
QK_TARGET void int8_panels(const uint16_t* x, const int8_t* w, const float* s, Out y, int N, int K,
                           int group, int p0, int m0) {
    const int G = K / group;
    const size_t stride = size_t(K / 2) * 32;
    __m512 tot[NB][MT];
    for (int a = 0; a < NB; ++a) for (int b = 0; b < MT; ++b) tot[a][b] = _mm512_setzero_ps();
    for (int g = 0; g < G; ++g) {
        __m512 acc[NB][MT];
        for (int a = 0; a < NB; ++a) for (int b = 0; b < MT; ++b) acc[a][b] = _mm512_setzero_ps();
        for (int k = g * group; k < (g + 1) * group; k += 2) {
            __m512i xb[MT];
            for (int b = 0; b < MT; ++b) {
                int32_t pair;
                std::memcpy(&pair, x + size_t(m0 + b) * K + k, 4);
                xb[b] = _mm512_set1_epi32(pair);
            }
            for (int a = 0; a < NB; ++a) {
                const int8_t* p = w + (p0 + a) * stride + size_t(k / 2) * 32;
                const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
                const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
                const __m512bh wb = _mm512_cvtne2ps_pbh(f1, f0);          // low half from f0: rows 0 .. 7
                for (int b = 0; b < MT; ++b) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], wb, (__m512bh)xb[b]);
            }
        }
        for (int a = 0; a < NB; ++a) {
            const __m512 sv = _mm512_loadu_ps(s + size_t(g) * N + (p0 + a) * 16);
            for (int b = 0; b < MT; ++b) tot[a][b] = _mm512_fmadd_ps(acc[a][b], sv, tot[a][b]);
        }
    }
    for (int a = 0; a < NB; ++a)
        for (int b = 0; b < MT; ++b) {
            alignas(64) float out[16];
            _mm512_store_ps(out, tot[a][b]);
            for (int i = 0; i < 16; ++i) y.put(m0 + b, (p0 + a) * 16 + i, out[i]);
        }
}


// bf16 weights in panels of 16 rows: for each column pair (k, k+1) the 16 rows' pairs lie side by side
// (64 bytes), so a panel is one sequential stream and one vdpbf16ps makes 16 outputs x 2 columns from a
// broadcast pair of x: no horizontal sums, and each weight vector serves every input row of the tile.
// Element (n, k) sits at ((n / 16) * (K / 2) + k / 2) * 32 + (n % 16) * 2 + k % 2.
template <int NB, int MT>
QK_TARGET void bf16_panels(const uint16_t* x, const uint16_t* w, Out y, int K, int p0, int m0) {
    const size_t stride = size_t(K / 2) * 32;                       // elements per panel
    const uint16_t* wp = w + size_t(p0) * stride;
    __m512 acc[NB][MT];
    for (int a = 0; a < NB; ++a) for (int b = 0; b < MT; ++b) acc[a][b] = _mm512_setzero_ps();
    for (int kp = 0; kp < K / 2; ++kp) {
        __m512i xb[MT];
        for (int b = 0; b < MT; ++b) {
            int32_t pair;
            std::memcpy(&pair, x + size_t(m0 + b) * K + 2 * kp, 4);
            xb[b] = _mm512_set1_epi32(pair);
        }
        for (int a = 0; a < NB; ++a) {
            const __m512i wv = _mm512_loadu_si512(wp + a * stride + size_t(kp) * 32);
            for (int b = 0; b < MT; ++b) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], (__m512bh)wv, (__m512bh)xb[b]);
        }
    }
    for (int a = 0; a < NB; ++a)
        for (int b = 0; b < MT; ++b) {
            alignas(64) float out[16];
            _mm512_store_ps(out, acc[a][b]);
            for (int i = 0; i < 16; ++i) y.put(m0 + b, (p0 + a) * 16 + i, out[i]);
        }
}

template <int NB, int MT>
QK_TARGET void bf16_rows(const uint16_t* x, const uint16_t* w, Out y, int M, int K, int p0, int p1, int& m) {
    for (; m + MT <= M; m += MT) {
        int p = p0;
        for (; p + NB <= p1; p += NB) bf16_panels<NB, MT>(x, w, y, K, p, m);
        for (; p < p1; ++p) bf16_panels<1, MT>(x, w, y, K, p, m);
    }
}

// Panels [p0, p1) in groups of 4 (~200 KB of weight for the 2B head, kept in L2 while every row passes).
QK_TARGET void bf16_mm(const uint16_t* x, const uint16_t* w, Out y, int M, int K, int p0, int p1) {
    for (int pb = p0; pb < p1; pb += 4) {
        const int pe = pb + 4 < p1 ? pb + 4 : p1;
        int m = 0;
        bf16_rows<2, 8>(x, w, y, M, K, pb, pe, m);
        bf16_rows<4, 4>(x, w, y, M, K, pb, pe, m);
        bf16_rows<4, 2>(x, w, y, M, K, pb, pe, m);
        bf16_rows<4, 1>(x, w, y, M, K, pb, pe, m);
    }
}

// Rows [n0, n1) (whole panels) of W = (q − z)·s as bf16 (N, K) row-major, for the many-row path
// (dequant + GEMM): walks the panels in storage order, 16 output rows at a time.
__attribute__((target_clones("avx512f", "avx2", "default")))
void dequant4(const uint8_t* w, const float* s, const uint8_t* z, int zc, uint16_t* out, int N, int K,
              int group, int n0, int n1) {
    for (int p = n0 / 16; p < n1 / 16; ++p)
        for (int g = 0; g < K / group; ++g) {
            float sc[16], zz[16];
            for (int r = 0; r < 16; ++r) {
                const size_t gn = size_t(g) * N + p * 16 + r;
                sc[r] = s[gn];
                zz[r] = float(z ? z[gn] : zc);
            }
            for (int k = g * group; k < (g + 1) * group; k += 4) {
                const uint8_t* src = w + (size_t(p) * (K / 4) + k / 4) * 32;
                for (int r = 0; r < 16; ++r) {
                    uint16_t* o = out + size_t(p * 16 + r - n0) * K + k;
                    const uint8_t b0 = src[2 * r], b1 = src[2 * r + 1];
                    o[0] = f32_to_bf16((float(b0 & 15) - zz[r]) * sc[r]);
                    o[1] = f32_to_bf16((float(b1 & 15) - zz[r]) * sc[r]);
                    o[2] = f32_to_bf16((float(b0 >> 4) - zz[r]) * sc[r]);
                    o[3] = f32_to_bf16((float(b1 >> 4) - zz[r]) * sc[r]);
                }
            }
        }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void dequant8(const int8_t* w, const float* s, uint16_t* out, int N, int K, int group, int n0, int n1) {
    for (int p = n0 / 16; p < n1 / 16; ++p)
        for (int g = 0; g < K / group; ++g) {
            float sc[16];
            for (int r = 0; r < 16; ++r) sc[r] = s[size_t(g) * N + p * 16 + r];
            for (int k = g * group; k < (g + 1) * group; k += 2) {
                const int8_t* src = w + (size_t(p) * (K / 2) + k / 2) * 32;
                for (int r = 0; r < 16; ++r) {
                    uint16_t* o = out + size_t(p * 16 + r - n0) * K + k;
                    o[0] = f32_to_bf16(float(src[2 * r]) * sc[r]);
                    o[1] = f32_to_bf16(float(src[2 * r + 1]) * sc[r]);
                }
            }
        }
}

// Panels [p0, p1) in blocks of 8 (128 output rows, whose weights stay in L2 while every input row
// passes them: the weight is read from memory once per call, whatever M); inside a block, tiles of NB
// panels x MT inputs with NB x MT = 8 independent accumulator chains (MT 8: one panel).
template <int MT, typename Tile>
void block_rows(int M, int pb, int pe, int& m, Tile tile) {
    constexpr int NB = 8 / MT;
    for (; m + MT <= M; m += MT) {
        int p = pb;
        for (; p + NB <= pe; p += NB) tile(std::integral_constant<int, NB>{}, std::integral_constant<int, MT>{}, p, m);
        for (; p < pe; ++p) tile(std::integral_constant<int, 1>{}, std::integral_constant<int, MT>{}, p, m);
    }
}

// MAXMT 8 (int8: its widening costs more, so it is shared by 8 input rows; int4 would run out of registers).
template <int MAXMT, typename Tile>
void tiles(int M, int p0, int p1, Tile tile) {
    for (int pb = p0; pb < p1; pb += 8) {
        const int pe = pb + 8 < p1 ? pb + 8 : p1;
        int m = 0;
        if (MAXMT == 8) block_rows<8>(M, pb, pe, m, tile);
        block_rows<4>(M, pb, pe, m, tile);
        block_rows<2>(M, pb, pe, m, tile);
        block_rows<1>(M, pb, pe, m, tile);
    }
}

template <typename F>
void parallel(int N, int nthreads, F f) {
    if (nthreads <= 1 || N < 64) return f(0, N);
    std::vector<std::thread> pool;
    const int step = ((N + nthreads - 1) / nthreads + 7) / 8 * 8;
    for (int n0 = step; n0 < N; n0 += step) pool.emplace_back(f, n0, n0 + step < N ? n0 + step : N);
    f(0, step < N ? step : N);
    for (auto& t : pool) t.join();
}

}  // namespace

extern "C" {

int qk_has_avx512bf16() {
    static const int has = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
    }();
    return has;
}

// y (M, N) bf16 = bias + sum_g s[g, n] * sum_{k in g} x[m, k] * (q[n, k] - z[g, n]); z null: zc everywhere.
// isa 1: AVX-512 BF16 (needs K % 64 == 0, group % 64 == 0), 0: scalar.
int qk_int4(const uint16_t* x, const uint8_t* w, const float* s, const uint8_t* z, int zc, uint16_t* yp, const float* bias,
            int M, int N, int K, int group, int isa, int nthreads) {
    const Out y{yp, bias, N};
    if (group <= 0 || K % group || K % 64 || N % 16) return -1;
    if (isa == 1) {
        if (group % 64 || !qk_has_avx512bf16()) return -2;
        const int G = K / group;
        std::vector<float> xs(size_t(M) * G);
        for (int m = 0; m < M; ++m)
            for (int g = 0; g < G; ++g) {
                float t = 0.f;
                for (int k = g * group; k < (g + 1) * group; ++k) t += bf16_to_f32(x[size_t(m) * K + k]);
                xs[size_t(m) * G + g] = t;
            }
        parallel(N / 16, nthreads, [&](int p0, int p1) {
            tiles<4>(M, p0, p1, [&](auto nb, auto mt, int p, int m) {
                int4_panels<decltype(nb)::value, decltype(mt)::value>(x, w, s, z, zc, xs.data(), y, N, K, group, p, m);
            });
        });
        return 0;
    }
    parallel(N, nthreads, [&](int n0, int n1) { int4_scalar(x, w, s, z, zc, y, M, N, K, group, n0, n1); });
    return 0;
}

// y (M, N) bf16 = bias + sum_g s[g, n] * sum_{k in g} x[m, k] * w[n, k]; isa 1 needs group % 32 == 0.
int qk_int8(const uint16_t* x, const int8_t* w, const float* s, uint16_t* yp, const float* bias, int M, int N, int K, int group,
            int isa, int nthreads) {
    const Out y{yp, bias, N};
    if (group <= 0 || K % group || K % 32 || N % 16) return -1;
    if (isa == 1) {
        if (group % 32 || !qk_has_avx512bf16()) return -2;
        parallel(N / 16, nthreads, [&](int p0, int p1) {
            tiles<8>(M, p0, p1, [&](auto nb, auto mt, int p, int m) {
                int8_panels<decltype(nb)::value, decltype(mt)::value>(x, w, s, y, N, K, group, p, m);
            });
        });
        return 0;
    }
    parallel(N, nthreads, [&](int n0, int n1) { int8_scalar(x, w, s, y, M, N, K, group, n0, n1); });
    return 0;
}


// y (M, N) bf16 = bias + x · wᵀ, w in 16-row panels (N % 16 == 0, K even); AVX-512 BF16 only, else -2.
int qk_bf16(const uint16_t* x, const uint16_t* w, uint16_t* yp, const float* bias, int M, int N, int K, int nthreads) {
    const Out y{yp, bias, N};
    if (N % 16 || K % 2) return -1;
    if (!qk_has_avx512bf16()) return -2;
    parallel(N / 16, nthreads, [&](int p0, int p1) { bf16_mm(x, w, y, M, K, p0, p1); });
    return 0;
}

// out (n1 − n0, K) bf16 = rows [n0, n1) of the dequantized weight (any CPU).
int qk_dequant4(const uint8_t* w, const float* s, const uint8_t* z, int zc, uint16_t* out, int N, int K,
                int group, int n0, int n1) {
    if (group <= 0 || K % group || K % 64 || group % 64 || N % 16 || n0 % 16 || n1 % 16 || n0 < 0 || n1 > N) return -1;
    dequant4(w, s, z, zc, out, N, K, group, n0, n1);
    return 0;
}

int qk_dequant8(const int8_t* w, const float* s, uint16_t* out, int N, int K, int group, int n0, int n1) {
    if (group <= 0 || K % group || K % 32 || group % 32 || N % 16 || n0 % 16 || n1 % 16 || n0 < 0 || n1 > N) return -1;
    dequant8(w, s, out, N, K, group, n0, n1);
    return 0;
}

}  // extern "C"
"""
