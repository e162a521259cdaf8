"""LightningDataModule over webdataset shards (data/shards.py)."""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import signal
from collections.abc import Callable, Sequence

import lightning as L
import timm.data
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from autoglm_train.data.shards import (
    ShardWatch,
    WatchedLoader,
    build_pipeline,
    epoch_samples_from_sizes,
    expand_shards,
    first_usable_sample,
    missing_local_shards,
    stable_seed,
)
from autoglm_train.model.towers import trim_padding_columns

log = logging.getLogger(__name__)


def ignore_requeue_signal(worker_id: int) -> None:
    # Slurm sends its pre-timeout SIGUSR1 to every process of the step; a loader worker would die of it
    # (default action) while the training process saves its checkpoint and requeues the job
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # Lightning seeds workers only when no worker_init_fn is set: keep its seeding
    if os.environ.get("PL_SEED_WORKERS") == "1":
        pl_worker_init_function(worker_id)


def tokenize_trimmed(tokenizer, texts: list[str]) -> torch.Tensor:
    return trim_padding_columns(tokenizer(texts))


class ShardDataModule(L.LightningDataModule):
    """Train and held-out shard sets -> batches.

    ``prepare`` (optional) makes the shards when they are missing, e.g. the embedded shapes set, and returns
    ``{"train": [...], "val": [...]}``, used where ``train_shards``/``val_shards`` are null;
    ``missing_hint`` is appended to the error when shards are missing and nothing can make them.
    Call ``attach(tokenizer, model_data_config)`` before the loaders are asked for: the transform follows
    the image tower's preprocessing (input size, mean, std, interpolation of its weights; ``image_size``
    overrides the size when set). ``timeout``: seconds a loader with workers waits for a batch before a
    ShardStallError names the shards its workers were reading (0 or None: forever). ``hard_groups``: the
    kinds of hard-negative group (``varies`` in a held-out sample's json, e.g. ``shape``) whose
    within-group recall validation reports as ``val/hard_r1_<kind>``; ``group_only``: those of them
    scored within their groups only, left out of the retrieval figures (``val/r1_mean`` and the rest).
    """

    def __init__(
        self,
        train_shards: str | Sequence[str] | None,
        val_shards: str | Sequence[str] | None,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 1,
        image_size: int | None = None,
        caption_key: str = "captions",
        shuffle_buffer: int = 2000,
        resampled: bool = False,
        epoch_samples: int | None = None,
        augment: dict | None = None,
        crop_pct: float | None = None,
        prepare: Callable[[], object] | None = None,
        missing_hint: str = "",
        seed: int = 0,
        timeout: float | None = 600.0,
        hard_groups: Sequence[str] | None = None,
        group_only: Sequence[str] | None = None,
    ):
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.image_size = num_workers, image_size
        self.caption_key, self.shuffle_buffer, self.resampled = caption_key, shuffle_buffer, resampled
        self.epoch_samples = epoch_samples
        self.augment, self.crop_pct = augment, crop_pct
        self.prepare, self.missing_hint = prepare, missing_hint
        self.seed = seed
        self.timeout = timeout or 0
        self.hard_groups = tuple(hard_groups or ())
        self.group_only = tuple(group_only or ())
        unknown = set(self.group_only) - set(self.hard_groups)
        if unknown:
            raise ValueError(
                f"data.group_only {sorted(unknown)} must be among data.hard_groups {self.hard_groups}"
            )
        self.tokenizer = None
        self.text_negatives = None
        self.train_transform = self.eval_transform = None
        self.stream_epoch = 0  # the training stream's current epoch (lit/run_state.py counts batches in it)
        self._resume: tuple[int, int] | None = None  # (epoch, batches) from a checkpoint
        self._prepared = False
        self._cached = None  # a CachedFeatures dataset, set before training by lit/feature_cache.py

    def prepare_data(self) -> None:
        # once per run: Lightning calls it again before trainer.validate, and a shard that vanished since
        # is by then a counted skip, not a reason to stop
        if self._prepared:
            return
        if self.prepare is not None:
            made = self.prepare()
            self.train_shards = self.train_shards or made["train"]
            self.val_shards = self.val_shards or made["val"]
        for name, shards in (("train_shards", self.train_shards), ("val_shards", self.val_shards)):
            urls = expand_shards(shards or [])
            missing = missing_local_shards(urls)
            if not urls or missing:
                raise FileNotFoundError(
                    f"data.{name}: {len(missing)} of {len(urls)} shards are missing "
                    f"(first: {missing[:2] or shards}). {self.missing_hint}".strip()
                )
            first_usable_sample(urls, self.caption_key)  # no usable sample at all is an error naming them
        self._prepared = True

    def attach(
        self, tokenizer, model_data_config: dict, trim_text: bool = False, text_negatives=None
    ) -> None:
        """``model_data_config``: the image tower's ``data_config`` (the preprocessing its weights
        expect); ``image_size`` overrides its input size when set, unless the tower takes one size only
        (``fixed_input_size``: open_clip towers, ViTs), which the images then follow (``input_size``).
        ``trim_text``: batches drop the token columns that are padding in every row (for a text tower that
        masks padding, so the same output).
        ``text_negatives`` (a data/caption_negatives.py generator): training batches carry each caption's
        generated negatives."""
        self.tokenizer = tokenizer
        self.text_negatives = text_negatives
        if trim_text and tokenizer is not None:
            self.tokenizer = functools.partial(tokenize_trimmed, tokenizer)  # pickles into spawned workers
        cfg = timm.data.resolve_data_config(model_data_config)
        common = {
            "input_size": self.input_size(cfg["input_size"], bool(model_data_config.get("fixed_input_size"))),
            "interpolation": cfg["interpolation"],
            "mean": cfg["mean"],
            "std": cfg["std"],
        }
        crop_pct = self.crop_pct if self.crop_pct is not None else cfg["crop_pct"]
        self.eval_transform = timm.data.create_transform(**common, is_training=False, crop_pct=crop_pct)
        # what an exported model needs to preprocess images the same way, without this class
        self.eval_transform_args = {**common, "input_size": list(common["input_size"]), "crop_pct": crop_pct}
        if self.augment:
            self.train_transform = timm.data.create_transform(**common, is_training=True, **self.augment)
        else:
            self.train_transform = self.eval_transform

    def input_size(self, model_size: tuple[int, int, int], fixed: bool) -> tuple[int, int, int]:
        """``data.image_size`` (square) where set, else the tower's own size; a tower that takes its own
        size only gets it whatever ``data.image_size`` says (e.g. the shapes set's 64 px rendered for a
        224 px open_clip ViT: its position embeddings fit one grid), and the run says so."""
        model_size = tuple(int(x) for x in model_size)
        if not self.image_size:
            return model_size
        wanted = (3, int(self.image_size), int(self.image_size))
        if fixed and wanted != model_size:
            log.warning(
                "data.image_size=%d is not used: the image tower takes %dx%d images only, so images are "
                "resized to %dx%d (data.image_size=null follows the model without this message)",
                self.image_size,
                *model_size[1:],
                *model_size[1:],
            )
            return model_size
        return wanted

    def _loader(self, train: bool) -> DataLoader:
        if self.tokenizer is None:
            raise RuntimeError(
                "ShardDataModule.attach(tokenizer, data_config) must be called before the loaders"
            )
        workers = self.num_workers if train else min(self.num_workers, len(expand_shards(self.val_shards)))
        # a timeout needs workers (the loader reads in-process otherwise), and naming the stalled shard
        # needs them to say what they read
        watch = ShardWatch() if workers and self.timeout else None
        pipeline = build_pipeline(
            self.train_shards if train else self.val_shards,
            tokenizer=self.tokenizer,
            transform=self.train_transform if train else self.eval_transform,
            batch_size=self.batch_size if train else self.eval_batch_size,
            train=train,
            caption_key=self.caption_key,
            shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled and train,
            seed=self.seed,
            shard_watch=watch,
            group_kinds=self.hard_groups,
            text_negatives=self.text_negatives,
        )
        if train and self.resampled:
            pipeline = pipeline.with_epoch(self.resampled_epoch_batches(max(workers, 1)))
        # workers are not persistent: each epoch starts them with seeds from (seed, epoch), which is what
        # lets a resumed run replay the same stream (see ReplayableStream)
        loader = WatchedLoader(
            pipeline,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            pin_memory=self._pin_memory(),
            worker_init_fn=ignore_requeue_signal if workers else None,
            timeout=self.timeout if watch else 0,
        )
        loader.shard_watch = watch
        return loader

    def resampled_epoch_batches(self, workers: int) -> int:
        """Batches each loader worker yields per epoch of a resampled (endless) stream: the epoch is the
        shard set's size (``data.epoch_samples``, else ``sizes.json`` beside the shards) over all ranks."""
        samples = self.epoch_samples or epoch_samples_from_sizes(expand_shards(self.train_shards))
        if not samples:
            raise ValueError(
                "data.resampled=true draws shards with replacement and needs an epoch length: give "
                "data.epoch_samples=N or put a sizes.json ({shard name: samples}) beside the shards"
            )
        world = self.trainer.world_size if self.trainer is not None else 1
        return max(1, math.ceil(samples / (self.batch_size * world * workers)))

    def train_dataloader(self):
        if self._cached is not None:
            loader = DataLoader(self._cached, batch_size=None, num_workers=0, pin_memory=self._pin_memory())
            return ReplayableStream(self, loader, self.seed)
        return ReplayableStream(self, self._loader(train=True), self.seed)

    def use_cached_features(self, dataset) -> None:
        """Training reads this (lit/feature_cache.py's CachedFeatures) instead of the shards."""
        self._cached = dataset

    def _pin_memory(self) -> bool:
        # page-locked batches copy to a GPU without blocking the host (as open_clip's loader does)
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def val_dataloader(self) -> DataLoader:
        loader = self._loader(train=False)
        # evaluation draws its loader seed from a private generator, so it never shifts training's randomness
        loader.generator = torch.Generator().manual_seed(0)
        return loader

    def resume_stream(self, epoch: int, batches: int) -> None:
        """The next training epoch is ``epoch``, replayed past the ``batches`` already trained on (set from a
        checkpoint by lit/run_state.py, before the first batch is drawn)."""
        self._resume = (epoch, batches)


class ReplayableStream:
    """The training loader, resumable mid-epoch. Each epoch's stream is a pure function of (seed, epoch,
    rank, worker): the pipeline's own generators and the loader's worker seeds are set from them before
    iterating. On resume it rebuilds the checkpoint's epoch and re-reads and drops the batches this rank
    already trained on.

    Replaying costs reading those batches again; it buys a resumed run identical to one never stopped.
    """

    def __init__(self, datamodule: ShardDataModule, loader, seed: int):
        self.datamodule, self.loader, self.seed = datamodule, loader, seed
        self.epoch = 0

    def __iter__(self):
        # lazy: Lightning calls iter() once just to check the loader is iterable, and never draws from it
        return self._stream()

    def _stream(self):
        resume, self.datamodule._resume = self.datamodule._resume, None
        if resume:
            self.epoch, skip = resume
        epoch, self.epoch = self.epoch, self.epoch + 1
        self.datamodule.stream_epoch = epoch
        self.loader.dataset.set_epoch(epoch)
        self.loader.generator = torch.Generator().manual_seed(stable_seed(self.seed, epoch, "workers"))
        iterator = iter(self.loader)
        if resume and skip:
            if next(itertools.islice(iterator, skip - 1, None), None) is None:
                raise RuntimeError(
                    f"cannot resume the data stream: epoch {epoch} has fewer than {skip} batches"
                )
            log.info("resumed the training stream at epoch %d after %d batches", epoch, skip)
        yield from iterator
