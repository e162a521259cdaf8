"""Caption tokenizers: a BPE from HF ``tokenizers`` trained on the training captions, a Hugging Face model's
own (fast) tokenizer, or open_clip's. Each maps texts to a fixed-length LongTensor of ids, padded with the
tokenizer's pad id, pickles small for DataLoader workers, and serializes to JSON (kept in checkpoints).

Ours encodes ``[CLS] tokens [SEP]`` padded with ``[PAD]`` (id 0), so our text tower can pool the first
position and mask the padding; a Hugging Face tokenizer adds its own special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from autoglm_train.utils.files import atomic_write_with

PAD, CLS, SEP, UNK = "[PAD]", "[CLS]", "[SEP]", "[UNK]"
SPECIAL_TOKENS = [PAD, CLS, SEP, UNK]


class CaptionTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with fixed-length padding; picklable for DataLoader workers."""

    def __init__(self, tokenizer: Tokenizer, context_length: int, pad_token: str | None = None):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        # a tokenizer that pads already (a saved one, a Hugging Face one) says with which token
        padding = tokenizer.padding or {}
        self.pad_token = pad_token or padding.get("pad_token") or PAD
        self.pad_id = tokenizer.token_to_id(self.pad_token)
        if self.pad_id is None:
            raise ValueError(f"tokenizer has no padding token {self.pad_token!r}")
        self.context_length = context_length
        self._tok = tokenizer
        self._configure()

    def _configure(self) -> None:
        self._tok.enable_truncation(self.context_length)
        self._tok.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token, length=self.context_length)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Token ids, shape (N, context_length), int64."""
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tok.encode_batch(list(texts))
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return self._tok.decode(ids.tolist(), skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        # whole or absent: ranks or a resumed job may read it while it is written
        atomic_write_with(path, lambda tmp: self._tok.save(str(tmp)))

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str, context_length: int) -> CaptionTokenizer:
        return cls(Tokenizer.from_str(text), context_length)

    @classmethod
    def from_file(cls, path: str | Path, context_length: int) -> CaptionTokenizer:
        if not Path(path).exists():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(Tokenizer.from_file(str(path)), context_length)

    # tokenizers.Tokenizer pickles, but keep the state explicit and small for worker processes
    def __getstate__(self) -> dict:
        return {"json": self.to_json(), "context_length": self.context_length, "pad_token": self.pad_token}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Tokenizer.from_str(state["json"]), state["context_length"], state.get("pad_token"))

    @classmethod
    def from_pretrained(cls, name_or_path: str, context_length: int) -> CaptionTokenizer:
        """A Hugging Face model's tokenizer (by hub name, from the local cache, or a local directory), as
        its fast ``tokenizers`` backend: what the data pipeline needs, and JSON like ours."""
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(name_or_path)
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"{name_or_path}: no fast (tokenizers) tokenizer; it is needed for the pipeline")
        if hf.pad_token is None:
            raise ValueError(f"{name_or_path}: the tokenizer has no padding token")
        return cls(Tokenizer.from_str(hf.backend_tokenizer.to_str()), context_length, hf.pad_token)


def tokenizer_from_json(text: str, context_length: int):
    """The tokenizer a checkpoint or a run directory's ``tokenizer.json`` holds: ours, a Hugging Face
    model's, or an open_clip model's (a small spec naming it)."""
    from autoglm_train.data.open_clip_tokenizer import OpenCLIPTokenizer, is_open_clip_tokenizer_json

    if is_open_clip_tokenizer_json(text):
        return OpenCLIPTokenizer.from_json(text)
    return CaptionTokenizer.from_json(text, context_length)


def train_bpe(
    texts: Iterable[str], vocab_size: int, context_length: int, min_frequency: int = 2
) -> CaptionTokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        special_tokens=[(CLS, tok.token_to_id(CLS)), (SEP, tok.token_to_id(SEP))],
    )
    return CaptionTokenizer(tok, context_length)
