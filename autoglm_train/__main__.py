"""``python -m autoglm_train [overrides]``: compose the Hydra config and run training."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from autoglm_train import train  # imported here so `--help` and `--cfg` answer without loading torch

    return train.entry(cfg)


if __name__ == "__main__":
    main()
