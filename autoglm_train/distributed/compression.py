"""Gradient compression as DDP communication hooks, attached on every backend, with the bytes they send.

Lightning registers a DDP comm hook only when the device is CUDA and skips it silently on CPU (gloo).
``CompressedDDPStrategy`` registers it on any device, logs which hook is active, and counts the bytes
all-reduced during each backward pass next to what uncompressed gradients would take.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

log = logging.getLogger(__name__)
MODES = ("none", "fp16", "bf16", "powersgd")


def comm_hook(
    mode: str,
    process_group=None,
    powersgd_rank: int = 1,
    powersgd_start_iter: int = 10,
    error_feedback: bool = True,
    powersgd_fp16: bool = False,
):
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``."""
    if mode == "none":  # what DDP does by default, registered so it is counted like the others
        return process_group, default_hooks.allreduce_hook
    if mode == "fp16":
        return process_group, default_hooks.fp16_compress_hook
    if mode == "bf16":
        return process_group, default_hooks.bf16_compress_hook
    if mode == "powersgd":
        if powersgd_start_iter < 2:
            # warm start (always on: without it torch's hook loses its buffers when buckets finish out of
            # order on gloo) and error feedback need two uncompressed iterations first
            raise ValueError("compression.start_iter must be >= 2")
        state = powersgd.PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=powersgd_start_iter,
            use_error_feedback=error_feedback,
            warm_start=True,
        )
        hook = powersgd.powerSGD_hook
        return state, default_hooks.fp16_compress_wrapper(hook) if powersgd_fp16 else hook
    raise ValueError(f"compression.mode={mode!r}: expected one of {', '.join(MODES)}")


@dataclass
class ByteCount:
    active: bool = False
    bytes: int = 0


_count = ByteCount()


def _count_all_reduce_bytes() -> None:
    """Wrap ``torch.distributed.all_reduce`` (which every hook calls through the module) to add up the
    payload while a backward pass is being counted. Installed once per process."""
    original = dist.all_reduce
    if getattr(original, "_counts_bytes", False):
        return

    @functools.wraps(original)
    def all_reduce(tensor, *args, **kwargs):
        if _count.active:
            _count.bytes += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    all_reduce._counts_bytes = True
    dist.all_reduce = all_reduce


class CompressedDDPStrategy(DDPStrategy):
    """Lightning's DDP with ``compression`` (none|fp16|bf16|powersgd) attached whatever the device.

    After each synchronizing backward, ``comm_stats`` holds ``bytes`` sent by this rank's all-reduces and
    ``uncompressed`` (the fp32 gradient size), which the module logs as ``comm/*``.
    """

    def __init__(
        self,
        compression: str = "none",
        powersgd_rank: int = 1,
        powersgd_start_iter: int = 10,
        error_feedback: bool = True,
        powersgd_fp16: bool = False,
        **kwargs,
    ):
        if compression not in MODES:
            raise ValueError(f"compression.mode={compression!r}: expected one of {', '.join(MODES)}")
        if compression == "powersgd" and kwargs.get("process_group_backend") != "nccl":
            # torch's PowerSGD hook issues its later all-reduces from future callbacks; on gloo those of
            # different buckets can reach the ranks in different orders (a collective mismatch that aborts
            # the process), so all gradients go in one bucket there
            kwargs.setdefault("bucket_cap_mb", 2**20)
        super().__init__(**kwargs)
        self.compression = compression
        self._hook_options = dict(
            powersgd_rank=powersgd_rank,
            powersgd_start_iter=powersgd_start_iter,
            error_feedback=error_feedback,
            powersgd_fp16=powersgd_fp16,
        )
        self.comm_stats: dict[str, float] = {}
        self.comm_hook_name: str | None = None
        self._uncompressed_bytes = 0.0

    def _register_ddp_hooks(self) -> None:
        state, hook = comm_hook(self.compression, process_group=None, **self._hook_options)
        self.model.register_comm_hook(state, hook)
        _count_all_reduce_bytes()
        # what plain DDP would send: every trained parameter's gradient in fp32
        self._uncompressed_bytes = float(
            sum(p.numel() * 4 for p in self.model.parameters() if p.requires_grad)
        )
        # what DDP itself reports as registered (asserted by the tests, not assumed)
        self.comm_hook_name = self.model._get_ddp_logging_data().get("comm_hook")
        if self.global_rank == 0:
            log.info(
                "gradient compression %s: DDP comm hook %s attached", self.compression, self.comm_hook_name
            )

    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        super().pre_backward(closure_loss)
        _count.active, _count.bytes = True, 0

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        _count.active = False
        if _count.bytes:  # zero when the backward did not sync (gradient accumulation)
            self.comm_stats = {"bytes": float(_count.bytes), "uncompressed": self._uncompressed_bytes}
