"""Caption tokenizer: a BPE from HF ``tokenizers``, trained on the training captions or loaded from a file.

Every encoding is ``[CLS] tokens [SEP]`` padded with ``[PAD]`` (id 0) to the context length, so the text
tower can pool the first position and mask the padding.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, CLS, SEP, UNK = "[PAD]", "[CLS]", "[SEP]", "[UNK]"
SPECIAL_TOKENS = [PAD, CLS, SEP, UNK]


class CaptionTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with fixed-length padding; picklable for DataLoader workers."""

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        if tokenizer.token_to_id(PAD) != 0 or tokenizer.token_to_id(CLS) is None:
            raise ValueError(f"tokenizer must define {PAD} as id 0 and {CLS}, {SEP}")
        self.context_length = context_length
        self._tok = tokenizer
        self._configure()

    def _configure(self) -> None:
        self._tok.enable_truncation(self.context_length)
        self._tok.enable_padding(pad_id=0, pad_token=PAD, length=self.context_length)

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
        self._tok.save(str(path))

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
        return {"json": self.to_json(), "context_length": self.context_length}

    def __setstate__(self, state: dict) -> None:
        self.context_length = state["context_length"]
        self._tok = Tokenizer.from_str(state["json"])
        self._configure()


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
