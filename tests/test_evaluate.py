"""``python -m autoglm_train.evaluate`` scores a checkpoint exactly as its training run's final evaluation
did, for our towers and for an open_clip model, and scores released weights with no checkpoint at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import TINY, compose_config, shapes_set, train_run
from test_open_clip import TinyCLIP
from test_train import METRIC_KEYS

from autoglm_train import evaluate

pytestmark = pytest.mark.slow
RETRIEVAL = sorted(k for k in METRIC_KEYS if k.startswith("val/"))


@pytest.fixture
def data_env(shapes_dir):
    os.environ["AUTOGLM_DATA_DIR"] = str(shapes_dir)
    yield shapes_dir
    os.environ.pop("AUTOGLM_DATA_DIR")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> TinyCLIP:
    tiny = TinyCLIP(tmp_path_factory.mktemp("tiny_clip_eval"), "tiny-clip-eval")
    # weights of another seed than the runs' (0): a model built without them would initialise identically
    torch.manual_seed(1)
    torch.save(open_clip.create_model(tiny.name).state_dict(), tiny.weights)
    return tiny


def evaluate_run(overrides: list[str], run_dir: Path) -> dict:
    metrics = evaluate.run(compose_config(overrides + ["progress_bar=false"], run_dir, "evaluate"))
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(metrics)
    return metrics


OPENAI_PREPROCESS = {
    "mean": open_clip.OPENAI_DATASET_MEAN,
    "std": open_clip.OPENAI_DATASET_STD,
    "interpolation": "bicubic",
    "crop_pct": 1.0,
}


def open_clip_overrides(tiny: TinyCLIP) -> list[str]:
    return [
        "model=open_clip",
        f"model.name={tiny.name}",
        f"model.model_config={tiny.config}",
        f"model.pretrained={tiny.weights}",
        "model.text_tower.context_length=16",
    ]


def test_a_checkpoint_of_ours_scores_what_its_training_run_reported(data_env, tmp_path):
    trained = train_run([*TINY, "trainer.max_steps=4", "eval.zeroshot.task=null"], tmp_path / "train")
    assert trained == pytest.approx(json.loads((tmp_path / "train" / "metrics.json").read_text()))
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    scored = evaluate_run([f"ckpt={ckpt}"], tmp_path / "eval")
    for key in RETRIEVAL:
        assert scored[key] == pytest.approx(trained[key], abs=1e-9), key
    assert scored["val/images"] == 200 and scored["val/captions"] == 400
    assert (tmp_path / "eval" / "tokenizer.json").read_text() == (
        tmp_path / "train" / "tokenizer.json"
    ).read_text()


def test_an_open_clip_checkpoint_and_released_weights_without_training(data_env, tiny_clip, tmp_path):
    model_args = open_clip_overrides(tiny_clip)
    tiny_no_text = [o for o in TINY if not o.startswith(("model.text_tower.", "model.embed_dim"))]
    trained = train_run(
        [*tiny_no_text, *model_args, "trainer.max_steps=3", "eval.zeroshot.task=null"], tmp_path / "train"
    )
    scored = evaluate_run([f"ckpt={tmp_path / 'train' / 'checkpoints' / 'last.ckpt'}"], tmp_path / "eval")
    for key in RETRIEVAL:
        assert scored[key] == pytest.approx(trained[key], abs=1e-9), key

    # the zero-shot baseline before any fine-tuning: the weights file alone, on a shard set
    shards = sorted(str(p) for p in shapes_set(data_env).glob("val-*.tar"))
    baseline = evaluate_run(
        [*model_args, "data=wds", f"data.val_shards={shards}", "data.image_size=null"], tmp_path / "base"
    )
    assert baseline["val/images"] == 250  # data=wds knows no groups: the 50 binding images count too
    # the same figures from open_clip's own model on the same held-out images and captions
    from autoglm_train.eval.retrieval import retrieval_metrics
    from autoglm_train.lit.datamodule import ShardDataModule

    clip, tokenizer = tiny_clip.reference(), tiny_clip.tokenizer()
    datamodule = ShardDataModule(shards, shards, eval_batch_size=100, num_workers=0)
    datamodule.prepare_data()
    datamodule.attach(tokenizer, {"input_size": (3, 32, 32), **OPENAI_PREPROCESS})
    parts = {"image": [], "id": [], "text": [], "text_id": []}
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            parts["image"].append(clip.encode_image(batch["image"], normalize=True))
            parts["text"].append(clip.encode_text(batch["text"], normalize=True))
            parts["id"].append(batch["id"])
            parts["text_id"].append(batch["text_id"])
    direct = retrieval_metrics(*(torch.cat(parts[k]) for k in ("image", "id", "text", "text_id")))
    for key in RETRIEVAL:
        assert baseline[key] == pytest.approx(direct[key.removeprefix("val/")], abs=1e-9), key


def test_evaluate_without_a_checkpoint_or_shards_says_what_to_give(tmp_path):
    with pytest.raises(ValueError, match=r"data=wds data.val_shards"):
        evaluate.run(compose_config(["model=open_clip"], tmp_path / "e", "evaluate"))
