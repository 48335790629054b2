// Portable code (any x86-64): the exact fp32 reference of the integer kernels (isa 0: tests, CPUs without
// AVX-512 VNNI) and the dequantizers of the many-row path (W or Wᵀ as bf16 blocks for torch's GEMM; the
// fallback of dequant.h's AVX-512 ones on CPUs without AVX-512 BF16, and their bit-exact reference).
#pragma once
#include "common.h"

namespace qk {

// y[m, n] = sum_g s[g, n] * sum_{k in g} x[m, k] * (q[n, k] - z[g, n]), fp32; q(n, k) reads one weight.
template <typename Q>
void int_scalar(const uint16_t* x, Q q, const uint16_t* s, const uint8_t* z, int zc, Out y, int M, int N, int K,
                int group, int n0, int n1) {
    const int G = K / group;
    for (int m = 0; m < M; ++m)
        for (int n = n0; n < n1; ++n) {
            float tot = 0.f;
            for (int g = 0; g < G; ++g) {
                float acc = 0.f;
                const float zz = float(z ? z[atg(n, g, N, G)] : zc);
                for (int k = g * group; k < (g + 1) * group; ++k)
                    acc += bf16_to_f32(x[size_t(m) * K + k]) * (float(q(n, k)) - zz);
                tot += acc * f16_to_f32(s[atg(n, g, N, G)]);
            }
            y.put(m, n, tot);
        }
}

// Rows [n0, n1) (whole panels) of W = (q − z)·s as bf16: W[n, k] -> out[(n − n0)·rs + k·cs] (rs = K, cs = 1:
// W row-major; rs = 1, cs = ld: Wᵀ (K, ld), dequant.h's layout on CPUs without its ISA).
__attribute__((target_clones("avx512f", "avx2", "default")))
void dequant4(const uint8_t* w, const uint16_t* s, const uint8_t* z, int zc, uint16_t* out, int N, int K,
              int group, int il, int n0, int n1, size_t rs, size_t cs) {
    const int G = K / group;
    for (int p = n0 / 16; p < n1 / 16; ++p)
        for (int g = 0; g < G; ++g) {
            float sc[16], zz[16];
            for (int r = 0; r < 16; ++r) sc[r] = f16_to_f32(s[atg(p * 16 + r, g, N, G)]);
            for (int r = 0; r < 16; ++r) zz[r] = float(z ? z[atg(p * 16 + r, g, N, G)] : zc);
            for (int k = g * group; k < (g + 1) * group; k += 8) {
                const uint8_t* src = w + Blocks{N / 16, size_t(K / 8), il}.at(p, k / 8);
                for (int r = 0; r < 16; ++r) {
                    uint16_t* o = out + size_t(p * 16 + r - n0) * rs + size_t(k) * cs;
                    for (int j = 0; j < 4; ++j) {
                        o[j * cs] = f32_to_bf16((float(src[4 * r + j] & 15) - zz[r]) * sc[r]);
                        o[(4 + j) * cs] = f32_to_bf16((float(src[4 * r + j] >> 4) - zz[r]) * sc[r]);
                    }
                }
            }
        }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void dequant8(const uint8_t* w, const uint16_t* s, uint16_t* out, int N, int K, int group, int il, int n0, int n1,
              size_t rs, size_t cs) {
    const int G = K / group;
    for (int p = n0 / 16; p < n1 / 16; ++p)
        for (int g = 0; g < G; ++g) {
            float sc[16];
            for (int r = 0; r < 16; ++r) sc[r] = f16_to_f32(s[atg(p * 16 + r, g, N, G)]);
            for (int k = g * group; k < (g + 1) * group; k += 4) {
                const uint8_t* src = w + Blocks{N / 16, size_t(K / 4), il}.at(p, k / 4);
                for (int r = 0; r < 16; ++r) {
                    uint16_t* o = out + size_t(p * 16 + r - n0) * rs + size_t(k) * cs;
                    for (int j = 0; j < 4; ++j) o[j * cs] = f32_to_bf16(float(int(src[4 * r + j]) - 128) * sc[r]);
                }
            }
        }
}

}  // namespace qk
