"""Every experiment composes; typos are errors; coco_align without shards fails at once, helpfully."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from autoglm_train import train
from conftest import compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates_its_parts(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg.trainer.max_steps > 0
    model_cfg = cfg.model.copy()
    model_cfg.text_tower.vocab_size = 100
    model_cfg.image_tower.name = "resnet18"  # building ViT-B weights is slow; the tower name is checked below
    assert instantiate(model_cfg).embed_dim == cfg.model.embed_dim
    instantiate(cfg.loss.objective)
    import timm

    assert timm.is_model(cfg.model.image_tower.name)


def test_coco_align_settings(tmp_path):
    cfg = compose_config(["experiment=coco_align"], tmp_path)
    assert cfg.model.image_tower.name == "vit_base_patch16_224"
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"


def test_a_typo_is_an_error(tmp_path):
    with pytest.raises(ConfigCompositionException):
        compose_config(["loss.temprature=0.05"], tmp_path)
    with pytest.raises(ConfigCompositionException):
        compose_config(["experiment=shapes_allign"], tmp_path)


def test_coco_align_without_shards_fails_at_once_saying_where_they_go(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOGLM_DATA_DIR", str(tmp_path / "empty"))
    cfg = compose_config(["experiment=coco_align"], tmp_path / "run")
    with pytest.raises(FileNotFoundError) as err:
        train.run(cfg)
    message = str(err.value)
    assert str(tmp_path / "empty" / "coco") in message and "train-NNNNNN.tar" in message
    assert not (tmp_path / "run" / "checkpoints").exists()
