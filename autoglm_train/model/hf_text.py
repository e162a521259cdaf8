"""A text tower on a Hugging Face ``transformers`` encoder (BERT, RoBERTa, DistilBERT, XLM-R, ModernBERT).

Token ids come from the model's own tokenizer (``CaptionTokenizer.from_pretrained``); padding is its pad id,
so the attention mask is ``tokens != pad_id``. Pooling: ``cls`` (first position), ``mean`` (over
non-padding tokens) or ``eos`` (the last non-padding token, e.g. ``[SEP]`` or ``</s>``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from autoglm_train.model.towers import LockableTower
from autoglm_train.model.weights import MissingWeightsError, ensure_hub_files

POOLS = ("cls", "mean", "eos")


def check_hf_weights(name_or_path: str, pretrained: bool = True) -> None:
    """Raise before anything expensive when the model's files are neither a local directory nor cached."""
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.text_tower.name={name_or_path}: no config.json in that directory")
        return
    if name_or_path.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model.text_tower.name={name_or_path}: directory not found")
    command = f"hf download {name_or_path}"
    what = f"Hugging Face text tower {name_or_path!r}"
    ensure_hub_files(name_or_path, ("config.json",), what, command)
    ensure_hub_files(name_or_path, ("tokenizer.json", "tokenizer_config.json"), what, command)
    if pretrained:
        ensure_hub_files(name_or_path, ("model.safetensors", "pytorch_model.bin"), what, command)


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's stack of layers (``encoder.layer``, ``transformer.layer``, ``layers``, ...): the
    ModuleList holding ``num_hidden_layers`` blocks."""
    depth = getattr(model.config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    matching = [m for m in lists if len(m) == depth] or sorted(lists, key=len, reverse=True)
    if not matching:
        raise ValueError(f"{type(model).__name__}: no stack of layers found to lock or decay")
    return matching[0]


class HFTextTower(LockableTower):
    def __init__(
        self,
        name: str,
        pretrained: bool = True,
        pool: str = "cls",
        context_length: int = 64,
        pad_id: int | None = None,
    ):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pool not in POOLS:
            raise ValueError(f"model.text_tower.pool must be one of {POOLS}, got {pool!r}")
        check_hf_weights(name, pretrained)
        try:
            if pretrained:
                self.model = AutoModel.from_pretrained(name)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(name))
        except OSError as exc:
            raise MissingWeightsError(f"model.text_tower.name={name}: {exc}") from exc
        # the pooler (BERT's dense + tanh over [CLS]) is not used: without it DDP sees no unused parameters
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None)
        if limit and context_length > limit:
            raise ValueError(f"model.text_tower.context_length={context_length} exceeds the model's {limit}")
        self.name, self.pool, self.context_length = name, pool, context_length
        self.pad_id = pad_id if pad_id is not None else (config.pad_token_id or 0)
        self.width = config.hidden_size

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze the embeddings and all but the last ``unlocked_layers`` layers (what follows the stack,
        such as a final norm, stays trainable with them)."""
        layers = find_layers(self.model)
        self.model.requires_grad_(False)
        if unlocked_layers > 0:
            for layer in layers[-unlocked_layers:]:
                layer.requires_grad_(True)
            after = False
            for module in self.model.children():  # modules after the stack (final norms)
                if after:
                    module.requires_grad_(True)
                after = after or any(m is layers for m in module.modules())
        self.locked = unlocked_layers <= 0

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient_* to activation_checkpointing_* (old names warn); 4.x has only those
        if hasattr(self.model, "activation_checkpointing_enable"):
            if enable:
                self.model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.model.activation_checkpointing_disable()
        elif enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    def layer_ids(self) -> tuple[dict[str, int], int]:
        layers = find_layers(self.model)
        depth = len(layers)
        layer_of = {id(p): i + 1 for i, layer in enumerate(layers) for p in layer.parameters()}
        ids = {}
        for name, p in self.named_parameters():
            if id(p) in layer_of:
                ids[name] = layer_of[id(p)]
            else:  # embeddings before the stack, norms after it
                ids[name] = 0 if "embed" in name else depth + 1
        return ids, depth + 1

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens != self.pad_id
        # drop columns that are padding in every row (right padding): same output, less compute
        longest = int(mask.sum(1).max().clamp(min=1))
        tokens, mask = tokens[:, :longest], mask[:, :longest]
        hidden = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        if self.pool == "cls":
            return hidden[:, 0]
        if self.pool == "eos":
            last = mask.long().sum(1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        keep = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
