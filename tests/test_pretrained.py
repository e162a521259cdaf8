"""Towers from weights (timm checkpoint files, timm releases from the Hugging Face cache, Hugging Face text
encoders from a local directory), locking, layer-wise learning-rate decay, and the memory/speed switches.

No network: every model is tiny, randomly initialised, and saved to the test's temp dir (or a fake hub
cache laid out as huggingface_hub lays it out), then loaded through the configs as a user's weights are.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from conftest import TINY
from safetensors.torch import save_file

from autoglm_train.data.shapes import COLOURS, COLS, ROWS, SHAPES, SIZES
from autoglm_train.data.tokenizer import CaptionTokenizer
from autoglm_train.lit.grad_cache import grad_cache_step
from autoglm_train.losses.infonce import infonce_loss
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.hf_text import HFTextTower
from autoglm_train.model.towers import ImageTower, TextTower
from autoglm_train.model.weights import MissingWeightsError

# the text tower's own keys: a Hugging Face tower has others
TINY_NO_TEXT = [o for o in TINY if not o.startswith("model.text_tower.")]


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT and a WordPiece tokenizer over the shapes captions' words, saved as a local model."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["a", "at", "the", "and", *COLOURS, *SHAPES, *SIZES, *ROWS, *COLS]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words)))}
    out = tmp_path_factory.mktemp("bert")
    BertTokenizerFast(vocab=vocab).save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(out)
    return out


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline machine whose Hugging Face cache holds nothing."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay files out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/<file>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        (snapshot / name).write_bytes(src.read_bytes())


def resnet_file(tmp_path: Path, suffix: str = ".safetensors", name: str = "resnet18") -> tuple[Path, dict]:
    """A ResNet as timm saves it: with its 10-class classifier (the tower drops it). The default job's
    tower is ``resnet18_narrow``."""
    torch.manual_seed(1)
    state = timm.create_model(name, num_classes=10).state_dict()
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path, state


# --- image towers from weights ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_image_tower_loads_a_local_file_without_its_classifier(tmp_path, suffix):
    path, state = resnet_file(tmp_path, suffix)
    tower = ImageTower("resnet18", checkpoint=str(path))
    loaded = tower.backbone.state_dict()
    assert "fc.weight" not in loaded
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_strict_loading_names_the_keys_and_lenient_loading_reports_them(tmp_path, caplog):
    _, state = resnet_file(tmp_path)
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"1 missing \(layer4.1.bn2.weight\), 1 unexpected \(extra.weight\)"):
        ImageTower("resnet18", checkpoint=str(path))
    with caplog.at_level(logging.WARNING):
        tower = ImageTower("resnet18", checkpoint=str(path), strict=False)
    assert "layer4.1.bn2.weight" in caplog.text and "strict=false" in caplog.text
    assert torch.equal(tower.backbone.conv1.weight, state["conv1.weight"])


def test_timm_release_loads_from_the_local_hub_cache_with_its_preprocessing(tmp_path, empty_hub_cache):
    torch.manual_seed(2)
    state = timm.create_model("test_vit", num_classes=0).state_dict()
    save_file(state, str(tmp_path / "model.safetensors"))
    put_in_hub_cache(
        empty_hub_cache, "timm/test_vit.r160_in1k", {"model.safetensors": tmp_path / "model.safetensors"}
    )
    tower = ImageTower("test_vit.r160_in1k", pretrained=True)
    for key, value in tower.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    config = tower.data_config
    assert config["input_size"] == (3, 160, 160)  # the weights' own size, mean and std reach the transform

    from autoglm_train.lit.datamodule import ShardDataModule

    datamodule = ShardDataModule(None, None, image_size=None)
    datamodule.attach(None, config)
    assert datamodule.eval_transform_args["input_size"] == [3, 160, 160]
    assert datamodule.eval_transform_args["mean"] == config["mean"]


def test_missing_weights_offline_fail_before_any_data_is_made(tiny_cfg, tmp_path, empty_hub_cache):
    from autoglm_train import train

    fresh = tmp_path / "fresh_data"
    cfg = tiny_cfg(
        "model.image_tower.name=resnet18",
        "model.image_tower.pretrained=true",
        f"data.prepare.out_dir={fresh}",
    )
    with pytest.raises(MissingWeightsError) as error:
        train.run(cfg)
    message = str(error.value)
    assert "resnet18" in message and str(empty_hub_cache) in message and "HF_HUB_OFFLINE=1" in message
    assert "On a machine with network" in message
    assert not fresh.exists()


def test_missing_text_tower_weights_offline_fail_before_any_data_is_made(tmp_path, empty_hub_cache):
    from conftest import compose_config

    from autoglm_train import train

    fresh = tmp_path / "fresh_data"
    cfg = compose_config(
        [*TINY_NO_TEXT, "model/text_tower=hf", "model.text_tower.name=bert-base-uncased"]
        + [f"data.prepare.out_dir={fresh}"],
        tmp_path / "run",
    )
    with pytest.raises(MissingWeightsError, match=r"bert-base-uncased.*weights not found") as error:
        train.run(cfg)
    assert str(empty_hub_cache) in str(error.value) and "hf download bert-base-uncased" in str(error.value)
    assert not fresh.exists()


@pytest.mark.parametrize(
    ("experiment", "names"),
    [("coco_finetune", ["ViT-B-16", "openai"]), ("coco_lit", ["vit_base_patch16_224.augreg2_in21k_ft_in1k"])],
)
def test_fine_tuning_recipes_without_weights_fail_at_once_naming_them(
    experiment, names, tmp_path, empty_hub_cache
):
    from conftest import compose_config

    from autoglm_train import train

    cfg = compose_config([f"experiment={experiment}", f"paths.data_dir={tmp_path / 'd'}"], tmp_path / "run")
    with pytest.raises(MissingWeightsError) as error:
        train.run(cfg)
    assert all(name in str(error.value) for name in names) and str(empty_hub_cache) in str(error.value)
    assert not (tmp_path / "d").exists()


def test_shapes_lit_without_a_checkpoint_says_what_is_missing(tmp_path):
    from conftest import compose_config

    from autoglm_train import train

    cfg = compose_config(
        ["experiment=shapes_lit", f"data.prepare.out_dir={tmp_path / 'd'}"], tmp_path / "run"
    )
    with pytest.raises(
        ValueError, match=r"lock_image=true would freeze .* model.image_tower.checkpoint=PATH"
    ):
        train.run(cfg)
    assert not (tmp_path / "d").exists()


# --- Hugging Face text towers -----------------------------------------------------------------------------
def test_hf_text_tower_pools_cls_mean_and_eos_ignoring_padding(bert_dir):
    from transformers import BertModel

    reference = BertModel.from_pretrained(bert_dir).eval()
    tokenizer = CaptionTokenizer.from_pretrained(str(bert_dir), context_length=16)
    tokens = tokenizer(["a small red circle at the top left", "a large blue square"])
    assert tokens.shape == (2, 16) and tokenizer.pad_id == 0
    assert tokenizer.decode(tokens[1]) == "a large blue square"  # no [UNK]: the tokenizer is the model's
    mask = tokens != 0
    hidden = reference(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    lengths = mask.sum(1)
    with torch.no_grad():
        cls = HFTextTower(str(bert_dir), pool="cls", context_length=16).eval()(tokens)
        mean = HFTextTower(str(bert_dir), pool="mean", context_length=16).eval()(tokens)
        eos = HFTextTower(str(bert_dir), pool="eos", context_length=16).eval()(tokens)
        mean_shorter = HFTextTower(str(bert_dir), pool="mean", context_length=16).eval()(tokens[:, :12])
    torch.testing.assert_close(cls, hidden[:, 0], atol=1e-5, rtol=0)
    expected_mean = (hidden * mask.unsqueeze(-1)).sum(1) / lengths.unsqueeze(-1)
    torch.testing.assert_close(mean, expected_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(mean_shorter, mean, atol=1e-5, rtol=0)  # padding length does not matter
    assert tokens[0, lengths[0] - 1] == tokenizer._tok.token_to_id("[SEP]")
    torch.testing.assert_close(eos, hidden[torch.arange(2), lengths - 1], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_hf_text_tower_trains_through_the_configs_with_its_tokenizer_saved(bert_dir, shapes_dir, tmp_path):
    from conftest import train_run

    from autoglm_train.compress.load import load_trained
    from autoglm_train.data.tokenizer import tokenizer_from_json

    os.environ["AUTOGLM_DATA_DIR"] = str(shapes_dir)
    try:
        metrics = train_run(
            [*TINY_NO_TEXT, "model/text_tower=hf", f"model.text_tower.name={bert_dir}"]
            + [
                "model.text_tower.context_length=24",
                "model.lock_text=true",
                "model.lock_text_unlocked_layers=1",
            ]
            + ["trainer.max_steps=4", "eval.zeroshot.task=null"],
            tmp_path / "run",
        )
    finally:
        os.environ.pop("AUTOGLM_DATA_DIR")
    assert metrics["train/steps"] == 4
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    hf = CaptionTokenizer.from_pretrained(str(bert_dir), 24)
    saved = tokenizer_from_json(state["tokenizer_json"], 24)
    caption = ["a small cyan diamond at the bottom right"]
    assert torch.equal(saved(caption), hf(caption))
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    # locked: embeddings and layer 0 exactly as saved; the unlocked last layer has moved
    from transformers import BertModel

    original = BertModel.from_pretrained(bert_dir).state_dict()
    trained = {
        k[len("model.text_tower.model.") :]: v for k, v in state["state_dict"].items() if ".text_tower." in k
    }
    for key, value in trained.items():
        if key.startswith(("embeddings.", "encoder.layer.0.")):
            assert torch.equal(value, original[key]), key
        elif key.startswith("encoder.layer.1.") and key.endswith("weight"):
            assert not torch.equal(value, original[key]), key
    # the checkpoint is usable alone: model and tokenizer back from it
    back = load_trained(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert torch.equal(back.tokenizer(caption), hf(caption))


# --- locking ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_locked_image_tower_from_a_checkpoint_is_bitwise_unchanged_and_the_rest_moves(tiny_cfg, tmp_path):
    """LiT as shapes_lit does it, with the last group left trainable: every locked parameter keeps its
    loaded value exactly, every trainable one has moved."""
    from autoglm_train import train

    path, state = resnet_file(tmp_path, name="resnet18_narrow")
    cfg = tiny_cfg(
        f"model.image_tower.checkpoint={path}",
        "model.lock_image=true",
        "model.lock_image_unlocked_groups=1",
        "model.lock_image_freeze_bn=true",
        "trainer.max_steps=6",
        "eval.zeroshot.task=null",
    )
    train.run(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    prefix = "model.image_tower.backbone."
    last_group = ("layer4.1.",)  # timm's finest grouping of a ResNet-18: stem, 8 blocks; the last one trains
    for key in state:
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        after = ckpt[prefix + key]
        if key.startswith(last_group) and key.endswith("weight") and "bn" not in key:
            assert not torch.equal(after, state[key]), key
        elif not key.startswith(last_group):
            assert torch.equal(after, state[key]), key  # weights and batch-norm statistics alike
    for key in ("model.image_proj.weight", "model.text_tower.token_embedding.weight"):
        assert key in ckpt

    # a requeued job resumes from its checkpoint even when the weights file has gone since
    path.unlink()
    resumed = tiny_cfg(
        f"model.image_tower.checkpoint={path}",
        "model.lock_image=true",
        "model.lock_image_unlocked_groups=1",
        "model.lock_image_freeze_bn=true",
        "trainer.max_steps=8",
        "eval.zeroshot.task=null",
        f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
        output_dir=tmp_path / "resumed",
    )
    assert train.run(resumed)["train/steps"] == 8
    again = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key in state:
        if not key.startswith(("fc.", *last_group)) and not key.endswith("num_batches_tracked"):
            assert torch.equal(again[prefix + key], state[key]), key  # still locked, still as loaded


def test_lock_puts_frozen_parameters_out_of_the_optimizer_and_keeps_the_locked_tower_in_eval():
    model = DualEncoder(
        ImageTower("resnet18"),
        TextTower(30, 32, 2, 2, 8),
        embed_dim=16,
        lock_image=True,
        lock_text=True,
        lock_text_unlocked_layers=1,
    )
    model.train()
    assert not model.image_tower.backbone.training and not model.image_tower.backbone.bn1.training
    trained = {id(p) for g in model.param_groups(0.1) for p in g["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in trained]
    assert not any(n.startswith("image_tower.") for n in names)
    assert not any(
        n.startswith(("text_tower.token_embedding", "text_tower.encoder.layers.0.")) for n in names
    )
    assert any(n.startswith("text_tower.encoder.layers.1.") for n in names)
    assert {"image_proj.weight", "text_proj.weight", "text_tower.final_norm.weight"} <= set(names)
    images = torch.randn(2, 3, 32, 32)
    assert not model.image_tower(images).requires_grad  # a wholly locked tower runs without autograd


@pytest.mark.slow
def test_two_gloo_ranks_train_a_locked_tower_with_powersgd(shapes_dir, tmp_path):
    """And with gradient checkpointing and gradient caching on top: no unused-parameter errors."""
    weights, _ = resnet_file(tmp_path, name="resnet18_narrow")
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "AUTOGLM_DATA_DIR": str(shapes_dir), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "autoglm_train", *TINY, "trainer=ddp_cpu", "compression=powersgd"]
    # rank 2: at the default rank 16 the tiny model's matrices are too small to be worth compressing
    args += ["compression.start_iter=2", "compression.rank=2", "model.lock_image=true"]
    args += [f"model.image_tower.checkpoint={weights}"]
    args += ["model.lock_text=true", "model.grad_checkpointing=true", "trainer.grad_cache_chunks=2"]
    args += ["model.lock_text_unlocked_layers=1", "trainer.max_steps=4", "trainer.log_every_n_steps=1"]
    args += ["eval.zeroshot.task=null", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(
        args, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=400
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "DDP comm hook powerSGD_hook attached" in out
    assert "PowerSGD rank 2 from step 2: " in out and "fewer bytes)" in out  # what it compresses, logged
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 4
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    ratios = [float(r) for row in logged[1:] if (r := row.split(",")[header.index("comm/ratio")])]
    assert ratios and min(ratios) < 0.5  # compressed once PowerSGD started; frozen weights never sent


# --- layer-wise learning-rate decay -------------------------------------------------------------------------
def test_layer_decay_scales_each_depth_and_leaves_heads_at_the_base_rate():
    from functools import partial

    from autoglm_train.lit.module import DualEncoderModule
    from autoglm_train.losses.infonce import InfoNCE
    from autoglm_train.losses.objective import Objective

    model = DualEncoder(ImageTower("resnet18"), TextTower(30, 32, 2, 2, 8), embed_dim=16)
    module = DualEncoderModule(
        model,
        Objective({"infonce": InfoNCE()}),
        optimizer=partial(torch.optim.AdamW, lr=1.0, weight_decay=0.1),
        text_layer_decay=0.5,
        image_layer_decay=0.8,
    )
    module.trainer = type("T", (), {"max_steps": 10})()
    optimizer = module.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    # text depth 2: embeddings 0, layers 1..2, final norm 3 -> 0.5^3, 0.5^2, 0.5, 1
    assert lr_of[id(named["text_tower.token_embedding.weight"])] == pytest.approx(0.125)
    assert lr_of[id(named["text_tower.encoder.layers.0.linear1.weight"])] == pytest.approx(0.25)
    assert lr_of[id(named["text_tower.encoder.layers.1.linear1.weight"])] == pytest.approx(0.5)
    assert lr_of[id(named["text_tower.final_norm.weight"])] == pytest.approx(1.0)
    # resnet18 in timm's fine grouping: stem 0, 8 blocks, the last block at the top
    assert lr_of[id(named["image_tower.backbone.conv1.weight"])] == pytest.approx(0.8**8)
    assert lr_of[id(named["image_tower.backbone.layer4.1.conv2.weight"])] == pytest.approx(1.0)
    assert lr_of[id(named["image_proj.weight"])] == 1.0 and lr_of[id(named["log_logit_scale"])] == 1.0
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays[id(named["text_tower.final_norm.weight"])] == 0.0
    assert decays[id(named["text_tower.encoder.layers.0.linear1.weight"])] == 0.1
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)


# --- memory and speed switches ------------------------------------------------------------------------------
def small_model(dropout: float = 0.1, **kwargs) -> DualEncoder:
    torch.manual_seed(0)
    image = ImageTower("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    return DualEncoder(image, TextTower(50, 32, 2, 2, 8, dropout=dropout), embed_dim=16, **kwargs)


def batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 50, (6, 8), generator=g)
    tokens[:, 6:] = 0
    return torch.randn(6, 3, 32, 32, generator=g), tokens


def loss_and_grads(model, images, tokens):
    torch.manual_seed(5)  # the same dropout draws in both runs
    image, text, scale = model(images, tokens)
    loss = infonce_loss(image, text, image, text, scale)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(bert_dir):
    plain, checkpointed = small_model(), small_model(grad_checkpointing=True)
    assert checkpointed.text_tower.grad_checkpointing and checkpointed.image_tower.backbone.grad_checkpointing
    images, tokens = batch()
    loss, grads = loss_and_grads(plain.train(), images, tokens)
    loss_c, grads_c = loss_and_grads(checkpointed.train(), images, tokens)
    assert loss_c == pytest.approx(loss.item(), abs=1e-6)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
    # the Hugging Face tower's own switch
    hf = HFTextTower(str(bert_dir), context_length=8)
    hf.set_grad_checkpointing(True)
    assert hf.model.is_activation_checkpointing


def test_gradient_checkpointing_with_gradient_caching_equals_the_full_batch():
    # no dropout: chunked passes draw other dropout masks than one full pass
    images, tokens = batch()
    _, reference = loss_and_grads(small_model(dropout=0.0).train(), images, tokens)

    def loss_fn(image, text, scale):
        return {"loss": infonce_loss(image, text, image, text, scale)}

    grads = {}
    for checkpointing in (False, True):
        model = small_model(dropout=0.0, grad_checkpointing=checkpointing).train()
        grad_cache_step(model, images, tokens, 2, loss_fn, [], lambda surrogate, last: surrogate.backward())
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters()}
    for name, ref in reference.items():
        # checkpointing changes nothing in the chunked computation
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-7, rtol=1e-6, msg=name)
        # chunks sum in another order than one pass: float32 rounding, relative to the gradient's scale
        scale = float(ref.abs().max())
        torch.testing.assert_close(grads[True][name], ref, atol=1e-5 * scale, rtol=0, msg=name)


def test_patch_dropout_acts_in_training_only_and_needs_a_vit():
    torch.manual_seed(0)
    plain = ImageTower("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    dropping = ImageTower("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, patch_dropout=0.5)
    dropping.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dropping.eval()(images), plain.eval()(images))
    seen = []
    hook = dropping.backbone.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    dropping.train()(images)
    hook.remove()
    assert seen == [1 + 8]  # the class token and half of the 16 patches
    with pytest.raises(ValueError, match="patch_dropout needs a ViT"):
        ImageTower("resnet18", patch_dropout=0.5)


@pytest.mark.slow
def test_bf16_mixed_precision_trains_on_cpu(tiny_cfg, monkeypatch, tmp_path):
    """The towers really compute in bfloat16 under Lightning's CPU autocast, and the loss stays finite."""
    from autoglm_train import train

    seen: set[torch.dtype] = set()
    build = train.build_model

    def recording_build(*args, **kwargs):
        model = build(*args, **kwargs)
        # the text tower ends in a LayerNorm, which autocast keeps in float32: look at a Linear inside it
        for module in (model.image_tower, model.text_tower.encoder.layers[0].linear1):
            module.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
        return model

    monkeypatch.setattr(train, "build_model", recording_build)
    cfg = tiny_cfg(
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "eval.zeroshot.task=null",
    )
    metrics = train.run(cfg)
    assert metrics["train/steps"] == 3
    assert seen == {torch.bfloat16}
    logged = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    losses = [float(r) for row in logged[1:] if (r := row.split(",")[header.index("train/loss")])]
    assert losses and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
def test_compiled_towers_give_the_eager_outputs_and_keep_state_dict_keys():
    eager, compiled = small_model().eval(), small_model(compile=True).eval()
    assert eager.state_dict().keys() == compiled.state_dict().keys()
    images, tokens = batch()
    with torch.no_grad():
        for a, b in zip(eager(images, tokens)[:2], compiled(images, tokens)[:2], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_deepcopy_of_a_locked_model_stays_locked():
    # the momentum encoder deep-copies the model
    model = small_model(lock_image=True)
    assert copy.deepcopy(model).image_tower.locked
