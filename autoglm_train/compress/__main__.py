"""``python -m autoglm_train.compress ckpt=PATH [overrides]``: compose conf/compress.yaml and run."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../../conf", config_name="compress")
def main(cfg: DictConfig) -> None:
    from autoglm_train.compress.run import run  # so --help and --cfg answer without loading torch

    run(cfg)


if __name__ == "__main__":
    main()
