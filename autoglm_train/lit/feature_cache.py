"""Features of a locked image tower, computed once and read back every epoch after (``model.cache_locked_
features=true``): a locked tower's output for a sample never changes when its transform is deterministic,
so an epoch then costs the text tower and the heads only, with no image decoded.

One file per training shard, under ``<feature_cache_dir>/<fingerprint>/``: the fingerprint hashes the
tower's weights and class, the image transform, the precision and this format, so a changed model, weights
or transform never reads a stale cache. A shard's file is named from its path, size and modification time
(a rewritten shard is cached again) and written whole or not at all (``utils/files.py``); one that does
not load or does not hold what its header says is built again. A killed build keeps the shards it finished.
Under DDP each rank caches and reads its own shards (``urls[rank::world]``); a cache built for all shards
ahead of training (``python -m autoglm_train.cache_features``) serves any number of ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import IterableDataset
from tqdm import tqdm

from autoglm_train.data.caption_negatives import negative_fields
from autoglm_train.data.shards import (
    SkipCounter,
    expand_shards,
    sample_id_to_int,
    stable_seed,
    usable_samples,
)
from autoglm_train.utils.files import atomic_write_with

log = logging.getLogger(__name__)

FORMAT = 1


def tower_fingerprint(tower: torch.nn.Module, transform_args: dict, precision: str) -> str:
    """What a cached feature depends on: the tower's class, weights and buffers (batch-norm statistics;
    not the step counter, which a frozen batch norm drops), the image transform and the precision."""
    h = hashlib.sha256(f"{FORMAT}|{type(tower).__qualname__}|{getattr(tower, 'name', '')}".encode())
    h.update(json.dumps(transform_args, sort_keys=True, default=str).encode())
    h.update(str(precision).encode())
    for name, value in tower.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        h.update(name.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """The cached features of each shard, for one fingerprint."""

    def __init__(self, root: str | Path, fingerprint: str):
        self.dir = Path(root) / fingerprint

    def path(self, url: str) -> Path:
        stat = os.stat(url)
        key = hashlib.sha256(f"{os.path.abspath(url)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
        return self.dir / f"{Path(url).name}.{key[:12]}.safetensors"

    def read(self, url: str) -> dict | None:
        """The shard's ``features``, ``ids`` and ``captions``; None when absent, unreadable or incomplete."""
        path = self.path(url)
        if not path.exists():
            return None
        try:
            with safe_open(path, "pt") as f:  # one read of the file: tensors and the header's metadata
                meta = f.metadata()
                features, ids = f.get_tensor("features"), f.get_tensor("ids")
            captions = json.loads(meta["captions"])
            count = int(meta["count"])
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            log.warning("feature cache %s is damaged (%s): building it again", path, exc)
            return None
        if not (features.shape[0] == ids.shape[0] == len(captions) == count):
            log.warning("feature cache %s is incomplete: building it again", path)
            return None
        return {"features": features, "ids": ids, "captions": captions}

    def write(
        self,
        url: str,
        features: torch.Tensor,
        ids: torch.Tensor,
        captions: list[list[str]],
        built_by: str = "",
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        metadata = {
            "captions": json.dumps(captions),
            "count": str(len(captions)),
            "shard": url,
            "built_by": built_by,
        }
        tensors = {"features": features.contiguous(), "ids": ids}
        atomic_write_with(self.path(url), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@torch.no_grad()
def shard_features(
    tower: torch.nn.Module,
    url: str,
    transform: Callable,
    caption_key: str,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """The tower's features of every usable sample of one shard, in shard order (fp32, on the host)."""
    device = next(tower.parameters()).device
    features, ids, captions, images = [], [], [], []

    def flush():
        if images:
            with autocast():
                out = tower(torch.stack(images).to(device))
            features.append(out.float().cpu())
            images.clear()

    for sample in usable_samples([url], caption_key, SkipCounter()):
        images.append(transform(sample["image"]))
        ids.append(sample_id_to_int(sample["id"]))
        captions.append(list(sample["captions"]))
        if len(images) == batch_size:
            flush()
    flush()
    width = getattr(tower, "width", 0)
    stacked = torch.cat(features) if features else torch.zeros(0, width)
    return stacked, torch.tensor(ids, dtype=torch.long), captions


def ensure_cached(
    cache: FeatureCache,
    tower: torch.nn.Module,
    urls: Sequence[str],
    transform: Callable,
    caption_key: str,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = True,
    built_by: str = "",
) -> list[dict]:
    """Each shard's cached features, building the ones that are missing or damaged (tower in eval mode)."""
    entries, built = [], 0
    was_training = tower.training
    tower.eval()
    try:
        for url in tqdm(urls, desc="caching locked image features", unit="shard", disable=not progress):
            entry = cache.read(url)
            if entry is None:
                features, ids, captions = shard_features(
                    tower, url, transform, caption_key, batch_size, autocast
                )
                cache.write(url, features, ids, captions, built_by)
                entry, built = {"features": features, "ids": ids, "captions": captions}, built + 1
            entries.append(entry)
    finally:
        tower.train(was_training)
    log.info("feature cache %s: %d shard(s) read, %d built", cache.dir, len(urls) - built, built)
    return entries


def cache_shards(root, tower, datamodule, trainer: L.Trainer, urls, progress: bool, built_by: str):
    """``(cache, entries)`` of ``urls`` for a tower read through the datamodule's eval transform under the
    trainer's precision context: the one place the fingerprint is made, for training and ahead of it."""
    fingerprint = tower_fingerprint(tower, datamodule.eval_transform_args, str(trainer.precision))
    cache = FeatureCache(root, fingerprint)
    entries = ensure_cached(
        cache,
        tower,
        urls,
        datamodule.eval_transform,
        datamodule.caption_key,
        datamodule.eval_batch_size,
        trainer.precision_plugin.forward_context,
        progress,
        built_by,
    )
    return cache, entries


class CachedFeatures(IterableDataset):
    """Training batches from cached features: each epoch a permutation of this rank's samples (seeded by
    seed, epoch and rank), one of each sample's captions drawn in turn, short last batch dropped (equal
    batches on every rank), as the shard stream does. ``image`` holds the tower's features."""

    def __init__(
        self, entries: list[dict], tokenizer, batch_size: int, seed: int, rank: int = 0, text_negatives=None
    ):
        self.features = torch.cat([e["features"] for e in entries])
        self.ids = torch.cat([e["ids"] for e in entries])
        self.captions = [c for e in entries for c in e["captions"]]
        if len(self.captions) < batch_size:
            raise ValueError(f"the feature cache holds {len(self.captions)} samples, fewer than one batch")
        self.tokenizer, self.batch_size, self.seed, self.rank = tokenizer, batch_size, seed, rank
        self.text_negatives = text_negatives  # a data/caption_negatives.py generator, or None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions) // self.batch_size

    def __iter__(self):
        seed = stable_seed(self.seed, self.epoch, self.rank, "cached")
        order = torch.randperm(len(self.captions), generator=torch.Generator().manual_seed(seed))
        captions_rng = random.Random(seed)
        negatives_rng = random.Random(stable_seed(seed, "negatives"))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            rows = order[start : start + self.batch_size]
            texts = [captions_rng.choice(self.captions[r]) for r in rows.tolist()]
            yield {
                "image": self.features[rows],
                "text": self.tokenizer(texts),
                "id": self.ids[rows],
                "skipped": {},
                **negative_fields(self.text_negatives, texts, negatives_rng, self.tokenizer),
            }


class FeatureCacheCallback(L.Callback):
    """Before the first batch is read: this rank's shards cached (built where missing), and the training
    loader switched to them."""

    def __init__(self, root: str | Path, progress: bool = True):
        self.root, self.progress = root, progress

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        tower = pl_module.model.image_tower
        if not getattr(tower, "locked", False) or datamodule.augment:
            raise ValueError(
                "model.cache_locked_features=true needs a wholly locked image tower (model.lock_image=true, "
                "no unlocked groups) and no augmentation (data.augment=null): its features must not change"
            )
        urls = expand_shards(datamodule.train_shards)[trainer.global_rank :: trainer.world_size]
        if not urls:
            raise ValueError(
                f"model.cache_locked_features: rank {trainer.global_rank} of {trainer.world_size} has no "
                f"training shard ({len(expand_shards(datamodule.train_shards))} in all)"
            )
        progress = self.progress and trainer.is_global_zero
        built_by = f"rank {trainer.global_rank} of {trainer.world_size}"
        _, entries = cache_shards(self.root, tower, datamodule, trainer, urls, progress, built_by)
        dataset = CachedFeatures(
            entries,
            datamodule.tokenizer,
            datamodule.batch_size,
            datamodule.seed,
            trainer.global_rank,
            getattr(datamodule, "text_negatives", None),
        )
        datamodule.use_cached_features(dataset)
        trainer.strategy.barrier("feature_cache")
