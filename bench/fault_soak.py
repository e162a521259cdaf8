"""A 2-rank gloo job driven through the faults a Slurm user meets, against the same job never interrupted:
the final parameters must be equal (max |difference| <= 1e-6).

    python bench/fault_soak.py [--steps 24] [--every 4] [--collective-timeout 30] [--keep DIR]

Both jobs run ``launch/slurm/train.sbatch`` (what a user submits) under a faked Slurm: ``srun`` starts
the two tasks itself (SLURM_PROCID 0 and 1), ends the step when one task fails (``--kill-on-bad-exit``)
and ``scontrol`` records requeue requests. The faulted job, in one run directory throughout:

1. preemption: SIGUSR1 to both tasks (Slurm's warning before the time limit) once a checkpoint exists:
   the ranks write ``hpc_ckpt_1.ckpt`` together and ask for a requeue; then the "time limit" kills the job;
2. requeue: the same command resumes from that checkpoint; once ``last.ckpt`` is past the middle, rank 1
   is SIGKILLed (an OOM kill, a lost node), with srun's ``--kill-on-bad-exit`` switched off for this
   launch, so that the survivor has to notice alone: rank 0 must exit non-zero within
   ``trainer.collective_timeout`` + 30 s naming rank 1, and no process of the job may remain;
3. a damaged checkpoint and a full disk: the newest checkpoint is cut in half, and the job is started again
   with an ``ENOSPC`` injected into ``torch.save`` at a later step (a ``sitecustomize`` on the job's
   ``PYTHONPATH``; nothing in the package knows): resume must skip the damaged file, fall back to the
   previous one, and stop at the full disk naming the path;
4. the last requeue runs to the end.

Printed: each phase's wall time and outcome, the kill-to-exit time, and the largest parameter difference.
Exit status 0 only if every check held. CPU only (gloo); about 5-10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = [
    "trainer=ddp_cpu",
    "data.batch_size=32",
    "data.eval_batch_size=100",
    "data.num_workers=0",
    "trainer.precision=32-true",
    "data.image_size=32",
    "data.shuffle_buffer=500",
    "data.prepare.n_train=3000",
    "data.prepare.n_val=200",
    "data.prepare.n_val_binding=50",
    "data.prepare.image_size=32",
    "data.prepare.samples_per_shard=500",
    "model.embed_dim=64",
    "model.text_tower.width=64",
    "model.text_tower.depth=1",
    "model.text_tower.heads=2",
    "tokenizer.train_samples=2000",
    "trainer.enable_model_summary=false",
    "scheduler.warmup_steps=2",
    "logger=none",
    "progress_bar=false",
    "eval.zeroshot.task=null",
    "threads=1",
]

FAKE_SRUN = """#!/bin/bash
# a faked srun: SLURM_NTASKS tasks of the command on this machine; --kill-on-bad-exit ends the step
# when one task fails
kill_on_bad_exit=0
while [[ "$1" == --* ]]; do [[ "$1" == --kill-on-bad-exit* ]] && kill_on_bad_exit=1; shift; done
# a launcher that leaves the survivors to themselves (torchrun without --max-restarts, a bare mpirun)
[[ -n "${SOAK_NO_KILL_ON_BAD_EXIT:-}" ]] && kill_on_bad_exit=0
: > "$SOAK_DIR/task_pids"
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
    pids+=($!)
    echo $! >> "$SOAK_DIR/task_pids"
done
status=0
while ((${#pids[@]})); do
    wait -n -p ended "${pids[@]}"
    rc=$?
    remaining=()
    for p in "${pids[@]}"; do [[ "$p" != "$ended" ]] && remaining+=("$p"); done
    pids=("${remaining[@]}")
    if ((rc != 0)); then
        status=$rc
        if ((kill_on_bad_exit)); then
            echo "srun: task $ended exited $rc: killing the step" >&2
            for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
        fi
    fi
done
exit $status
"""

FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$SOAK_DIR/scontrol_calls"
"""

# injected into the job's interpreters: a full disk when the checkpoint of one step is written
ENOSPC_AT_STEP = """import os
_step = int(os.environ.get("SOAK_ENOSPC_AT_STEP", "0"))
if _step:
    import errno
    import torch
    _save = torch.save
    def _full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == _step:
            f.write(b"PK")  # a few bytes, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return _save(obj, f, *args, **kwargs)
    torch.save = _full_disk
"""


class Job:
    """One faked Slurm job (its id fixes its run directory), launched as often as it is requeued."""

    def __init__(self, work: Path, job_id: int, overrides: list[str], data_dir: Path) -> None:
        self.work, self.job_id, self.overrides, self.restarts = work, job_id, overrides, 0
        self.dir = work / f"job-{job_id}"
        bin_dir = self.dir / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "srun").write_text(FAKE_SRUN)
        (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
        for f in bin_dir.iterdir():
            f.chmod(0o755)
        inject = self.dir / "inject"
        inject.mkdir()
        (inject / "sitecustomize.py").write_text(ENOSPC_AT_STEP)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
        env.update(
            PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
            PYTHONPATH=os.pathsep.join([str(inject), str(REPO), env.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
            PYTHON=sys.executable,
            PYTHONUNBUFFERED="1",
            SOAK_DIR=str(self.dir),
            AUTOGLM_LOG_DIR=str(work / "logs"),
            AUTOGLM_DATA_DIR=str(data_dir),
            SLURM_JOB_ID=str(job_id),
            SLURM_JOB_NAME="autoglm_train",
            SLURM_SUBMIT_DIR=str(REPO),
            SLURM_JOB_NODELIST="localhost",
            SLURM_NODELIST="localhost",
            SLURM_JOB_NUM_NODES="1",
            SLURM_NNODES="1",
            SLURM_NTASKS_PER_NODE="2",
            SLURM_NTASKS="2",
            SLURM_CPUS_PER_TASK="1",
        )
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def run_dir(self) -> Path:
        return self.work / "logs" / "shapes_align" / "runs" / f"slurm-{self.job_id}"

    def start(self, **extra_env: str) -> None:
        env = {**self.env, "SLURM_RESTART_COUNT": str(self.restarts), **extra_env}
        self.log_path = self.dir / f"launch-{self.restarts}.log"
        command = ["bash", str(REPO / "launch/slurm/train.sbatch"), *self.overrides]
        self.proc = subprocess.Popen(
            command,
            env=env,
            stdout=open(self.log_path, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.restarts += 1

    def task_pids(self) -> list[int]:
        path = self.dir / "task_pids"
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill_all(self) -> None:
        """The time limit: everything of the job's session ends."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def session_processes(self) -> list[int]:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields after the name: state, ppid, pgrp, session
            if int(fields[3]) == self.proc.pid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
        return alive


def checkpoint_step(path: Path) -> int | None:
    try:
        return json.loads((path.parent / (path.name + ".manifest.json")).read_text()).get("step")
    except (OSError, ValueError):
        return None


def wait_for(predicate, timeout: float, job: Job, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if job.proc.poll() is not None:
            raise RuntimeError(
                f"the job ended (rc {job.proc.returncode}) before {what}:\n{job.log()[-4000:]}"
            )
        if time.monotonic() - start > timeout:
            job.kill_all()
            raise RuntimeError(f"timed out waiting for {what}:\n{job.log()[-4000:]}")
        time.sleep(0.2)
    return time.monotonic() - start


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=4, help="checkpoint (and validation) interval")
    parser.add_argument("--collective-timeout", type=int, default=30)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir)")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="fault_soak-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / "data"
    overrides = [
        *TINY,
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.every}",
        f"trainer.collective_timeout={args.collective_timeout}",
    ]
    checks: list[tuple[str, bool, str]] = []
    timings: dict[str, float] = {}

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append((name, ok, detail))
        print(f"[{'ok' if ok else 'FAILED'}] {name}{': ' + detail if detail else ''}", flush=True)

    base_id = random.randint(10_000, 59_999)  # the faked jobs' ports derive from their ids
    # --- the uninterrupted job -----------------------------------------------------------------------------
    reference = Job(work, base_id, overrides, data_dir)
    start = time.monotonic()
    reference.start()
    rc = reference.wait(timeout=1800)
    timings["uninterrupted"] = time.monotonic() - start
    check("uninterrupted job", rc == 0, f"rc {rc}, {timings['uninterrupted']:.0f} s")
    if rc != 0:
        print(reference.log()[-4000:])
        return 1

    job = Job(work, base_id + 1, overrides, data_dir)
    last = job.run_dir / "checkpoints" / "last.ckpt"
    # --- 1. preemption ---------------------------------------------------------------------------
    start = time.monotonic()
    job.start()
    wait_for(lambda: (checkpoint_step(last) or 0) >= args.every, 900, job, "the first checkpoint")
    for pid in job.task_pids():
        os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: (job.dir / "scontrol_calls").exists(), 300, job, "the requeue request")
    hpc = sorted(job.run_dir.glob("hpc_ckpt_*.ckpt"))
    job.kill_all()
    timings["1 preemption"] = time.monotonic() - start
    requeued = (job.dir / "scontrol_calls").read_text().split() == ["requeue", str(job.job_id)]
    check("preemption: checkpoint and requeue", bool(hpc) and requeued, f"{[p.name for p in hpc]}")

    # --- 2. requeue, then rank 1 is killed ------------------------------------------------------------------
    start = time.monotonic()
    job.start(SOAK_NO_KILL_ON_BAD_EXIT="1")
    middle = args.steps // 2
    wait_for(lambda: (checkpoint_step(last) or 0) >= middle, 900, job, f"a checkpoint at step {middle}")
    check("requeued job resumed from the preemption checkpoint", "Resuming from" in job.log())
    rank1 = job.task_pids()[1]
    killed_at = time.monotonic()
    os.kill(rank1, signal.SIGKILL)
    try:
        rc = job.wait(timeout=args.collective_timeout + 30)
        timings["kill to exit"] = time.monotonic() - killed_at
    except subprocess.TimeoutExpired:
        rc = None
        timings["kill to exit"] = float("inf")
    leftover = job.session_processes() if rc is not None else ["(still running)"]
    if rc is None:
        job.kill_all()
    check(
        "rank 1 SIGKILLed: the job ends by itself, non-zero",
        rc not in (None, 0),
        f"rc {rc}, {timings['kill to exit']:.1f} s after the kill (limit {args.collective_timeout + 30} s)",
    )
    check("no process of the job remains", not leftover, f"{leftover}")
    gone = [line for line in job.log().splitlines() if "rank 1 is gone" in line]
    check("rank 0 names the lost rank and the step", bool(gone), gone[0].split("] - ")[-1] if gone else "")
    timings["2 requeue + kill"] = time.monotonic() - start

    # --- 3. a damaged newest checkpoint, then a full disk --------------------------------------------------
    newest = max(
        [p for p in [last, *job.run_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()],
        key=lambda p: p.stat().st_mtime,
    )
    damaged_step = checkpoint_step(newest)
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    full_at = min(args.steps, (damaged_step or middle) + args.every)
    start = time.monotonic()
    job.start(SOAK_ENOSPC_AT_STEP=str(full_at))
    rc = job.wait(timeout=900)
    timings["3 damaged + full disk"] = time.monotonic() - start
    out = job.log()
    check(
        "the damaged checkpoint is skipped and resume falls back",
        "falling back to" in out and "truncated" in out,
    )
    check(
        f"a full disk at step {full_at} stops the job naming the path",
        rc != 0 and "DiskWriteError" in out and "No space left on device" in out and ".ckpt" in out,
        f"rc {rc}",
    )

    # --- 4. the last requeue runs to the end ---------------------------------------------------------------
    start = time.monotonic()
    job.start()
    rc = job.wait(timeout=1800)
    timings["4 final requeue"] = time.monotonic() - start
    check("the last requeue finishes", rc == 0 and (job.run_dir / "metrics.json").exists(), f"rc {rc}")
    if rc == 0:
        ref, got = final_weights(reference.run_dir), final_weights(job.run_dir)
        worst = max((ref[k].double() - got[k].double()).abs().max().item() for k in ref)
        same_keys = ref.keys() == got.keys()
        check(
            "final parameters equal the uninterrupted job's",
            same_keys and worst <= 1e-6,
            f"max |diff| {worst:.2e}",
        )
        timings["max |diff|"] = worst

    print("\nphase timings (s): " + json.dumps({k: round(v, 3) for k, v in timings.items()}))
    failed = [name for name, ok, _ in checks if not ok]
    print(
        f"{len(checks) - len(failed)} of {len(checks)} checks held"
        + (f"; failed: {failed}" if failed else "")
    )
    print(f"work directory: {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
