"""Every experiment composes; typos are errors; coco_align without shards fails at once, helpfully."""

from pathlib import Path

import pytest
from conftest import compose_config
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from autoglm_train import train
from autoglm_train.build import model_family

EXPERIMENTS = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml")
)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates_its_parts(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg.trainer.max_steps > 0
    instantiate(cfg.loss.objective)
    family = model_family(cfg.model)
    if family == "open_clip":  # open_clip's own names; weights are checked in tests/test_open_clip.py
        import open_clip

        assert cfg.model.name in open_clip.list_models()
        return
    import timm

    assert timm.is_model(cfg.model.image_tower.name)
    model_cfg = cfg.model.copy()
    model_cfg.image_tower.name = "resnet18"  # building ViT-B weights is slow; the tower name is checked above
    model_cfg.image_tower.pretrained = False  # no weights here: tests/test_pretrained.py loads them
    model_cfg.image_tower.checkpoint = None
    model_cfg.lock_image = False
    if family == "hf":
        assert cfg.model.text_tower.name and cfg.model.text_tower.pool in ("cls", "mean", "eos")
        return
    model_cfg.text_tower.vocab_size = 100
    assert instantiate(model_cfg).embed_dim == cfg.model.embed_dim


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


@pytest.mark.parametrize(
    "loss,terms",
    [
        ("infonce", {"infonce"}),
        ("triplet", {"triplet"}),
        ("infonce_triplet", {"infonce", "triplet"}),
        ("siglip", {"siglip"}),
    ],
)
def test_loss_configs_build_their_terms_and_take_the_sweep_keys(loss, terms, tmp_path):
    cfg = compose_config(
        [f"loss={loss}", "loss.margin=0.3", "loss.temperature=0.05", "loss.mining=semihard"], tmp_path
    )
    objective = instantiate(cfg.loss.objective)
    assert set(objective.terms) == terms and set(objective.weights) == terms
    assert objective.temperature is None  # learned by default
    if "triplet" in terms:
        assert (
            objective.terms["triplet"].margin(10**6) == 0.3
            and objective.terms["triplet"].mining == "semihard"
        )
    assert cfg.model.init_temperature == 0.05


def test_temperature_and_margin_schedules_from_the_command_line(tmp_path):
    cfg = compose_config(
        [
            "loss=infonce_triplet",
            "loss.temperature_schedule=cosine",
            "loss.temperature=0.1",
            "loss.temperature_end=0.02",
            "loss.margin_warmup_steps=100",
            "loss.margin_start=0.05",
            "loss.margin=0.25",
            "trainer.max_steps=400",
        ],
        tmp_path,
    )
    objective = instantiate(cfg.loss.objective)
    assert objective.temperature(0) == pytest.approx(0.1) and objective.temperature(400) == pytest.approx(
        0.02
    )
    margin = objective.terms["triplet"].margin
    assert (
        margin(0) == pytest.approx(0.05)
        and margin(50) == pytest.approx(0.15)
        and margin(100) == pytest.approx(0.25)
    )


def test_optuna_search_config_composes(tmp_path):
    cfg = compose_config(["hparams_search=margin_temperature"], tmp_path)
    assert cfg.optimized_metric == "val/r1_mean" and "triplet" in cfg.loss.objective.terms


@pytest.mark.parametrize("mode", ["none", "fp16", "bf16", "powersgd"])
@pytest.mark.parametrize("trainer", ["ddp", "ddp_cpu"])
def test_ddp_trainers_build_our_strategy_with_the_compression(trainer, mode, tmp_path):
    from autoglm_train.distributed.compression import CompressedDDPStrategy

    cfg = compose_config([f"trainer={trainer}", f"compression={mode}"], tmp_path)
    trainer_cfg, chunks, _ = train.split_trainer_config(cfg)
    strategy = instantiate(trainer_cfg.strategy)
    assert isinstance(strategy, CompressedDDPStrategy) and strategy.compression == mode and chunks == 1
    assert strategy._process_group_backend == ("nccl" if trainer == "ddp" else "gloo")


def test_the_powersgd_presets_reach_the_strategy(tmp_path):
    # the settings chosen from the sweep in docs/results.md
    expected = {"powersgd": (16, False), "powersgd_aggressive": (4, False)}
    for preset, (rank, fp16) in expected.items():
        cfg = compose_config(
            ["trainer=ddp_cpu", f"compression={preset}", "compression.exclude=[*proj*]"], tmp_path
        )
        strategy = instantiate(train.split_trainer_config(cfg)[0].strategy)
        options = strategy._hook_options
        assert strategy.compression == "powersgd" and options["powersgd_rank"] == rank, preset
        assert (
            options["powersgd_fp16"] is fp16 and options["error_feedback"] and options["powersgd_warm_start"]
        )
        assert options["powersgd_start_iter"] == 10 and options["powersgd_exclude"] == ("*proj*",)


def test_compression_without_ddp_and_grad_cache_with_accumulation_are_errors(tmp_path):
    from autoglm_train.config_check import check_train_config

    with pytest.raises(ValueError, match="use trainer=ddp"):
        check_train_config(compose_config(["compression=fp16"], tmp_path))
    cfg = compose_config(["trainer.grad_cache_chunks=4", "trainer.accumulate_grad_batches=2"], tmp_path)
    with pytest.raises(ValueError, match="does not combine"):
        check_train_config(cfg)
    cfg = compose_config(["trainer.grad_cache_chunks=4", "trainer.gradient_clip_val=1.0"], tmp_path)
    trainer_cfg, chunks, clip = train.split_trainer_config(cfg)
    assert chunks == 4 and clip == 1.0 and "gradient_clip_val" not in trainer_cfg
