"""open_clip_train's recipe on our trainer, step for step, and image sizes that follow a model with one.

``experiment=open_clip_parity`` trains a tiny open_clip ViT over the same fixed batches as open_clip_train's
own ``train_one_epoch`` does from the same weights (its AdamW parameter groups, ``cosine_lr`` with warm-up,
``ClipLoss``, gradient clipping, the logit-scale clamp after each step): the same loss at every step and
the same weights after, fp32 on the CPU. The model starts at the logit scale of CLIP's released weights,
log(100) exactly, where the clamp acts.
"""

from __future__ import annotations

import copy
import math
from argparse import Namespace
from functools import partial

import lightning as L
import open_clip
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from open_clip_fixture import TinyCLIP, one_thread  # noqa: F401 (autouse: one thread here)
from open_clip_train.scheduler import cosine_lr
from open_clip_train.train import train_one_epoch
from PIL import Image
from torch.utils.data import DataLoader

from autoglm_train.build import build_model, build_zeroshot
from autoglm_train.data.open_clip_tokenizer import OpenCLIPTokenizer
from autoglm_train.eval.zeroshot import zeroshot_metrics
from autoglm_train.lit.module import DualEncoderModule
from autoglm_train.losses.infonce import InfoNCE
from autoglm_train.losses.objective import Objective
from autoglm_train.model.open_clip import export_open_clip_state_dict
from autoglm_train.train import build_module, core_callbacks, split_trainer_config

STEPS, BATCH, WARMUP, LR, CLIP_NORM = 12, 8, 3, 2e-3, 1.0
PAIRS = 16  # captions drawn again and again, so the model learns and its logit scale is pushed both ways


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyCLIP:
    # CLIP's released weights sit exactly at the clamp (the float32 nearest log 100)
    return TinyCLIP(tmp_path_factory.mktemp("parity"), "tiny-oc-parity", logit_scale=math.log(100))


def fixed_batches(tiny: TinyCLIP) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    images = torch.randn(PAIRS, 3, 32, 32, generator=g)
    tokens = OpenCLIPTokenizer(tiny.name, None, str(tiny.config))(
        [f"shape {i} in colour {i % 5} at cell {i % 3}" for i in range(PAIRS)]
    )
    picks = [torch.randperm(PAIRS, generator=g)[:BATCH] for _ in range(STEPS)]
    return [(images[p], tokens[p]) for p in picks]


class RecordingClipLoss(open_clip.ClipLoss):
    """open_clip's loss, keeping each step's value (train_one_epoch logs it rounded, every N steps)."""

    def __init__(self):
        super().__init__()
        self.values: list[float] = []

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.values.append(sum(out.values()).item())
        return out


class Batches(list):
    """What train_one_epoch reads of open_clip_train's data (a ``DataInfo``, whose module needs pandas):
    ``set_epoch`` and a loader with its counts."""

    @property
    def dataloader(self) -> Batches:
        return self

    def set_epoch(self, epoch: int) -> None:
        pass

    @property
    def num_batches(self) -> int:
        return len(self)

    @property
    def num_samples(self) -> int:
        return len(self) * BATCH


def open_clip_train_run(tiny: TinyCLIP, batches) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One epoch of open_clip_train over ``batches``, set up as its main.py does for these arguments."""
    model = open_clip.create_model(tiny.name, pretrained=str(tiny.weights), output_dict=True)
    # main.py's split: no weight decay where p.ndim < 2 or the name has bn, ln, bias or logit_scale
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kept = [p for n, p in named if p.ndim < 2 or any(k in n for k in ("bn", "ln", "bias", "logit_scale"))]
    decayed = [p for n, p in named if not any(p is q for q in kept)]
    optimizer = torch.optim.AdamW(
        [{"params": kept, "weight_decay": 0.0}, {"params": decayed, "weight_decay": 0.2}],
        lr=LR,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scheduler = cosine_lr(optimizer, LR, WARMUP, len(batches))
    args = Namespace(
        device="cpu",
        precision="fp32",
        distill=False,
        accum_freq=1,
        skip_scheduler=False,
        grad_clip_norm=CLIP_NORM,
        horovod=False,
        rank=0,
        local_rank=0,
        world_size=1,
        batch_size=BATCH,
        log_every_n_steps=100,
        wandb=False,
    )
    loss = RecordingClipLoss()
    data = {"train": Batches(batches)}
    train_one_epoch(model, data, loss, 0, optimizer, None, scheduler, None, args)
    return loss.values, {k: v.detach().clone() for k, v in model.state_dict().items()}


class LossRecorder(L.Callback):
    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs["loss"].item())


def our_run(tiny: TinyCLIP, batches, tmp_path) -> tuple[list[float], dict[str, torch.Tensor], object]:
    """experiment=open_clip_parity with the same settings, through the module and Trainer train.run
    builds (its core callbacks included), over the same batches."""
    cfg = compose_config(
        [
            "experiment=open_clip_parity",
            f"model.name={tiny.name}",
            f"model.pretrained={tiny.weights}",
            f"model.model_config={tiny.config}",
            "model.text_tower.context_length=16",
            f"optimizer.lr={LR}",
            f"scheduler.warmup_steps={WARMUP}",
            f"trainer.max_steps={STEPS}",
            f"trainer.gradient_clip_val={CLIP_NORM}",
            "trainer.precision=32-true",
            "trainer.enable_model_summary=false",
            "logger=none",
            "callbacks=none",
            "progress_bar=false",
        ],
        tmp_path,
    )
    model = build_model(cfg.model, tiny.tokenizer())
    module = build_module(cfg, model)
    recorder = LossRecorder()
    trainer_cfg, _, _ = split_trainer_config(cfg)
    trainer = instantiate(
        trainer_cfg,
        callbacks=[*core_callbacks(), recorder],
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    loader = DataLoader([{"image": i, "text": t} for i, t in batches], batch_size=None)  # in this order
    trainer.fit(module, train_dataloaders=loader)
    return recorder.values, export_open_clip_state_dict(model), module


def test_experiment_trains_step_for_step_as_open_clip_train(tiny, tmp_path):
    batches = fixed_batches(tiny)
    theirs, their_state = open_clip_train_run(tiny, copy.deepcopy(batches))
    ours, our_state, module = our_run(tiny, batches, tmp_path)

    assert len(theirs) == len(ours) == STEPS
    assert max(abs(a - b) for a, b in zip(theirs, ours, strict=True)) <= 1e-5, (theirs, ours)
    assert our_state.keys() == their_state.keys()
    start = torch.load(tiny.weights)
    for key, value in their_state.items():
        assert (our_state[key] - value).abs().max().item() <= 1e-5, key
        if value.is_floating_point():
            assert not torch.equal(value, start[key]), f"{key} never trained: the comparison says nothing"
    # the recipe's knobs really were the ones compared: groups, clipping, a schedule still warming up at 0
    optimizer = module.optimizers().optimizer
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]
    assert optimizer.defaults["fused"] is None and optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    assert module.trainer.gradient_clip_val == CLIP_NORM
    # the scale at log(100): the clamp and the gradient at the cap both acted on what was compared
    assert their_state["logit_scale"].item() <= math.log(100) + 1e-6


def open_clip_name(name: str) -> str:
    """Our parameter's name in open_clip's CLIP (what the export renames it to)."""
    if name == "log_logit_scale":
        return "logit_scale"
    return name.removeprefix("image_tower.").removeprefix("text_tower.")


def test_param_groups_split_as_open_clip_train_does(tiny):
    """Our weight-decay rule and main.py's (by rank and open_clip's name) put every parameter in the same
    group."""
    model = tiny.ours()
    names = {id(p): open_clip_name(n) for n, p in model.named_parameters()}
    reference = dict(tiny.reference().named_parameters())
    assert set(names.values()) == set(reference)
    decayed_group, kept_group = model.param_groups(0.2)
    ours = {names[id(p)] for p in decayed_group["params"]}
    theirs = {
        n
        for n, p in reference.items()
        if not (p.ndim < 2 or any(k in n for k in ("bn", "ln", "bias", "logit_scale")))
    }
    assert ours == theirs and decayed_group["weight_decay"] == 0.2 and kept_group["weight_decay"] == 0.0


def test_the_logit_scale_learns_at_its_cap_and_is_clamped_after_each_step(tiny, tmp_path):
    model = tiny.ours()
    assert model.log_logit_scale.item() == pytest.approx(math.log(100))  # at the cap, as CLIP's weights
    model.logit_scale().backward()
    assert model.log_logit_scale.grad.item() == pytest.approx(100.0, rel=1e-5)  # a plain clamp gives 0
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(1000.0))
    assert model.logit_scale().item() == pytest.approx(100.0)  # the value used never passes the cap

    # the trainer brings the parameter back after its optimizer step (here one that changes nothing)
    module = DualEncoderModule(
        model, Objective({"infonce": InfoNCE()}), optimizer=partial(torch.optim.AdamW, lr=0.0)
    )
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    batch = {"image": torch.randn(4, 3, 32, 32), "text": tiny.tokenizer()(["a"] * 4)}
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    assert model.log_logit_scale.item() == pytest.approx(math.log(100))


@pytest.mark.parametrize("data", ["shapes", "wds", "coco"])
def test_images_follow_a_model_that_takes_one_size(data, tiny, tmp_path, caplog):
    """model=open_clip on every data option: a fixed-size tower gets its own size whatever data.image_size
    says, and the run names the key and both sizes; zero-shot renders go through the same transform."""
    overrides = [
        "model=open_clip",
        f"model.name={tiny.name}",
        f"model.pretrained={tiny.weights}",
        f"model.model_config={tiny.config}",
        "model.text_tower.context_length=16",
        f"data={data}",
        "data.image_size=64",
        "eval.zeroshot.task=shapes",
    ]
    if data != "shapes":
        overrides += ["data.train_shards=none.tar", "data.val_shards=none.tar"]
    cfg = compose_config(overrides, tmp_path)
    model = build_model(cfg.model, tiny.tokenizer())
    datamodule = instantiate(cfg.data)
    with caplog.at_level("WARNING"):
        datamodule.attach(tiny.tokenizer(), model.image_tower.data_config)
    assert datamodule.eval_transform_args["input_size"] == [3, 32, 32]
    assert "data.image_size=64 is not used" in caplog.text and "32x32" in caplog.text
    image = Image.new("RGB", (64, 64))  # what the shapes set renders at data.image_size 64
    assert datamodule.train_transform(image).shape == datamodule.eval_transform(image).shape == (3, 32, 32)
    if data == "shapes":  # zero-shot renders at data.prepare.image_size, through the same transform
        source = build_zeroshot(cfg.eval.zeroshot, cfg.data)
        metrics = zeroshot_metrics(model, tiny.tokenizer(), source, datamodule.eval_transform, 200, "cpu")
        assert 0.0 <= metrics["zeroshot/shape_top1"] <= 1.0

    # a tower that takes any size keeps data.image_size, silently
    caplog.clear()
    datamodule.attach(tiny.tokenizer(), {**model.image_tower.data_config, "fixed_input_size": False})
    assert datamodule.eval_transform_args["input_size"] == [3, 64, 64] and not caplog.text
