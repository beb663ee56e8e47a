"""Processes: one job over several processes (hosts) with `jax.distributed` (docs/DESIGN.md
section 12).

Every process runs the same command; `jax.distributed.initialize` joins them, after which
`jax.devices()` lists every process's devices and a mesh over them spans the cluster. A
process that dies must not leave the others waiting in a collective forever: a watchdog
thread publishes a heartbeat in the coordination service's key-value store (JAX's own
service, not a protocol of ours) and reads its peers'; a peer silent for STALE_S
seconds, or one that stopped on an error, stops this process too with one clear line
(JAX's own heartbeat timeout is the backstop). Files on disk stay consistent: orbax
writes checkpoints atomically, and everything else is written by process 0 alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import threading
import time
from typing import Any

from tvq.errors import InputError

STALE_S = 15.0  # a peer without a heartbeat this long is dead
BEAT_S = 1.0
BACKSTOP_S = 45  # JAX's heartbeat timeout: it aborts the process after this
WAIT_MS = 24 * 3600 * 1000  # barriers wait for slow peers; dead ones are the watchdog's
ENV = {"coordinator": "TVQ_COORDINATOR", "num_processes": "TVQ_NUM_PROCESSES",
       "process_id": "TVQ_PROCESS_ID"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How to join: a coordinator HOST:PORT, the process count and this one's index, or
    `auto` (JAX detects them on Slurm, Open MPI and cloud TPU)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator is not None

    def check(self) -> ClusterSpec:
        """Raises InputError for an incomplete or contradictory spec."""
        given = [n for n in ("coordinator", "num_processes", "process_id")
                 if getattr(self, n) is not None]  # fmt: skip
        if self.auto:
            return self
        if not given:
            return self
        if len(given) < 3:
            missing = [f"--{n.replace('_', '-')}" for n in ENV if n not in given]
            raise InputError(f"a cluster needs --coordinator, --num-processes and --process-id "
                             f"(missing {', '.join(missing)})")  # fmt: skip
        if not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", self.coordinator or ""):
            raise InputError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
        if self.num_processes < 1:
            raise InputError(f"--num-processes must be at least 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise InputError(f"--process-id must be in [0, {self.num_processes}), "
                             f"got {self.process_id}")  # fmt: skip
        return self


_watchdog: Watchdog | None = None


def join(spec: ClusterSpec) -> None:
    """Joins the cluster (before any other JAX work) and starts the watchdog; a spec that
    is not enabled does nothing."""
    global _watchdog
    spec.check()
    if not spec.enabled:
        return
    import jax

    try:
        if spec.auto:
            jax.distributed.initialize(heartbeat_timeout_seconds=BACKSTOP_S,
                                       shutdown_timeout_seconds=60)  # fmt: skip
        else:
            jax.distributed.initialize(
                spec.coordinator, spec.num_processes, spec.process_id,
                heartbeat_timeout_seconds=BACKSTOP_S, shutdown_timeout_seconds=60,
            )  # fmt: skip
    except Exception as e:  # jax raises RuntimeError / ValueError / XlaRuntimeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "the cluster" if spec.auto else f"the coordinator {spec.coordinator}"
        raise InputError(f"cannot join {where}: {first}") from None
    _watchdog = Watchdog(_client(), jax.process_index(), jax.process_count())
    _watchdog.start()


def active() -> bool:
    """Whether this process is one of several."""
    return _watchdog is not None and _watchdog.count > 1


def is_main() -> bool:
    """Process 0 (or the only process): the one that writes files and prints results."""
    import jax

    return jax.process_index() == 0


def set_context(text: str) -> None:
    """What a stopped process says after its reason, e.g. where its checkpoints are."""
    if _watchdog is not None:
        _watchdog.context = text


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (a no-op alone)."""
    if active():
        try:
            _client().wait_at_barrier(f"tvq/{name}", WAIT_MS)
        except Exception:  # the coordinator is gone: no peer can be heard any more
            stop_process("lost the coordinator (process 0)")


def gather(name: str, value: Any) -> list[Any] | None:
    """Every process's JSON-able `value`, in process order, on process 0 (None on others)."""
    if not active():
        return [value]
    import jax

    client = _client()
    try:
        client.key_value_set(f"tvq/gather/{name}/{jax.process_index()}", json.dumps(value))
        if not is_main():
            return None
        return [json.loads(client.blocking_key_value_get(f"tvq/gather/{name}/{p}", WAIT_MS))
                for p in range(jax.process_count())]  # fmt: skip
    except Exception:
        stop_process("lost the coordinator (process 0)")


def leave(error: str | None = None, code: int = 1) -> None:
    """Tells the peers this process is done (or stopped on `error`) and stops the watchdog.
    After an error the process exits at once: waiting for peers that are still in a
    collective would hang."""
    global _watchdog
    if _watchdog is None:
        return
    watchdog, _watchdog = _watchdog, None
    watchdog.stop("error: " + error if error else "done")
    if error is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        if watchdog.index == 0:  # the coordination service lives here: let peers read why
            time.sleep(2.5 * BEAT_S)
        os._exit(code)


def stop_process(reason: str, context: str | None = None) -> None:
    """Ends this process at once with one line: a peer is gone, so any collective or
    barrier would wait forever (and Python's exit would wait for the peers too)."""
    if context is None:
        context = _watchdog.context if _watchdog is not None else ""
    context = f"; {context}" if context else ""
    sys.stdout.flush()
    sys.stderr.write(f"error: {reason}; stopping this process{context}\n")
    sys.stderr.flush()
    os._exit(1)


def peer_failure(error: Exception) -> str | None:
    """The line to print when `error` is a collective that failed because a peer went away
    (Gloo or NCCL report a reset connection as a runtime error); None otherwise."""
    if not active() or type(error).__name__ not in ("JaxRuntimeError", "XlaRuntimeError"):
        return None
    first = (str(error).strip().splitlines() or [""])[0]
    context = f"; {_watchdog.context}" if _watchdog.context else ""
    return f"another process of the cluster stopped ({first}){context}"


def _client():
    from jax._src import distributed  # the client of JAX's coordination service

    return distributed.global_state.client


class Watchdog(threading.Thread):
    """Publishes this process's heartbeat and stops the process when a peer goes silent
    or stops on an error (see the module docstring)."""

    def __init__(self, client, index: int, count: int) -> None:
        super().__init__(name="tvq-watchdog", daemon=True)
        self.client, self.index, self.count = client, index, count
        self.context = ""
        self.stopping = threading.Event()

    def run(self) -> None:
        beat, seen = 0, {p: (None, time.monotonic()) for p in range(self.count) if p != self.index}
        while not self.stopping.wait(BEAT_S):
            beat += 1
            try:
                self.client.key_value_set(self._key(self.index), str(beat), allow_overwrite=True)
            except Exception:
                stop_process("lost the coordinator (process 0)", self.context)
            now = time.monotonic()
            for peer, (last, since) in list(seen.items()):
                try:
                    value = self.client.key_value_try_get(self._key(peer))
                except Exception:  # not published yet
                    value = None
                if value == "done":
                    del seen[peer]
                elif value is not None and value.startswith("error: "):
                    stop_process(f"process {peer} stopped ({value[7:]})", self.context)
                elif value != last:
                    seen[peer] = (value, now)
                elif now - since > STALE_S:
                    stop_process(f"process {peer} of {self.count} stopped responding "
                                 f"(no heartbeat for {STALE_S:.0f} s)", self.context)  # fmt: skip

    def stop(self, final: str) -> None:
        self.stopping.set()
        self.join(timeout=5)
        try:
            self.client.key_value_set(self._key(self.index), final, allow_overwrite=True)
        except Exception:
            pass

    def _key(self, process: int) -> str:
        return f"tvq/alive/{process}"
