"""Shared fixtures: tiny shards and tiny composed configs (the full suite runs on 2 CPU cores)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from autoglm_train.data.shapes import write_shapes_shards

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# small enough to train in seconds on 2 cores, big enough to learn above chance
TINY = [
    "data.batch_size=64",
    "data.eval_batch_size=100",
    "data.num_workers=0",
    "trainer.precision=32-true",  # the tests compare numbers at fp32 (bf16 is tested where named)
    "data.image_size=32",
    "data.shuffle_buffer=500",
    "data.prepare.n_train=3000",
    "data.prepare.n_val=200",
    "data.prepare.n_val_binding=50",
    "data.prepare.image_size=32",
    "data.prepare.samples_per_shard=1000",
    "model.embed_dim=64",
    "model.text_tower.width=64",
    "model.text_tower.depth=1",
    "model.text_tower.heads=2",
    "tokenizer.train_samples=2000",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "trainer.enable_model_summary=false",
    "scheduler.warmup_steps=2",
    "logger=csv",
    "progress_bar=false",
]


def free_port() -> int:
    """A TCP port free now on localhost, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unit_embeddings(n: int, d: int, seed: int):
    """Random unit-norm fp64 image and text embeddings (independent), ready for gradients."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    return image, text


def assert_rank_shares_equal_whole(rank_loss, whole: torch.Tensor, inputs: tuple, world: int) -> None:
    """Simulated ranks: ``rank_loss(rank)`` scores that rank's rows against the gathered batch. The mean of
    the rank losses, and the sum of their gradients / world (DDP's average), equal the whole batch's."""
    whole_grads = torch.autograd.grad(whole, inputs)
    losses = [rank_loss(rank) for rank in range(world)]
    assert torch.stack(losses).mean().item() == pytest.approx(whole.item(), rel=1e-12)
    grads = [torch.autograd.grad(loss / world, inputs) for loss in losses]
    for k, ref in enumerate(whole_grads):
        torch.testing.assert_close(sum(g[k] for g in grads), ref, rtol=1e-10, atol=1e-13)


@pytest.fixture(scope="session", autouse=True)
def _temp_files_under_pytest(tmp_path_factory):
    """Temporary files of the suite, and of every process it starts, go under pytest's own base folder
    (which keeps the last three sessions): what a process SIGKILLed on purpose (a preemption, a lost rank)
    cannot remove, such as a loader's shard-watch folder, or wandb's temporary folders, is not left in
    the system's temp folder."""
    folder = str(tmp_path_factory.mktemp("tmp"))
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = folder
    tempfile.tempdir = None  # recomputed from TMPDIR on next use
    yield
    if saved is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved
    tempfile.tempdir = None


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """One tiny shapes set shared by the session (same spec as TINY)."""
    data_dir = tmp_path_factory.mktemp("data")
    write_shapes_shards(
        data_dir / "shapes", n_train=3000, n_val=200, n_val_binding=50, image_size=32, samples_per_shard=1000
    )
    return data_dir


def shapes_set(data_dir: Path) -> Path:
    """The directory of the one shapes set in ``data_dir`` (each spec gets its own under ``shapes/``)."""
    (found,) = {p.parent for p in (data_dir / "shapes").glob("*/manifest.json")}
    return found


def compose_config(overrides: list[str], output_dir: Path, config_name: str = "train"):
    """Compose like the entry point does, with the Hydra runtime set so ${hydra:...} resolves."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    return cfg


def train_run(overrides: list[str], run_dir: Path) -> dict:
    """A training run as the entry point makes it (its composed config in ``.hydra/``, which is how a
    checkpoint is read back); returns its metrics."""
    from omegaconf import OmegaConf

    from autoglm_train import train

    cfg = compose_config(overrides, run_dir)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return train.run(cfg)


@pytest.fixture
def tiny_cfg(tmp_path, shapes_dir):
    def make(*extra: str, output_dir: Path | None = None):
        os.environ["AUTOGLM_DATA_DIR"] = str(shapes_dir)
        return compose_config(TINY + list(extra), output_dir or tmp_path / "run")

    yield make
    os.environ.pop("AUTOGLM_DATA_DIR", None)
    GlobalHydra.instance().clear()
