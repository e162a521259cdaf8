"""FSDP2 on two gloo ranks (``FSDP2Strategy``): the same training as DDP on the same global batch, with a
momentum encoder and a queue; exact resume from a sharded checkpoint; locked towers untouched."""

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY, free_port
from test_ddp import WORLD, B, global_batches  # the same batches as the DDP equality test

from autoglm_train.distributed.compression import CompressedDDPStrategy
from autoglm_train.distributed.fsdp import FSDP2Strategy, block_units
from autoglm_train.lit.module import DualEncoderModule
from autoglm_train.lit.run_state import RunState
from autoglm_train.losses.infonce import InfoNCE
from autoglm_train.losses.objective import Objective
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.momentum import MomentumEncoder
from autoglm_train.model.towers import ImageTower, TextTower
from autoglm_train.utils.checkpoint_files import verify_checkpoint

pytestmark = pytest.mark.slow
STEPS, K, QUEUE = 4, 2, 32  # resume at step K


def make_module(lock_image: bool = False) -> DualEncoderModule:
    torch.manual_seed(0)  # ViT: no batch norm, whose per-rank statistics FSDP does not broadcast
    image_tower = ImageTower("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    model = DualEncoder(image_tower, TextTower(50, 32, 2, 2, 8), embed_dim=16, lock_image=lock_image)
    momentum = MomentumEncoder(model, 0.9)
    objective = Objective({"infonce": InfoNCE()}, queue_size=QUEUE)
    # SGD: Adam would turn float noise in near-zero gradients into full-size updates (see test_ddp.py)
    optimizer = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1)
    return DualEncoderModule(model, objective, optimizer=optimizer, momentum=momentum)


class Record(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(module, batches, strategy, steps, ckpt_path=None, save=None, epochs=-1) -> Record:
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_steps=steps,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[record, RunState()],
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=[], ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)  # on every rank: each writes its shards
    return record


def full_state(module) -> dict[str, torch.Tensor]:
    """Every weight, the momentum encoder's too, whole (a collective under FSDP)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in module.state_dict().items()
        if k.startswith(("model.", "momentum."))
    }


def worker(rank: int, port: int, out_dir: str, job: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    out = Path(out_dir)
    shard = [{k: v[rank * B : (rank + 1) * B] for k, v in b.items()} for b in global_batches(STEPS)]
    result = {}
    if job == "equal":
        ddp = make_module()
        result["ddp"] = fit(ddp, shard, CompressedDDPStrategy(process_group_backend="gloo"), STEPS).losses
        result["ddp_state"] = full_state(ddp)
        fsdp = make_module()
        result["fsdp"] = fit(fsdp, shard, FSDP2Strategy(process_group_backend="gloo"), STEPS).losses
        result["fsdp_state"] = full_state(fsdp)
        result["queue"] = fsdp.objective.queue_state()
        # resume: an epoch of K steps (the LR schedule set for STEPS), a sharded checkpoint, then the rest
        ckpt = out / "sharded.ckpt"
        fit(make_module(), shard[:K], FSDP2Strategy(process_group_backend="gloo"), STEPS, save=ckpt, epochs=1)
        result["ckpt_files"] = sorted(p.name for p in ckpt.iterdir())
        result["ckpt_manifest"] = verify_checkpoint(ckpt)
        resumed = make_module()
        rest = fit(resumed, shard[K:], FSDP2Strategy(process_group_backend="gloo"), STEPS, ckpt_path=ckpt)
        result["resumed"], result["resumed_state"] = rest.losses, full_state(resumed)
        result["resumed_queue"] = resumed.objective.queue_state()
    else:  # a locked image tower
        locked = make_module(lock_image=True)
        before = full_state(locked)
        fit(locked, shard, FSDP2Strategy(process_group_backend="gloo"), STEPS)
        result["before"], result["after"] = before, full_state(locked)
    torch.save(result, out / f"{job}-rank{rank}.pt")


def run_two_ranks(tmp_path, job):
    mp.spawn(worker, args=(free_port(), str(tmp_path), job), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{job}-rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def equal_run(tmp_path_factory):
    return run_two_ranks(tmp_path_factory.mktemp("fsdp"), "equal")


def test_fsdp_equals_ddp_on_the_same_global_batch_with_momentum_and_queue(equal_run):
    for rank in equal_run:
        assert rank["fsdp"] == pytest.approx(rank["ddp"], abs=1e-5)
    state = equal_run[0]
    assert state["fsdp_state"].keys() == state["ddp_state"].keys()
    assert any(k.startswith("momentum.") for k in state["fsdp_state"])
    for name, ref in state["ddp_state"].items():
        torch.testing.assert_close(state["fsdp_state"][name], ref, atol=1e-5, rtol=0, msg=name)
    # the momentum encoder moved (an EMA on the shards), and the queue holds keys of both ranks
    assert not torch.equal(
        state["fsdp_state"]["momentum.module.text_proj.weight"],
        make_module().momentum.module.text_proj.weight,
    )
    q0, q1 = (r["queue"]["image"] for r in equal_run)
    assert torch.equal(q0["ids"], q1["ids"]) and {int(i) % 100 // (B // 2) for i in q0["ids"]} == {0, 1}


def test_resume_from_a_sharded_checkpoint_equals_the_straight_run(equal_run):
    # a DCP folder: one file of shards per rank, the plan, Lightning's other state from rank 0, and the
    # manifest of them all, written last (verified: every file's size and checksum)
    files = [".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "meta.pt"]
    assert equal_run[0]["ckpt_files"] == files
    assert sorted(equal_run[0]["ckpt_manifest"]["files"]) == [f for f in files if f != "manifest.json"]
    for rank in equal_run:
        assert rank["resumed"] == pytest.approx(rank["fsdp"][K:], abs=1e-6)
        for name, ref in rank["fsdp_state"].items():
            torch.testing.assert_close(rank["resumed_state"][name], ref, atol=1e-6, rtol=0, msg=name)
        for key, queue in rank["queue"].items():
            assert torch.equal(rank["resumed_queue"][key]["ids"], queue["ids"])


def test_a_locked_tower_stays_bitwise_unchanged_under_fsdp(tmp_path):
    rank0 = run_two_ranks(tmp_path, "locked")[0]
    moved = 0
    for name, before in rank0["before"].items():
        if name.startswith("model.image_tower."):
            assert torch.equal(rank0["after"][name], before), name
        elif name.startswith("model.text_tower."):
            moved += not torch.equal(rank0["after"][name], before)
    assert moved > 0  # the other tower trained


def test_the_units_are_each_towers_blocks():
    module = make_module()
    vit, text = module.model.image_tower, module.model.text_tower
    assert block_units(vit) == list(vit.backbone.blocks)
    assert block_units(text) == list(text.encoder.layers)
    resnet = ImageTower("resnet18")
    assert block_units(resnet) == [getattr(resnet.backbone, f"layer{i}") for i in range(1, 5)]


def test_command_line_fsdp_cpu_run_resumes_on_another_world_size_and_evaluates(shapes_dir, tmp_path):
    # 2 ranks write a sharded checkpoint (ResNet-18: batch norm, channels_last kernels made contiguous;
    # momentum encoder and queue on); 1 rank resumes from it (DCP reshards; the stream restarts); evaluate
    # reads the folder
    run_dir = tmp_path / "fsdp"
    env = {**os.environ, "AUTOGLM_DATA_DIR": str(shapes_dir), "PYTHONUNBUFFERED": "1"}
    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "autoglm_train", *TINY, "trainer=fsdp_cpu", "momentum.enabled=true"]
    args += ["loss.queue_size=256", "eval.zeroshot.task=null", f"hydra.run.dir={run_dir}"]
    first = subprocess.run(
        [*args, "trainer.max_steps=4"], cwd=root, env=env, capture_output=True, text=True, timeout=400
    )
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert "FSDP2 over 2 ranks" in first.stdout + first.stderr
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in last.iterdir()}
    # one rank of the same per-rank batch halves the global batch: a change a resume refuses unless named
    second = subprocess.run(
        [*args, "trainer.max_steps=6", "trainer.devices=1", "resume.allow_changes=[trainer.devices]"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "Resuming from" in out and "checkpoint of 2 rank(s) resumed on 1" in out
    assert json.loads((run_dir / "metrics.json").read_text())["train/steps"] == 6
    evaluated = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoglm_train.evaluate",
            f"ckpt={last}",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["val/r1_mean"] == pytest.approx(
        json.loads((run_dir / "metrics.json").read_text())["val/r1_mean"]
    )
