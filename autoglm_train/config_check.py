"""Refuse a bad configuration at start-up, before anything expensive, with every problem at once.

``check_train_config``, ``check_evaluate_config`` and ``check_compress_config`` hold each user-facing value
of the composed config (``conf/train.yaml`` and its groups, ``conf/evaluate.yaml``, ``conf/compress.yaml``)
against what the code that consumes it allows, and raise one ``ConfigError`` naming every key, its value
and what is allowed: ``data.batch_size=-4: must be an integer >= 1``.

The YAML files stay the source of defaults and of which keys exist (Hydra refuses an unknown key at
composition); this module says which *values* are allowed. It is a table of rules over dotted keys (type,
range, choices), each optionally conditional (``model.image_tower.name`` is a timm name only for the timm
image tower), plus a few cross-field checks (a queue needs the momentum encoder and at least one global
batch of room). Hydra structured configs would have to repeat every default of every group option
(model=open_clip, model/text_tower=hf, loss=siglip, ...) in dataclasses; the table repeats none. A key
absent from the composed config (the group option chosen has no such key) is skipped. A removed option
stays in its YAML as null for a while, so that setting it is refused here, saying what to do instead
(``REMOVED``), rather than by Hydra's bare "Key ... is not in struct".

Choices come from the modules that consume them (``MINING_MODES``, ``MODES``, ...), so they cannot drift.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from autoglm_train.build import model_family
from autoglm_train.compress import IMPORTANCES, KINDS, QUANT_MODES, SCOPES
from autoglm_train.data.caption_negatives import TEXT_NEGATIVES
from autoglm_train.data.shapes import GROUP_ATTRIBUTES
from autoglm_train.distributed.compression import MODES as COMPRESSION_MODES
from autoglm_train.distributed.fsdp import CHECKPOINT_FORMATS, MIXED_PRECISION, is_checkpoint
from autoglm_train.eval.rerank import RERANK_SCORES
from autoglm_train.losses.schedules import SCHEDULES
from autoglm_train.losses.triplet import MINING_MODES
from autoglm_train.model.dual_encoder import COMPILE_MODES, PROJECTIONS
from autoglm_train.model.hf_text import POOLS as HF_POOLS
from autoglm_train.model.momentum import MOMENTUM_SCHEDULES

# Lightning's bounds for seed_everything
MAX_SEED = 2**32 - 1
# what the tokenizer needs: [CLS] and [SEP] around at least nothing
MIN_CONTEXT_LENGTH = 2

ABSENT = object()  # the key is not in this config (another group option, or another job's config)
MISSING = object()  # the key is there but ??? (mandatory, not given)


class ConfigError(ValueError):
    """Every problem found in a config; ``problems`` lists them one per line of the message."""

    def __init__(self, problems: list[str], job: str = "training"):
        self.problems, self.job = problems, job
        lines = "\n".join(f"  - {p}" for p in problems)
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__(f"invalid {job} configuration ({count}):\n{lines}")

    def __reduce__(self):  # rebuilt from its problems, not its message, when sent between processes
        return type(self), (self.problems, self.job)


# ---------------------------------------------------------------------------------------------------------
# reading values


def lookup(cfg: DictConfig, key: str) -> tuple[Any, str | None]:
    """``(value, interpolation)`` at dotted ``key``: ABSENT, MISSING, or the resolved value as plain
    Python (lists, dicts), with the interpolation it came from (``${loss.temperature}``) if any."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig):
        return ABSENT, None
    if OmegaConf.is_missing(parent, leaf):
        return MISSING, None
    if leaf not in parent:
        return ABSENT, None
    source = None
    if OmegaConf.is_interpolation(parent, leaf):
        source = OmegaConf.to_container(parent, resolve=False)[leaf]
    value = parent[leaf]
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return value, source


def value_of(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """The value at ``key``, or ``default`` where it is absent, missing or cannot be resolved (the table's
    rules report those; cross-field checks just skip)."""
    try:
        value, _ = lookup(cfg, key)
    except Exception:
        return default
    return default if value is ABSENT or value is MISSING else value


def show(value: Any) -> str:
    """A value as a user types it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value is MISSING:
        return "???"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# the kinds of value


def always(cfg: DictConfig) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    """``key`` must hold a value ``accepts`` takes; ``allowed`` says which, in the error message. The rule
    holds only where ``applies(cfg)`` (e.g. only for one model family)."""

    key: str
    allowed: str
    accepts: Callable[[Any], bool]
    applies: Callable[[DictConfig], bool] = always

    def problem(self, cfg: DictConfig) -> str | None:
        if not self.applies(cfg):
            return None
        try:
            value, source = lookup(cfg, self.key)
        except Exception as exc:  # an interpolation to a key that is not there, a resolver that fails
            return f"{self.key}: cannot be resolved ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        if value is ABSENT:
            return None
        if value is MISSING:
            return f"{self.key}=???: not given; must be {self.allowed}"
        if self.accepts(value):
            return None
        origin = f" (from {source})" if source else ""
        return f"{self.key}={show(value)}{origin}: must be {self.allowed}"


def _nullable(test: Callable[[Any], bool], allowed: str, null: bool) -> tuple[Callable[[Any], bool], str]:
    if not null:
        return test, allowed
    return (lambda v: v is None or test(v)), f"null or {allowed}"


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def _within(v, low, high, low_open: bool, high_open: bool) -> bool:
    above = low is None or (v > low if low_open else v >= low)
    below = high is None or (v < high if high_open else v <= high)
    return above and below


def is_integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # YAML's true is not a count


def is_number(v: Any) -> bool:
    return is_integer(v) or (isinstance(v, float) and math.isfinite(v))  # nan passes no bound


def integer(key, low=None, high=None, *, null=False, when=always) -> Rule:
    allowed = "an integer" + _bounds(low, high, False, False)
    test, allowed = _nullable(lambda v: is_integer(v) and _within(v, low, high, False, False), allowed, null)
    return Rule(key, allowed, test, when)


def number(key, low=None, high=None, *, low_open=False, high_open=False, null=False, when=always) -> Rule:
    allowed = "a number" + _bounds(low, high, low_open, high_open)
    test, allowed = _nullable(
        lambda v: is_number(v) and _within(v, low, high, low_open, high_open), allowed, null
    )
    return Rule(key, allowed, test, when)


def one_of(key, choices: Iterable, *, null=False, when=always) -> Rule:
    choices = tuple(choices)
    allowed = "one of " + ", ".join(dict.fromkeys(show(c) for c in choices))  # Lightning's 32 and "32": once
    # YAML's true equals 1 in Python, but is no choice of a numeric key
    test, allowed = _nullable(lambda v: not isinstance(v, bool) and v in choices, allowed, null)
    return Rule(key, allowed, test, when)


def flag(key, *, null=False, when=always) -> Rule:
    test, allowed = _nullable(lambda v: isinstance(v, bool), "true or false", null)
    return Rule(key, allowed, test, when)


def text(key, *, null=False, when=always) -> Rule:
    test, allowed = _nullable(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string", null)
    return Rule(key, allowed, test, when)


def existing_file(key, *, null=False, when=always) -> Rule:
    test, allowed = _nullable(lambda v: isinstance(v, str) and Path(v).is_file(), "an existing file", null)
    return Rule(key, allowed, test, when)


def existing_checkpoint(key, *, null=False, when=always) -> Rule:
    """A checkpoint file, or a sharded checkpoint's folder (torch DCP, written under FSDP)."""
    test, allowed = _nullable(
        lambda v: isinstance(v, str) and is_checkpoint(v),
        "an existing checkpoint file or sharded folder",
        null,
    )
    return Rule(key, allowed, test, when)


def custom(key, allowed: str, test: Callable[[Any], bool], *, null=False, when=always) -> Rule:
    test, allowed = _nullable(test, allowed, null)
    return Rule(key, allowed, test, when)


# ---------------------------------------------------------------------------------------------------------
# values that need more than a type and a range


def is_timm_model(name: Any) -> bool:
    """A name timm can build: an architecture of its registry, with or without a pretrained tag
    (``vit_base_patch16_224.augreg_in21k``), or a hub / local-directory source timm resolves itself."""
    if not isinstance(name, str) or not name:
        return False
    if ":" in name:  # hf-hub:org/repo, local-dir:/path: timm's own sources, checked with the weights
        return True
    import timm

    return timm.is_model(name.split(".", 1)[0])


def is_shard_set(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip() != ""
    return isinstance(v, list) and bool(v) and all(isinstance(s, str) and s for s in v)


def is_betas(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v)


def is_crop_scale(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(is_number(s) for s in v) and 0 < v[0] <= v[1]


def is_prompt_template(t: Any) -> bool:
    """A str.format pattern the class name changes (a template without {} gives every class one text)."""
    try:
        return isinstance(t, str) and t.format("cat") != t.format("dog")
    except (IndexError, KeyError, ValueError):
        return False


LORA_TARGETS = "a list of glob patterns over the tower's module names ([]: no adapters; null: defaults)"


def is_lora_targets(v: Any) -> bool:
    return isinstance(v, list | ListConfig) and all(isinstance(t, str) and t for t in v)


def is_device_count(v: Any) -> bool:
    """Lightning's ``devices``: "auto", -1 (all), a count >= 1, or device indices (a list, "0,1")."""
    if v == "auto" or v == -1 or v == "-1":
        return True
    if is_integer(v):
        return v >= 1
    if isinstance(v, list):
        return bool(v) and all(is_integer(i) and i >= 0 for i in v)
    if isinstance(v, str):
        parts = [p.strip() for p in v.split(",") if p.strip()]
        return bool(parts) and all(p.isdigit() for p in parts) and ("," in v or int(parts[0]) >= 1)
    return False


def known_device_count(devices: Any) -> int | None:
    """How many devices per node ``trainer.devices`` asks for, where that is known without looking at
    the hardware ("auto" and -1 are not)."""
    if is_integer(devices) and devices >= 1:
        return devices
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([p for p in devices.split(",") if p.strip()])
    if isinstance(devices, str) and devices.strip().isdigit() and int(devices) >= 1:
        return int(devices)
    return None


def accelerators() -> tuple[str, ...]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))


def precisions() -> tuple:
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT

    return tuple(choice for kind in typing.get_args(_PRECISION_INPUT) for choice in typing.get_args(kind))


# ---------------------------------------------------------------------------------------------------------
# conditions


def family(cfg: DictConfig) -> str | None:
    model = cfg.get("model")
    return model_family(model) if isinstance(model, DictConfig) else None


def family_is(*names: str) -> Callable[[DictConfig], bool]:
    return lambda cfg: family(cfg) in names


def timm_image_tower(cfg: DictConfig) -> bool:
    return family(cfg) in ("ours", "hf")  # open_clip names its own architectures


def temperature_scheduled(cfg: DictConfig) -> bool:
    return value_of(cfg, "loss.temperature_schedule") is not None


def temperature_ramped(cfg: DictConfig) -> bool:
    return value_of(cfg, "loss.temperature_schedule") in SCHEDULES


def powersgd(cfg: DictConfig) -> bool:
    return value_of(cfg, "compression.mode") == "powersgd"


# ---------------------------------------------------------------------------------------------------------
# the table: training (conf/train.yaml and its groups); evaluation shares the keys it has


RUN_RULES = [
    integer("seed", 0, MAX_SEED),
    integer("threads", 0, null=True),  # 0 and null both keep torch's default
    flag("progress_bar"),
    text("task_name"),
    text("optimized_metric"),
    existing_file("ckpt_path", null=True),
    existing_checkpoint("init_from", null=True),
]

TOKENIZER_RULES = [
    existing_file("tokenizer.path", null=True),
    integer("tokenizer.vocab_size", 1),
    integer("tokenizer.min_frequency", 0),
    integer("tokenizer.train_samples", 1, null=True),
    integer("tokenizer.context_length", MIN_CONTEXT_LENGTH),
]

OPTIMIZER_RULES = [  # AdamW's own limits, checked before the data is made rather than after
    number("optimizer.lr", 0),
    number("optimizer.weight_decay", 0),
    number("optimizer.eps", 0),
    custom("optimizer.betas", "two numbers in [0, 1)", is_betas),
    flag("optimizer.fused", null=True),  # null: torch's default kernel (open_clip_parity)
    number("optimizer.image_layer_decay", 0, 1, low_open=True, null=True),
    number("optimizer.text_layer_decay", 0, 1, low_open=True, null=True),
    integer("scheduler.warmup_steps", 0),
    number("scheduler.min_lr_ratio", 0, 1),
]

EVAL_RULES = [
    integer("eval.chunk_size", 1),
    one_of("eval.zeroshot.task", ("shapes", "folder", "shards"), null=True),
    text("eval.zeroshot.label_key"),
    custom(
        "eval.zeroshot.classnames",
        "a non-empty list of class names",
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(c, str | int) for c in v),
        null=True,
    ),
    custom(
        "eval.zeroshot.templates",
        "a non-empty list of prompt templates, each with {} for the class name",
        lambda v: isinstance(v, list) and bool(v) and all(is_prompt_template(t) for t in v),
    ),
    integer("eval.zeroshot.batch_size", 1),
    integer("eval.rerank.k", 0),
    one_of("eval.rerank.score", RERANK_SCORES),
]

MOMENTUM_RULES = [
    flag("momentum.enabled"),
    number("momentum.m", 0, 1),
    one_of("momentum.schedule", MOMENTUM_SCHEDULES),
]

LOSS_RULES = [
    number("loss.temperature", 0, low_open=True),
    flag("loss.learn_temperature"),
    one_of("loss.temperature_schedule", ("constant", *SCHEDULES), null=True),
    number("loss.temperature_end", 0, low_open=True, when=temperature_scheduled),
    integer("loss.temperature_steps", 0, when=temperature_ramped),
    # a negative margin selects no semihard triplet at all and makes the hinge reward violations
    number("loss.margin", 0),
    number("loss.margin_start", 0),
    integer("loss.margin_warmup_steps", 0),
    one_of("loss.mining", MINING_MODES),
    integer("loss.queue_size", 0),
    number("loss.distill_alpha", 0, 1),
    integer("loss.distill_ramp_steps", 0),
    number("loss.siglip_init_bias"),
    one_of("loss.text_negatives", TEXT_NEGATIVES, null=True),
    integer("loss.text_negatives_count", 1),
    integer("model.fusion.layers", 0),
    integer("model.fusion.heads", 1),
    flag("model.fusion.tower_grad"),
]

SHARDS = "a shard pattern or a list of shard paths/URLs (null: data.prepare makes them)"

DATA_RULES = [
    custom("data.train_shards", SHARDS, lambda v: v is None or is_shard_set(v)),
    custom("data.val_shards", SHARDS, lambda v: v is None or is_shard_set(v)),
    integer("data.batch_size", 1),
    integer("data.eval_batch_size", 1),
    integer("data.num_workers", 0),
    integer("data.image_size", 1, null=True),
    text("data.caption_key"),
    integer("data.shuffle_buffer", 0),
    flag("data.resampled"),
    integer("data.epoch_samples", 1, null=True),
    number("data.crop_pct", 0, low_open=True, null=True),
    custom("data.augment.scale", "two numbers 0 < low <= high (crop area fractions)", is_crop_scale),
    number("data.augment.hflip", 0, 1),
    # the embedded shapes generator (data=shapes)
    integer("data.prepare.n_train", 1),
    integer("data.prepare.n_val", 1),
    integer("data.prepare.seed"),
    integer("data.prepare.image_size", 1),
    integer("data.prepare.samples_per_shard", 1),
    integer("data.prepare.val_shards", 1),
    number("data.prepare.train_group_fraction", 0, 1),
    custom(
        "data.prepare.train_group_attributes",
        f"a non-empty list of {', '.join(GROUP_ATTRIBUTES)}",
        lambda v: isinstance(v, list) and bool(v) and all(a in GROUP_ATTRIBUTES for a in v),
    ),
    custom(
        "data.hard_groups",
        "a list of attribute names (what a held-out hard-negative group varies)",
        lambda v: isinstance(v, list) and all(isinstance(k, str) and k for k in v),
        null=True,
    ),
    custom(
        "data.group_only",
        "a list of hard-group kinds (among data.hard_groups) scored within their groups only",
        lambda v: isinstance(v, list) and all(isinstance(k, str) and k for k in v),
        null=True,
    ),
    integer("data.prepare.n_val_binding", 0),
]

MODEL_RULES = [
    integer("model.embed_dim", 1),
    one_of("model.projection_kind", PROJECTIONS),
    integer("model.projection_rank", 1, null=True),
    number("model.init_temperature", 0, low_open=True, when=family_is("ours", "hf")),
    number("model.init_temperature", 0, low_open=True, null=True, when=family_is("open_clip")),
    flag("model.learn_temperature"),
    number("model.max_logit_scale", 0, low_open=True),  # used as log(max_logit_scale)
    flag("model.lock_image"),
    flag("model.cache_locked_features", null=True),
    integer("model.lock_image_unlocked_groups", 0),
    flag("model.lock_image_freeze_bn"),
    flag("model.lock_text"),
    integer("model.lock_text_unlocked_layers", 0),
    flag("model.grad_checkpointing"),
    flag("model.lora.enabled"),
    integer("model.lora.rank", 1),
    number("model.lora.alpha", 0, low_open=True),
    number("model.lora.dropout", 0, 1, high_open=True),
    custom("model.lora.targets.image", LORA_TARGETS, is_lora_targets, null=True),
    custom("model.lora.targets.text", LORA_TARGETS, is_lora_targets, null=True),
    # true is towers (the key was a flag before step existed); step compiles the training step's forward and
    # loss as one function (lit/compiled_step.py)
    custom(
        "model.compile",
        "false, true (= towers), " + " or ".join(COMPILE_MODES),
        lambda v: isinstance(v, bool) or v in COMPILE_MODES,
    ),
    number("model.image_tower.patch_dropout", 0, 1, high_open=True),
    flag("model.image_tower.channels_last"),
    # the timm image tower (model=small, vit_b16; model/text_tower=hf keeps it)
    custom(
        "model.image_tower.name",
        "a timm model name (timm.list_models(); a pretrained tag may follow a '.')",
        is_timm_model,
        when=timm_image_tower,
    ),
    flag("model.image_tower.pretrained", when=timm_image_tower),
    # a path, not an existing file: a resumed (requeued) run needs no weights file, and build.py's weights
    # check says what is missing, with where to get it, before any data is made when not resuming
    text("model.image_tower.checkpoint", null=True, when=timm_image_tower),
    flag("model.image_tower.strict", when=timm_image_tower),
    # our text transformer
    integer("model.text_tower.width", 1, when=family_is("ours")),
    integer("model.text_tower.depth", 1, when=family_is("ours")),
    integer("model.text_tower.heads", 1, when=family_is("ours")),
    number("model.text_tower.mlp_ratio", 0, low_open=True, when=family_is("ours")),
    number("model.text_tower.dropout", 0, 1, when=family_is("ours")),
    one_of("model.text_tower.pool", ("cls", "mean"), when=family_is("ours")),
    # a Hugging Face text tower
    text("model.text_tower.name", when=family_is("hf")),
    flag("model.text_tower.pretrained", when=family_is("hf")),
    one_of("model.text_tower.pool", HF_POOLS, when=family_is("hf")),
    integer("model.text_tower.context_length", MIN_CONTEXT_LENGTH),
    # open_clip (the name and weights are checked with the weights, before any data is made)
    text("model.name", when=family_is("open_clip")),
    text("model.pretrained", null=True, when=family_is("open_clip")),
]

TRAINER_RULES = [
    one_of("trainer.accelerator", accelerators()),
    custom(
        "trainer.devices",
        '"auto", -1 (all), an integer >= 1, or device indices (a list, or "0,1")',
        is_device_count,
    ),
    integer("trainer.num_nodes", 1),
    one_of("trainer.precision", precisions()),
    integer("trainer.max_steps", -1),  # -1: no limit (the LR then stays after warm-up)
    integer("trainer.max_epochs", -1, null=True),
    integer("trainer.val_check_interval", 1, null=True),  # optimizer steps: epochs are not the unit
    integer("trainer.check_val_every_n_epoch", 1, null=True),
    integer("trainer.num_sanity_val_steps", -1, null=True),
    integer("trainer.log_every_n_steps", 0, null=True),
    number("trainer.gradient_clip_val", 0, null=True),
    integer("trainer.accumulate_grad_batches", 1),
    custom(
        "trainer.deterministic",
        'true, false or "warn"',
        lambda v: isinstance(v, bool) or v == "warn",
        null=True,
    ),
    flag("trainer.benchmark", null=True),
    flag("trainer.enable_model_summary"),
    integer("trainer.skip_nonfinite_steps", 0, null=True),
    integer("trainer.grad_cache_chunks", 1, null=True),
    number("trainer.collective_timeout", 0, low_open=True, null=True),  # seconds
    one_of("checkpoint.format", CHECKPOINT_FORMATS),
    integer("checkpoint.keep_last", 1),
    custom(
        "resume.allow_changes",
        "a list of dotted config keys (a key accepts the keys below it)",
        lambda v: isinstance(v, list) and all(isinstance(k, str) and k for k in v),
    ),
    one_of("trainer.strategy.mixed_precision", MIXED_PRECISION, when=lambda c: sharded(c)),
    flag("trainer.strategy.reshard_after_forward", when=lambda c: sharded(c)),
    flag("trainer.strategy.cpu_offload", when=lambda c: sharded(c)),
    one_of("compression.mode", COMPRESSION_MODES),
    integer("compression.rank", 1, when=powersgd),
    # PowerSGD's warm start and error feedback need two uncompressed iterations first
    integer("compression.start_iter", 2, when=powersgd),
    flag("compression.error_feedback"),
    flag("compression.warm_start"),
    # below 1 torch's hook would "compress" vectors, and matrices into more bytes than they had
    number("compression.min_compression_rate", 1, when=powersgd),
    custom(
        "compression.exclude",
        "a list of parameter-name patterns",
        lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
    ),
    flag("compression.fp16"),
]

TRAIN_RULES = [
    *RUN_RULES,
    *TOKENIZER_RULES,
    *OPTIMIZER_RULES,
    *EVAL_RULES,
    *MOMENTUM_RULES,
    *LOSS_RULES,
    *DATA_RULES,
    *MODEL_RULES,
    *TRAINER_RULES,
]


def benchmark_set(cfg: DictConfig) -> bool:
    return bool(value_of(cfg, "benchmark.dataset"))


def benchmark_precision(cfg: DictConfig) -> bool:
    # a precision Lightning does not know is reported once, by the trainer's rule
    return benchmark_set(cfg) and value_of(cfg, "trainer.precision") in precisions()


# the benchmark pass runs in fp32 or under autocast (clip_benchmark's --amp); no half-precision model
BENCHMARK_PRECISIONS = ("32-true", "32", 32, "bf16-mixed", "16-mixed")

BENCHMARK_RULES = [
    text("benchmark.dataset", null=True),
    text("benchmark.split"),
    integer("benchmark.batch_size", 1),
    integer("benchmark.num_workers", 0),
    custom(
        "benchmark.recall_k",
        "a non-empty list of integers >= 1",
        lambda v: isinstance(v, list) and bool(v) and all(is_integer(k) and k >= 1 for k in v),
    ),
    one_of("trainer.precision", BENCHMARK_PRECISIONS, when=benchmark_precision),
]

EVALUATE_RULES = [
    existing_checkpoint("ckpt", null=True),
    # evaluation trains nothing: no training shards, no checkpoint to resume
    *[rule for rule in TRAIN_RULES if rule.key not in ("ckpt_path", "data.train_shards")],
    *BENCHMARK_RULES,
]

COMPRESS_RULES = [
    existing_checkpoint("ckpt"),
    integer("seed", 0, MAX_SEED),
    integer("threads", 0, null=True),
    flag("progress_bar"),
    flag("prune.enabled"),
    number("prune.ratio", 0, 1, high_open=True),  # the fraction removed: 1 would remove everything
    one_of("prune.importance", IMPORTANCES),
    one_of("prune.scope", SCOPES),
    custom(
        "prune.targets",
        "a non-empty list of " + ", ".join(KINDS),
        lambda v: isinstance(v, list) and bool(v) and all(t in KINDS for t in v),
    ),
    integer("prune.iterations", 1),
    integer("prune.calibration_batches", 1),
    integer("finetune.steps", 0),
    number("finetune.lr", 0),
    integer("finetune.batch_size", 1),
    flag("finetune.distill"),
    number("finetune.kl_weight", 0),
    number("finetune.mse_weight", 0),
    flag("lowrank_heads.enabled"),
    integer("lowrank_heads.rank", 1, null=True),
    number("lowrank_heads.energy", 0, 1, low_open=True),
    integer("lowrank_heads.finetune_steps", 0),
    flag("quantize.enabled"),
    integer("quantize.calibration_batches", 1),
    one_of("quantize.image", QUANT_MODES),
    one_of("quantize.text", QUANT_MODES),
    custom(
        "quantize.exclude",
        "auto, or a list of node names kept fp32",
        lambda v: v == "auto" or (isinstance(v, list) and all(isinstance(x, str) and x for x in v)),
    ),
    number("quantize.min_cosine", 0, 1, low_open=True),  # 1 asks for no change at all: every node fp32
    integer("quantize.sensitivity_batches", 1),
    custom(
        "token_merge.r",
        "an integer >= 0 or a list of them (tokens merged away per block; 0: off)",
        lambda v: all(is_integer(r) and r >= 0 for r in (v if isinstance(v, list) else [v])),
    ),
    integer("data.num_workers", 0),
    integer("report.latency_batch", 1),
    integer("report.repeats", 1),
    custom(
        "report.sweep_ratios",
        "a list of numbers in [0, 1)",
        lambda v: isinstance(v, list) and all(is_number(r) and 0 <= r < 1 for r in v),
    ),
    integer("report.sweep_finetune_steps", 0),
]


# ---------------------------------------------------------------------------------------------------------
# cross-field checks: each returns its problems


def global_batch(cfg: DictConfig) -> tuple[int, str] | None:
    """(the smallest global batch the config can mean, how it was counted): "auto" devices count as one."""
    batch, nodes = value_of(cfg, "data.batch_size"), value_of(cfg, "trainer.num_nodes", 1)
    if not (is_integer(batch) and is_integer(nodes)):
        return None
    devices = known_device_count(value_of(cfg, "trainer.devices", 1))
    shown = f"{devices}" if devices else "at least 1 (devices=auto)"
    counted = f"data.batch_size * trainer.devices * trainer.num_nodes = {batch} * {shown} * {nodes}"
    return batch * (devices or 1) * nodes, counted


def queue_and_distillation(cfg: DictConfig) -> list[str]:
    """The queue and distillation use the momentum encoder's keys; a queue of less than one global batch
    is overwritten wholly by every step's keys, so it never holds a step's worth of past negatives."""
    momentum = value_of(cfg, "momentum.enabled")
    if momentum is None:  # no momentum group (evaluation): nothing is trained
        return []
    problems = []
    queue, alpha = value_of(cfg, "loss.queue_size", 0), value_of(cfg, "loss.distill_alpha", 0.0)
    if momentum is False and is_integer(queue) and queue > 0:
        problems.append(f"loss.queue_size={queue}: needs momentum.enabled=true (it queues momentum keys)")
    if momentum is False and is_number(alpha) and alpha > 0:
        problems.append(
            f"loss.distill_alpha={alpha}: needs momentum.enabled=true (it distils the momentum model)"
        )
    found = global_batch(cfg)
    if is_integer(queue) and queue > 0 and found and queue < found[0]:
        size, counted = found
        problems.append(
            f"loss.queue_size={queue}: must be 0 or >= the global batch, {counted} = {size} "
            "(every step enqueues the whole global batch of keys)"
        )
    return problems


def configured_terms(cfg: DictConfig) -> dict[str, Any]:
    terms = value_of(cfg, "loss.objective.terms", {}) or {}
    return {name: term for name, term in terms.items() if term is not None}


def loss_terms_and_weights(cfg: DictConfig) -> list[str]:
    """At least one term; every weight a number >= 0 (or null, dropped) for a configured term; a queue
    used by at least one term (SigLIP scores in-batch pairs only)."""
    if value_of(cfg, "loss.objective") is None:
        return []
    terms = configured_terms(cfg)
    if not terms:
        return ["loss.objective.terms: configure at least one loss term (infonce, triplet, siglip)"]
    problems = []
    for name, weight in (value_of(cfg, "loss.weights", {}) or {}).items():
        if weight is None:
            continue
        if not (is_number(weight) and weight >= 0):
            problems.append(f"loss.weights.{name}={show(weight)}: must be null or a number >= 0")
        elif name == "itm":
            continue  # the fusion stage's term, added with it (fusion_stage checks the pair)
        elif name not in terms:
            problems.append(
                f"loss.weights.{name}={show(weight)}: names no configured loss term ({', '.join(terms)})"
            )
    queue = value_of(cfg, "loss.queue_size", 0)
    if is_integer(queue) and queue > 0 and not any(term_uses_queue(t) for t in terms.values()):
        problems.append(
            f"loss.queue_size={queue}: no configured term uses a queue ({', '.join(terms)} score in-batch "
            "pairs only); add an infonce or triplet term, or set loss.queue_size=0"
        )
    return problems


def text_negatives(cfg: DictConfig) -> list[str]:
    """Caption negatives are extra columns of InfoNCE's image->text logits: they need that term, and
    gradient caching's chunked passes do not carry them."""
    kind = value_of(cfg, "loss.text_negatives")
    if kind in (None, "none") or value_of(cfg, "loss.objective") is None:
        return []
    problems = []
    terms = configured_terms(cfg)
    if "infonce" not in terms:
        problems.append(
            f"loss.text_negatives={kind}: only the infonce term scores caption negatives, and the loss has "
            f"{', '.join(terms) or 'no terms'}: add it (loss=infonce or loss=infonce_triplet)"
        )
    chunks = value_of(cfg, "trainer.grad_cache_chunks", 1)
    if is_integer(chunks) and chunks > 1:
        problems.append(
            f"loss.text_negatives={kind} with trainer.grad_cache_chunks={chunks}: gradient caching does not "
            "carry caption negatives yet; set one of them off"
        )
    return problems


def fusion_stage(cfg: DictConfig) -> list[str]:
    """The fusion stage trains through the itm term, which needs the towers' token states of one whole
    batch on an unsharded model; ``loss.weights.itm`` means nothing without it."""
    layers = value_of(cfg, "model.fusion.layers", 0)
    on = is_integer(layers) and layers > 0
    problems = []
    k = value_of(cfg, "eval.rerank.k", 0)
    # evaluating a checkpoint, its own run's model is scored (evaluate.py checks its fusion stage)
    if not on and is_integer(k) and k > 0 and value_of(cfg, "ckpt") is None:
        problems.append(
            f"eval.rerank.k={k}: re-ranking scores pairs with the fusion stage, and the model has none; set "
            "model.fusion.layers=N (N > 0), or eval.rerank.k=0"
        )
    if not on:
        weight = value_of(cfg, "loss.weights.itm")
        if weight is not None and value_of(cfg, "loss.objective") is not None:
            problems.append(
                f"loss.weights.itm={show(weight)}: the itm term trains a fusion stage, and the model has "
                "none; set model.fusion.layers=N (N > 0), or loss.weights.itm=null"
            )
        return problems
    chunks = value_of(cfg, "trainer.grad_cache_chunks", 1)
    if is_integer(chunks) and chunks > 1:
        problems.append(
            f"model.fusion.layers={layers} with trainer.grad_cache_chunks={chunks}: the itm term needs the "
            "token states of the whole batch, which gradient caching's chunks do not keep; set one of them "
            "off"
        )
    if sharded(cfg):
        problems.append(
            f"model.fusion.layers={layers}: the fusion stage is not combined with FSDP yet; use trainer=ddp "
            "or trainer=ddp_cpu"
        )
    return problems


def term_uses_queue(term: Any) -> bool:
    from hydra.utils import get_class

    target = term.get("_target_") if isinstance(term, dict) else None
    try:
        return bool(getattr(get_class(target), "uses_queue", True)) if target else True
    except Exception:  # an unimportable target is instantiate's error to report
        return True


def text_tower_shape(cfg: DictConfig) -> list[str]:
    width, heads = value_of(cfg, "model.text_tower.width"), value_of(cfg, "model.text_tower.heads")
    if family(cfg) == "ours" and is_integer(width) and is_integer(heads) and heads > 0 and width % heads:
        return [
            f"model.text_tower.width={width}: must be divisible by model.text_tower.heads={heads} "
            "(each attention head takes width / heads channels)"
        ]
    return []


def projection_heads(cfg: DictConfig) -> list[str]:
    kind, rank = value_of(cfg, "model.projection_kind"), value_of(cfg, "model.projection_rank")
    if kind == "lowrank" and rank is None:
        return ["model.projection_kind=lowrank: needs model.projection_rank=R (the factor rank)"]
    if kind not in ("lowrank", None) and rank is not None:
        return [f"model.projection_rank={show(rank)}: needs model.projection_kind=lowrank (got {kind})"]
    return []


def locking(cfg: DictConfig) -> list[str]:
    """Counts of unlocked groups/layers mean something only for a locked tower."""
    problems = []
    for tower, counts in (
        ("image", ("lock_image_unlocked_groups", "lock_image_freeze_bn")),
        ("text", ("lock_text_unlocked_layers",)),
    ):
        if value_of(cfg, f"model.lock_{tower}") is not False:
            continue
        for key in counts:
            value = value_of(cfg, f"model.{key}")
            if value not in (None, 0, False):
                problems.append(f"model.{key}={show(value)}: needs model.lock_{tower}=true")
    return problems


def feature_cache(cfg: DictConfig) -> list[str]:
    """Cached features stand for the tower's output only if neither the tower nor the images change."""
    if value_of(cfg, "model.cache_locked_features") is not True:
        return []
    problems = []
    groups = value_of(cfg, "model.lock_image_unlocked_groups", 0)
    if value_of(cfg, "model.lock_image") is not True or groups not in (None, 0):
        problems.append(
            "model.cache_locked_features=true: needs model.lock_image=true with "
            f"model.lock_image_unlocked_groups=0 (got lock_image={show(value_of(cfg, 'model.lock_image'))}, "
            f"unlocked groups {show(groups)})"
        )
    if value_of(cfg, "model.lora.enabled") is True and value_of(cfg, "model.lora.targets.image") != []:
        problems.append(
            "model.cache_locked_features=true: the image tower's LoRA adapters change its output every step; "
            "set model.lora.targets.image=[] (adapters in the text tower only) or model.lora.enabled=false"
        )
    if value_of(cfg, "data.augment") not in (None, {}):
        problems.append(
            "model.cache_locked_features=true: needs data.augment=null (the features must not change)"
        )
    if value_of(cfg, "data.resampled") is True:
        problems.append(
            "model.cache_locked_features=true: reads each rank's cached shards once an epoch, while "
            "data.resampled=true draws shards with replacement: set data.resampled=false"
        )
    return problems


def trainer_combinations(cfg: DictConfig) -> list[str]:
    problems = []
    chunks, accumulate = (
        value_of(cfg, "trainer.grad_cache_chunks"),
        value_of(cfg, "trainer.accumulate_grad_batches", 1),
    )
    if is_integer(chunks) and chunks > 1 and accumulate != 1:
        problems.append(
            f"trainer.grad_cache_chunks={chunks}: does not combine with trainer.accumulate_grad_batches="
            f"{show(accumulate)} (gradient caching already gives the whole batch's gradient; raise "
            "data.batch_size)"
        )
    if is_integer(chunks) and chunks > 1 and value_of(cfg, "model.compile") == "step":
        problems.append(
            f"model.compile=step: does not combine with trainer.grad_cache_chunks={chunks} (the compiled "
            "step is the forward and loss of the whole batch, which gradient caching replaces by its own "
            "chunked passes); use model.compile=towers, or trainer.grad_cache_chunks=1"
        )
    mode = value_of(cfg, "compression.mode", "none")
    if mode != "none" and value_of(cfg, "trainer") is not None and value_of(cfg, "trainer.strategy") is None:
        problems.append(
            f"compression.mode={mode}: compresses DDP gradients; use trainer=ddp or trainer=ddp_cpu"
        )
    return problems


def sharded(cfg: DictConfig) -> bool:
    """Whether the trainer shards the model (trainer=fsdp, fsdp_cpu)."""
    return str(value_of(cfg, "trainer.strategy._target_", "")).endswith("fsdp.FSDP2Strategy")


def sharding(cfg: DictConfig) -> list[str]:
    """What FSDP does not combine with, said at start-up rather than found mid-run."""
    fmt = value_of(cfg, "checkpoint.format", "auto")
    if not sharded(cfg):
        if fmt == "sharded":
            return [
                "checkpoint.format=sharded: only a sharded trainer writes shards; use trainer=fsdp or "
                "trainer=fsdp_cpu, or checkpoint.format=auto"
            ]
        return []
    problems = []
    mode = value_of(cfg, "compression.mode", "none")
    if mode != "none":
        problems.append(
            f"compression.mode={mode}: DDP communication hooks do not apply to FSDP, which reduce-scatters "
            "gradients itself (trainer.strategy.mixed_precision=bf16 halves what it gathers); use "
            "compression=none, or trainer=ddp"
        )
    chunks = value_of(cfg, "trainer.grad_cache_chunks")
    if is_integer(chunks) and chunks > 1:
        problems.append(
            f"trainer.grad_cache_chunks={chunks}: gradient caching is not combined with FSDP yet (each "
            "chunk's backward would reduce-scatter); use trainer=ddp, or trainer.grad_cache_chunks=1"
        )
    if value_of(cfg, "model.compile") not in (False, None, ABSENT):
        problems.append(
            f"model.compile={show(value_of(cfg, 'model.compile'))}: compiling is not combined with FSDP yet; "
            "use model.compile=false, or trainer=ddp"
        )
    if value_of(cfg, "model.lora.enabled") is True:
        # not run yet: FSDP2 units would hold frozen base weights and trainable adapters together, and the
        # sharded checkpoint and merge paths have not been checked with peft's modules
        problems.append(
            "model.lora.enabled=true: LoRA is not combined with FSDP yet (not tested); use trainer=ddp or "
            "trainer=ddp_cpu (the frozen base stays out of DDP's reducer, so only adapters are all-reduced)"
        )
    if value_of(cfg, "model.cache_locked_features"):
        problems.append(
            "model.cache_locked_features=true: the feature cache is built under DDP only; use trainer=ddp, "
            "or keep the locked tower sharded (model.cache_locked_features=false)"
        )
    return problems


def zeroshot_inputs(cfg: DictConfig) -> list[str]:
    task = value_of(cfg, "eval.zeroshot.task")
    if task == "folder":
        root = value_of(cfg, "eval.zeroshot.root")
        if not (isinstance(root, str) and Path(root).is_dir()):
            return [f"eval.zeroshot.root={show(root)}: eval.zeroshot.task=folder needs an existing directory"]
    if task == "shards":
        return [
            f"eval.zeroshot.{key}=null: eval.zeroshot.task=shards needs it"
            for key in ("shards", "classnames")
            if not value_of(cfg, f"eval.zeroshot.{key}")
        ]
    return []


def shard_sources(cfg: DictConfig, keys: tuple[str, ...] = ("train_shards", "val_shards")) -> list[str]:
    """Without a generator (data.prepare), the shards must be named."""
    if value_of(cfg, "data") is None or value_of(cfg, "data.prepare") is not None:
        return []
    return [
        f"data.{key}=null: must name the shards (a pattern or a list) when data.prepare is null"
        for key in keys
        if value_of(cfg, f"data.{key}", "") is None
    ]


def held_out_shard_source(cfg: DictConfig) -> list[str]:
    # evaluation reads only the held-out shards
    return shard_sources(cfg, ("val_shards",))


TRAIN_CHECKS = [
    queue_and_distillation,
    loss_terms_and_weights,
    text_negatives,
    fusion_stage,
    text_tower_shape,
    locking,
    projection_heads,
    feature_cache,
    trainer_combinations,
    sharding,
    zeroshot_inputs,
    shard_sources,
]


def evaluation_data(cfg: DictConfig) -> list[str]:
    if value_of(cfg, "ckpt") is None and value_of(cfg, "data") is None and not benchmark_set(cfg):
        return [
            "data: without ckpt=PATH, say which shards to score (data=wds data.val_shards=...), or a "
            "clip_benchmark dataset (benchmark.dataset=NAME benchmark.root=DIR)"
        ]
    return []


def benchmark_inputs(cfg: DictConfig) -> list[str]:
    """A benchmark names a readable directory, and is scored alone (no held-out shards, no eval tasks)."""
    from autoglm_train.data.clip_benchmark import layout_problems

    if not benchmark_set(cfg):
        return []
    root, split = value_of(cfg, "benchmark.root"), value_of(cfg, "benchmark.split")
    if not isinstance(root, str) or not root.strip():
        return [f"benchmark.root={show(root)}: benchmark.dataset needs the dataset's directory"]
    problems = [
        f"benchmark.root={root}: {p} (clip_benchmark's webdataset layout)"
        for p in layout_problems(root, split if isinstance(split, str) else "test")
    ]
    if value_of(cfg, "eval.zeroshot.task") is not None:
        problems.append("eval.zeroshot.task: a benchmark run scores the benchmark alone; set it to null")
    if value_of(cfg, "eval.rerank.k"):
        problems.append("eval.rerank.k: a benchmark run does not re-rank; set it to 0")
    return problems


# options that no longer exist, each null in its YAML: what to do instead of setting it
REMOVED = {
    "prune.backend": "Torch-Pruning is the one pruner (the hand-written `ours` is gone); drop the key",
}


def removed_options(cfg: DictConfig) -> list[str]:
    """A removed option given a value."""
    return [
        f"{key}={show(value)}: the option was removed; {instead}"
        for key, instead in REMOVED.items()
        if (value := value_of(cfg, key)) is not None
    ]


# ---------------------------------------------------------------------------------------------------------
# entry points


Check = Callable[[DictConfig], list[str]]


def problems_in(cfg: DictConfig, rules: list[Rule], checks: list[Check]) -> list[str]:
    """Every problem the rules, then the cross-field checks, find."""
    problems = [p for rule in rules if (p := rule.problem(cfg))]
    return problems + [p for check in checks for p in check(cfg)]


def _raise_if_any(problems: list[str], job: str) -> None:
    if problems:
        raise ConfigError(problems, job)


def check_train_config(cfg: DictConfig) -> None:
    """A composed training config (conf/train.yaml); raises ``ConfigError`` listing every problem."""
    _raise_if_any(problems_in(cfg, TRAIN_RULES, TRAIN_CHECKS), "training")


def check_evaluate_config(cfg: DictConfig) -> None:
    """A composed evaluation config (conf/evaluate.yaml): the training keys it has, and ``ckpt``/``data``."""
    checks = [c for c in TRAIN_CHECKS if c is not shard_sources]
    checks += [held_out_shard_source, evaluation_data, benchmark_inputs]
    _raise_if_any(problems_in(cfg, EVALUATE_RULES, checks), "evaluation")


def check_compress_config(cfg: DictConfig) -> None:
    """A composed compression config (conf/compress.yaml); raises ``ConfigError`` listing every problem."""
    _raise_if_any(problems_in(cfg, COMPRESS_RULES, [removed_options]), "compression")
