"""Short real trainings on the tiny shapes set: learning, outputs, resume, and the command line."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY

from autoglm_train import train

pytestmark = pytest.mark.slow

METRIC_KEYS = {
    "val/i2t_r1",
    "val/i2t_r5",
    "val/i2t_r10",
    "val/t2i_r1",
    "val/t2i_r5",
    "val/t2i_r10",
    "val/r1_mean",
    "train/steps",
    "train/samples",
    "time/train_s",
    "time/samples_per_s",
}


def test_short_training_lifts_recall_far_above_chance(tiny_cfg, tmp_path):
    # the default job's half-width towers at 32 px: 300 steps (0.67), about the time of ResNet-18's 150 (0.35)
    cfg = tiny_cfg("trainer.max_steps=300", "trainer.val_check_interval=300")
    metrics = train.run(cfg)
    run = Path(cfg.paths.output_dir)
    # 200 held-out images, 2 captions each: chance R@1 is 1/200 both ways
    assert metrics["val/r1_mean"] > 0.2, metrics  # chance is 0.005
    assert metrics["val/i2t_r10"] > metrics["val/i2t_r1"]
    # shapes_align also classifies single-shape renders zero-shot (figures of the full run: docs/results.md)
    zeroshot = {"zeroshot/shape_top1", "zeroshot/colour_top1", "zeroshot/colour_top5"}
    assert zeroshot <= set(metrics) and all(0 <= metrics[k] <= 1 for k in zeroshot)
    saved = json.loads((run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(saved) and all(isinstance(v, (int, float)) for v in saved.values())
    # every held-out image is in a hard-negative group: within-group recall per attribute (data.hard_groups)
    assert {f"val/hard_r1_{k}" for k in ("shape", "colour", "position", "size")} <= set(saved)
    assert saved["train/steps"] == 300 and saved["train/samples"] == 300 * 64
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "checkpoints" / "best.ckpt").exists()
    assert (run / "tokenizer.json").exists()


def test_resume_continues_the_step_count(tiny_cfg, tmp_path):
    first = tiny_cfg("trainer.max_steps=7", "trainer.val_check_interval=3", output_dir=tmp_path / "first")
    train.run(first)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 7

    resumed = tiny_cfg(
        "trainer.max_steps=12",
        "trainer.val_check_interval=5",
        f"ckpt_path={last}",
        output_dir=tmp_path / "second",
    )
    metrics = train.run(resumed)
    assert metrics["train/steps"] == 12
    ckpt = torch.load(
        tmp_path / "second" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["global_step"] == 12
    # the resumed run used the checkpoint's tokenizer, not a new one
    assert (tmp_path / "second" / "tokenizer.json").read_text() == (
        tmp_path / "first" / "tokenizer.json"
    ).read_text()


def test_command_line_run_writes_the_run_directory(shapes_dir, tmp_path):
    run_dir = tmp_path / "cli"
    env = {**os.environ, "AUTOGLM_DATA_DIR": str(shapes_dir), "PYTHONUNBUFFERED": "1"}
    args = [
        sys.executable,
        "-m",
        "autoglm_train",
        *TINY,
        "trainer.max_steps=4",
        "trainer.enable_model_summary=true",  # TINY turns it off
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(
        args, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Run directory: {run_dir}" in done.stdout.replace("\n", "")
    assert "val/r1_mean" in done.stdout  # the results table
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "metrics.json").exists()
    # a newcomer's log: the model summary's parameter counts, not Lightning's noise around them
    log = done.stdout + done.stderr
    assert "Trainable params" in log and "DualEncoder" in log
    for noise in ("FLOPs", "litlogger", "Skipping setting a default `ModelSummary`"):
        assert noise not in log, noise


def test_wandb_logger_runs_offline_without_an_account(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg("logger=wandb", "trainer.max_steps=2", "trainer.val_check_interval=2")
    train.run(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.parametrize(
    "loss,columns",
    [
        ("infonce_triplet", {"train/loss/infonce", "train/loss/triplet", "train/sched/margin"}),
        ("siglip", {"train/loss/siglip", "train/sched/siglip_bias"}),
    ],
)
def test_combined_and_siglip_losses_train_and_log_each_term(tiny_cfg, loss, columns):
    cfg = tiny_cfg(
        f"loss={loss}", "loss.margin_warmup_steps=4", "trainer.max_steps=4", "trainer.log_every_n_steps=1"
    )
    metrics = train.run(cfg)
    assert metrics["train/steps"] == 4
    header = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert columns <= set(header) and "train/loss" in header


# caption negatives and the fusion stage through the whole job, with what they must compose with
@pytest.mark.parametrize(
    "extra",
    [
        [
            "loss.text_negatives=swap",
            "momentum.enabled=true",
            "loss.queue_size=128",
            "loss.distill_alpha=0.4",
        ],
        ["model.fusion.layers=1", "loss.text_negatives=swap", "model.grad_checkpointing=true"],
    ],
    ids=["negatives+momentum", "fusion+negatives+checkpointing"],
)
def test_binding_remedies_train_with_what_they_compose_with(tiny_cfg, extra, tmp_path):
    fusion = any(o.startswith("model.fusion") for o in extra)
    cfg = tiny_cfg(
        *extra,
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        *(["eval.rerank.k=4"] if fusion else []),
    )
    metrics = train.run(cfg)
    assert 0 <= metrics["val/hard_r1_binding"] <= 1 and metrics["val/images"] == 200  # binding: groups only
    if fusion:
        assert {"val/rerank_r1_mean", "val/rerank_hard_r1_binding"} <= set(metrics)
        assert all(math.isfinite(v) for v in metrics.values())


def test_a_second_stage_starts_a_fusion_stage_on_a_trained_runs_locked_towers(tiny_cfg, tmp_path):
    """init_from: stage 2 (LiT + a new fusion stage, with momentum) takes stage 1's weights and tokenizer,
    keeps its locked towers exactly, and starts its own optimizer and step count."""
    first = tiny_cfg("trainer.max_steps=4", output_dir=tmp_path / "first")
    train.run(first)
    stage1 = Path(first.paths.output_dir)
    second = tiny_cfg(
        f"init_from={stage1 / 'checkpoints' / 'last.ckpt'}",
        "model.fusion.layers=1",
        "model.lock_image=true",
        "model.lock_image_freeze_bn=true",
        "model.lock_text=true",
        "momentum.enabled=true",
        "loss.text_negatives=swap",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "eval.rerank.k=4",
        "tokenizer.vocab_size=300",  # a tokenizer trained anew would differ from stage 1's
        output_dir=tmp_path / "second",
    )
    metrics = train.run(second)
    stage2 = Path(second.paths.output_dir)
    assert metrics["train/steps"] == 3 and "val/rerank_hard_r1_binding" in metrics
    assert (stage2 / "tokenizer.json").read_text() == (stage1 / "tokenizer.json").read_text()
    before = torch.load(stage1 / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    after = torch.load(stage2 / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    towers = [k for k in before if k.startswith(("model.image_tower.", "model.text_tower."))]
    # frozen batch norm keeps no num_batches_tracked; every other tower tensor is stage 1's, unchanged
    assert {k for k in towers if not k.endswith("num_batches_tracked")} <= after.keys()
    assert towers and all(torch.equal(before[k], after[k]) for k in towers if k in after)
    assert any(k.startswith("model.fusion.") for k in after) and not any("fusion" in k for k in before)
    # the heads were trained on: stage 2 moved them from where stage 1 left them
    assert not torch.equal(before["model.image_proj.weight"], after["model.image_proj.weight"])


def test_init_from_refuses_a_checkpoint_that_shares_no_weight_with_the_model(tmp_path):
    from autoglm_train.model.weights import init_from_checkpoint

    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.elsewhere.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="none of its weights belong to this model"):
        init_from_checkpoint(torch.nn.Linear(2, 2), path)
