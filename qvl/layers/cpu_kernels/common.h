// Shared by qvl's CPU kernels: bf16 conversion, the output writer, the panel layouts, the OpenMP split.
// Plain C ABI, no torch headers. Every AVX-512 function carries its ISA in a `target` attribute and is only
// called after a run-time check (qk_has_*); the scalar code runs on any x86-64.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <immintrin.h>

namespace qk {

inline uint16_t f32_to_bf16(float f) {                       // round to nearest even (no NaNs here)
    uint32_t u; std::memcpy(&u, &f, 4);
    return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float bf16_to_f32(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }

// The integer kernels' scales are IEEE binary16 bit patterns (fp16: what the GPTQ / AWQ checkpoints
// store; half of fp32's bytes, and the scales are 1/16 of an int4 weight's). Exact, subnormals included.
inline float f16_to_f32(uint16_t h) {
    const uint32_t e = (h >> 10) & 31, m = h & 1023, sign = uint32_t(h & 0x8000) << 16;
    uint32_t u;
    if (e == 31) u = sign | 0x7F800000u | (m << 13);                    // inf / nan
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);              // normal: rebias 15 -> 127
    else { const float f = float(m) * 5.9604644775390625e-8f; return sign ? -f : f; }   // m · 2^-24, exact
    float f; std::memcpy(&f, &u, 4); return f;
}

// Where results go: y (M, N) bf16 = value + bias[n] (bias may be null), rounded once.
struct Out {
    uint16_t* y; const float* bias; int N;
    void put(int m, int n, float v) const { y[size_t(m) * N + n] = f32_to_bf16(bias ? v + bias[n] : v); }
};

// Every weight is stored in panels of 16 output rows, 64 bytes per step of the input dim:
//   bf16: a step is 2 columns, the 16 rows' (k, k+1) pairs side by side (one vdpbf16ps lane each); a panel
//         is one sequential stream (panels one after the other);
//   int8: a step is 4 columns, row r's w[r, k..k+3] + 128 as 4 unsigned bytes at 4r (one vpdpbusd lane);
//   int4: a step is 8 columns, byte 4r + j holds q[r, k + j] in its low nibble and q[r, k + 4 + j] in its
//         high one (one AND, or a shift and an AND, gives the vpdpbusd lane of 4 columns).
// The integer panels come in one of two orders, the packer's choice (`il`, passed with every call):
//   il 8: interleaved in blocks of 8 (128 output rows; the last block may hold fewer): per step the
//         block's panels' 64 bytes lie side by side, so a tile over a whole block reads one sequential
//         stream (the VNNI kernel: 8 separate panel streams read 16-18 GB/s where a copy read 20-21, one
//         stream 20-22, 2-core Zen 4, shared);
//   il 1: panel after panel (the AVX2 kernels: a one-row tile over 4 panels reads 4 sequential streams,
//         which the hardware prefetcher keeps further ahead than one, avx2.h).
// Either way a block of 8 panels is one contiguous range (the unit of the thread split and of the
// many-row tiles' L2 prefetch). Per-group scales and zeros are always blocked by 8 (atg). Several linears
// concatenated along N are one weight (the fused q/k/v and gate/up) when every one but the last fills
// whole blocks (N % 128 == 0).
struct Blocks {                        // where panel p's step t starts, in bytes, for steps of 64 bytes
    int P; size_t steps; int il = 8;   // panels, steps per panel, interleave (8 or 1)
    int in(int p) const { const int b = p / 8 * 8; return P - b < 8 ? P - b : 8; }    // panels in p's block
    size_t at(int p, size_t t) const {
        if (il == 1) return (size_t(p) * steps + t) * 64;
        return (size_t(p / 8) * 8 * steps + t * in(p) + p % 8) * 64;
    }
    size_t step_bytes(int p) const { return il == 1 ? 64 : size_t(in(p)) * 64; }       // step t to t + 1
    size_t panel_bytes() const { return il == 1 ? steps * 64 : 64; }   // panel p to p + 1 (in one block)
    size_t block_bytes(int p) const { return size_t(in(p)) * steps * 64; }            // p's whole block
};
inline size_t at8(int n, int k, int N, int K, int il) { return Blocks{N / 16, size_t(K / 4), il}.at(n / 16, k / 4) + (n % 16) * 4 + k % 4; }
inline size_t at4(int n, int k, int N, int K, int il) { return Blocks{N / 16, size_t(K / 8), il}.at(n / 16, k / 8) + (n % 16) * 4 + k % 4; }
inline int nib4(const uint8_t* w, int n, int k, int N, int K, int il) { const uint8_t b = w[at4(n, k, N, K, il)]; return k % 8 < 4 ? b & 15 : b >> 4; }
// Scales and zeros, per group of one panel 16 values (the 16 rows'), blocked like the weights: per group
// the block's panels' values side by side, so a block's scales are one stream too.
inline size_t atg(int n, int g, int N, int G) { return Blocks{N / 16, size_t(G)}.at(n / 16, g) / 4 + n % 16; }
// Group g's scales (and zeros, z may be null) of panels [p0, p0 + np) into L1: a line per panel (fp16
// scales: two panels a line), not in a stream (the integer kernels call it before a block of the input dim).
inline void prefetch_group(const uint16_t* s, const uint8_t* z, int p0, int np, int g, int N, int G) {
    for (int a = 0; a < np; ++a) {
        _mm_prefetch((const char*)(s + atg((p0 + a) * 16, g, N, G)), _MM_HINT_T0);
        if (z) _mm_prefetch((const char*)(z + atg((p0 + a) * 16, g, N, G)), _MM_HINT_T0);
    }
}

// Panels [0, P) split over `nthreads` threads of torch's own OpenMP pool (the library links the libgomp
// torch has loaded: its threads are awake right after torch's ops, no second pool competes for the
// cores), in whole blocks of 8 panels; every output is computed by one thread from the same inputs, so
// the result does not depend on the thread count.
template <typename F>
void parallel(int P, int nthreads, F f) {
    const int blocks = (P + 7) / 8, nt = nthreads < blocks ? nthreads : blocks;
    if (nt <= 1) return f(0, P);
    const int per = (blocks + nt - 1) / nt * 8;
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        const int p0 = t * per, p1 = p0 + per < P ? p0 + per : P;
        if (p0 < p1) f(p0, p1);
    }
}

// Panels [p0, p1) in blocks of 8 (128 output rows, whose weights stay in L2 while every input row passes
// them: the weight is read from memory once per call, whatever M); inside a block, tiles of NB panels x
// MT input rows with NB x MT = PROD independent accumulator chains (8 zmm; 4 panels' worth for AVX2,
// whose panels take two ymm each).
template <int MT, int PROD, typename Tile>
void block_rows(int M, int pb, int pe, int& m, Tile tile) {
    constexpr int NB = PROD / MT;
    for (; m + MT <= M; m += MT) {
        int p = pb;
        for (; p + NB <= pe; p += NB) tile(std::integral_constant<int, NB>{}, std::integral_constant<int, MT>{}, p, m);
        for (; p < pe; ++p) tile(std::integral_constant<int, 1>{}, std::integral_constant<int, MT>{}, p, m);
    }
}

// block(pb, pe) runs before a block's tiles (the integer kernels prefetch the block there). MAXMT: the
// most rows a tile takes (4 for the VNNI integers: a broadcast x word then serves 2 panels, which costs
// fewer instructions per multiply than 8 rows x 1 panel, measured at 16 rows); MAXMT <= PROD.
template <int MAXMT, int PROD, typename Tile, typename Block>
void tiles(int M, int p0, int p1, Tile tile, Block block) {
    for (int pb = p0; pb < p1; pb += 8) {
        const int pe = pb + 8 < p1 ? pb + 8 : p1;
        block(pb, pe);
        int m = 0;
        if constexpr (MAXMT >= 8) block_rows<8, PROD>(M, pb, pe, m, tile);
        if constexpr (MAXMT >= 4) block_rows<4, PROD>(M, pb, pe, m, tile);
        block_rows<2, PROD>(M, pb, pe, m, tile);
        block_rows<1, PROD>(M, pb, pe, m, tile);
    }
}

}  // namespace qk
