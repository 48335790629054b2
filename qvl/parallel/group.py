"""The tensor-parallel process group: where a rank learns its place, joins, and leaves.

  GroupSpec(rank, world_size, master_addr, master_port, backend, local_rank, join_timeout_s)
      one process's place in the group; `GroupSpec.from_env(...)` reads the torchrun-style environment
      (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) when called — never at import time. Under
      torchrun itself (TORCHELASTIC_USE_AGENT_STORE) its agent serves the store and rank 0 is a client too.
  join(spec, alive=None) -> the rendezvous TCPStore, with the default process group initialised: rank 0
      opens it (a torch TCPStore on master_addr:master_port) and waits for every rank; the others connect
      to it. Both give up after `join_timeout_s` (default JOIN_TIMEOUT_S) with a RuntimeError naming the
      address, the ranks and the timeout — a port already in use, an unreachable master or a rank that
      never joins is an error, never a hang (rank 0 also stops waiting when `alive()` reports a reason).
  start_heartbeat(spec) / watch_heartbeats(...)  ranks > 0 count up a key in the store every HEARTBEAT_S;
      rank 0 declares a rank gone after HEARTBEAT_TIMEOUT_S without a beat (ranks on other machines have no
      process sentinel rank 0 could wait on, and an idle server runs no collective that would fail).
  control_group() the gloo group of the host-side control messages (None: the default group, gloo).
  leave() destroys the group (idempotent); free_port() a TCP port free on this host now.
  default_backend(device) nccl for CUDA, gloo otherwise (EngineConfig.distributed_backend overrides).

Collectives themselves get COLLECTIVE_TIMEOUT_S: workers wait in a broadcast for the next step while
the server is idle, for as long as it is idle, so a short collective timeout would kill an idle server.
A dead peer is not found by this timeout but by the executor's watchdog (process sentinels, heartbeats)
and by gloo, which fails a collective at once when a peer's socket closes.

Knows nothing about models, the engine or what is broadcast.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

JOIN_TIMEOUT_S = 120.0                        # a 72B shard loads after the join, so this is only the rendezvous
COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600.0        # see the module docstring: idle servers wait in a collective
_POLL_S = 0.1
_CONTROL = None               # control_group(): set by join, cleared by leave
_JOINED = False               # this process joined a group (then it leaves through exit_process)
_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


def default_backend(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class GroupSpec:
    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str = "gloo"
    local_rank: int | None = None                 # the device index on this node (default: rank)
    join_timeout_s: float = field(default=JOIN_TIMEOUT_S)
    agent_store: bool = False                     # torchrun's agent already serves the store on master_port
    prefix: str = "qvl/"                          # the keys' namespace in the store (a torchrun restart: new)

    def __post_init__(self):
        for name, lo in (("world_size", 1), ("rank", 0), ("master_port", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"GroupSpec.{name} must be an integer >= {lo}, got {v!r}")
        if self.rank >= self.world_size:
            raise ValueError(f"GroupSpec.rank must be < world_size {self.world_size}, got {self.rank}")
        if self.backend not in ("nccl", "gloo"):
            raise ValueError(f"GroupSpec.backend must be nccl or gloo, got {self.backend!r}")
        if not self.join_timeout_s > 0:
            raise ValueError(f"GroupSpec.join_timeout_s must be > 0 seconds, got {self.join_timeout_s!r}")

    @property
    def device_index(self) -> int:
        return self.rank if self.local_rank is None else self.local_rank

    @staticmethod
    def env_present(environ=None) -> bool:
        """True when the torchrun-style variables describe a group of more than one process."""
        env = os.environ if environ is None else environ
        return "WORLD_SIZE" in env and env.get("WORLD_SIZE", "1").strip() not in ("", "1")

    @staticmethod
    def other_rank_env(environ=None) -> bool:
        """RANK > 0 of such a group in the environment."""
        env = os.environ if environ is None else environ
        return GroupSpec.env_present(env) and env.get("RANK", "0").strip() not in ("", "0")

    @classmethod
    def from_env(cls, backend: str, *, join_timeout_s: float = JOIN_TIMEOUT_S, environ=None) -> "GroupSpec":
        """The spec the MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE (/ LOCAL_RANK) variables describe;
        ValueError naming the variable that is missing or not a number."""
        env = os.environ if environ is None else environ
        missing = [k for k in _ENV if not env.get(k, "").strip()]
        if missing:
            raise ValueError(f"a multi-node tensor-parallel launch needs {', '.join(_ENV)} in the environment; "
                             f"missing: {', '.join(missing)}")
        ints = {}
        for k in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            if k in env:
                try:
                    ints[k] = int(env[k])
                except ValueError:
                    raise ValueError(f"environment variable {k} must be an integer, got {env[k]!r}") from None
        agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").strip().lower() == "true"
        return cls(rank=ints["RANK"], world_size=ints["WORLD_SIZE"], master_addr=env["MASTER_ADDR"].strip(),
                   master_port=ints["MASTER_PORT"], backend=backend, local_rank=ints.get("LOCAL_RANK"),
                   join_timeout_s=join_timeout_s, agent_store=agent,
                   prefix=f"qvl/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/")


def join(spec: GroupSpec, alive: Callable[[], str | None] | None = None):
    """Join (rank 0: open) the group `spec` describes and return its store (ranks leave messages there).

    RuntimeError after spec.join_timeout_s, or (rank 0) as soon as `alive()` returns a reason: the
    executor passes one that reports a spawned worker which exited before it joined."""
    global _JOINED
    _JOINED = True
    where = f"{spec.master_addr}:{spec.master_port}"
    timeout = timedelta(seconds=spec.join_timeout_s)
    try:
        store = dist.TCPStore(spec.master_addr, spec.master_port, spec.world_size,
                              is_master=spec.rank == 0 and not spec.agent_store, timeout=timeout,
                              wait_for_workers=False)
    except Exception as e:  # noqa: BLE001 - torch raises several types (DistNetworkError, DistStoreError, ...)
        msg = _first_line(e)
        if spec.rank == 0 and ("in use" in msg.lower() or "address already" in msg.lower()):
            raise RuntimeError(f"tensor-parallel rendezvous: port {spec.master_port} on {spec.master_addr} is "
                               f"already in use ({msg}); pick another MASTER_PORT") from None
        raise RuntimeError(f"tensor-parallel rendezvous failed: rank {spec.rank} could not reach rank 0 at "
                           f"{where} within {spec.join_timeout_s:.0f} s ({type(e).__name__}: {msg}); is rank 0 "
                           f"running, and are MASTER_ADDR/MASTER_PORT right?") from None
    store = dist.PrefixStore(spec.prefix, store)
    if spec.rank == 0:
        # Each other rank counts itself in; rank 0 polls, so a spawned worker that died is seen at once.
        deadline = time.monotonic() + spec.join_timeout_s
        while (joined := store.add("joined", 0)) < spec.world_size - 1:
            reason = alive() if alive is not None else None
            if reason or time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel rendezvous failed: {joined} of {spec.world_size - 1} other "
                                   f"rank(s) joined rank 0 at {where} "
                                   + (f"({reason})" if reason else f"within {spec.join_timeout_s:.0f} s (a rank "
                                      f"that never started, another MASTER_ADDR/MASTER_PORT, or a firewall)"))
            time.sleep(_POLL_S)
    else:
        store.add("joined", 1)
    dist.init_process_group(spec.backend, store=store, rank=spec.rank, world_size=spec.world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    global _CONTROL
    _CONTROL = (dist.new_group(backend="gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
                if spec.backend == "nccl" else None)
    return store


def control_group():
    """The group of the host-side control messages (step headers, the handshake, STOP), whose tensors live on
    the CPU: the default group under gloo; under NCCL a gloo group beside it, so an idle worker waits for
    the next step on a socket, not in an NCCL kernel spinning on its GPU."""
    return _CONTROL


HEARTBEAT_S = 1.0             # a rank > 0 counts up its `beat/<rank>` key in the store this often ...
HEARTBEAT_TIMEOUT_S = 10.0    # ... and rank 0 calls it gone when the count stood still this long


def start_heartbeat(spec: GroupSpec) -> None:
    """Rank > 0: a daemon thread counting up `beat/<rank>` in the rendezvous store (its own connection), so rank
    0 sees a rank on another machine die while no collective runs (`watch_heartbeats`)."""
    store = dist.PrefixStore(spec.prefix, dist.TCPStore(spec.master_addr, spec.master_port, is_master=False,
                                                        timeout=timedelta(seconds=spec.join_timeout_s)))

    def beat() -> None:
        try:
            while True:
                store.add(f"beat/{spec.rank}", 1)
                time.sleep(HEARTBEAT_S)
        except Exception:  # noqa: BLE001 - rank 0 is gone: the step loop finds out and leaves
            pass
    threading.Thread(target=beat, name="qvl-tp-heartbeat", daemon=True).start()


def watch_heartbeats(store, world_size: int, stop: Callable[[], bool], dead: Callable[[str], None]) -> None:
    """Rank 0 (run on a thread): call `dead(reason)` once a rank's heartbeat count stands still for
    HEARTBEAT_TIMEOUT_S; return when `stop()`."""
    last = {r: (-1, time.monotonic()) for r in range(1, world_size)}
    while not stop():
        now = time.monotonic()
        for r, (count, since) in last.items():
            try:
                c = store.add(f"beat/{r}", 0)
            except Exception:  # noqa: BLE001 - the store is rank 0's own; it is closing
                return
            if c != count:
                last[r] = (c, now)
            elif now - since > HEARTBEAT_TIMEOUT_S:
                dead(f"tensor-parallel rank {r} sent no heartbeat for {HEARTBEAT_TIMEOUT_S:.0f} s "
                     f"(its process or machine is gone)")
                return
        time.sleep(HEARTBEAT_S)


def _first_line(e: BaseException) -> str:
    s = str(e)
    return s.splitlines()[0] if s else type(e).__name__


def exit_process(code: int) -> None:
    """End a process that joined a group: run the atexit handlers (the executor's shutdown), flush, then
    exit without the rest of the interpreter's teardown. In that teardown, with the heartbeat threads and
    their c10d stores still alive, a rank sometimes aborted after its work was done ("terminate called
    without an active exception", SIGABRT): 1 run of 6 of `torchrun --nproc-per-node 2 -m qvl.cli run ...
    -tp 2` here, 0 of 10 through this exit. A process that joined nothing returns."""
    if not _JOINED:
        return
    import atexit
    import logging
    import sys

    atexit._run_exitfuncs()          # what must still run: the executor's shutdown (STOP to the workers)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def leave() -> None:
    """Destroy this process's group, if any."""
    global _CONTROL
    _CONTROL = None
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a dead peer may make the teardown fail; the process is leaving
            pass
