// qvl's CPU kernels, the C ABI that qvl.layers.quant_kernels calls through ctypes (compiled on first use).
//   qk_int4(x, w, s, z, zc, y, bias, M, N, K, group, il, isa, nthreads)   4-bit weights (q − z)·s
//   qk_int8(x, w, s, y, bias, M, N, K, group, il, isa, nthreads)          8-bit weights w·s (w = q − z as int8)
//   qk_bf16(x, w, y, bias, M, N, K, isa, nthreads)                    bf16 weights in 16-row panels
//   qk_bf16_gemm(x, w, y, bias, M, N, K, nthreads)                    bf16 W (N, K) as stored, many rows (gemm.h)
//   qk_dequant4 / qk_dequant8(..., out, ld, ..., il, n0, n1, trans, isa, nthreads)   rows of W as bf16 (any CPU)
//   qk_rms_norm, qk_rotary, qk_silu_mul, qk_decode_attention: glue.h's ops (AVX2 + FMA, qk_glue_ok())
//   qk_decode_stack(step): a decode step's decoder layers in one call (stack.h; AVX2 + FMA)
// x (M, K) bf16, y (M, N) bf16 = x · Wᵀ + bias (fp32 bias or null, added in fp32, rounded once); layouts
// in common.h (il: the integer panels' interleave, 8 or 1). isa 1: the AVX-512 kernel (VNNI for the
// integers, BF16 for bf16), 2: AVX2 (integers; avx2.h, the same bits as VNNI; bf16: bf16.h's AVX2 + FMA
// kernel), 0: the scalar reference.
// Return 0, or -1 (shape refused) / -2 (ISA missing): the caller falls back, never guesses.
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "scalar.h"
#include "vnni.h"
#include "avx2.h"
#include "bf16.h"
#include "gemm.h"
#include "dequant.h"
#include "glue.h"
#include "stack.h"

using namespace qk;

namespace {

bool avx512_base() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// The activation block of the VNNI kernels: 128 columns, or the group when 128 does not divide it.
int block_of(int group) { return group % 128 == 0 ? 128 : group; }

// isa 1: AVX-512 VNNI (vnni.h), 2: AVX2 (avx2.h); the caller has checked the CPU has it.
int run_int(int bits, const uint16_t* x, const uint8_t* w, const uint16_t* s, const uint8_t* z, int zc,
            Out y, int M, int N, int K, int group, int il, int isa, int nthreads) {
    const int XB = block_of(group), nb = K / XB;
    std::vector<int8_t> xq(size_t(M) * K);
    std::vector<float> sx(size_t(M) * nb), sm(size_t(M) * nb);
    if (isa == 1) quantize_rows(x, M, K, XB, xq.data(), sx.data(), sm.data());
    else quantize_rows_avx2(x, M, K, XB, xq.data(), sx.data(), sm.data());
    const float zf = bits == 4 ? float(zc) : isa == 1 ? 128.f : 0.f;   // avx2.h sums w·xq itself
    const uint8_t* zp = bits == 4 ? z : nullptr;
    const Blocks blocks{N / 16, size_t(K / (bits == 4 ? 8 : 4)), il};
    const int8_t* xp = xq.data();
    const float *sxp = sx.data(), *smp = sm.data();
    auto block = [&](int pb, int pe) {
        // More than one row: the tiles read a block panel by panel (a 512-byte stride), so the block
        // is pulled into L2 in storage order first. One row reads the block in order anyway.
        if (M == 1) return;
        const char* a = (const char*)(w + blocks.at(pb, 0));
        const size_t bytes = blocks.block_bytes(pb);
        for (size_t off = 0; off < bytes; off += 64) _mm_prefetch(a + off, _MM_HINT_T1);
        (void)pe;
    };
    parallel(N / 16, nthreads, [&](int p0, int p1) {
        if (isa == 1)
            tiles<4, 8>(M, p0, p1, [&](auto nbk, auto mt, int p, int m) {
                constexpr int NB = decltype(nbk)::value, MT = decltype(mt)::value;
                if (bits == 4) int_panels<4, NB, MT>(xp, sxp, smp, w, s, zp, zf, y, K, group, il, XB, p, m);
                else int_panels<8, NB, MT>(xp, sxp, smp, w, s, zp, zf, y, K, group, il, XB, p, m);
            }, block);
        else
            tiles<2, 4>(M, p0, p1, [&](auto nbk, auto mt, int p, int m) {   // one row: 4 panels (il 1: 4 streams)
                constexpr int NB = decltype(nbk)::value, MT = decltype(mt)::value;
                if (bits == 4) int_panels_avx2<4, NB, MT>(xp, sxp, smp, w, s, zp, zf, y, K, group, il, XB, p, m);
                else int_panels_avx2<8, NB, MT>(xp, sxp, smp, w, s, zp, zf, y, K, group, il, XB, p, m);
            }, block);
    });
    return 0;
}

// AVX2 + FMA + F16C: avx2.h's integer kernels (F16C widens their fp16 scales).
bool avx2_int() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// The best integer kernel this CPU runs: 1 (AVX-512 VNNI), 2 (AVX2 + FMA + F16C) or 0 (the scalar code only).
int best_int_isa() {
    __builtin_cpu_init();
    if (avx512_base() && __builtin_cpu_supports("avx512vnni")) return 1;
    return avx2_int() ? 2 : 0;
}

// isa 1 or 2 as asked, if this CPU has it (-2 if not).
int int_isa_ok(int isa) {
    static const int best = best_int_isa(), avx2 = avx2_int();
    return isa == 1 ? best == 1 : isa == 2 ? avx2 : 0;
}

}  // namespace

extern "C" {

int qk_has_avx512bf16() {
    static const int has = avx512_base() && __builtin_cpu_supports("avx512bf16");
    return has;
}

int qk_has_avx512vnni() { return int_isa_ok(1); }

// The integer kernels' best isa here: 1 AVX-512 VNNI, 2 AVX2, 0 none (the scalar code, isa 0, runs anywhere).
int qk_int_isa() {
    static const int best = best_int_isa();
    return best;
}

// The number of OpenMP threads a parallel region gets (tests: the library shares torch's pool).
int qk_omp_threads(int nthreads) {
    int got = 1;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp master
        {
#ifdef _OPENMP
            got = omp_get_num_threads();
#endif
        }
    }
    return got;
}

// y = x · ((q − z)·s)ᵀ + bias; s (N/16, G, 16) fp16, z (N/16, G, 16) uint8; z null: zc everywhere. Needs K % group == 0, group % 32 == 0.
int qk_int4(const uint16_t* x, const uint8_t* w, const uint16_t* s, const uint8_t* z, int zc, uint16_t* yp,
            const float* bias, int M, int N, int K, int group, int il, int isa, int nthreads) {
    const Out y{yp, bias, N};
    if (group <= 0 || K % group || group % 32 || N % 16 || (il != 1 && il != 8)) return -1;
    if (isa) return int_isa_ok(isa) ? run_int(4, x, w, s, z, zc, y, M, N, K, group, il, isa, nthreads) : -2;
    parallel(N / 16, nthreads, [&](int p0, int p1) {
        int_scalar(x, [&](int n, int k) { return nib4(w, n, k, N, K, il); }, s, z, zc, y, M, N, K, group, p0 * 16, p1 * 16);
    });
    return 0;
}

// y = x · (w·s)ᵀ + bias, w stored + 128 (u8); s (N/16, G, 16) fp16. Needs K % group == 0, group % 32 == 0.
int qk_int8(const uint16_t* x, const uint8_t* w, const uint16_t* s, uint16_t* yp, const float* bias, int M, int N,
            int K, int group, int il, int isa, int nthreads) {
    const Out y{yp, bias, N};
    if (group <= 0 || K % group || group % 32 || N % 16 || (il != 1 && il != 8)) return -1;
    if (isa) return int_isa_ok(isa) ? run_int(8, x, w, s, nullptr, 0, y, M, N, K, group, il, isa, nthreads) : -2;
    parallel(N / 16, nthreads, [&](int p0, int p1) {
        int_scalar(x, [&](int n, int k) { return int(w[at8(n, k, N, K, il)]) - 128; }, s, nullptr, 0, y, M, N, K, group,
                   p0 * 16, p1 * 16);
    });
    return 0;
}

// The bf16 kernel's best isa here: 1 AVX-512 BF16, 2 AVX2 + FMA, 0 none.
int qk_bf16_isa() {
    __builtin_cpu_init();
    static const int best = qk_has_avx512bf16() ? 1 : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 2 : 0;
    return best;
}

// y = x · wᵀ + bias, w in 16-row bf16 panels (N % 16 == 0, K even); isa 1 AVX-512 BF16, 2 AVX2 (-2 if
// this CPU lacks it).
int qk_bf16(const uint16_t* x, const uint16_t* w, uint16_t* yp, const float* bias, int M, int N, int K, int isa,
            int nthreads) {
    const Out y{yp, bias, N};
    if (N % 16 || K % 2 || (isa != 1 && isa != 2)) return -1;
    const int best = qk_bf16_isa();
    if (best == 0 || (isa == 1 && best != 1)) return -2;
    if (isa == 1) {
        parallel(N / 16, nthreads, [&](int p0, int p1) { bf16_mm(x, w, y, M, K, p0, p1); });
        return 0;
    }
    std::vector<float> xf(size_t(M) * K);
    for (size_t i = 0; i < xf.size(); ++i) xf[i] = bf16_to_f32(x[i]);
    parallel(N / 16, nthreads, [&](int p0, int p1) { bf16_mm_avx2(xf.data(), w, y, M, K, p0, p1); });
    return 0;
}

// Rows [n0, n1) of the dequantized weight as bf16: trans 0 -> out (n1 − n0, K) = W rows, trans 1 -> out
// (K, n1 − n0) = Wᵀ columns (the many-row GEMM's operand); ld: out's row stride in elements. isa 1:
// dequant.h (AVX-512 BF16, trans 1 only), 0: the scalar code (any CPU). Panels split over nthreads; either
// way the same bits.
namespace {
int dq_check(int N, int K, int group, int il, int n0, int n1, int ld, int trans, int isa) {
    if (group <= 0 || K % group || group % 32 || N % 16 || n0 % 16 || n1 % 16 || n0 < 0 || n1 > N || n0 > n1) return -1;
    if (il != 1 && il != 8) return -1;
    if (ld < (trans ? n1 - n0 : K) || (isa == 1 && trans != 1)) return -1;
    return isa == 1 && !qk_has_avx512bf16() ? -2 : 0;
}
}  // namespace

int qk_dequant4(const uint8_t* w, const uint16_t* s, const uint8_t* z, int zc, uint16_t* out, int ld, int N, int K,
                int group, int il, int n0, int n1, int trans, int isa, int nthreads) {
    if (const int rc = dq_check(N, K, group, il, n0, n1, ld, trans, isa)) return rc;
    parallel((n1 - n0) / 16, nthreads, [&](int a, int b) {
        const int pa = n0 / 16 + a, pb = n0 / 16 + b;
        if (isa == 1) dequant4_t(w, s, z, zc, out, N, K, group, il, n0, ld, pa, pb);
        else if (trans) dequant4(w, s, z, zc, out + (pa * 16 - n0), N, K, group, il, pa * 16, pb * 16, 1, size_t(ld));
        else dequant4(w, s, z, zc, out + size_t(pa * 16 - n0) * ld, N, K, group, il, pa * 16, pb * 16, size_t(ld), 1);
    });
    return 0;
}

int qk_dequant8(const uint8_t* w, const uint16_t* s, uint16_t* out, int ld, int N, int K, int group, int il, int n0,
                int n1, int trans, int isa, int nthreads) {
    if (const int rc = dq_check(N, K, group, il, n0, n1, ld, trans, isa)) return rc;
    parallel((n1 - n0) / 16, nthreads, [&](int a, int b) {
        const int pa = n0 / 16 + a, pb = n0 / 16 + b;
        if (isa == 1) dequant8_t(w, s, out, N, K, group, il, n0, ld, pa, pb);
        else if (trans) dequant8(w, s, out + (pa * 16 - n0), N, K, group, il, pa * 16, pb * 16, 1, size_t(ld));
        else dequant8(w, s, out + size_t(pa * 16 - n0) * ld, N, K, group, il, pa * 16, pb * 16, size_t(ld), 1);
    });
    return 0;
}

// glue.h: 0, -1 (shape refused) or -2 (no AVX2 + FMA here); strides in elements.
int qk_glue_ok() {
    static const int ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return ok;
}

// y = x · Wᵀ + bias with W (N, K) bf16 row-major, in fp32 on AVX2 + FMA (gemm.h; any M, N, K); -2 where
// this CPU lacks AVX2 + FMA.
int qk_bf16_gemm(const uint16_t* x, const uint16_t* w, uint16_t* yp, const float* bias, int M, int N, int K,
                 int nthreads) {
    if (M <= 0 || N <= 0 || K <= 0) return -1;
    if (!qk_glue_ok()) return -2;
    const Out y{yp, bias, N};
    parallel((N + 15) / 16, nthreads, [&](int p0, int p1) { gemm_bf16(x, w, y, M, N, K, p0, p1); });
    return 0;
}

int qk_rms_norm(const uint16_t* x, long sx, const uint16_t* w, uint16_t* y, long sy, int rows, int H, float eps) {
    if (!qk_glue_ok()) return -2;
    if (H % 8) return -1;
    rms_norm(x, sx, w, y, sy, rows, H, eps);
    return 0;
}

int qk_rotary(const uint16_t* x, long sx, const uint16_t* cs, const uint16_t* sn, uint16_t* y, long sy, int N,
              int heads, int D) {
    if (!qk_glue_ok()) return -2;
    if (D % 16) return -1;
    rotary(x, sx, cs, sn, y, sy, N, heads, D);
    return 0;
}

int qk_silu_mul(const uint16_t* g, long sg, const uint16_t* u, long su, uint16_t* y, long sy, int rows, int I) {
    if (!qk_glue_ok()) return -2;
    if (I % 8) return -1;
    silu_mul(g, sg, u, su, y, sy, rows, I);
    return 0;
}

int qk_decode_attention(const uint16_t* q, long sq, const uint16_t* k, long skb, long skl, const uint16_t* v,
                        long svb, long svl, const uint8_t* mask, uint16_t* out, int B, int L, int nH, int nKV,
                        int D, float scale, int nthreads) {
    if (!qk_glue_ok()) return -2;
    if (D % 16 || nKV <= 0 || nH % nKV) return -1;
    decode_attention(q, sq, k, skb, skl, v, svb, svl, mask, out, B, L, nH, nKV, D, scale, nthreads);
    return 0;
}

// stack.h's layers, each linear through the entry point above that its `bits` name; 0, -1 (a shape, an
// index out of range), -2 (no AVX2 + FMA, or a kernel's ISA missing).
int qk_decode_stack(const Step* st) {
    if (!qk_glue_ok()) return -2;
    if (st->B < 1 || st->D % 16 || st->H % 8 || st->I % 8 || st->nKV <= 0 || st->nH % st->nKV) return -1;
    std::vector<uint16_t> xp;                       // x[:, perm] of an act-order linear
    return decode_stack(*st, [&xp](const Linear& L, const uint16_t* x, uint16_t* y, int M, int nt) {
        if (L.perm) {
            xp.resize(size_t(M) * L.K);
            for (int m = 0; m < M; ++m)
                for (int k = 0; k < L.K; ++k) xp[size_t(m) * L.K + k] = x[size_t(m) * L.K + L.perm[k]];
            x = xp.data();
        }
        const auto* w = static_cast<const uint8_t*>(L.w);
        if (L.bits == 4) return qk_int4(x, w, L.s, L.z, L.zc, y, L.bias, M, L.N, L.K, L.group, L.il, L.isa, nt);
        if (L.bits == 8) return qk_int8(x, w, L.s, y, L.bias, M, L.N, L.K, L.group, L.il, L.isa, nt);
        if (L.bits == 16) return qk_bf16(x, static_cast<const uint16_t*>(L.w), y, L.bias, M, L.N, L.K, L.isa, nt);
        return -1;
    });
}

}  // extern "C"
