"""Lightning's checkpoint writer and reader, verified: every single-file checkpoint a run writes
(``last.ckpt``, ``best.ckpt``, the preemption checkpoint, the one after fit) goes through
``utils/checkpoint_files.py``: written whole or not at all, a manifest last, ``last.ckpt``'s previous
versions kept (``checkpoint.keep_last``). Reading verifies the manifest first."""

from __future__ import annotations

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from autoglm_train.utils.checkpoint_files import save_checkpoint_file, verify_checkpoint


class VerifiedCheckpointIO(TorchCheckpointIO):
    def __init__(self, keep_last: int = 2) -> None:
        super().__init__()
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.keep_last = keep_last

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options is not supported by VerifiedCheckpointIO")
        save_checkpoint_file(checkpoint, path, self.keep_last)

    def load_checkpoint(self, path, *args, **kwargs):
        verify_checkpoint(path)
        return super().load_checkpoint(path, *args, **kwargs)
