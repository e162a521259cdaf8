"""``python -m autoglm_train.cache_features [training overrides]``: build the locked image tower's feature
cache for every training shard ahead of training, with the training config's keys (the same model,
weights, image size and precision make the same fingerprint, so training then reads it; see
lit/feature_cache.py). Every shard is cached, so the cache serves a run on any number of ranks.

    python -m autoglm_train.cache_features experiment=shapes_lit model.image_tower.checkpoint=PATH
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict:
    import lightning as L
    from hydra.utils import instantiate

    from autoglm_train.build import check_model_weights, model_family
    from autoglm_train.data.shards import expand_shards
    from autoglm_train.lit.feature_cache import cache_shards
    from autoglm_train.train import start_run

    if model_family(cfg.model) == "open_clip":
        raise ValueError(
            "cache_features: builds caches for a timm image tower (model=small/vit_b16), not open_clip"
        )
    start_run(cfg)
    check_model_weights(cfg.model)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    tower = instantiate(cfg.model.image_tower)
    datamodule.attach(None, tower.data_config)
    # the training run's precision context and device, so the features are the ones it would compute
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, logger=False
    )
    tower = tower.to(trainer.strategy.root_device)
    urls = expand_shards(datamodule.train_shards)
    root = cfg.paths.feature_cache_dir
    cache, _ = cache_shards(root, tower, datamodule, trainer, urls, bool(cfg.progress_bar), "cache_features")
    print(f"feature cache: {cache.dir} ({len(urls)} shards)")
    return {"dir": str(cache.dir), "shards": len(urls)}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
