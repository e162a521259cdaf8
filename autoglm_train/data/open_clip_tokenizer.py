"""open_clip's tokenizer for an open_clip model, behind the interface of our caption tokenizer.

Its JSON form is a small spec naming the model (open_clip rebuilds the vocabulary from its package), kept in
checkpoints and written as the run's ``tokenizer.json``:
``{"open_clip_tokenizer": name, "context_length": n, "model_config": path or null}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from autoglm_train.utils.files import atomic_write_text

SPEC_KEY = "open_clip_tokenizer"


def register_config(name: str, model_config: str | None) -> None:
    """A custom architecture's config must be known to open_clip in every process (workers included),
    since the tokenizer kind and context length come from it."""
    import open_clip  # here, not at the top: tokenizer_from_json asks this module about every checkpoint

    if model_config is None:
        return
    path = Path(model_config)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config not found: {model_config}")
    if open_clip.get_model_config(name) != json.loads(path.read_text()):
        open_clip.add_model_config(path)


def is_open_clip_tokenizer_json(text: str) -> bool:
    """Whether ``text`` is an ``OpenCLIPTokenizer`` spec (not a ``tokenizers`` JSON)."""
    if SPEC_KEY not in text[:1000]:  # a full tokenizers JSON runs to megabytes: look at the head only
        return False
    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(spec, dict) and SPEC_KEY in spec


class OpenCLIPTokenizer:
    """``open_clip.get_tokenizer(name)``: texts -> LongTensor (N, context_length); picklable (small state,
    rebuilt in the worker)."""

    def __init__(self, name: str, context_length: int | None = None, model_config: str | None = None):
        import open_clip

        self.name = name.replace("/", "-")  # open_clip's spelling, as the model's
        self.model_config = str(Path(model_config).expanduser().resolve()) if model_config else None
        register_config(self.name, self.model_config)
        if self.name not in open_clip.list_models():
            # open_clip would fall back silently to CLIP's tokenizer at 77 tokens
            raise ValueError(f"{self.name!r} is not an open_clip model (open_clip.list_models())")
        self._tok = open_clip.get_tokenizer(self.name, context_length=context_length)
        self.context_length = int(self._tok.context_length)

    @property
    def _hf(self):
        """The Hugging Face tokenizer under open_clip's HFTokenizer/SigLipTokenizer; None for CLIP's BPE."""
        return getattr(self._tok, "tokenizer", None)

    @property
    def vocab_size(self) -> int:
        return len(self._hf) if self._hf is not None else int(self._tok.vocab_size)

    @property
    def pad_id(self) -> int:
        pad = self._hf.pad_token_id if self._hf is not None else None
        return 0 if pad is None else int(pad)  # CLIP's BPE pads with zeros

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Token ids, shape (N, context_length), int64."""
        if isinstance(texts, str):
            texts = [texts]
        return self._tok(list(texts)).long()

    def decode(self, ids: torch.Tensor) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        # CLIP's BPE: the text lies between start and end of text; 0 pads but is also "!" inside it
        end = ids.index(self._tok.eot_token_id) if self._tok.eot_token_id in ids else len(ids)
        return self._tok.decode([i for i in ids[:end] if i != self._tok.sot_token_id]).strip()

    def spec(self) -> dict:
        return {SPEC_KEY: self.name, "context_length": self.context_length, "model_config": self.model_config}

    def to_json(self) -> str:
        return json.dumps(self.spec())

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")  # whole or absent, as CaptionTokenizer.save

    @classmethod
    def from_spec(cls, spec: dict) -> OpenCLIPTokenizer:
        return cls(spec[SPEC_KEY], spec.get("context_length"), spec.get("model_config"))

    @classmethod
    def from_json(cls, text: str) -> OpenCLIPTokenizer:
        return cls.from_spec(json.loads(text))

    def __getstate__(self) -> dict:
        return self.spec()

    def __setstate__(self, state: dict) -> None:
        self.__init__(state[SPEC_KEY], state["context_length"], state["model_config"])
