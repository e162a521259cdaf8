"""Sharded data parallelism: PyTorch's FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``.

The one place that knows sharding. Each rank holds 1/world of every parameter, gradient and optimizer
moment; a block's parameters are all-gathered just before its forward (and backward) and freed after.

The units follow torchtitan's order: each tower's blocks first (timm ViT ``blocks.N``, ResNet stages
``layerN``, ConvNeXt ``stages.N``, our text layers ``layers.N``, HF ``layer.N``, open_clip
``resblocks.N``), then each tower (its embeddings, stem and final norm), then the dual encoder itself (the
projection heads and the logit scale). The momentum encoder is sharded the same way, so its EMA update
is a per-shard operation on every rank; a loss with parameters (SigLIP's bias) is a unit of its own, so its
gradient is reduced like the rest. Queues stay unsharded buffers: every rank holds the same keys.

Lightning's ``FSDPStrategy`` (FSDP1) refuses CPU; ``ModelParallelStrategy`` runs FSDP2 on a gloo CPU mesh
too (checked with torch 2.14), so ``trainer=fsdp_cpu`` tests on CPU the same code ``trainer=fsdp`` runs
over NCCL. Checkpoints are torch DCP folders (one file per rank, ``checkpoint.format=sharded``) or one
consolidated file written by rank 0 (``full``); ``weights.load_checkpoint`` reads either.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from autoglm_train.utils.checkpoint_files import begin_folder, write_folder_manifest

log = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("auto", "sharded", "full")  # auto: sharded under FSDP
MIXED_PRECISION = ("bf16", "fp16", None)
# a module named like this is one transformer block / ResNet stage: the unit of sharding
BLOCK_NAME = re.compile(r"(?:^|\.)(?:(?:resblocks|layers|layer|blocks|stages)\.\d+|layer[1-4])$")
# methods called on a sharded module other than forward: they must gather its parameters first
FORWARD_METHODS = ("encode_image", "encode_text")


def block_units(tower: nn.Module) -> list[nn.Module]:
    """The outermost modules of ``tower`` named like a block or stage, in order."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in tower.named_modules():
        if BLOCK_NAME.search(name) and not any(name.startswith(parent + ".") for parent, _ in found):
            found.append((name, module))
    return [module for _, module in found]


def shard_dual_encoder(model: nn.Module, **fsdp_kwargs) -> int:
    """``fully_shard`` each tower's blocks, each tower, then the model (the root). Returns the number of
    units. ``encode_image``/``encode_text`` are registered, so calling them alone gathers the heads."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # FSDP2 shards contiguous parameters only: channels_last conv kernels go back to NCHW (the inputs may
    # stay channels_last; oneDNN/cuDNN take either)
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    units = 0
    for tower in (model.image_tower, model.text_tower):
        for block in block_units(tower):
            fully_shard(block, **fsdp_kwargs)
            units += 1
        fully_shard(tower, **fsdp_kwargs)
        units += 1
    fully_shard(model, **fsdp_kwargs)
    for method in FORWARD_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return units + 1


def mixed_precision_policy(name: str | None):
    """bf16 (or fp16) compute with fp32 gradient reduction; None: everything in the parameters' dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if name not in MIXED_PRECISION:
        raise ValueError(f"strategy.mixed_precision must be one of {MIXED_PRECISION}, got {name!r}")
    if name is None:
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


class FSDP2Strategy(ModelParallelStrategy):
    """Pure sharded data parallelism over every process (no tensor parallelism): one mesh dimension of
    world size. ``mixed_precision`` (``bf16``: bf16 compute, fp32 reduce), ``reshard_after_forward``
    (False keeps gathered parameters from forward to backward: less communication, more memory),
    ``cpu_offload`` (parameters, gradients and optimizer state in host memory; the optimizer steps there)
    and ``checkpoint_format`` (``sharded`` | ``full``) are the config keys."""

    def __init__(
        self,
        mixed_precision: str | None = None,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        checkpoint_format: str = "auto",
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"checkpoint.format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}"
            )
        mixed_precision_policy(mixed_precision)  # validates the name now, not at the first step
        checkpoint_format = "sharded" if checkpoint_format == "auto" else checkpoint_format
        kwargs = {"timeout": timeout} if timeout is not None else {}
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=checkpoint_format == "sharded",
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.mixed_precision = mixed_precision
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.checkpoint_format = checkpoint_format

    def setup_environment(self) -> None:
        # every process is one data-parallel shard (Lightning's default splits nodes x devices instead)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        # a sharded checkpoint is written by every rank (torch DCP), not through the CheckpointIO: rank 0
        # first shifts the previous versions (checkpoint.keep_last) and marks the folder unfinished, and
        # writes its manifest (every file's size and checksum) once all ranks are done
        step, config = checkpoint.get("global_step"), checkpoint.get("config")
        if self._save_distributed_checkpoint:
            filepath = self.broadcast(filepath)
            if self.global_rank == 0:
                begin_folder(filepath, getattr(self.checkpoint_io, "keep_last", 1), step)
            self.barrier("sharded checkpoint begun")
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if self._save_distributed_checkpoint:
            self.barrier("sharded checkpoint written")
            if self.global_rank == 0:
                write_folder_manifest(filepath, step, config)
            self.barrier("sharded checkpoint manifest written")

    @property
    def shard_mesh(self):
        return self.device_mesh["data_parallel"]

    def fsdp_kwargs(self) -> dict:
        from torch.distributed.fsdp import CPUOffloadPolicy

        kwargs = {
            "mesh": self.shard_mesh,
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": mixed_precision_policy(self.mixed_precision),
        }
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.root_device.type == "cuda")
        return kwargs

    def shard(self, module: nn.Module) -> None:
        """Shard what the LightningModule trains (called from its ``configure_model``)."""
        from torch.distributed.fsdp import fully_shard

        kwargs = self.fsdp_kwargs()
        units = shard_dual_encoder(module.model, **kwargs)
        momentum = getattr(module, "momentum", None)
        if momentum is not None:
            shard_dual_encoder(momentum.module, **kwargs)
        objective = getattr(module, "objective", None)
        if objective is not None and any(True for _ in objective.parameters()):
            fully_shard(objective, **kwargs)
        log.info(
            "FSDP2 over %d ranks: %d units per model%s; mixed precision %s, reshard_after_forward=%s, "
            "cpu_offload=%s, checkpoints %s",
            self.shard_mesh.size(),
            units,
            " (the momentum encoder likewise)" if momentum is not None else "",
            self.mixed_precision or "off",
            self.reshard_after_forward,
            self.cpu_offload,
            self.checkpoint_format,
        )


def is_checkpoint(path) -> bool:
    """A checkpoint file, or a sharded checkpoint: a torch DCP folder (its ``.metadata`` file inside)."""
    path = Path(path)
    return path.is_file() or (path / ".metadata").is_file()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(module: nn.Module) -> bool:
    return any(hasattr(p, "to_local") for p in module.parameters())
