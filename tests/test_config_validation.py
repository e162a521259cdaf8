"""Bad configuration values are refused at start-up, all at once, before any shard or model is made
(autoglm_train/config_check.py); the shipped configs pass. Composition only: nothing is trained."""

import pickle
from pathlib import Path

import pytest
from conftest import TINY, compose_config

from autoglm_train import train
from autoglm_train.config_check import (
    ConfigError,
    check_compress_config,
    check_evaluate_config,
    check_train_config,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

# (overrides, the key the message must name); TINY's global batch is 64 (one CPU device)
BAD_TRAINING = [
    (["data.batch_size=-4"], "data.batch_size"),
    (["data.eval_batch_size=0"], "data.eval_batch_size"),
    (["loss.temperature=0"], "loss.temperature"),
    (["loss.margin=-0.5"], "loss.margin"),
    (["loss=triplet", "loss.mining=medium"], "loss.mining"),
    (["momentum.enabled=true", "loss.queue_size=32"], "loss.queue_size"),
    (["trainer=ddp_cpu", "momentum.enabled=true", "loss.queue_size=100"], "loss.queue_size"),  # < 2 x 64
    (["loss.queue_size=64"], "loss.queue_size"),  # no momentum encoder to fill it
    (["model.image_tower.name=not_a_model"], "model.image_tower.name"),
    (["loss.temperature_schedule=cosine", "loss.temperature_end=0"], "loss.temperature_end"),
    (["loss.temperature_schedule=exponential"], "loss.temperature_schedule"),
    (["loss.distill_alpha=1.5"], "loss.distill_alpha"),
    (["optimizer.lr=-0.001"], "optimizer.lr"),
    (["optimizer.text_layer_decay=0"], "optimizer.text_layer_decay"),
    (["optimizer.fused=sometimes"], "optimizer.fused"),
    (["model.text_tower.heads=3"], "model.text_tower.width"),  # 64 channels over 3 heads
    (["model.text_tower.pool=eos"], "model.text_tower.pool"),  # a Hugging Face tower's, not ours
    (["model.image_tower.patch_dropout=1.0"], "model.image_tower.patch_dropout"),
    (["trainer.precision=33"], "trainer.precision"),
    (["trainer.devices=0"], "trainer.devices"),
    (["trainer.grad_cache_chunks=2", "trainer.accumulate_grad_batches=2"], "trainer.grad_cache_chunks"),
    (["compression=fp16"], "compression.mode"),
    (["trainer=ddp_cpu", "compression=powersgd", "compression.start_iter=1"], "compression.start_iter"),
    (
        ["trainer=ddp_cpu", "compression=powersgd", "compression.min_compression_rate=0.5"],
        "compression.min_compression_rate",
    ),
    (["trainer=ddp_cpu", "compression=powersgd", "compression.exclude=*proj*"], "compression.exclude"),
    (["eval.zeroshot.task=folder"], "eval.zeroshot.root"),
    # FSDP refuses at start-up what it does not combine with
    (["trainer=fsdp_cpu", "compression=powersgd"], "compression.mode"),
    (["trainer=fsdp_cpu", "trainer.grad_cache_chunks=2"], "trainer.grad_cache_chunks"),
    (["trainer=fsdp_cpu", "model.compile=true"], "model.compile"),
    (["trainer=fsdp_cpu", "trainer.strategy.mixed_precision=fp8"], "trainer.strategy.mixed_precision"),
    (["checkpoint.format=sharded"], "checkpoint.format"),  # only FSDP writes shards
    (["checkpoint.format=zip"], "checkpoint.format"),
    (["momentum.m=1.5"], "momentum.m"),
    (["data.prepare.train_group_fraction=1.5"], "data.prepare.train_group_fraction"),
    (["data.prepare.train_group_attributes=[shape,texture]"], "data.prepare.train_group_attributes"),
    (["data.hard_groups=[shape,3]"], "data.hard_groups"),
    (["model.image_tower.channels_last=maybe"], "model.image_tower.channels_last"),
    (["model.cache_locked_features=true"], "model.cache_locked_features"),  # the tower is not locked
    (
        ["model.lock_image=true", "model.lock_image_unlocked_groups=1", "model.cache_locked_features=true"],
        "model.cache_locked_features",
    ),
    (["model.projection_kind=lowrank"], "model.projection_kind"),  # no rank
    (["model.projection_rank=16"], "model.projection_rank"),  # linear heads
    (["model.projection_kind=lowrank", "model.projection_rank=0"], "model.projection_rank"),
    # caption hard negatives and the fusion stage
    (["loss.text_negatives=reverse"], "loss.text_negatives"),
    (["loss=triplet", "loss.text_negatives=swap"], "loss.text_negatives"),  # only infonce scores them
    (["loss.text_negatives=swap", "trainer.grad_cache_chunks=2"], "loss.text_negatives"),
    (["loss.weights.itm=0.5"], "loss.weights.itm"),  # no fusion stage to train
    (["eval.rerank.k=16"], "eval.rerank.k"),
    (["model.fusion.layers=1", "eval.rerank.score=dot"], "eval.rerank.score"),
    (["model.fusion.layers=1", "trainer=fsdp_cpu"], "model.fusion.layers"),
    (["model.fusion.layers=1", "trainer.grad_cache_chunks=2"], "model.fusion.layers"),
    (["model.fusion.layers=1", "model.fusion.tower_grad=maybe"], "model.fusion.tower_grad"),
    (["data.group_only=[shape,7]"], "data.group_only"),
    (["trainer.collective_timeout=0"], "trainer.collective_timeout"),
]

BAD_COMPRESSION = [
    (["prune.ratio=1.5"], "prune.ratio"),
    (["prune.iterations=0"], "prune.iterations"),
    (["prune.importance=l3"], "prune.importance"),
    (["prune.targets=[heads,filters]"], "prune.targets"),
    (["prune.backend=ours"], "prune.backend"),  # removed: Torch-Pruning is the one pruner
    (["report.repeats=0"], "report.repeats"),
    (["lowrank_heads.energy=0"], "lowrank_heads.energy"),
    (["lowrank_heads.rank=0"], "lowrank_heads.rank"),
    (["quantize.exclude=some"], "quantize.exclude"),
    (["quantize.min_cosine=1.5"], "quantize.min_cosine"),
    (["token_merge.r=-2"], "token_merge.r"),
    (["token_merge.r=[4,two]"], "token_merge.r"),
]


@pytest.fixture
def empty_data_dir(tmp_path, monkeypatch) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setenv("AUTOGLM_DATA_DIR", str(data_dir))
    return data_dir


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A file where compress.yaml wants a checkpoint: never read, since the config is refused first."""
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"not a checkpoint")
    return path


@pytest.mark.parametrize("overrides,key", BAD_TRAINING, ids=[" ".join(o) for o, _ in BAD_TRAINING])
def test_a_bad_training_value_is_refused_before_any_shard_is_written(
    overrides, key, empty_data_dir, tmp_path
):
    run_dir = tmp_path / "run"
    cfg = compose_config(TINY + overrides, run_dir)
    with pytest.raises(ConfigError) as err:
        train.run(cfg)
    assert f"{key}=" in str(err.value)
    assert not list(empty_data_dir.rglob("*.tar")), "shards were written before the config was checked"
    assert not run_dir.exists(), "the run started before the config was checked"


@pytest.mark.parametrize("overrides,key", BAD_COMPRESSION, ids=[" ".join(o) for o, _ in BAD_COMPRESSION])
def test_a_bad_compression_value_is_refused_before_the_checkpoint_is_loaded(
    overrides, key, checkpoint, tmp_path
):
    from autoglm_train.compress.run import run

    run_dir = tmp_path / "run"
    cfg = compose_config([f"ckpt={checkpoint}", *overrides], run_dir, config_name="compress")
    with pytest.raises(ConfigError) as err:
        run(cfg)  # loading the fake checkpoint would fail otherwise, with another error
    assert f"{key}=" in str(err.value) and not run_dir.exists()


def test_the_message_names_key_value_and_what_is_allowed(tmp_path):
    cfg = compose_config(["data.batch_size=-4", "loss.mining=medium"], tmp_path)
    with pytest.raises(ConfigError) as err:
        check_train_config(cfg)
    assert "data.batch_size=-4: must be an integer >= 1" in err.value.problems
    assert "loss.mining=medium: must be one of all, semihard, hard" in err.value.problems
    assert isinstance(err.value, ValueError)


def test_every_problem_is_reported_at_once(tmp_path):
    bad = [
        "data.batch_size=-4",
        "loss.temperature=0",
        "loss.margin=-0.5",
        "loss.mining=medium",
        "model.image_tower.name=not_a_model",
        "trainer.num_nodes=0",
    ]
    cfg = compose_config(bad, tmp_path)
    with pytest.raises(ConfigError) as err:
        check_train_config(cfg)
    named = {problem.split("=", 1)[0] for problem in err.value.problems}
    assert {override.split("=", 1)[0] for override in bad} <= named
    # the model's temperature is ${loss.temperature}: said so, not left to guess
    assert "model.init_temperature=0 (from ${loss.temperature}): must be a number > 0" in err.value.problems


def test_a_scheduled_temperature_needs_its_steps_when_max_steps_is_unlimited(tmp_path):
    cfg = compose_config(["loss.temperature_schedule=linear", "trainer.max_steps=-1"], tmp_path)
    with pytest.raises(ConfigError, match=r"loss.temperature_steps=-1 \(from \$\{trainer.max_steps\}\)"):
        check_train_config(cfg)
    check_train_config(compose_config(["trainer.max_steps=-1"], tmp_path))  # unscheduled: no limit needed


def test_the_queue_counts_every_device_and_node(tmp_path):
    enough = ["trainer=ddp_cpu", "trainer.num_nodes=2", "data.batch_size=64", "momentum.enabled=true"]
    check_train_config(compose_config([*enough, "loss.queue_size=256"], tmp_path))
    with pytest.raises(ConfigError, match=r"= 64 \* 2 \* 2 = 256"):
        check_train_config(compose_config([*enough, "loss.queue_size=255"], tmp_path))
    # devices=auto (trainer=ddp): at least one device per node is certain
    auto = ["trainer=ddp", "data.batch_size=64", "momentum.enabled=true"]
    with pytest.raises(ConfigError, match="at least 1"):
        check_train_config(compose_config([*auto, "loss.queue_size=63"], tmp_path))
    check_train_config(compose_config([*auto, "loss.queue_size=64"], tmp_path))


def test_a_refused_config_survives_pickling_whole():
    error = pickle.loads(pickle.dumps(ConfigError(["a=1: must be b", "c=2: must be d"], "training")))
    assert error.problems == ["a=1: must be b", "c=2: must be d"] and "2 problems" in str(error)


GOOD_TRAINING = (
    [[f"experiment={name}"] for name in EXPERIMENTS]
    + [[f"loss={name}"] for name in ("infonce", "triplet", "infonce_triplet", "siglip")]
    + [[f"trainer={name}"] for name in ("cpu", "gpu", "ddp", "ddp_cpu", "fsdp", "fsdp_cpu")]
    + [["trainer=fsdp_cpu", "checkpoint.format=full", "trainer.strategy.mixed_precision=bf16"]]
    + [["trainer=ddp_cpu", f"compression={mode}"] for mode in ("fp16", "bf16", "powersgd")]
    + [
        ["model=open_clip"],
        ["model=vit_b16"],
        ["model/text_tower=hf", "model.text_tower.pool=eos"],
        ["data=coco"],
        ["data=wds", "data.train_shards='d/train-{000000..000009}.tar'", "data.val_shards=[d/val.tar]"],
        ["hparams_search=margin_temperature"],
        ["loss=infonce_triplet", "momentum.enabled=true", "loss.queue_size=4096", "loss.distill_alpha=0.4"],
        ["loss.temperature_schedule=cosine", "loss.temperature_end=0.02"],
        ["logger=wandb", "callbacks=none"],
        ["loss.text_negatives=shuffle", "model.fusion.layers=2", "eval.rerank.k=16", "loss.weights.itm=0.5"],
        ["model.fusion.layers=1", "model.fusion.tower_grad=false"],
        ["loss=infonce_triplet", "loss.text_negatives=swap", "momentum.enabled=true", "loss.queue_size=4096"],
    ]
)


@pytest.mark.parametrize("overrides", GOOD_TRAINING, ids=[" ".join(o) for o in GOOD_TRAINING])
def test_the_shipped_training_configs_pass(overrides, tmp_path):
    check_train_config(compose_config(overrides, tmp_path))


def test_the_shipped_compression_and_evaluation_configs_pass(checkpoint, tmp_path):
    check_compress_config(compose_config([f"ckpt={checkpoint}"], tmp_path, config_name="compress"))
    for overrides in (
        [f"ckpt={checkpoint}"],
        ["data=wds", "data.val_shards=d/val.tar", "model=open_clip"],
        ["data=shapes", "model/text_tower=hf"],
    ):
        check_evaluate_config(compose_config(overrides, tmp_path, config_name="evaluate"))


def test_a_removed_option_is_refused_saying_what_to_do_instead(checkpoint, tmp_path):
    overrides = [f"ckpt={checkpoint}", "prune.backend=torch_pruning"]
    cfg = compose_config(overrides, tmp_path, config_name="compress")
    with pytest.raises(ConfigError, match="backend=torch_pruning: the option was removed; Torch-Pruning is"):
        check_compress_config(cfg)


def test_evaluation_refuses_bad_values_before_reading_anything(tmp_path):
    from autoglm_train.evaluate import run

    run_dir = tmp_path / "run"
    cfg = compose_config(["eval.chunk_size=0"], run_dir, config_name="evaluate")
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert "eval.chunk_size=0" in str(err.value) and "data:" in str(err.value) and not run_dir.exists()
