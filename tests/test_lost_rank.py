"""A lost rank ends the job promptly: the survivors exit non-zero naming the lost rank and the step, and no
process of the job is left (issue 28, point 1)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import TINY, compose_config, free_port

from autoglm_train import train
from autoglm_train.config_check import check_train_config
from autoglm_train.distributed.liveness import PeerWatch, is_collective_failure

TIMEOUT_S = 20  # trainer.collective_timeout in the runs below


# --- the heartbeat, in one process: an in-memory store and a clock the test moves -------------------------
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Exited:
    def __init__(self, code):
        self.code = code

    def poll(self):
        return self.code


def watches(world: int, store, clock, **kwargs) -> list[PeerWatch]:
    return [
        PeerWatch(r, world, lambda: store, silent_after=10, step=lambda: 7, clock=clock, **kwargs)
        for r in range(world)
    ]


def test_a_silent_rank_is_named_with_its_step_and_the_verdict_reaches_the_others():
    store, clock = dist.HashStore(), Clock()
    w0, w1, w2 = watches(3, store, clock)
    for _ in range(3):
        clock.now += 1
        assert [w.beat() for w in (w1, w2, w0)] == [None] * 3  # rank 0 sees this round's beats
    clock.now += 9  # rank 1 beats no more; 9 s of silence is not yet 10
    assert w0.beat() is None and w2.beat() is None
    clock.now += 2
    assert w2.beat() is None  # rank 2 watches rank 0 only
    verdict = w0.beat()
    assert verdict == "rank 1 is gone (no heartbeat for 11 s; last seen at step 7)"
    assert w0.message() == f"{verdict}; stopping rank 0 at step 7 (exit 1)"
    assert w2.beat() == f"{verdict} [found by rank 0]"


def test_a_failed_collective_shortens_the_wait_and_a_finished_rank_is_not_lost():
    store, clock = dist.HashStore(), Clock()
    w0, w1 = watches(2, store, clock)
    w1.beat(), w0.beat()
    clock.now += 5
    assert w0.beat() is None  # 5 s of silence, no failure: not yet
    w0.collective_failed()
    assert "rank 1 is gone (no heartbeat for 5 s" in w0.beat()

    store, clock = dist.HashStore(), Clock()
    w0, w1 = watches(2, store, clock)
    w1.beat(), w0.beat()
    w1.note_failure("ValueError: boom")
    w1.stop(done=True)  # finished (or failed) without a collective: never taken for lost
    clock.now += 60
    assert w0.beat() is None


def test_a_failed_rank_is_named_with_its_error_and_a_child_rank_with_its_signal():
    store, clock = dist.HashStore(), Clock()
    w0, w1 = watches(2, store, clock)
    w1.beat(), w0.beat()
    w1.note_failure("ValueError: boom")
    clock.now += 11
    assert "rank 1 is gone (no heartbeat for 11 s; it failed: ValueError: boom; last seen" in w0.beat()

    store, clock = dist.HashStore(), Clock()
    (w0,) = watches(1, store, clock, children={1: Exited(-signal.SIGKILL)})
    assert w0.beat().startswith("rank 1 is gone (killed by SIGKILL")
    (w0,) = watches(1, dist.HashStore(), clock, children={1: Exited(0)})
    assert w0.beat() is None  # a child that finished is not lost


def test_a_store_that_stops_answering_names_rank_0():
    clock, store = Clock(), dist.HashStore()

    class Gone:  # the store's host died at t=102: every call fails from then on
        def __getattr__(self, name):
            if clock.now > 102:
                raise dist.DistNetworkError("Connection reset by peer")
            return getattr(store, name)

    watch = PeerWatch(1, 2, Gone, silent_after=10, clock=clock)
    watch.beat()
    clock.now += 3
    assert watch.beat() is None
    clock.now += 10
    assert watch.beat() == (
        "rank 0 is gone (the job's store, which it hosts, has not answered for 13 s: "
        "DistNetworkError: Connection reset by peer)"
    )


def test_collective_failures_are_told_from_the_rank_s_own_errors():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    assert is_collective_failure(gloo) and is_collective_failure(dist.DistBackendError("NCCL error"))
    assert not is_collective_failure(ValueError("bad value"))
    from autoglm_train.lit.divergence import NonFiniteError

    assert not is_collective_failure(NonFiniteError("non-finite loss at step 3"))


def test_collective_timeout_reaches_the_strategy_and_is_checked(tmp_path):
    from hydra.utils import instantiate

    for trainer in ("ddp_cpu", "fsdp_cpu"):
        cfg = compose_config([f"trainer={trainer}", "trainer.collective_timeout=42"], tmp_path)
        trainer_cfg, _, _ = train.split_trainer_config(cfg)
        assert "collective_timeout" not in trainer_cfg
        assert instantiate(trainer_cfg.strategy)._timeout.total_seconds() == 42
    cfg = compose_config(["+trainer.strategy=ddp", "trainer.collective_timeout=42"], tmp_path)
    assert instantiate(train.split_trainer_config(cfg)[0].strategy)._timeout.total_seconds() == 42
    assert compose_config([], tmp_path).trainer.collective_timeout == 300
    for bad in (-5, "soon"):  # and 0, in test_config_validation.py
        with pytest.raises(ValueError, match="trainer.collective_timeout"):
            check_train_config(compose_config([f"trainer.collective_timeout={bad}"], tmp_path))


# --- a real 2-rank gloo job, rank 1 SIGKILLed mid-run ------------------------------------------------------
def session_processes(sid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_rank_1_and_time_rank_0(command, env, probe: Path, log_path: Path) -> tuple[float, str, int]:
    """Start the job in a session of its own (every process it makes stays in it), SIGKILL rank 1 once both
    ranks have trained 3 steps; assert that rank 0 exits, and no process of the job is left; return the
    seconds from the kill to rank 0's exit, the job's output and its exit status."""
    with open(log_path, "w") as log:
        job = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not all((read_json(probe / f"rank{r}.json") or {}).get("step", 0) >= 3 for r in (0, 1)):
            assert job.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "training never got under way"
            time.sleep(0.2)
        rank0 = read_json(probe / "rank0.json")["pid"]
        killed = time.monotonic()
        os.kill(read_json(probe / "rank1.json")["pid"], signal.SIGKILL)
        while not gone(rank0):
            assert time.monotonic() - killed < TIMEOUT_S + 30, "rank 0 outlived the lost rank"
            time.sleep(0.05)
        took = time.monotonic() - killed
        code = job.wait(timeout=10)
        # every process of the job (rank 1's loader worker, orphaned by the kill, included) ends with rank 0
        deadline = time.monotonic() + 5
        while session_processes(job.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not session_processes(job.pid), "processes of the job outlived it"
        return took, log_path.read_text(), code
    finally:
        for pid in session_processes(job.pid):
            os.kill(pid, signal.SIGKILL)


LOST_RUN = [
    *TINY,
    "trainer=ddp_cpu",
    "threads=1",
    "data.num_workers=1",
    "trainer.max_steps=500",
    "trainer.val_check_interval=500",
    f"trainer.collective_timeout={TIMEOUT_S}",
    "eval.zeroshot.task=null",
    "logger=none",
]


@pytest.mark.slow
def test_a_sigkilled_rank_ends_the_job_promptly_naming_it(shapes_dir, tmp_path):
    # Lightning's own launcher: rank 0 starts rank 1 (the default on one machine)
    probe = tmp_path / "probe"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]))
    env.update(AUTOGLM_DATA_DIR=str(shapes_dir), PYTHONUNBUFFERED="1", MASTER_PORT=str(free_port()))
    command = [sys.executable, "-m", "autoglm_train", *LOST_RUN, f"hydra.run.dir={tmp_path / 'run'}"]
    command += ["+callbacks.pids._target_=run_probes.Pids", f"+callbacks.pids.out_dir={probe}"]
    took, log, code = kill_rank_1_and_time_rank_0(command, env, probe, tmp_path / "job.log")
    assert code == 1, log[-3000:]
    assert "rank 1 is gone (killed by SIGKILL; last seen at step " in log, log[-3000:]
    assert "stopping rank 0 at step " in log
    assert took < TIMEOUT_S + 30, took
    print(f"rank 0 exited {took:.1f} s after rank 1 was killed")


@pytest.mark.slow
def test_a_sigkilled_task_under_srun_is_named_from_its_heartbeat(shapes_dir, tmp_path):
    # the ranks as srun starts them: neither is the other's parent, so rank 0 learns of the loss from the
    # failed collective and names rank 1 from its silent heartbeat
    probe = tmp_path / "probe"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]))
    env.update(AUTOGLM_DATA_DIR=str(shapes_dir), PYTHONUNBUFFERED="1")
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NAME="autoglm_train", SLURM_NTASKS="2", SLURM_NNODES="1")
    env.update(SLURM_NTASKS_PER_NODE="2", SLURM_NODELIST="localhost", SLURM_NODEID="0")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rank = [sys.executable, "-m", "autoglm_train", *LOST_RUN, f"hydra.run.dir={tmp_path / 'run'}"]
    rank += ["+callbacks.pids._target_=run_probes.Pids", f"+callbacks.pids.out_dir={probe}"]
    rc0 = tmp_path / "rank0.rc"
    tasks = [f"SLURM_PROCID={r} SLURM_LOCALID={r} {shlex.join(rank)}" for r in (0, 1)]
    shell = f"({tasks[0]}; echo $? > {rc0}) & {tasks[1]} & wait"
    took, log, _ = kill_rank_1_and_time_rank_0(["bash", "-c", shell], env, probe, tmp_path / "job.log")
    assert rc0.read_text().strip() == "1", log[-3000:]
    assert "rank 0: a collective failed at step " in log, log[-3000:]
    assert "rank 1 is gone (no heartbeat for " in log and "; stopping rank 0 at step " in log
    assert took < TIMEOUT_S + 30, took
    print(f"rank 0 exited {took:.1f} s after rank 1 was killed")
