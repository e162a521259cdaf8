"""Two gloo processes keep identical queues; a resumed run continues exactly like one never stopped."""

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import TINY, free_port

from autoglm_train import train
from autoglm_train.distributed.gather import gather_with_grad
from autoglm_train.losses.infonce import InfoNCE
from autoglm_train.losses.objective import Objective

pytestmark = pytest.mark.slow
QUEUE, BATCH, STEPS = 10, 3, 4


def batch_keys(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    image, text, image_m, text_m = (F.normalize(torch.randn(BATCH, 8, generator=g), dim=-1) for _ in range(4))
    return (
        image.requires_grad_(),
        text.requires_grad_(),
        image_m,
        text_m,
        torch.arange(BATCH) + 100 * rank + 10 * step,
    )


def queue_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    objective = Objective({"infonce": InfoNCE()}, queue_size=QUEUE, gather=gather_with_grad)
    for step in range(STEPS):
        image, text, image_m, text_m, ids = batch_keys(rank, step)
        out = objective(image, text, torch.tensor(10.0), ids=ids, step=step, momentum=(image_m, text_m))
        out["loss"].backward()
    features, ids = objective.queues["text"].contents()
    torch.save({"features": features, "ids": ids}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_hold_identical_queues_with_keys_from_both(tmp_path):
    mp.spawn(queue_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    q0, q1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(q0["features"], q1["features"]) and torch.equal(q0["ids"], q1["ids"])
    # reference: every step's keys gathered in rank order, concatenated, the last QUEUE kept
    keys = torch.cat([batch_keys(r, s)[3] for s in range(STEPS) for r in (0, 1)])
    ids = torch.cat([batch_keys(r, s)[4] for s in range(STEPS) for r in (0, 1)])
    torch.testing.assert_close(q0["features"], keys[-QUEUE:])
    assert torch.equal(q0["ids"], ids[-QUEUE:])
    assert {int(i) // 100 for i in q0["ids"]} == {0, 1}


def losses_by_step(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_resume_continues_exactly_with_momentum_queue_and_epoch_boundary(tiny_cfg, tmp_path):
    # 1,000 training samples / batch 64 = 15 batches an epoch: step 18 is 3 batches into epoch 1
    common = [
        "data.prepare.n_train=1000",
        f"paths.data_dir={tmp_path / 'data'}",  # its own small set, not a second one beside the session's
        "loss=infonce_triplet",
        "momentum.enabled=true",
        "momentum.schedule=cosine",
        "loss.queue_size=200",
        "loss.distill_alpha=0.4",
        "loss.distill_ramp_steps=20",
        "loss.margin_warmup_steps=30",
        "trainer.max_steps=22",
        "trainer.val_check_interval=11",
        "trainer.log_every_n_steps=1",
        "eval.zeroshot.task=null",
        "callbacks.last_checkpoint.every_n_train_steps=18",
        "callbacks.last_checkpoint.filename='at-{step}'",
    ]
    train.run(tiny_cfg(*common, output_dir=tmp_path / "straight"))
    checkpoint = tmp_path / "straight" / "checkpoints" / "at-step=18.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 18
    train.run(tiny_cfg(*common, f"ckpt_path='{checkpoint}'", output_dir=tmp_path / "resumed"))

    straight, resumed = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "resumed")
    after = sorted(s for s in resumed if s >= 18)
    assert len(after) == 4 and all(abs(straight[s] - resumed[s]) <= 1e-6 for s in after), (straight, resumed)
    a, b = (
        torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True)
        for r in ("straight", "resumed")
    )
    assert a["global_step"] == b["global_step"] == 22
    for name, value in a["state_dict"].items():  # model and momentum model
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
    for name in ("image", "text"):
        queue_a, queue_b = (c["run_state"]["queues"][name] for c in (a, b))
        torch.testing.assert_close(queue_b["features"], queue_a["features"], rtol=0, atol=1e-6)
        assert queue_b["ptr"] == queue_a["ptr"]


# --- two ranks under (faked) Slurm: preemption checkpoint, requeue, exact resume on every rank ----------
RANKS_STEPS = 14
# 3 shards of 200 over 2 ranks: rank 0 reads 2 (12 batches of 32 an epoch), rank 1 reads 1 (6 batches)
RANKS_RUN = [
    *TINY,
    "data.prepare.n_train=600",
    "data.prepare.samples_per_shard=200",
    "data.batch_size=32",
    "data.num_workers=1",
    "trainer=ddp_cpu",
    "threads=1",
    "momentum.enabled=true",
    "loss.queue_size=96",
    f"trainer.max_steps={RANKS_STEPS}",
    "trainer.val_check_interval=20",  # no periodic checkpoint: the preemption checkpoints are the newest
    "eval.zeroshot.task=null",
    "logger=none",
]


def start_slurm_ranks(run_dir: Path, probe: Path, data_dir: Path, bin_dir: Path, job: int, *extra: str):
    """The two tasks ``srun`` would start for a one-node, two-GPU job step, as CPU processes."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    base.update(
        PATH=f"{bin_dir}{os.pathsep}{base['PATH']}",
        PYTHONPATH=str(Path(__file__).resolve().parent),
        PYTHONUNBUFFERED="1",
        AUTOGLM_DATA_DIR=str(data_dir),
        SLURM_JOB_ID=str(job),
        SLURM_JOB_NAME="autoglm_train",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NNODES="1",
        SLURM_NODELIST="localhost",
        SLURM_NODEID="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    command = [sys.executable, "-m", "autoglm_train", *RANKS_RUN, f"hydra.run.dir={run_dir}"]
    command += ["+callbacks.record._target_=run_probes.RecordSteps", f"+callbacks.record.out_dir={probe}"]
    command += list(extra)
    return [
        subprocess.Popen(
            command,
            env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]


def finish(procs, timeout: float = 400) -> None:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]


def test_two_ranks_resume_exactly_after_a_preemption_checkpoint(tmp_path):
    from run_probes import read_steps
    from test_slurm import fake_slurm_bin, wait_for

    data_dir, bin_dir = tmp_path / "data", fake_slurm_bin(tmp_path)
    job = random.randint(100_000, 999_999)

    # straight through
    finish(start_slurm_ranks(tmp_path / "straight", tmp_path / "probe_straight", data_dir, bin_dir, job))

    # preempted: Slurm's warning reaches the ranks at different steps (rank 0 at step 8, rank 1 at 9); the
    # ranks agree and checkpoint together after step 9, rank 0 requeues; then the job is killed. By then
    # rank 1 is 3 batches into its second epoch, rank 0 9 batches into its first
    run_dir = tmp_path / "preempted"
    signals = [
        "+callbacks.warn0._target_=run_probes.SignalAt",
        "+callbacks.warn0.step=8",
        "+callbacks.warn0.rank=0",
        "+callbacks.warn1._target_=run_probes.SignalAt",
        "+callbacks.warn1.step=9",
        "+callbacks.warn1.rank=1",
    ]
    procs = start_slurm_ranks(run_dir, tmp_path / "probe_first", data_dir, bin_dir, job + 1, *signals)
    wait_for(lambda: (tmp_path / "scontrol_calls").exists(), 300, procs[0], "the requeue request")
    for p in procs:
        p.kill()
        p.wait(timeout=30)
    assert (tmp_path / "scontrol_calls").read_text().split()[:2] == ["requeue", str(job + 1)]
    first = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == 9
    positions = [(r["epoch"], r["batches"]) for r in first["run_state"]["ranks"]]
    assert positions == [(0, 9), (1, 3)]

    # the requeued job: same command and run directory; it finds the newest preemption checkpoint
    finish(start_slurm_ranks(run_dir, tmp_path / "probe_resumed", data_dir, bin_dir, job + 1, *signals[:3]))
    resumed_from = max(read_steps(tmp_path / "probe_resumed", 0)) - len(
        read_steps(tmp_path / "probe_resumed", 0)
    )
    assert resumed_from in (9, 10)  # hpc_ckpt_2 (after step 10) if it was written before the kill

    for rank in (0, 1):
        straight = read_steps(tmp_path / "probe_straight", rank)
        resumed = read_steps(tmp_path / "probe_resumed", rank)
        assert sorted(resumed) == list(range(resumed_from + 1, RANKS_STEPS + 1))
        for step, record in resumed.items():
            assert record["ids"] == straight[step]["ids"], (rank, step)
            assert abs(record["loss"] - straight[step]["loss"]) <= 1e-6, (rank, step)
        # and went on across an epoch boundary after the resume (after step 12 on both)
        epochs = [resumed[s]["epoch"] for s in sorted(resumed)]
        assert epochs[-1] - epochs[0] == 1, epochs
    a, b = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        for d in (tmp_path / "straight", run_dir)
    )
    assert a["global_step"] == b["global_step"] == RANKS_STEPS
    for name, value in a["state_dict"].items():  # model and momentum model
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
    for name in ("image", "text"):
        torch.testing.assert_close(
            b["run_state"]["queues"][name]["features"], a["run_state"]["queues"][name]["features"]
        )
