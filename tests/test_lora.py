"""LoRA through peft (model/lora.py): only adapters, heads and the temperature learn, locked base weights stay
bitwise as they were, a checkpoint rebuilt from the config loads strictly, and the merged model (no adapter
module left) computes what the adapted one does, in torch, in open_clip's own model and on ONNX Runtime."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from test_open_clip import TinyCLIP

from autoglm_train.config_check import ConfigError, check_train_config
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.lora import has_adapters, merged
from autoglm_train.model.momentum import MomentumEncoder
from autoglm_train.model.towers import ImageTower, TextTower

LORA = {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.0, "targets": {"image": None, "text": None}}


def timm_and_ours(lora=LORA, vocab_size=60, **options):
    torch.manual_seed(0)
    image = ImageTower("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    return DualEncoder(image, TextTower(vocab_size, 32, 2, 2, 16), embed_dim=16, lora=lora, **options)


def hf_text(tmp_path, lora=LORA, **options):
    from transformers import BertConfig, BertModel

    from autoglm_train.model.hf_text import HFTextTower

    if not (tmp_path / "bert" / "config.json").exists():
        torch.manual_seed(1)
        config = BertConfig(
            vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        BertModel(config).save_pretrained(tmp_path / "bert")
    torch.manual_seed(0)
    # zero_init_last=false: timm zeroes each block's last batch-norm scale, which a trained tower has not, and
    # which would leave the block's convolutions (and their adapters) without a gradient
    image = ImageTower("resnet18_narrow", channels_last=True, zero_init_last=False)
    text = HFTextTower(str(tmp_path / "bert"), context_length=16, pad_id=0)
    return DualEncoder(image, text, embed_dim=16, lora=lora, **options)


def inputs(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 60, (n, 16), generator=g)


def contrastive(model, images, tokens):
    image, text, scale = model(images, tokens)
    logits = scale * image @ text.T
    target = torch.arange(len(images))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def is_head(name: str) -> bool:
    return name.startswith(("image_proj.", "text_proj.")) or name == "log_logit_scale"


BUILDERS = {
    # a wholly locked ViT with adapters (eval mode, autograd for the adapters) + our text transformer,
    # under gradient checkpointing
    "timm_vit_locked+ours": lambda tmp: timm_and_ours(lock_image=True, grad_checkpointing=True),
    # a ResNet (convolution adapters, batch norm) whose last group stays fully trainable + HF BERT
    "resnet_unlocked_group+hf": lambda tmp: hf_text(tmp, lock_image=True, lock_image_unlocked_groups=1),
    "open_clip": lambda tmp: TinyCLIP(tmp / "clip", "tiny-lora").ours(lora=LORA),
}


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) if "resnet" in f else f for f in BUILDERS]
)
def test_only_adapters_and_heads_learn_and_the_merged_model_is_the_same(family, tmp_path):
    model = BUILDERS[family](tmp_path)
    assert set(model.lora_towers) == {"image", "text"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = {n for n, _ in model.named_parameters()}  # buffers (batch-norm statistics) aside
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    unlocked = {n for n in trainable if not (is_adapter(n) or is_head(n))}
    if family.startswith("resnet"):  # the lock's last group (the ResNet's last stage) trains fully
        assert unlocked and all(n.startswith("image_tower.backbone.layer4.") for n in unlocked)
    else:
        assert not unlocked
    momentum = MomentumEncoder(model, 0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        optimizer.zero_grad()
        contrastive(model, *inputs(step)).backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
        optimizer.step()
        momentum.update(model, step)

    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        if is_adapter(name) and name.endswith("lora_B.default.weight") or is_head(name):
            assert changed, name  # B starts at zero, so A alone may see no gradient in 3 steps
        elif name in parameters and not is_adapter(name) and name not in unlocked:
            assert not changed, name  # frozen base weights, bit for bit
    # the momentum copy averages the unmerged weights: the same frozen base, its own adapters
    ema = momentum.module.state_dict()
    for name, value in after.items():
        if is_adapter(name) and name.endswith("lora_B.default.weight"):
            assert not torch.equal(ema[name], value), name
        elif name in parameters and not (is_adapter(name) or is_head(name) or name in unlocked):
            assert torch.equal(ema[name], value), name

    model.eval()
    images, tokens = inputs(9)
    with torch.no_grad():  # no-grad eval takes the fused inference paths: they must not skip adapters
        adapted = model(images, tokens)
    with torch.enable_grad():
        for got, want in zip(model(images, tokens)[:2], adapted[:2], strict=True):
            torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=0)
    plain = merged(model)
    assert has_adapters(model) and not has_adapters(plain)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not any(".lora_" in k or ".base_layer." in k for k in plain.state_dict())
    with torch.no_grad():
        merged_out = plain(images, tokens)
    for got, want in zip(merged_out[:2], adapted[:2], strict=True):
        assert (got - want).abs().max() <= 1e-5

    # a checkpoint: the same config rebuilds the same keys, loaded strictly, the same outputs
    again = BUILDERS[family](tmp_path)
    again.load_state_dict(after)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(images, tokens)[0], adapted[0], atol=0, rtol=0)

    if family == "open_clip":  # export_open_clip's state dict is the merged model, in open_clip's own model
        from autoglm_train.model.open_clip import export_open_clip_state_dict

        clip = TinyCLIP(tmp_path / "clip", "tiny-lora")
        torch.save(export_open_clip_state_dict(plain), tmp_path / "exported.pt")
        reference = clip.reference(tmp_path / "exported.pt")
        with torch.no_grad():
            got = F.normalize(reference.encode_image(images), dim=-1)
        assert (got - adapted[0]).abs().max() <= 1e-5


@pytest.mark.slow
def test_the_onnx_export_serves_the_merged_model(tmp_path):
    from autoglm_train.compress.export import export_model
    from autoglm_train.compress.serving import OrtDualEncoder
    from autoglm_train.data.tokenizer import train_bpe

    tokenizer = train_bpe(["a small red circle at the top left", "two blue squares"] * 20, 60, 16, 1)
    model = timm_and_ours(vocab_size=tokenizer.vocab_size)
    for module in model.modules():  # trained-looking adapters (B starts at zero)
        if isinstance(module, LoraLayer):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.2)
    images, _ = inputs(3)
    export_model(model, tokenizer, tmp_path / "fp32", {"input_size": [3, 32, 32]}, images)
    meta = json.loads((tmp_path / "fp32" / "export.json").read_text())
    assert meta["format"] == 2 and has_adapters(model)  # the caller's model keeps its adapters
    served = OrtDualEncoder(tmp_path / "fp32")
    tokens = tokenizer(["a red circle", "two blue squares at the top"])
    model.eval()
    with torch.no_grad():
        assert (served.encode_image(images) - model.encode_image(images)).abs().max() <= 1e-5
        assert (served.encode_text(tokens) - model.encode_text(tokens)).abs().max() <= 1e-5


def test_targets_that_would_not_run_or_match_nothing_are_refused():
    with pytest.raises(ValueError, match="matches no module of the image tower"):
        timm_and_ours({**LORA, "targets": {"image": ["*blocks.*.attn.qkvx"], "text": []}})
    # nn.MultiheadAttention reads out_proj.weight without calling the module: an adapter would never run
    with pytest.raises(ValueError, match="nn.MultiheadAttention"):
        timm_and_ours({**LORA, "targets": {"image": [], "text": ["*self_attn.out_proj"]}})
    with pytest.raises(ValueError, match="LoRA adapts nn.Linear and nn.Conv2d"):
        timm_and_ours({**LORA, "targets": {"image": ["*blocks.0.norm1"], "text": []}})
    with pytest.raises(ValueError, match="model.lora.targets.image=\\[\\]"):
        timm_and_ours(lock_image=True, cache_locked_features=True)
    # text only: the locked image tower's features still cache
    model = timm_and_ours({**LORA, "targets": {"image": [], "text": None}}, lock_image=True)
    assert model.lora_towers == ("text",) and not has_adapters(model.image_tower)
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    assert copy.deepcopy(model).image_tower.locked


def test_lora_keys_are_checked_at_start_up(tiny_cfg):
    check_train_config(tiny_cfg("model.lora.enabled=true", "model.lora.targets.text=[]"))
    cfg = tiny_cfg(
        "model.lora.enabled=true",
        "model.lora.rank=0",
        "model.lora.dropout=1.0",
        "model.lora.targets.image=qkv",
        "model.lock_image=true",
        "model.cache_locked_features=true",
        "data.augment=null",
    )
    with pytest.raises(ConfigError) as error:
        check_train_config(cfg)
    message = str(error.value)
    for expected in (
        "model.lora.rank=0",
        "model.lora.dropout=1.0",
        "model.lora.targets.image=qkv",
        "the image tower's LoRA adapters change its output every step",
    ):
        assert expected in message, message
    with pytest.raises(ConfigError, match="LoRA is not combined with FSDP"):
        check_train_config(tiny_cfg("model.lora.enabled=true", "trainer=fsdp_cpu", "trainer.devices=2"))


@pytest.mark.slow
def test_a_lora_run_resumes_and_evaluate_scores_its_checkpoint(shapes_dir, tmp_path, monkeypatch):
    from conftest import TINY, train_run
    from test_evaluate import RETRIEVAL, evaluate_run

    from autoglm_train.model.weights import load_checkpoint

    monkeypatch.setenv("AUTOGLM_DATA_DIR", str(shapes_dir))
    lora = ["model.lora.enabled=true", "eval.zeroshot.task=null"]
    trained = train_run([*TINY, *lora, "trainer.max_steps=4"], tmp_path / "train")
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    state = load_checkpoint(ckpt)["state_dict"]
    assert any(".lora_B." in k for k in state) and any(".base_layer." in k for k in state)
    scored = evaluate_run([f"ckpt={ckpt}"], tmp_path / "eval")
    for key in RETRIEVAL:
        assert scored[key] == pytest.approx(trained[key], abs=1e-9), key
    # resumed from it (the same config rebuilds the same adapters): two more steps, the base untouched
    train_run([*TINY, *lora, "trainer.max_steps=6", f"ckpt_path={ckpt}"], tmp_path / "resumed")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 6
    for name, value in state.items():
        if (
            name.startswith("model.image_tower.")
            and ".lora_" not in name
            and "running_" not in name
            and "num_batches" not in name
        ):
            assert torch.equal(resumed["state_dict"][name], value), name
