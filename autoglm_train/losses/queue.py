"""A ring buffer of past (momentum) embeddings and their sample ids, used as extra negatives.

Held as plain tensors, not module buffers: DDP would broadcast buffers from rank 0 on every step, and
every rank already holds the same queue because keys are gathered from all ranks before they are
enqueued. ``state_dict``/``load_state_dict`` carry it through checkpoints.
"""

from __future__ import annotations

import torch


class FeatureQueue:
    def __init__(self, size: int, dim: int):
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size, self.dim = size, dim
        self.features = torch.zeros(size, dim)
        self.ids = torch.zeros(size, dtype=torch.long)
        self.ptr = 0  # next slot to write
        self.filled = 0  # valid entries (< size until the first wrap-around)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Append ``keys`` (n, dim) with their ``ids``; the oldest entries are overwritten (any n)."""
        if keys.shape[0] != ids.shape[0] or keys.shape[1] != self.dim:
            raise ValueError(
                f"expected keys (n, {self.dim}) and ids (n,), got {tuple(keys.shape)}, {tuple(ids.shape)}"
            )
        if self.features.device != keys.device:
            self.features, self.ids = self.features.to(keys.device), self.ids.to(keys.device)
        keys, ids = keys[-self.size :], ids[-self.size :]  # more than the queue holds: the newest win
        slots = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % self.size
        self.features[slots] = keys.detach().to(self.features.dtype)
        self.ids[slots] = ids
        self.ptr = (self.ptr + keys.shape[0]) % self.size
        self.filled = min(self.size, self.filled + keys.shape[0])

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid entries, oldest first."""
        if self.filled < self.size:
            return self.features[: self.filled], self.ids[: self.filled]
        order = (self.ptr + torch.arange(self.size, device=self.features.device)) % self.size
        return self.features[order], self.ids[order]

    def state_dict(self) -> dict:
        return {
            "features": self.features.cpu(),
            "ids": self.ids.cpu(),
            "ptr": self.ptr,
            "filled": self.filled,
        }

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["features"].shape) != (self.size, self.dim):
            raise ValueError(
                f"checkpoint queue is {tuple(state['features'].shape)}, "
                f"config asks for ({self.size}, {self.dim})"
            )
        device = self.features.device
        self.features, self.ids = state["features"].to(device), state["ids"].to(device)
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
