"""A lost rank ends the job promptly, and says which rank was lost and at which step.

When a rank dies (OOM-killed, its node lost, a segfault in a loader) the others wait in their next
collective. With gloo a killed peer's sockets close and the collective fails at once, with nothing that
names the rank; a lost node, or NCCL, leaves them waiting for the process group's timeout
(``trainer.collective_timeout``), after which NCCL's watchdog aborts the process, again naming no one. All
the while the job holds every device.

So while a job trains, each rank beats a heartbeat into the job's TCP store from a daemon thread: a counter
and its step, once a second. Rank 0 watches every rank's counter, the others watch rank 0's; a counter that
stands still for ``silent_after`` seconds (half the collective timeout, so the verdict comes before NCCL's
abort), or for a few seconds once a collective has failed, names its rank as gone. The rank that finds it
posts the verdict in the store (every other rank reads it on its next beat), then ends: the message logged,
every process under it killed (loader workers, their ``pipe:`` commands, and the ranks Lightning's launcher
started), and ``os._exit(1)``, which no hung collective, loader shutdown or teardown can hold up.

Why the store and not the launcher's process handles: only Lightning's local launcher has handles (rank 0
is the parent of the node's other ranks); under srun or torchrun no rank is another's child, while every
rank reaches the store at ``MASTER_ADDR:MASTER_PORT``. Where rank 0 does hold its children's handles, it
reads their exit status too, so a local death is named at once with its signal; Lightning's own observer of
those children, which would SIGKILL rank 0 itself a few seconds later (naming no step, orphaning its loader
workers), is stood down in favour of this watch (``LostRankWatch`` in lit/lost_rank.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from autoglm_train.utils.processes import descendants, kill_processes, snapshot_descendants, start_time

log = logging.getLogger(__name__)

DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0
HEARTBEAT_S = 1.0
# once a collective has failed, a peer silent this long is taken as the cause (it would beat every second)
SILENT_AFTER_FAILURE_S = 4.0
EXIT_CODE = 1

# --- trainer.collective_timeout -> the strategy's process-group timeout ---------------------------------


def strategy_with_timeout(strategy: Any, seconds: float | None) -> Any:
    """``trainer.strategy`` (a config node with ``_target_``, a Lightning strategy name, or ``auto``) with
    ``timeout`` set to ``seconds``, as Hydra builds it: a node gets a ``datetime.timedelta`` node; a name
    Lightning registers becomes that strategy's node (its registered arguments kept) when its class takes a
    timeout. ``auto``, and a strategy without a process group, come back as they are (a single device makes
    no group; ``auto`` on several devices is Lightning's ``ddp`` with torch's default timeout: name the
    strategy, e.g. ``trainer=ddp_cpu``, to set it)."""
    if seconds is None:
        return strategy
    timeout = {"_target_": "datetime.timedelta", "seconds": float(seconds)}
    if isinstance(strategy, Mapping) and "_target_" in strategy:
        return {**strategy, "timeout": strategy.get("timeout") or timeout}
    if isinstance(strategy, str) and strategy != "auto":
        import inspect

        from lightning.pytorch.strategies import StrategyRegistry

        if strategy in StrategyRegistry:
            entry = StrategyRegistry[strategy]
            cls = entry["strategy"]
            if "timeout" in inspect.signature(cls.__init__).parameters:
                target = f"{cls.__module__}.{cls.__qualname__}"
                return {"_target_": target, **entry["init_params"], "timeout": timeout}
    return strategy


# --- what a failure in the training loop was --------------------------------------------------------------

# gloo's own words (its source path is in its messages too); NCCL's errors are DistBackendErrors
_COLLECTIVE_MARKERS = (
    "gloo",
    "nccl",
    "connection closed by peer",
    "connection reset by peer",
    "timed out waiting",
)


def is_collective_failure(exc: BaseException) -> bool:
    """A collective that failed or timed out (a peer gone, the usual cause), as torch raises it."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return type(exc) is RuntimeError and any(marker in text for marker in _COLLECTIVE_MARKERS)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


# --- ending this rank -------------------------------------------------------------------------------------


_ending = threading.Lock()


def end_this_rank(message: str, also_kill: dict[int, int] | None = None, code: int = EXIT_CODE) -> None:
    """Log ``message``, kill every process under this one (and ``also_kill``: {pid: start time} of processes
    that were under it, e.g. a killed child rank's loader workers), and exit at once with ``code``. Once:
    a second caller (the watch's thread and the training loop may both get here) waits for the exit."""
    if not _ending.acquire(blocking=False):
        threading.Event().wait()
    log.error(message)
    if not logging.getLogger().handlers:  # no logging set up (a rank started outside the entry point)
        print(message, file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        for handler in logging.getLogger().handlers:
            handler.flush()
    with contextlib.suppress(Exception):
        tree = {pid: start_time(pid) for pid in descendants(os.getpid())}
        kill_processes({**(also_kill or {}), **tree})
    os._exit(code)


# --- the heartbeat ---------------------------------------------------------------------------------------


class PeerWatch:
    """Heartbeats of this rank in the job's store, and the watch over the others' (see the module's text).

    ``store`` makes a store client (the job's TCP store); ``step`` is read at each beat; ``children``
    ({global rank: Popen}) are ranks this process started; ``on_lost(message)`` ends this rank (tests pass
    their own). ``prefix`` keeps launches apart in a store that outlives one (torchrun's agent's).
    """

    def __init__(
        self,
        rank: int,
        world: int,
        store: Callable[[], Any],
        silent_after: float,
        *,
        step: Callable[[], int] = lambda: -1,
        children: dict | None = None,
        prefix: str = "autoglm/liveness",
        interval: float = HEARTBEAT_S,
        on_lost: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.rank, self.world = rank, world
        self.silent_after = silent_after
        self.interval = interval
        self._connect, self._store = store, None
        self._step = step
        self.children = dict(children or {})
        self._prefix = prefix.rstrip("/")
        self._on_lost = on_lost or self._end
        self._clock = clock
        self._watched = list(range(world)) if rank == 0 else [0]
        self._watched = [r for r in self._watched if r != rank]
        now = clock()
        self._seen = {r: (None, now) for r in self._watched}  # rank -> (last counter, when it changed)
        self._done: set[int] = set()
        self._store_ok = now
        self._failed_at: float | None = None  # when this rank's collective failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tree: dict[int, int] = {}
        self.verdict: str | None = None

    def key(self, name: str) -> str:
        return f"{self._prefix}/{name}"

    # lifecycle
    def start(self) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="autoglm-peer-watch", daemon=True)
        self._thread.start()

    def stop(self, done: bool = True) -> None:
        """No more beats or watching. ``done``: this rank finished its part normally, so the others must not
        take its silence for a loss."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.interval)
        if done:
            with contextlib.suppress(Exception):
                self._client().set(self.key(f"done/{self.rank}"), "1")

    def note_failure(self, what: str) -> None:
        """This rank's own training failed (not a collective): the others may name it with its reason."""
        with contextlib.suppress(Exception):
            self._client().set(self.key(f"failed/{self.rank}"), what[:500])

    def collective_failed(self) -> None:
        """A collective failed on this rank: a peer silent for a few seconds is then taken for the cause."""
        self._failed_at = self._clock()

    # one beat
    def _client(self):
        if self._store is None:
            self._store = self._connect()
        return self._store

    def _threshold(self) -> float:
        if self._failed_at is None:
            return self.silent_after
        return min(self.silent_after, SILENT_AFTER_FAILURE_S)

    def beat(self) -> str | None:
        """Beat once and look at the others; returns the verdict if one was reached (and remembers it)."""
        now = self._clock()
        if self.children:  # their loader workers: orphaned if a child rank is killed, yet to be ended
            with contextlib.suppress(Exception):
                self.tree = snapshot_descendants(os.getpid())
        try:
            store = self._client()
            store.add(self.key(f"beat/{self.rank}"), 1)
            store.set(self.key(f"step/{self.rank}"), str(self._step()))
            if store.check([self.key("down")]):
                posted = store.get(self.key("down")).decode()
                return self._decide(posted, post=False)
            lost = [r for r in self._watched if self._silent(store, r, now)]
            self._store_ok = now
        except Exception as exc:  # the store is gone or unreachable: its host (rank 0, or the agent) is
            self._store = None
            silent = now - self._store_ok
            if silent > self._threshold():
                return self._decide(
                    f"rank 0 is gone (the job's store, which it hosts, has not answered for {silent:.0f} s: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                    post=False,
                )
            return None
        for r, proc in sorted(self.children.items()):
            code = proc.poll()
            if code is not None and code != 0 and r not in self._done:
                return self._decide(f"rank {r} is gone ({describe_exit(code)}{self._last_seen(r)})")
        if lost:
            silent = {r: now - self._seen[r][1] for r in lost}
            said = "; ".join(
                f"rank {r} is gone (no heartbeat for {silent[r]:.0f} s{self._last_seen(r)})" for r in lost
            )
            return self._decide(said)
        return None

    def _silent(self, store, r: int, now: float) -> bool:
        if r in self._done:
            return False
        count = store.add(self.key(f"beat/{r}"), 0)
        last, since = self._seen[r]
        if count != last:
            self._seen[r] = (count, now)
            return False
        if now - since <= self._threshold():
            return False
        if store.check([self.key(f"done/{r}")]):
            self._done.add(r)
            return False
        return True

    def _last_seen(self, r: int) -> str:
        said = ""
        with contextlib.suppress(Exception):
            store = self._client()
            if store.check([self.key(f"failed/{r}")]):
                said += f"; it failed: {store.get(self.key(f'failed/{r}')).decode()}"
            if store.check([self.key(f"step/{r}")]):
                said += f"; last seen at step {store.get(self.key(f'step/{r}')).decode()}"
        return said

    def _decide(self, verdict: str, post: bool = True) -> str:
        if self.verdict is None:
            self.verdict = verdict
            if post:  # the others read it on their next beat, so their logs say the same
                with contextlib.suppress(Exception):
                    self._client().compare_set(self.key("down"), "", f"{verdict} [found by rank {self.rank}]")
        return self.verdict

    def message(self) -> str:
        return f"{self.verdict}; stopping rank {self.rank} at step {self._step()} (exit {EXIT_CODE})"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.beat() is not None:
                if self.rank == 0 and self.world > 2:
                    time.sleep(self.interval + 0.5)  # rank 0 hosts the store: let the others read the verdict
                self._on_lost(self.message())
                return

    def _end(self, message: str) -> None:
        end_this_rank(message, also_kill=self.tree)


def job_store(timeout_s: float) -> Callable[[], Any]:
    """A client of the job's TCP store (``MASTER_ADDR:MASTER_PORT``, set by every launcher Lightning
    supports), its own connection, with a short timeout: a store that does not answer is news here."""

    def connect():
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )

    return connect
