"""Tensor parallelism end to end on the CPU: 2 gloo ranks, fp32, the tiny random Qwen2-VL (4 heads, 2 KV heads).

  * greedy tokens of tp=2 == tp=1 == transformers, for text, an image, a video and both;
  * the engine invariants under tp=2: batched == alone, prefix-cache hit == miss, chunked prefill and
    forced preemption change nothing; Qwen3-VL (DeepStack rows broadcast) == tp=1;
  * `qvl serve -tp 2` (a real uvicorn process) answers the official `openai` client like tp=1, and SIGTERM
    leaves no process behind; killing its worker makes /health answer 503 and the server exit != 0 within
    seconds, again leaving no process;
  * two "machines" on one host (`qvl worker` with RANK=1, `qvl run` with RANK=0, MASTER_ADDR=127.0.0.1),
    and `torchrun --nproc-per-node 2 -m qvl.cli run ...`, give tp=1's tokens; a remote worker that dies
    while rank 0 is idle is found by its missing heartbeat;
  * the rendezvous fails with a clear error (port in use, a rank that never joins) instead of hanging, and
    an unshardable head count is refused before any process starts.
One tensor-parallel engine per process (torch's default group): tests that build their own close `tp2` first.
Processes are found through /proc (psutil is not a dependency).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from test_server import ServerProcess
from tiny import IMG, VID, chat, greedy_tokens, hf_media_kwargs, image, tiny_engine

from qvl.parallel import group as tp_group

N_NEW = 12
ROOT = Path(__file__).resolve().parents[1]
QUESTION = "How many shapes are there?"
RUN_FLAGS = ["--device", "cpu", "--dtype", "float32", "--threads", "1", "--max-model-len", "1024",
             "--kv-cache-memory", "8MiB"]


def video(seed: int, frames: int = 6, h: int = 112, w: int = 168) -> dict:
    return {"video": [image(seed + i, h, w) for i in range(frames)], "fps": 2, "resized_height": h,
            "resized_width": w}


CASES = {
    "text": (chat("Describe the weather in words."), None),
    "image": (chat(IMG + "Describe this image."), {"image": [image(0)]}),
    "video": (chat(VID + "What happens?"), {"video": [video(3)]}),
    "image_video": (chat(IMG + "then" + VID + "Compare."), {"image": [image(5, 56, 84)], "video": [video(7)]}),
}


def prompts(eng, names=tuple(CASES)):
    return [eng.processor.process_prompt(CASES[n][0], CASES[n][1]) for n in names]


# ------------------------------------------------------------------------------------------ processes

def children(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc/*/stat: field 4 is the parent pid)."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(d)] = int(fields[1])
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for c, pp in parents.items():
            if pp == p and c not in out:
                out.add(c)
                todo.append(c)
    return out


def wait_gone(pids, timeout: float = 10.0) -> set[int]:
    """The pids still alive (not zombies) after up to `timeout` seconds."""
    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if alive(p)}


def qvl(*args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qvl.cli", *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, **kw)


class Served(ServerProcess):
    """`qvl serve MODEL -tp 2` on a free port, healthy."""

    def __init__(self, model: Path, log: Path):
        super().__init__(model, ["-tp", "2", *RUN_FLAGS, "--no-ui"], log, env={"PYTHONPATH": str(ROOT)},
                         command=[sys.executable, "-m", "qvl.cli", "serve"])

    def workers(self) -> list[int]:
        """The server's tensor-parallel worker processes (its children running qvl's spawn target)."""
        out = []
        for c in children(self.proc.pid):
            try:
                cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "multiprocessing.spawn" in cmd and "resource_tracker" not in cmd:
                out.append(c)
        return out


# ------------------------------------------------------------------------------------------- engines

@pytest.fixture(scope="module")
def tp1(tiny_ckpt):
    return tiny_engine(tiny_ckpt, enable_prefix_caching=False, encoder_cache_memory=0, threads=1)


@pytest.fixture(scope="module")
def reference(tp1):
    """tp=1, each case alone, no caches, whole prefill."""
    return [greedy_tokens(tp1, [p], N_NEW)[0] for p in prompts(tp1)]


@pytest.fixture(scope="module")
def tp2(tiny_ckpt):
    eng = tiny_engine(tiny_ckpt, tensor_parallel_size=2, threads=1)
    yield eng
    eng.close()


def hf_greedy(path, ps) -> list[list[int]]:
    from transformers import Qwen2VLForConditionalGeneration

    hf = Qwen2VLForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa",
                                                         dtype=torch.float32).eval()
    out = []
    for p in ps:
        kw = hf_media_kwargs(p)
        ids = torch.tensor([p.token_ids])
        with torch.no_grad():
            out.append(hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=N_NEW, min_new_tokens=N_NEW, **kw)[0, ids.shape[1]:].tolist())
    return out


def test_tp2_greedy_equals_tp1_and_transformers(tiny_ckpt, tp2, reference):
    # really sharded: rank 0 holds half the heads (2 of 4) and half the KV heads (1 of 2)
    attn = tp2.model.attention_modules()[0]
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1) and attn.k_cache.shape[2] == 1
    got = [greedy_tokens(tp2, [p], N_NEW)[0] for p in prompts(tp2)]
    assert got == reference
    assert got == hf_greedy(tiny_ckpt, prompts(tp2))
    assert len({tuple(r) for r in reference}) == len(reference)        # the inputs steer the model


def test_tp2_batched_and_prefix_cache_hit(tp2, reference):
    first = greedy_tokens(tp2, prompts(tp2), N_NEW)                     # one batch
    hits = tp2.stats()["prefix_cache_hits"]
    second = greedy_tokens(tp2, prompts(tp2), N_NEW)                    # the same prompts: cache hits
    assert first == second == reference
    assert tp2.stats()["prefix_cache_hits"] > hits
    assert tp2.stats()["kv_blocks_free"] == tp2.stats()["kv_blocks_total"]


def test_tp2_chunked_and_preempted(tiny_ckpt, reference, tp2):
    tp2.close()                             # one tensor-parallel engine per process (torch's default group)
    with pytest.raises(Exception, match="the tensor-parallel group has been shut down"):
        greedy_tokens(tp2, prompts(tp2)[:1], 1)
    per_block = 2 * 2 * 16 * 1 * 16 * 4     # layers * K,V * block * kv heads per rank * head dim * fp32
    eng = tiny_engine(tiny_ckpt, tensor_parallel_size=2, threads=1, max_num_batched_tokens=7,
                      kv_cache_memory=9 * per_block, encoder_cache_memory=0)
    try:
        assert eng.block_manager.num_blocks == 9         # every rank planned 9 of its own (1-head) blocks
        assert greedy_tokens(eng, prompts(eng), N_NEW) == reference
        s = eng.stats()
        assert s["num_preemptions"] > 0 and s["kv_blocks_free"] == 9
    finally:
        eng.close()
    assert all(p.exitcode == 0 for p in eng.executor.procs)              # STOP, not killed


def test_tp2_qwen3_vl_deepstack_equals_tp1(tiny_qwen3_vl_ckpt, tp2):
    """Qwen3-VL: the DeepStack feature sets and their rows reach the workers (step_message extras)."""
    tp2.close()                             # one tensor-parallel engine per process (torch's default group)
    one = tiny_engine(tiny_qwen3_vl_ckpt, threads=1)
    ps = [one.processor.process_prompt(chat(IMG + "Describe this image."), {"image": [image(0, 128, 160)]}),
          one.processor.process_prompt(chat("Describe the weather in words."), None)]
    want = greedy_tokens(one, ps, N_NEW)
    eng = tiny_engine(tiny_qwen3_vl_ckpt, tensor_parallel_size=2, threads=1)
    try:
        assert eng.model.attention_modules()[0].num_kv_heads == 1
        assert greedy_tokens(eng, ps, N_NEW) == want
    finally:
        eng.close()


def test_tp2_awq_engine_equals_dequantized_reference(tmp_path, tp2):
    """An AWQ checkpoint through the whole engine at tp=2 (quantized shards, per-rank KV) == the float
    checkpoint of its dequantized weights at tp=1."""
    from quant_fixtures import write_quantized

    tp2.close()
    qdir, ref = write_quantized(tmp_path / "awq", "awq", group=32, seed=2)
    one = tiny_engine(ref, threads=1)
    ps = [one.processor.process_prompt(*CASES[n]) for n in ("image", "text")]
    want = greedy_tokens(one, ps, N_NEW)
    eng = tiny_engine(qdir, tensor_parallel_size=2, threads=1)
    try:
        assert eng.model.quantization is not None
        assert greedy_tokens(eng, ps, N_NEW) == want
    finally:
        eng.close()


# -------------------------------------------------------------------------------------------- server

def test_serve_tp2_openai_client_and_sigterm(tiny_ckpt, tp1, tmp_path):
    from openai import OpenAI

    from qvl.llm import LLM
    from qvl.sampling_params import SamplingParams

    messages = [{"role": "user", "content": "What color is the circle?"}]
    want = LLM.from_engine(tp1).chat(messages, SamplingParams(temperature=0, max_tokens=10),
                                     use_tqdm=False)[0].outputs[0].text
    srv = Served(tiny_ckpt, tmp_path / "serve.log")
    try:
        assert len(srv.workers()) == 1
        client = OpenAI(base_url=srv.url + "/v1", api_key="none")
        r = client.chat.completions.create(model=tiny_ckpt.name, messages=messages, temperature=0, max_tokens=10)
        assert r.choices[0].message.content == want and r.usage.completion_tokens == 10
        procs = children(srv.proc.pid)
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(60)
    assert code == 0, srv.log()
    assert not wait_gone(procs), f"left behind: {procs}"


def test_killed_worker_makes_health_503_and_server_exit(tiny_ckpt, tmp_path):
    srv = Served(tiny_ckpt, tmp_path / "kill.log")
    try:
        procs = children(srv.proc.pid)
        (worker,) = srv.workers()
        os.kill(worker, signal.SIGKILL)
        t0, seen = time.monotonic(), None
        while time.monotonic() - t0 < 10 and srv.proc.poll() is None:
            try:
                r = httpx.get(srv.url + "/health", timeout=1)
                if r.status_code == 503:
                    seen = r.json()["error"]["message"]
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert seen and "rank 1" in seen, srv.log()
        code = srv.proc.wait(15)
        took = time.monotonic() - t0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    assert code != 0 and took < 15, (code, took, srv.log())
    assert not wait_gone(procs), f"left behind: {procs}"


# ---------------------------------------------------------------------------------- two "machines"

@pytest.fixture(scope="module")
def run_answer(tp1):
    """`qvl run QUESTION --temperature 0 --max-tokens 8`'s text at tp=1 (special tokens kept, as qvl run does)."""
    from qvl.llm import LLM
    from qvl.sampling_params import SamplingParams

    return LLM.from_engine(tp1).chat([{"role": "user", "content": QUESTION}],
                                     SamplingParams(temperature=0, max_tokens=8, skip_special_tokens=False),
                                     use_tqdm=False)[0].outputs[0].text


def test_two_machines_on_one_host(tiny_ckpt, run_answer, tmp_path):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(tp_group.free_port()), "WORLD_SIZE": "2"}
    log1 = open(tmp_path / "rank1.log", "w")
    rank1 = qvl("worker", str(tiny_ckpt), "-tp", "2", *RUN_FLAGS, env={**env, "RANK": "1"}, stdout=log1,
                stderr=subprocess.STDOUT)
    try:
        rank0 = qvl("run", QUESTION, "--model", str(tiny_ckpt), "-tp", "2", *RUN_FLAGS, "--temperature", "0",
                    "--max-tokens", "8", "--json", env={**env, "RANK": "0"}, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
        out, err = rank0.communicate(timeout=120)
        assert rank0.returncode == 0, err
        assert json.loads(out)["text"] == run_answer
        assert rank1.wait(30) == 0, (tmp_path / "rank1.log").read_text()       # stopped by rank 0
    finally:
        if rank1.poll() is None:
            rank1.kill()
        log1.close()


def test_torchrun_runs_the_same_command_on_every_rank(tiny_ckpt, run_answer):
    """torchrun's agent serves the store (rank 0 joins as a client) and rank 1's `qvl run` becomes a worker."""
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "qvl.cli", "run", QUESTION,
                          "--model", str(tiny_ckpt), "-tp", "2", *RUN_FLAGS, "--temperature", "0", "--max-tokens",
                          "8", "--json"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["text"] == run_answer


def test_remote_worker_death_is_seen_while_idle(tiny_ckpt, tp2, reference, monkeypatch, tmp_path):
    """Rank 0 in this process under the torchrun environment, rank 1 a `qvl worker`: no process sentinel to
    wait on, and an idle engine runs no collective, so only the heartbeat can tell it is gone."""
    from qvl.parallel import group

    tp2.close()
    port = tp_group.free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    log = open(tmp_path / "rank1.log", "w")
    rank1 = qvl("worker", str(tiny_ckpt), *RUN_FLAGS, env={**env, "RANK": "1"}, stdout=log, stderr=subprocess.STDOUT)
    for k, v in {**env, "RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    eng = None
    try:
        eng = tiny_engine(tiny_ckpt, tensor_parallel_size=2, threads=1)
        assert eng.executor.procs == [] and eng.failure is None
        assert greedy_tokens(eng, prompts(eng, ["text"]), N_NEW)[0] == reference[0]
        rank1.kill()
        t0 = time.monotonic()
        while eng.failure is None and time.monotonic() - t0 < group.HEARTBEAT_TIMEOUT_S + 10:
            time.sleep(0.2)
        assert eng.failure is not None and "rank 1 sent no heartbeat" in eng.failure
        with pytest.raises(Exception, match="no heartbeat"):
            greedy_tokens(eng, prompts(eng, ["text"]), 1)
    finally:
        if eng is not None:
            eng.close()
        rank1.kill()
        rank1.wait()
        log.close()


# ---------------------------------------------------------------------------------------- rendezvous

def test_rendezvous_errors_are_clear_and_bounded():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"port {taken} on 127.0.0.1 is already in use"):
            tp_group.join(tp_group.GroupSpec(0, 2, master_port=taken, join_timeout_s=5))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"0 of 1 other rank\(s\) joined rank 0 at 127.0.0.1:\d+ within 2 s"):
        tp_group.join(tp_group.GroupSpec(0, 2, master_port=tp_group.free_port(), join_timeout_s=2))
    assert time.monotonic() - t0 < 10
    with pytest.raises(RuntimeError, match=r"rank 1 could not reach rank 0 at 127.0.0.1:\d+ within 1 s"):
        tp_group.join(tp_group.GroupSpec(1, 2, master_port=tp_group.free_port(), join_timeout_s=1))
    with pytest.raises(ValueError, match="missing: MASTER_PORT, RANK"):
        tp_group.GroupSpec.from_env("gloo", environ={"MASTER_ADDR": "x", "WORLD_SIZE": "2"})


def test_unshardable_model_is_refused_before_any_process_starts(tiny_ckpt):
    before = children(os.getpid())
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide num_attention_heads=4"):
        tiny_engine(tiny_ckpt, tensor_parallel_size=3)
    assert children(os.getpid()) == before

