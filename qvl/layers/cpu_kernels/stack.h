// A decode step's Qwen2 / Qwen3 decoder layers in one call (qvl.layers.cpu_stack): B sequences, one new
// token each, through every layer with the kernels the Python layers call, in their order and with their
// rounding, so the result is the Python path's bit for bit:
//   n = rms_norm(x, ln1); qkv = n · Wqkvᵀ + b; (Qwen3: q, k = rms_norm of each head); q, k = rotary(qkv's
//   q and k heads); each token's cache slot <- k, v; a = attention of q over the token's context (read
//   through the block table); x = bf16(x + a · Woᵀ); n = rms_norm(x, ln2); gu = n · Wguᵀ;
//   x = bf16(x + silu_mul(gu's gate, gu's up) · Wdownᵀ).
// What it saves: at batch 1 the 2B's 28 layers are ~8000 Python calls and ~3000 torch ops a token, which
// run with cold caches after each linear has streamed megabytes of weight.
#pragma once
#include <cstdint>
#include <vector>
#include "glue.h"

namespace qk {

struct Linear {                 // one weight as the kernels take it (cpu_stack.py's _Linear, field for field)
    int bits;                   // 4, 8 (QuantWeight's integers) or 16 (pack_bf16's panels)
    const void* w; const uint16_t* s; const uint8_t* z; int zc, group, il, isa;
    int N, K; const float* bias;   // bias fp32 (N,) or null
    const int64_t* perm;           // act-order GPTQ: the kernel multiplies x[:, perm] (K,), or null
};

struct Layer {
    Linear qkv, o, gate_up, down;       // qkv: q, k, v concatenated along N; gate_up: gate then up
    const uint16_t *ln1, *ln2;          // the two RMSNorm weights (H,)
    const uint16_t *q_norm, *k_norm;    // Qwen3's RMSNorm over each q / k head before rotary (D,), or null
    uint16_t *k_cache, *v_cache;        // (num_blocks, block_size, nKV, D)
};

struct Step {
    int B, H, nH, nKV, D, I; float eps, scale;
    uint16_t* x;                        // (B, H) in, out: the hidden states after the last layer
    const uint16_t *cos, *sin;          // (B, D) the rotary tables (sin with its first half negated)
    const int64_t* slots;               // (B,) each new token's cache slot
    const int32_t* tables; int width;   // (B, width) block tables
    const int32_t* ctx;                 // (B,) context lengths, the new token included
    int block_size, num_blocks, nthreads, nlayers;
    const Layer* layers;
};

// linear(L, x (M, K), y (M, N), M, nthreads) -> the kernel's return code (qk.cpp).
template <typename Lin>
int decode_stack(const Step& st, Lin linear) {
    const int B = st.B, H = st.H, D = st.D, nq = st.nH * D, nkv = st.nKV * D, W = nq + 2 * nkv;
    const long slots_total = long(st.num_blocks) * st.block_size;
    for (int b = 0; b < B; ++b) {
        if (st.ctx[b] < 1 || st.ctx[b] > st.width * st.block_size || st.slots[b] < 0 || st.slots[b] >= slots_total)
            return -1;
        for (int i = 0; i < (st.ctx[b] + st.block_size - 1) / st.block_size; ++i)
            if (st.tables[size_t(b) * st.width + i] < 0 || st.tables[size_t(b) * st.width + i] >= st.num_blocks) return -1;
    }
    std::vector<uint16_t> n(size_t(B) * H), qkv(size_t(B) * W), rot(size_t(B) * (nq + nkv)), att(size_t(B) * nq),
        o(size_t(B) * H), gu(size_t(B) * 2 * st.I), act(size_t(B) * st.I);
    const int g = st.nH / st.nKV;
    auto add = [&](const uint16_t* d) {                // x = bf16(x + d), torch's bf16 add
        for (size_t i = 0; i < size_t(B) * H; ++i) st.x[i] = f32_to_bf16(bf16_to_f32(st.x[i]) + bf16_to_f32(d[i]));
    };
    for (int li = 0; li < st.nlayers; ++li) {
        const Layer& L = st.layers[li];
        rms_norm(st.x, H, L.ln1, n.data(), H, B, H, st.eps);
        if (int rc = linear(L.qkv, n.data(), qkv.data(), B, st.nthreads)) return rc;
        if (L.q_norm)                                  // in place: each row's sum is taken before it is written
            for (int b = 0; b < B; ++b) {
                uint16_t* r = &qkv[size_t(b) * W];
                rms_norm(r, D, L.q_norm, r, D, st.nH, D, st.eps);
                rms_norm(r + nq, D, L.k_norm, r + nq, D, st.nKV, D, st.eps);
            }
        rotary(qkv.data(), W, st.cos, st.sin, rot.data(), nq + nkv, B, st.nH + st.nKV, D);
        for (int b = 0; b < B; ++b) {
            std::memcpy(L.k_cache + st.slots[b] * nkv, &rot[size_t(b) * (nq + nkv) + nq], size_t(nkv) * 2);
            std::memcpy(L.v_cache + st.slots[b] * nkv, &qkv[size_t(b) * W + nq + nkv], size_t(nkv) * 2);
        }
#pragma omp parallel for num_threads(st.nthreads) schedule(static) if (st.nthreads > 1 && B * st.nH > 1)
        for (int bh = 0; bh < B * st.nH; ++bh) {
            const int b = bh / st.nH, h = bh % st.nH, j = h / g;
            const int32_t* table = st.tables + size_t(b) * st.width;
            const auto at = [&](int l) { return (long(table[l / st.block_size]) * st.block_size + l % st.block_size) * nkv; };
            attend_row(&rot[size_t(b) * (nq + nkv) + h * D], L.k_cache + j * D, L.v_cache + j * D, at, at,
                       [](int) { return false; }, st.ctx[b], D, st.scale, &att[size_t(bh) * D]);
        }
        if (int rc = linear(L.o, att.data(), o.data(), B, st.nthreads)) return rc;
        add(o.data());
        rms_norm(st.x, H, L.ln2, n.data(), H, B, H, st.eps);
        if (int rc = linear(L.gate_up, n.data(), gu.data(), B, st.nthreads)) return rc;
        silu_mul(gu.data(), 2 * st.I, gu.data() + st.I, 2 * st.I, act.data(), st.I, B, st.I);
        if (int rc = linear(L.down, act.data(), o.data(), B, st.nthreads)) return rc;
        add(o.data());
    }
    return 0;
}

}  // namespace qk
