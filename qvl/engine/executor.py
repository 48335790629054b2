"""TPExecutor: rank 0 of a tensor-parallel group — starts the other ranks, broadcasts each step, watches them.

  TPExecutor.launch(cfg, device)   tensor_parallel_size > 1. On one machine (no WORLD_SIZE in the
      environment) it spawns tp - 1 local workers (multiprocessing "spawn" context, qvl.parallel.worker,
      each dying with this process) on a free 127.0.0.1 port; under MASTER_ADDR/MASTER_PORT/RANK/
      WORLD_SIZE (torchrun, or `qvl worker` on the other nodes) it is RANK 0 and the other ranks are
      started by whoever started this one. Then it opens the rendezvous (qvl.parallel.group: a clear
      error after its timeout, never a hang).
  tp_info                          TPInfo(rank=0, size) for qvl.build.load_model(tp=...)
  agree_num_blocks(n, block_size, max_model_len, max_num_seqs) -> the KV pool every rank can hold
      (each plans from its own free memory; all_reduce MIN; qvl.parallel.worker)
  attach(model)                    wraps rank 0's `model.forward`: every call first broadcasts its
      arguments (qvl.parallel.step_message) so each worker runs its shard on the same inputs, then runs
      rank 0's shard; the runner is unchanged (it calls model(...) as with one process). Vision, the
      embedding, the logits and sampling stay on rank 0.
  failure -> str | None            why the group is broken (a worker exited, a collective failed);
      on_failure(fn) calls fn(reason) once, from the watchdog thread or the step that found it.
      After a failure every step raises TPWorkerError at once.
  shutdown()                       STOP to the workers, join them (terminate, then kill, after
      SHUTDOWN_S), leave the group. Idempotent; also done at interpreter exit for spawned workers
      (daemonic processes).

The watchdog is a thread blocked on the local workers' process sentinels: a worker that dies is seen
at once, even while the server is idle. Remote workers (the multi-node launch) are seen dead at the
next collective, which gloo fails when the peer's connection closes, or when their heartbeat stops
(qvl.parallel.group.HEARTBEAT_TIMEOUT_S), whichever comes first. NCCL may wait in a collective with a
dead peer until its timeout; the heartbeat still fails the engine, and the server then exits.
Knows nothing about requests or scheduling; of the model only forward's arguments and attention_modules().
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from typing import Callable

import torch
import torch.distributed as dist

from qvl.parallel import group as tp_group
from qvl.parallel import step_message, worker

log = logging.getLogger("qvl.executor")
SHUTDOWN_S = 5.0          # how long a worker may take to leave after STOP before it is terminated
_EXTRA = ("deepstack_embeds", "vision_mask")


class TPWorkerError(RuntimeError):
    """A tensor-parallel rank died or a collective failed: the engine cannot step any more."""


def check_tensor_parallel(path, cfg) -> None:
    """ValueError (with the numbers) when the checkpoint at `path` cannot be split tensor_parallel_size ways."""
    from qvl.models import load_config, read_config_dict
    from qvl.parallel.shard import check_shardable
    from qvl.quant import resolve as resolve_quantization

    _, config = load_config(path)
    spec = resolve_quantization(read_config_dict(path).get("quantization_config"), cfg.quantization)
    check_shardable(config, spec, cfg.tensor_parallel_size)


class TPExecutor:
    def __init__(self, spec: tp_group.GroupSpec, store, procs: list, device: torch.device):
        self.spec, self.store, self.procs = spec, store, procs
        self.device = device
        self.comm_device = worker.comm_device(spec.backend, device)
        self.failure: str | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()          # one step's collectives at a time (and none during shutdown)
        self._closed = False
        self._failed_once = threading.Lock()
        self._handshaken = False               # agree_num_blocks ran: the workers are in their step loop
        if procs:
            threading.Thread(target=self._watch, name="qvl-tp-watchdog", daemon=True).start()
        threading.Thread(target=tp_group.watch_heartbeats, name="qvl-tp-heartbeats", daemon=True,
                         args=(store, spec.world_size, lambda: self._closed or self.failure is not None,
                               self._fail)).start()
        atexit.register(self.shutdown)

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    @property
    def tp_info(self):
        from qvl.parallel.shard import TPInfo

        return TPInfo(rank=0, size=self.spec.world_size)

    # --- start -----------------------------------------------------------------------------------
    @classmethod
    def launch(cls, cfg, device: torch.device, *, join_timeout_s: float = tp_group.JOIN_TIMEOUT_S) -> "TPExecutor":
        tp = cfg.tensor_parallel_size
        backend = cfg.distributed_backend or tp_group.default_backend(device)
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(f"distributed_backend nccl needs CUDA devices, got device {device}; use gloo")
        if dist.is_initialized():       # torch allows one default process group per process
            raise RuntimeError("a tensor-parallel engine is already running in this process: close() it first")
        procs = []
        if tp_group.GroupSpec.env_present():
            spec = tp_group.GroupSpec.from_env(backend, join_timeout_s=join_timeout_s)
            if spec.world_size != tp:
                raise ValueError(f"WORLD_SIZE={spec.world_size} in the environment but tensor_parallel_size={tp}; "
                                 f"they must be equal")
            if spec.rank != 0:
                raise ValueError(f"RANK={spec.rank}: only rank 0 builds the engine; the other ranks run "
                                 f"`qvl worker` (or `qvl serve`, which runs one for RANK > 0)")
        else:
            spec = tp_group.GroupSpec(0, tp, "127.0.0.1", tp_group.free_port(), backend,
                                      join_timeout_s=join_timeout_s)
            ctx = multiprocessing.get_context("spawn")
            main = threading.current_thread() is threading.main_thread()
            for r in range(1, tp):
                p = ctx.Process(target=worker.spawned_main, name=f"qvl-tp-rank{r}", daemon=True,
                                args=(cfg, dataclasses.replace(spec, rank=r, local_rank=r), os.getpid(), main))
                p.start()
                procs.append(p)
        rank0_device = worker.rank_device(cfg.device, spec)
        if rank0_device.type == "cuda":
            torch.cuda.set_device(rank0_device)        # NCCL's communicator binds to the current device

        def alive() -> str | None:
            dead = [f"rank {r} (pid {p.pid}) exited with code {p.exitcode} before joining"
                    for r, p in enumerate(procs, start=1) if p.exitcode is not None]
            # the usual cause: a script without a __main__ guard, which the spawned worker re-runs on import
            return "; ".join(dead) + (" (see its traceback above; a script that builds a tensor-parallel "
                                      "engine must do it under `if __name__ == \"__main__\":`)") if dead else None
        try:
            store = tp_group.join(spec, alive)
        except BaseException:
            _stop_procs(procs)
            raise
        log.info("tensor parallel: rank 0 of %d (%s, %s:%d)", tp, backend, spec.master_addr, spec.master_port)
        return cls(spec, store, procs, rank0_device)

    # --- the step --------------------------------------------------------------------------------
    def agree_num_blocks(self, num_blocks: int, block_size: int, max_model_len: int, max_num_seqs: int) -> int:
        self._handshaken = True
        with self._lock:
            self._check()
            try:
                n, _ = worker.agree_num_blocks(num_blocks, (block_size, max_model_len, max_num_seqs))
            except Exception as e:  # noqa: BLE001 - a worker that failed to load left its reason in the store
                raise self._fail(f"the tensor-parallel handshake failed ({type(e).__name__}: {_first_line(e)})",
                                 wait_s=2.0) from None
        if n < num_blocks:
            log.info("KV pool: %d blocks (rank 0 could hold %d; another rank has less free memory)", n, num_blocks)
        return n

    def attach(self, model) -> None:
        """Wrap model.forward (see the module docstring)."""
        inner = model.forward
        hidden_size = model.config.hidden_size

        def forward(input_ids, positions, attn_metadata=None, inputs_embeds=None, **extra):
            unknown = sorted(set(extra) - set(_EXTRA))
            if unknown:
                raise TypeError(f"tensor parallel: cannot broadcast the model arguments {unknown}")
            if inputs_embeds is None:       # workers hold no embedding: they always run from embeddings
                inputs_embeds = model.model.embed_tokens(input_ids.to(model.device))    # (N, H)
            if inputs_embeds.shape[-1] != hidden_size:
                raise ValueError(f"inputs_embeds must be (N, {hidden_size}), got {tuple(inputs_embeds.shape)}")
            call = step_message.StepCall(positions, attn_metadata, inputs_embeds,
                                         tuple(extra["deepstack_embeds"]) if extra.get("deepstack_embeds")
                                         is not None else None, extra.get("vision_mask"))
            with self._lock:
                self._check()
                try:
                    step_message.send(call, device=self.comm_device, control=tp_group.control_group())
                    return inner(input_ids, positions, attn_metadata, inputs_embeds=inputs_embeds, **extra)
                except Exception as e:
                    if isinstance(e, dist.DistError) or self._a_worker_died(wait_s=0.5):
                        raise self._fail(f"a tensor-parallel collective failed ({type(e).__name__}: "
                                         f"{_first_line(e)})") from None
                    raise
        model.forward = forward

    # --- faults ----------------------------------------------------------------------------------
    def on_failure(self, fn: Callable[[str], None]) -> None:
        self._callbacks.append(fn)
        if self.failure is not None:
            fn(self.failure)

    def _check(self) -> None:
        if self._closed:
            raise TPWorkerError("the tensor-parallel group has been shut down")
        if self.failure is not None:
            raise TPWorkerError(self.failure)

    def _a_worker_died(self, wait_s: float) -> bool:
        if not self.procs:
            return False
        return bool(multiprocessing.connection.wait([p.sentinel for p in self.procs], timeout=wait_s))

    def _worker_errors(self) -> str:
        notes = []
        for r in range(1, self.spec.world_size):
            key = f"error/{r}"
            try:
                if self.store.check([key]):
                    notes.append(f"rank {r}: {self.store.get(key).decode(errors='replace')}")
            except Exception:  # noqa: BLE001 - the store lives in this process; never fail while failing
                pass
        for r, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                notes.append(f"rank {r} (pid {p.pid}) exited with code {p.exitcode}")
        return "; ".join(notes)

    def _fail(self, reason: str, wait_s: float = 0.0) -> TPWorkerError:
        if wait_s:
            self._a_worker_died(wait_s)
        with self._failed_once:
            first = self.failure is None
            if first:
                notes = self._worker_errors()
                self.failure = reason + (f": {notes}" if notes else "")
        if first:
            log.error("%s", self.failure)
            for fn in self._callbacks:
                try:
                    fn(self.failure)
                except Exception:  # noqa: BLE001 - a callback must not hide the failure
                    log.exception("tensor-parallel failure callback failed")
        return TPWorkerError(self.failure)

    def _watch(self) -> None:
        ready = multiprocessing.connection.wait([p.sentinel for p in self.procs])
        if self._closed:
            return
        dead = [(r, p) for r, p in enumerate(self.procs, start=1) if p.sentinel in ready]
        r, p = dead[0]
        p.join(0.1)
        self._fail(f"tensor-parallel worker rank {r} died")

    # --- stop ------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        told = False
        if self.failure is None and self._lock.acquire(timeout=2.0):   # a stuck step keeps the lock: skip STOP
            try:               # before the handshake the workers wait in it, not in the step loop
                if self._handshaken:
                    step_message.send_stop(tp_group.control_group())
                else:
                    worker.abort_handshake()
                told = True
            except Exception:  # noqa: BLE001 - a worker already gone: terminate the rest below
                pass
            finally:
                self._lock.release()
        _stop_procs(self.procs, SHUTDOWN_S if told else 0.0)
        if told or self.spec.backend == "gloo":    # NCCL's teardown may wait on a dead peer
            tp_group.leave()


def _stop_procs(procs: list, grace_s: float = 0.0) -> None:
    for p in procs:
        p.join(grace_s)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


def _first_line(e: BaseException) -> str:
    s = str(e)
    return s.splitlines()[0] if s else type(e).__name__
