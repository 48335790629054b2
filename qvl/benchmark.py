"""`qvl bench`: how fast a checkpoint answers questions about images on this machine, qvl alone.

Contract: `run_bench(llm, concurrency=(1, 8), new_tokens=128, image_size=(448, 448), question=...,
seed=0) -> list[dict]`, one row per N in `concurrency`. A row submits N chat requests at once through
`LLM.chat`. Each request has its own random-noise image of `image_size` (width, height), so no two
requests share a prefix-cache block or a vision-encoder entry, and the same question. Decoding is
greedy with `min_tokens = max_tokens = new_tokens`, so every request yields exactly `new_tokens`
tokens. One unmeasured request runs first as a warm-up.

Row fields (times in each RequestOutput.metrics; `wall_s` also covers image preprocessing):
    concurrency, prompt_tokens (per request), new_tokens, wall_s,
    output_tok_s = N * new_tokens / wall_s, requests_s = N / wall_s,
    ttft_ms_median, ttft_ms_p90          arrival -> first token,
    tpot_ms_median                       per request (finish - first token) / (new_tokens - 1).
The comparison with transformers is in the repository's bench/ scripts, not here.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
from PIL import Image

from qvl.sampling_params import SamplingParams

DEFAULT_QUESTION = "Describe this image in detail."


def _conversation(image: Image.Image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def _images(n: int, size: tuple[int, int], rng: np.random.Generator) -> list[Image.Image]:
    w, h = size
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def _row(outs, n: int, new_tokens: int, wall: float) -> dict:
    for o in outs:
        if len(o.outputs[0].token_ids) != new_tokens:
            raise RuntimeError(f"request {o.request_id} produced {len(o.outputs[0].token_ids)} tokens, "
                               f"expected {new_tokens}")
    ttft = sorted(1000 * o.metrics.ttft for o in outs)
    tpot = [1000 * (o.metrics.finished_time - o.metrics.first_token_time) / (new_tokens - 1) for o in outs] \
        if new_tokens > 1 else [0.0]
    return {
        "concurrency": n,
        "prompt_tokens": len(outs[0].prompt_token_ids),
        "new_tokens": new_tokens,
        "wall_s": round(wall, 4),
        "output_tok_s": round(n * new_tokens / wall, 2),
        "requests_s": round(n / wall, 3),
        "ttft_ms_median": round(statistics.median(ttft), 1),
        "ttft_ms_p90": round(float(np.percentile(ttft, 90)), 1),
        "tpot_ms_median": round(statistics.median(tpot), 2),
    }


def check(concurrency, new_tokens: int, image_size: tuple[int, int]) -> None:
    """ValueError naming the bad setting (run_bench calls it; the CLI calls it before loading a model)."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if not concurrency or min(concurrency) < 1:
        raise ValueError(f"concurrency values must be >= 1, got {list(concurrency)}")
    if min(image_size) < 1:
        raise ValueError(f"image size must be positive, got {image_size[0]}x{image_size[1]}")


def run_bench(llm, *, concurrency=(1, 8), new_tokens: int = 128, image_size: tuple[int, int] = (448, 448),
              question: str = DEFAULT_QUESTION, seed: int = 0) -> list[dict]:
    check(concurrency, new_tokens, image_size)
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    llm.chat(_conversation(_images(1, image_size, rng)[0], question), params, use_tqdm=False)   # warm-up
    rows = []
    for n in concurrency:
        convs = [_conversation(im, question) for im in _images(n, image_size, rng)]
        start = time.perf_counter()
        outs = llm.chat(convs, params, use_tqdm=False)
        rows.append(_row(outs, n, new_tokens, time.perf_counter() - start))
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'concurrency':>11}  {'wall s':>8}  {'output tok/s':>12}  {'req/s':>7}  " \
           f"{'TTFT median / p90 ms':>21}  {'TPOT median ms':>14}"
    lines = [head]
    for r in rows:
        ttft = f"{r['ttft_ms_median']:.0f} / {r['ttft_ms_p90']:.0f}"
        lines.append(f"{r['concurrency']:>11}  {r['wall_s']:>8.2f}  {r['output_tok_s']:>12.1f}  "
                     f"{r['requests_s']:>7.2f}  {ttft:>21}  {r['tpot_ms_median']:>14.1f}")
    return "\n".join(lines)
