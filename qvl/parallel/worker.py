"""A tensor-parallel rank > 0: load its shard, build its KV cache, run every step rank 0 broadcasts.

  run_worker(cfg, spec) -> exit code      join the group (qvl.parallel.group), load rank r's shard
      (qvl.build.load_model(tp=TPInfo): decoder slices only; no vision tower, embedding or LM head),
      agree on the KV-cache size with rank 0 (`agree_num_blocks`), then loop: receive a step
      (qvl.parallel.step_message), run the shard's forward (which does its all-reduces with the other
      ranks), repeat until rank 0 says STOP. 0 after STOP; 1 when loading or planning fails (the message
      goes into the rendezvous store under `error/<rank>` for rank 0 to report), when rank 0 fails to
      start, or when rank 0 goes away.
  spawned_main(cfg, spec, parent_pid, main_thread)   the multiprocessing (spawn) target of the executor's
      local workers: dies with its parent (PR_SET_PDEATHSIG on Linux when the parent spawned from its main
      thread — the signal follows the spawning thread — and always a watchdog thread polling the parent pid)
      and ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; rank 0 stops its workers).
  `qvl worker` (qvl.cli) runs run_worker under the MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE environment,
      for ranks on other machines.

The handshake (`agree_num_blocks`, the same collectives on every rank): rank 0 broadcasts
(block_size, max_model_len, max_num_seqs); each rank plans its blocks from its own free memory and its
shard's KV heads; an all_reduce MIN gives the pool every rank uses.

A step whose forward raises on this rank (a shape check) raises on rank 0 too — the ranks run the same
code on the same inputs — so the error is logged and the loop goes on; a failed collective ends it.
Knows nothing about requests, the scheduler or sampling.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from qvl.parallel import group as tp_group
from qvl.parallel import step_message

log = logging.getLogger("qvl.worker")
PARENT_POLL_S = 0.5


def comm_device(backend: str, device: torch.device) -> torch.device:
    """Where the broadcast tensors live: the CUDA device for NCCL, the CPU for gloo."""
    return device if backend == "nccl" else torch.device("cpu")


def rank_device(device_str: str, spec: tp_group.GroupSpec) -> torch.device:
    """This rank's device: cuda:<local rank> (modulo the visible devices, so one GPU can host two ranks
    for a check) when cfg.device is cuda/auto on a CUDA machine, else the CPU."""
    from qvl.build import resolve_device

    dev = resolve_device(device_str)
    if dev.type == "cuda":
        return torch.device("cuda", spec.device_index % torch.cuda.device_count())
    return dev


def agree_num_blocks(mine: int | None, settings: tuple[int, int, int] | None, plan=None
                     ) -> tuple[int, tuple[int, int, int]] | None:
    """The handshake of the module docstring, on any rank (CPU tensors over qvl.parallel.group.control_group):
    rank 0 passes `mine` and `settings` (block_size, max_model_len, max_num_seqs); a worker passes
    `plan(settings) -> its own count`. Returns (the agreed number of blocks, settings), or None on a worker
    when rank 0 sent `abort_handshake` instead (it failed before its plan)."""
    control = tp_group.control_group()
    s = torch.tensor(settings if settings is not None else (0, 0, 0), dtype=torch.long)
    dist.broadcast(s, src=0, group=control)
    settings = tuple(int(x) for x in s.tolist())
    if settings[0] == 0:
        return None
    n = torch.tensor([mine if mine is not None else plan(settings)], dtype=torch.long)
    dist.all_reduce(n, op=dist.ReduceOp.MIN, group=control)
    return int(n.item()), settings


def abort_handshake() -> None:
    """Rank 0, when it fails before agree_num_blocks: the workers waiting in it leave (block_size 0)."""
    dist.broadcast(torch.zeros(3, dtype=torch.long), src=0, group=tp_group.control_group())


def _load(cfg, spec, device):
    from qvl.build import load_model, resolve_model_path
    from qvl.build import resolve_dtype
    from qvl.parallel.shard import TPInfo

    return load_model(resolve_model_path(cfg.model_path), dtype=resolve_dtype(cfg.dtype, device), device=device,
                      quantization=cfg.quantization, tp=TPInfo(rank=spec.rank, size=spec.world_size))


def run_worker(cfg, spec: tp_group.GroupSpec) -> int:
    from qvl.engine.kv_cache import KVCache, plan_num_blocks
    from qvl.build import resolve_dtype
    from qvl.layers.attention import attention_backend

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = rank_device(cfg.device, spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = tp_group.join(spec)
    tp_group.start_heartbeat(spec)
    cdev = comm_device(spec.backend, device)
    dtype = resolve_dtype(cfg.dtype, device)            # rank 0's activations dtype: its embeddings'
    try:
        try:
            model, config = _load(cfg, spec, device)

            def plan(settings):
                block_size, max_model_len, max_num_seqs = settings
                return plan_num_blocks(model.attention_modules(), block_size=block_size, dtype=dtype,
                                       device=device, kv_cache_memory=cfg.kv_cache_memory,
                                       max_num_seqs=max_num_seqs, max_model_len=max_model_len)
            agreed = agree_num_blocks(None, None, plan)
        except Exception as e:  # noqa: BLE001 - loading or planning failed here: rank 0 reports it
            msg = f"{type(e).__name__}: {e}"
            log.error("rank %d: start failed: %s", spec.rank, msg)
            store.set(f"error/{spec.rank}", msg)
            return 1
        if agreed is None:
            log.warning("rank %d: rank 0 failed to start; leaving", spec.rank)
            return 1
        num_blocks, (block_size, _, _) = agreed
        kv = KVCache(model.attention_modules(), num_blocks=num_blocks, block_size=block_size, dtype=dtype,
                     device=device)
        kv.attach(model.attention_modules(), attention_backend(cfg.attention_backend, device))
        log.info("rank %d/%d ready on %s: %d KV blocks of %d tokens", spec.rank, spec.world_size, device,
                 num_blocks, block_size)
        _serve(model, config.hidden_size, dtype, device, cdev)
    except Exception as e:  # noqa: BLE001 - rank 0 went away or a collective failed: leave
        log.error("rank %d: leaving: %s: %s", spec.rank, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return 1
    finally:
        tp_group.leave()
    return 0


@torch.inference_mode()
def _serve(model, hidden_size: int, dtype, device, cdev) -> None:
    control = tp_group.control_group()
    while True:
        call = step_message.recv(hidden_size=hidden_size, dtype=dtype, device=cdev, control=control)
        if call is None:
            return
        if device.type != "cpu":        # the integers always arrive on the CPU (and everything under gloo)
            call = step_message.to_device(call, device)
        try:
            model(None, call.positions, call.attn_metadata, **call.kwargs())
        except Exception as e:  # noqa: BLE001 - see the module docstring: rank 0 raised the same
            if isinstance(e, dist.DistError):
                raise
            log.warning("step failed on this rank as on rank 0: %s: %s", type(e).__name__, e)


# ------------------------------------------------------------------------------- spawned local workers

def _die_with_parent(parent_pid: int, main_thread: bool) -> None:
    if sys.platform.startswith("linux") and main_thread:
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
    if os.getppid() != parent_pid:          # the parent died before the prctl
        os._exit(1)

    def watch():
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(1)
    threading.Thread(target=watch, name="qvl-parent-watch", daemon=True).start()


def spawned_main(cfg, spec: tp_group.GroupSpec, parent_pid: int, main_thread: bool) -> None:
    _die_with_parent(parent_pid, main_thread)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank{spec.rank} %(levelname)s %(name)s: "
                                                      "%(message)s")
    sys.exit(run_worker(cfg, spec))
