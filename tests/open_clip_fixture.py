"""A tiny open_clip architecture registered from a JSON written by the test, and a weights file of a
randomly initialised instance: open_clip models without a download.

    from open_clip_fixture import TinyCLIP   # tests/ is on sys.path under pytest, as for conftest
    tiny = TinyCLIP(tmp_path, "tiny-oc-test")
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from autoglm_train.data.open_clip_tokenizer import OpenCLIPTokenizer
from autoglm_train.model.open_clip import open_clip_model

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class TinyCLIP:
    """A registered tiny architecture and a weights file of a randomly initialized instance."""

    def __init__(self, root: Path, name: str, logit_scale: float = 2.5, **config):
        root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config = root / f"{name}.json"
        self.config.write_text(json.dumps({**TINY_CONFIG, **config}))
        open_clip.add_model_config(self.config)
        torch.manual_seed(0)
        clip = open_clip.create_model(name)
        with torch.no_grad():
            clip.logit_scale.fill_(logit_scale)  # not the default: the temperature really comes from the file
        self.weights = root / "weights.pt"
        torch.save(clip.state_dict(), self.weights)

    def ours(self, **kwargs):
        return open_clip_model(
            self.name, pretrained=str(self.weights), model_config=str(self.config), **kwargs
        )

    def reference(self, weights: Path | None = None, **kwargs):
        """open_clip's own model from a weights file (ours unless given), as a user would load it."""
        model, _, _ = open_clip.create_model_and_transforms(
            self.name, pretrained=str(weights or self.weights), **kwargs
        )
        return model.eval()

    def tokenizer(self) -> OpenCLIPTokenizer:
        return OpenCLIPTokenizer(self.name, None, str(self.config))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second thread gains nothing and stalls (5x and more) when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
