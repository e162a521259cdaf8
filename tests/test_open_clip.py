"""open_clip models as our model family: the towers compute exactly what open_clip computes, the export
loads back into open_clip, locking follows open_clip's groups, and missing weights fail clearly offline.

Every model here is a tiny open_clip architecture registered from a JSON written by the test (random
weights saved to a file): nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import open_clip
import pytest
import timm.data
import torch
from conftest import compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from open_clip_fixture import TinyCLIP, one_thread  # noqa: F401 (autouse: one thread here)

from autoglm_train.data.open_clip_tokenizer import OpenCLIPTokenizer, is_open_clip_tokenizer_json
from autoglm_train.export_open_clip import main as export_main
from autoglm_train.export_open_clip import trained_logit_bias
from autoglm_train.model import open_clip as ours
from autoglm_train.model.open_clip import (
    check_open_clip_weights,
    export_open_clip_state_dict,
    open_clip_load_call,
    open_clip_model,
)
from autoglm_train.model.weights import MissingWeightsError

CAPTIONS = ["a small red circle at the top left", "two blue squares!", "a large green diamond"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyCLIP:
    return TinyCLIP(tmp_path_factory.mktemp("tiny"), "tiny-oc-test")


@pytest.fixture(scope="module")
def tiny_custom_text(tmp_path_factory) -> TinyCLIP:
    return TinyCLIP(tmp_path_factory.mktemp("tiny_custom"), "tiny-oc-test-custom", custom_text=True)


def inputs(tiny: TinyCLIP):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return images, tiny.tokenizer()(CAPTIONS)


def assert_same_embeddings(model, reference, images, tokens) -> None:
    with torch.no_grad():
        image_diff = model.encode_image(images) - reference.encode_image(images, normalize=True)
        text_diff = model.encode_text(tokens) - reference.encode_text(tokens, normalize=True)
    assert image_diff.abs().max() <= 1e-5 and text_diff.abs().max() <= 1e-5


@pytest.mark.parametrize("which", ["tiny", "tiny_custom_text"])
def test_towers_compute_what_open_clip_computes(which, request):
    tiny = request.getfixturevalue(which)
    model, reference = tiny.ours().eval(), tiny.reference()
    images, tokens = inputs(tiny)
    assert_same_embeddings(model, reference, images, tokens)
    assert model.logit_scale().item() == pytest.approx(reference.logit_scale.exp().item(), rel=1e-6)
    assert model.image_tower.width == model.text_tower.width == model.embed_dim == 32
    assert model.text_tower.context_length == 16
    # the image half lives in the image tower only
    assert not any(n.startswith("visual") for n, _ in model.text_tower.named_parameters())


@pytest.mark.parametrize("which", ["tiny", "tiny_custom_text"])
def test_export_loads_in_open_clip_before_and_after_training(which, request, tmp_path):
    tiny = request.getfixturevalue(which)
    model = tiny.ours()
    images, tokens = inputs(tiny)
    before = tmp_path / "before.pt"
    torch.save(export_open_clip_state_dict(model), before)
    assert_same_embeddings(model.eval(), tiny.reference(before), images, tokens)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        image_emb, text_emb, scale = model(images, tokens)
        logits = scale * image_emb @ text_emb.T
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(images)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = tmp_path / "after.pt"
    torch.save(export_open_clip_state_dict(model), after)
    exported, original = torch.load(after), torch.load(tiny.weights)
    assert exported.keys() == original.keys()
    assert not torch.equal(exported["visual.proj"], original["visual.proj"])
    assert exported["logit_scale"].shape == original["logit_scale"].shape
    reference = tiny.reference(after)
    assert_same_embeddings(model.eval(), reference, images, tokens)
    assert reference.logit_scale.exp().item() == pytest.approx(model.logit_scale().item(), rel=1e-6)


def test_tokenizer_pickles_and_round_trips_through_json(tiny, tmp_path):
    tokenizer = tiny.tokenizer()
    tokens = tokenizer(CAPTIONS)
    assert tokens.dtype == torch.long and tokens.shape == (3, 16)
    assert tokenizer.context_length == 16 and tokenizer.pad_id == 0 and tokenizer.vocab_size == 49408
    assert tokenizer.decode(tokens[0]) == CAPTIONS[0]
    assert torch.equal(tokenizer("two blue squares!"), tokens[1:2])

    text = tokenizer.to_json()
    assert json.loads(text) == {
        "open_clip_tokenizer": tiny.name,
        "context_length": 16,
        "model_config": str(tiny.config.resolve()),
    }
    assert is_open_clip_tokenizer_json(text)
    assert not is_open_clip_tokenizer_json('{"version": "1.0", "model": {}}')
    assert not is_open_clip_tokenizer_json("not json")
    assert torch.equal(OpenCLIPTokenizer.from_spec(json.loads(text))(CAPTIONS), tokens)
    tokenizer.save(tmp_path / "tokenizer.json")
    assert is_open_clip_tokenizer_json((tmp_path / "tokenizer.json").read_text())

    blob = pickle.dumps(tokenizer)
    assert len(blob) < 1000  # workers receive the spec, not the vocabulary
    assert torch.equal(pickle.loads(blob)(CAPTIONS), tokens)


def test_locked_image_tower_is_frozen_and_stays_in_eval_mode(tiny):
    model = tiny.ours(lock_image=True).train()
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    assert model.image_tower.locked and not model.image_tower.visual.training
    assert model.text_tower.training and all(p.requires_grad for p in model.text_tower.parameters())
    images, tokens = inputs(tiny)
    image_emb, text_emb, _ = model(images, tokens)
    assert not image_emb.requires_grad and text_emb.requires_grad


def test_lock_text_with_one_unlocked_layer_trains_the_last_block_norm_and_projection(tiny):
    model = tiny.ours(lock_text=True, lock_text_unlocked_layers=1).train()
    trainable = {n for n, p in model.text_tower.named_parameters() if p.requires_grad}
    last_block = {
        n for n, _ in model.text_tower.named_parameters() if n.startswith("transformer.resblocks.1.")
    }
    assert trainable == last_block | {"ln_final.weight", "ln_final.bias", "text_projection"}
    assert not model.text_tower.locked and model.text_tower.training

    locked = tiny.ours(lock_text=True).train()
    assert locked.text_tower.locked and not locked.text_tower.training
    assert not any(p.requires_grad for p in locked.text_tower.parameters())
    assert all(p.requires_grad for p in locked.image_tower.parameters())


def test_partial_image_lock_uses_open_clip_groups(tiny):
    # open_clip's ViT groups from the end: [proj], [last block, ln_post], earlier blocks, embeddings
    model = tiny.ours(lock_image=True, lock_image_unlocked_groups=2)
    trainable = {n for n, p in model.image_tower.named_parameters() if p.requires_grad}
    assert "visual.proj" in trainable and "visual.ln_post.weight" in trainable
    assert any(n.startswith("visual.transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith(("visual.transformer.resblocks.0.", "visual.conv1")) for n in trainable)
    assert not model.image_tower.locked


def test_protocol_data_config_and_layer_ids(tiny):
    model = tiny.ours()
    data = model.image_tower.data_config
    assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == 1.0
    assert data["interpolation"] == "bicubic" and data["mean"] == open_clip.OPENAI_DATASET_MEAN
    assert timm.data.resolve_data_config(model.image_tower.pretrained_cfg)["std"] == data["std"]

    image_ids, image_layers = model.image_tower.layer_ids()
    assert image_layers == 3 and image_ids["visual.conv1.weight"] == 0
    assert (
        image_ids["visual.transformer.resblocks.1.attn.in_proj_weight"] == 2 and image_ids["visual.proj"] == 3
    )
    text_ids, text_layers = model.text_tower.layer_ids()
    assert text_layers == 3 and text_ids["token_embedding.weight"] == 0 and text_ids["text_projection"] == 3
    assert set(image_ids) == {n for n, _ in model.image_tower.named_parameters()}
    assert set(text_ids) == {n for n, _ in model.text_tower.named_parameters()}
    scales = model.lr_scales(image_layer_decay=0.5, text_layer_decay=0.5)
    assert scales["image_tower.visual.conv1.weight"] == 0.125 and scales["text_tower.text_projection"] == 1.0


def test_patch_dropout_and_grad_checkpointing_keep_eval_outputs(tiny):
    model = tiny.ours(grad_checkpointing=True, image_tower={"patch_dropout": 0.5})
    assert model.image_tower.visual.transformer.grad_checkpointing
    assert model.text_tower.transformer.grad_checkpointing
    images, tokens = inputs(tiny)
    image_emb, text_emb, _ = model.train()(images, tokens)
    (image_emb.sum() + text_emb.sum()).backward()
    assert model.image_tower.visual.proj.grad is not None
    assert_same_embeddings(model.eval(), tiny.reference(), images, tokens)  # no patch is dropped in eval


def test_weights_trained_with_quick_gelu_get_it(tiny, monkeypatch):
    """open_clip 3.x only warns when a tag's QuickGELU is missing from the architecture (ViT-B-32 + openai):
    we ask for it, and the export says how to load it."""
    assert ours.wants_quick_gelu("ViT-B-32", open_clip.get_pretrained_cfg("ViT-B-32", "openai"))
    assert not ours.wants_quick_gelu("ViT-B-32-quickgelu", open_clip.get_pretrained_cfg("ViT-B-32", "openai"))
    monkeypatch.setattr(ours, "check_open_clip_weights", lambda *args: {"quick_gelu": True})
    model = tiny.ours().eval()
    assert isinstance(model.text_tower.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert "force_quick_gelu=True" in open_clip_load_call(model.open_clip_spec, "x.pt")
    assert_same_embeddings(model, tiny.reference(force_quick_gelu=True), *inputs(tiny))


def test_architecture_without_weights_follows_the_tag(tiny, monkeypatch):
    """``load_weights=False`` (a checkpoint of ours is loaded next): the tag's QuickGELU and preprocessing,
    random weights, and the weights are neither read nor checked."""
    tag = {"quick_gelu": True, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "hf_hub": "nobody/nothing/"}
    monkeypatch.setattr(ours, "tag_config", lambda name, pretrained: tag)
    model = open_clip_model(tiny.name, "some-tag", str(tiny.config), load_weights=False)
    assert isinstance(model.text_tower.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert model.image_tower.data_config["mean"] == (0.5, 0.5, 0.5)
    assert model.open_clip_spec.force_quick_gelu and model.open_clip_spec.pretrained == "some-tag"
    assert not torch.equal(model.image_tower.visual.proj, torch.load(tiny.weights)["visual.proj"])


def test_export_of_a_model_with_a_logit_bias(tmp_path):
    """SigLIP-style models: a (1,)-shaped scale and a bias; the trained bias replaces the loaded one."""
    tiny = TinyCLIP(tmp_path, "tiny-oc-test-bias", init_logit_bias=-10.0, nonscalar_logit_scale=True)
    model = tiny.ours()
    assert model.text_tower.logit_bias.item() == -10.0
    torch.save(export_open_clip_state_dict(model, logit_bias=torch.tensor(-7.5)), tmp_path / "out.pt")
    reference = tiny.reference(tmp_path / "out.pt")
    assert reference.logit_bias.shape == (1,) and reference.logit_bias.item() == -7.5
    assert reference.logit_scale.exp().item() == pytest.approx(model.logit_scale().item(), rel=1e-6)
    assert export_open_clip_state_dict(model)["logit_bias"].item() == -10.0


def test_timm_trunk_locks_and_keeps_its_statistics(tmp_path):
    """open_clip's TimmModel: lock(0) freezes the trunk and leaves its head trainable, as open_clip does;
    the frozen trunk runs in eval mode like our locked backbone. Layer ids follow timm's grouping."""
    vision = {"timm_model_name": "resnet18", "timm_pool": "avg", "timm_proj": "linear", "image_size": 32}
    tiny = TinyCLIP(tmp_path, "tiny-oc-test-timm", vision_cfg=vision)
    model = tiny.ours(lock_image=True, lock_image_freeze_bn=True).train()
    trainable = [n for n, p in model.image_tower.named_parameters() if p.requires_grad]
    assert trainable == ["visual.head.proj.weight"] and not model.image_tower.visual.trunk.training
    ids, layers = model.image_tower.layer_ids()
    assert set(ids) == {n for n, _ in model.image_tower.named_parameters()}
    assert ids["visual.trunk.conv1.weight"] == 0 and ids["visual.head.proj.weight"] == layers
    assert_same_embeddings(model.eval(), tiny.reference(), *inputs(tiny))


def test_bad_settings_are_errors_naming_the_key(tiny):
    with pytest.raises(ValueError, match="model.text_tower.context_length=77"):
        tiny.ours(text_tower={"context_length": 77})
    with pytest.raises(ValueError, match="model.image_tower: unknown keys"):
        tiny.ours(image_tower={"patch_drop": 0.1})
    with pytest.raises(ValueError, match=r"model\.name='ViT-Q-99'.*open_clip\.list_models\(\)"):
        check_open_clip_weights("ViT-Q-99", None)


def test_missing_weights_file_and_unknown_tag_are_clear_errors(tiny, tmp_path):
    missing = tmp_path / "nowhere" / "weights.pt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        check_open_clip_weights(tiny.name, str(missing), str(tiny.config))
    with pytest.raises(ValueError, match="'laion9b'.*known: openai"):
        check_open_clip_weights("ViT-B-32", "laion9b")
    with pytest.raises(FileNotFoundError, match="model.model_config"):
        check_open_clip_weights(tiny.name, None, str(tmp_path / "none.json"))


def test_released_weights_missing_offline_name_the_model_and_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    empty = tmp_path / "empty_hub_cache"
    empty.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeightsError) as err:
        check_open_clip_weights("ViT-B-32", "openai")
    message = str(err.value)
    assert "ViT-B-32" in message and str(empty) in message and "create_model('ViT-B-32'" in message


def test_config_group_composes_and_builds(tiny, tmp_path):
    cfg = compose_config(
        [
            "model=open_clip",
            f"model.name={tiny.name}",
            f"model.pretrained={tiny.weights}",
            f"model.model_config={tiny.config}",
            "model.text_tower.context_length=16",
            "model.lock_image=true",
        ],
        tmp_path,
    )
    assert cfg.tokenizer.context_length == 16
    model = instantiate(cfg.model)
    assert model.image_tower.locked and model.open_clip_spec.name == tiny.name


def fake_run(tiny: TinyCLIP, root: Path, model_cfg: dict, state: dict, tokenizer_json: str) -> Path:
    """A run directory as training leaves it: the composed config and a checkpoint."""
    (root / ".hydra").mkdir(parents=True)
    config = {"model": model_cfg, "tokenizer": {"context_length": 16}, "paths": {"output_dir": str(root)}}
    OmegaConf.save(OmegaConf.create(config), root / ".hydra" / "config.yaml")
    ckpt = root / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    weights = {f"model.{k}": v for k, v in state.items()}
    torch.save({"state_dict": weights, "tokenizer_json": tokenizer_json}, ckpt)
    return ckpt


def test_export_cli_writes_a_file_open_clip_loads(tiny, tmp_path, capsys):
    model = tiny.ours()
    with torch.no_grad():
        model.image_tower.visual.proj.mul_(2.0)  # trained weights differ from the run's pretrained file
    model_cfg = {
        "_target_": "autoglm_train.model.open_clip.open_clip_model",
        "name": tiny.name,
        "pretrained": str(tiny.weights),
        "model_config": str(tiny.config),
        "text_tower": {"context_length": 16},
    }
    ckpt = fake_run(tiny, tmp_path / "run", model_cfg, model.state_dict(), tiny.tokenizer().to_json())
    assert export_main([f"ckpt={ckpt}"]) == 0
    out = tmp_path / "run" / f"open_clip_{tiny.name}.pt"
    printed = capsys.readouterr().out
    assert str(out) in printed and "create_model_and_transforms" in printed and "add_model_config" in printed
    assert_same_embeddings(model.eval(), tiny.reference(out), *inputs(tiny))


def test_export_cli_refuses_a_model_not_trained_with_open_clip(tiny, tmp_path, capsys):
    ours = {"_target_": "autoglm_train.model.dual_encoder.DualEncoder"}
    ckpt = fake_run(tiny, tmp_path / "run", ours, {}, "{}")
    assert export_main([f"ckpt={ckpt}"]) == 2
    assert "not model=open_clip" in capsys.readouterr().err
    assert export_main(["checkpoint=x"]) == 2


def test_export_takes_a_siglip_loss_bias_from_the_checkpoint(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model.log_logit_scale": torch.zeros(1)}}, ckpt)
    assert trained_logit_bias(ckpt) is None
    state = {
        "model.log_logit_scale": torch.zeros(1),
        "objective.terms.siglip.logit_bias": torch.tensor([-3.0]),
    }
    torch.save({"state_dict": state}, ckpt)
    assert trained_logit_bias(ckpt).item() == -3.0
