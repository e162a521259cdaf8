"""Two gloo processes keep identical queues; a resumed run continues exactly like one never stopped."""

import csv
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port

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
    # 3,000 training samples / batch 64 = 46 batches an epoch: step 50 is 4 batches into epoch 1
    common = [
        "loss=infonce_triplet",
        "momentum.enabled=true",
        "momentum.schedule=cosine",
        "loss.queue_size=200",
        "loss.distill_alpha=0.4",
        "loss.distill_ramp_steps=20",
        "loss.margin_warmup_steps=30",
        "trainer.max_steps=56",
        "trainer.val_check_interval=25",
        "trainer.log_every_n_steps=1",
        "callbacks.last_checkpoint.every_n_train_steps=50",
        "callbacks.last_checkpoint.filename='at-{step}'",
    ]
    train.run(tiny_cfg(*common, output_dir=tmp_path / "straight"))
    checkpoint = tmp_path / "straight" / "checkpoints" / "at-step=50.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 50
    train.run(tiny_cfg(*common, f"ckpt_path='{checkpoint}'", output_dir=tmp_path / "resumed"))

    straight, resumed = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "resumed")
    after = sorted(s for s in resumed if s >= 50)
    assert len(after) == 6 and all(abs(straight[s] - resumed[s]) <= 1e-6 for s in after), (straight, resumed)
    a, b = (
        torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=False)
        for r in ("straight", "resumed")
    )
    assert a["global_step"] == b["global_step"] == 56
    for name, value in a["state_dict"].items():  # model and momentum model
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
    for name in ("image", "text"):
        torch.testing.assert_close(
            b["queues"][name]["features"], a["queues"][name]["features"], rtol=0, atol=1e-6
        )
        assert b["queues"][name]["ptr"] == a["queues"][name]["ptr"]
