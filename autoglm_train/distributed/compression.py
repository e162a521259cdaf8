"""Gradient compression as DDP communication hooks, attached on every backend, with the bytes they send.

Lightning registers a DDP comm hook only when the device is CUDA and skips it silently on CPU (gloo).
``CompressedDDPStrategy`` registers it on any device, logs which hook is active, and counts the bytes
all-reduced during each backward pass next to what uncompressed gradients would take.

PowerSGD is torch's ``powerSGD_hook`` behind ``NamedPowerSGD``, which adds what the hook lacks: parameters
left uncompressed by name, and its state (step count, error-feedback residuals, warm-start factors) kept
per parameter, so that it is saved in checkpoints and restored on any number of ranks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

log = logging.getLogger(__name__)
MODES = ("none", "fp16", "bf16", "powersgd")
CHECKPOINT_KEY = "powersgd"


# --- what is compressed ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorPlan:
    """How one gradient travels under PowerSGD: when compressed, the hook's ``matrix`` view (n, m) and
    ``rank`` (n x r and m x r factors are all-reduced); else ``matrix`` None (all-reduced as is)."""

    name: str
    shape: tuple[int, ...]  # the parameter's
    matrix: tuple[int, int] | None
    rank: int
    why: str  # compressed | vector | excluded | small

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def elements_sent(self) -> int:
        return (self.matrix[0] + self.matrix[1]) * self.rank if self.matrix else self.numel


def is_excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in exclude)


def plan_tensor(name: str, shape: Sequence[int], rank: int, min_rate: float, exclude: Iterable[str]):
    shape = tuple(int(d) for d in shape)
    if len(shape) <= 1:
        return TensorPlan(name, shape, None, 0, "vector")
    if is_excluded(name, exclude):
        return TensorPlan(name, shape, None, 0, "excluded")
    n = shape[0]
    m = int(np.prod(shape)) // n  # the hook's view: first dimension x the rest
    r = min(n, m, rank)
    if not powersgd._should_compress(n, m, r, min_rate)[0]:
        return TensorPlan(name, shape, None, 0, "small")
    return TensorPlan(name, shape, (n, m), r, "compressed")


def powersgd_plan(named_parameters, rank: int, min_rate: float = 2, exclude: Iterable[str] = ()):
    """Per trained parameter, how PowerSGD sends its gradient."""
    exclude = tuple(exclude)
    return [
        plan_tensor(name, tuple(p.shape), rank, min_rate, exclude)
        for name, p in named_parameters
        if p.requires_grad
    ]


def describe_plan(plan: list[TensorPlan], element_size: int = 4) -> str:
    """One paragraph for the log: what is compressed, what is not and why, and the bytes of a step."""
    groups: dict[str, list[TensorPlan]] = {}
    for t in plan:
        groups.setdefault(t.why, []).append(t)
    sent = sum(t.elements_sent for t in plan) * element_size
    full = sum(t.numel for t in plan) * 4
    parts = [
        f"{why}: {len(ts)} tensors, {sum(t.numel for t in ts):,} parameters"
        + (
            f" ({', '.join(t.name for t in ts[:6])}{', ...' if len(ts) > 6 else ''})"
            if why == "excluded"
            else ""
        )
        for why, ts in groups.items()
    ]
    return (
        f"{'; '.join(parts)}. Expected {sent / 2**20:.2f} MiB all-reduced per step after the uncompressed "
        f"start, against {full / 2**20:.2f} MiB uncompressed "
        f"({sent / full:.4f}x, {full / sent:.1f}x fewer bytes)"
    )


# --- the hook -------------------------------------------------------------------------------------------
# one gradient in a bucket: where it lies in the bucket's buffer, and how it travels
Slot = tuple[int, TensorPlan]


class _BucketView:
    """The bucket as torch's hook should see it: excluded gradients flattened, which its own size test
    then sends uncompressed (an N x 1 matrix never shrinks)."""

    def __init__(self, bucket, flat: Sequence[bool]):
        self._bucket, self._flat = bucket, flat

    def gradients(self):
        return [g.view(-1) if f else g for g, f in zip(self._bucket.gradients(), self._flat, strict=True)]

    def __getattr__(self, name):
        return getattr(self._bucket, name)


class NamedPowerSGD:
    """Torch's ``powerSGD_hook`` (a DDP comm hook: ``model.register_comm_hook(state, hook)``) with gradients
    excluded by parameter name, and its state per parameter rather than per bucket.

    The hook keeps error-feedback residuals and warm-start factors per DDP bucket, as flat buffers whose
    layout is that of the bucket. That layout changes when DDP rebuilds its buckets after the first step
    of every new process, a resumed one included; so the state is re-laid out by parameter name whenever a
    bucket's layout changes, and saved by name.
    """

    def __init__(self, state: powersgd.PowerSGDState, named_parameters, exclude: Iterable[str] = ()):
        self.state = state
        # each trained parameter's plan, by id(parameter): fixed for the run, so made once
        trained = [(name, p) for name, p in named_parameters if p.requires_grad]
        plans = powersgd_plan(trained, state.matrix_approximation_rank, state.min_compression_rate, exclude)
        self.plans = {id(p): t for (_, p), t in zip(trained, plans, strict=True)}
        self.layouts: dict[int, tuple[Slot, ...]] = {}
        self.pool: dict[str, dict[str, torch.Tensor]] = {}  # per-name state waiting for its bucket
        self.relayouts = 0
        # what DDP checks and reports in its logging data
        self.__name__ = self.__qualname__ = "powerSGD_hook"

    # the hook
    def __call__(self, state, bucket):
        if state.iter >= state.start_powerSGD_iter:
            self._prepare(state, bucket)
        flat = [self.plans[id(p)].why == "excluded" for p in bucket.parameters()]
        view = _BucketView(bucket, flat) if any(flat) else bucket
        return powersgd.powerSGD_hook(state, view)

    def _layout(self, bucket) -> tuple[Slot, ...]:
        buffer = bucket.buffer()
        base, size = buffer.data_ptr(), buffer.element_size()
        return tuple(
            ((g.data_ptr() - base) // size, self.plans[id(p)])
            for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True)
        )

    def _prepare(self, state, bucket) -> None:
        index = bucket.index()
        layout = self._layout(bucket)
        if self.layouts.get(index, layout) != layout:  # DDP rebuilt its buckets: every bucket's state by name
            for i, old in self.layouts.items():
                self.pool.update(self._unpack(i, old, state.error_dict.get(i)))
            state.error_dict.clear(), state.p_memory_dict.clear(), state.q_memory_dict.clear()
            self.layouts.clear()
            self.relayouts += 1
        self.layouts[index] = layout
        if self.pool and index not in state.error_dict and index not in state.q_memory_dict:
            self._pack(index, layout, bucket.buffer())

    @staticmethod
    def _compressed(layout: tuple[Slot, ...]) -> list[TensorPlan]:
        # the order of the hook's factor buffers: grouped by matrix shape, in order of first appearance
        groups: dict[tuple[int, int], list[TensorPlan]] = {}
        for _, t in layout:
            if t.matrix:
                groups.setdefault(t.matrix, []).append(t)
        return [t for group in groups.values() for t in group]

    def _unpack(self, index: int, layout, error: torch.Tensor | None) -> dict[str, dict[str, torch.Tensor]]:
        """Bucket ``index``'s state under ``layout``, by parameter name."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        if error is not None:
            for offset, t in layout:
                out.setdefault(t.name, {})["error"] = error[offset : offset + t.numel].view(t.shape).clone()
        q = self.state.q_memory_dict.get(index)
        if q is not None and self.state.warm_start:
            at = 0
            for t in self._compressed(layout):
                size = t.matrix[1] * t.rank
                out.setdefault(t.name, {})["q"] = q[at : at + size].view(t.matrix[1], t.rank).clone()
                at += size
        return out

    def _pack(self, index: int, layout, buffer: torch.Tensor) -> None:
        """Bucket ``index``'s state under ``layout`` from the per-name pool (what is missing starts fresh:
        zero residual; random factors for the whole bucket, as the hook's first step does)."""
        state, device, dtype = self.state, buffer.device, buffer.dtype
        found = [(offset, t) for offset, t in layout if t.name in self.pool]
        if not found:
            return
        if state.use_error_feedback:
            error = torch.zeros(buffer.numel(), device=device, dtype=dtype)
            for offset, t in found:
                e = self.pool[t.name].get("error")
                if e is not None:
                    error[offset : offset + t.numel] = e.reshape(-1).to(device, dtype)
            state.error_dict[index] = error
        compressed = self._compressed(layout)
        qs = [self.pool.get(t.name, {}).get("q") for t in compressed]
        fits = all(
            q is not None and tuple(q.shape) == (t.matrix[1], t.rank)
            for q, t in zip(qs, compressed, strict=True)
        )
        if state.warm_start and compressed and fits:
            state.q_memory_dict[index] = torch.cat([q.reshape(-1) for q in qs]).to(device, dtype)
            # P is recomputed from Q before it is read; the hook only needs it to exist to reuse Q
            p_size = sum(t.matrix[0] * t.rank for t in compressed)
            state.p_memory_dict[index] = torch.empty(p_size, device=device, dtype=dtype)
        for _, t in found:
            del self.pool[t.name]

    # checkpoints
    def state_dict(self) -> dict:
        """The state to save, the same on every rank; collective (every rank must call it).

        Error feedback adds to each rank's next gradient what compression dropped from its last one.
        PowerSGD compresses the mean of those over ranks (P = mean(M_r) Q; Q = mean(M_r)^T P), so only the
        mean residual shapes the training: it is what is saved, and what every rank starts from on resume,
        whatever the number of ranks then."""
        state = self.state
        per_name: dict[str, dict[str, torch.Tensor]] = {k: dict(v) for k, v in self.pool.items()}
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for index in sorted(self.layouts):
            error = state.error_dict.get(index)
            if error is not None and world > 1:
                error = error.clone()
                dist.all_reduce(error)
                error.div_(world)
            for name, parts in self._unpack(index, self.layouts[index], error).items():
                per_name.setdefault(name, {}).update(parts)
        rng = state.rng.get_state()
        return {
            "iter": int(state.iter),
            "rng": {"keys": torch.from_numpy(rng[1].astype(np.int64)), "pos": int(rng[2])},
            "params": {name: {k: v.cpu() for k, v in parts.items()} for name, parts in per_name.items()},
        }

    def load_state_dict(self, saved: dict) -> None:
        """Restore ``state_dict()``; laid out into the buckets when each is first seen."""
        self.state.iter = int(saved["iter"])
        keys = saved["rng"]["keys"].numpy().astype(np.uint32)
        self.state.rng.set_state(("MT19937", keys, int(saved["rng"]["pos"]), 0, 0.0))
        self.state.error_dict.clear(), self.state.p_memory_dict.clear(), self.state.q_memory_dict.clear()
        self.layouts.clear()
        self.pool = {name: dict(parts) for name, parts in saved["params"].items()}


def comm_hook(
    mode: str,
    process_group=None,
    powersgd_rank: int = 1,
    powersgd_start_iter: int = 10,
    error_feedback: bool = True,
    powersgd_fp16: bool = False,
    powersgd_warm_start: bool = True,
    powersgd_min_compression_rate: float = 2,
    powersgd_exclude: Iterable[str] = (),
    named_parameters=None,
):
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``; PowerSGD needs
    ``named_parameters`` of the DDP model (the names its exclusions and saved state go by)."""
    if mode == "none":  # what DDP does by default, registered so it is counted like the others
        return process_group, default_hooks.allreduce_hook
    if mode == "fp16":
        return process_group, default_hooks.fp16_compress_hook
    if mode == "bf16":
        return process_group, default_hooks.bf16_compress_hook
    if mode == "powersgd":
        if powersgd_start_iter < 2:
            # DDP lays its buckets out anew after the first step; the hook's state needs the final layout
            raise ValueError("compression.start_iter must be >= 2")
        if powersgd_min_compression_rate < 1:
            raise ValueError("compression.min_compression_rate must be >= 1")
        if named_parameters is None:
            raise ValueError("PowerSGD needs the DDP model's named_parameters")
        state = powersgd.PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=powersgd_start_iter,
            min_compression_rate=powersgd_min_compression_rate,
            use_error_feedback=error_feedback,
            warm_start=powersgd_warm_start,
        )
        hook = NamedPowerSGD(state, named_parameters, powersgd_exclude)
        if powersgd_fp16:
            wrapped = default_hooks.fp16_compress_wrapper(hook)
            wrapped.powersgd = hook
            wrapped.__qualname__ = "fp16_compress_wrapper(powerSGD_hook)"
            return state, wrapped
        return state, hook
    raise ValueError(f"compression.mode={mode!r}: expected one of {', '.join(MODES)}")


# --- counting bytes -------------------------------------------------------------------------------------
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


# --- the strategy ---------------------------------------------------------------------------------------
class CompressedDDPStrategy(DDPStrategy):
    """Lightning's DDP with ``compression`` (none|fp16|bf16|powersgd) attached whatever the device.

    After each synchronizing backward, ``comm_stats`` holds ``bytes`` sent by this rank's all-reduces and
    ``uncompressed`` (the fp32 gradient size), which the module logs as ``comm/*``. PowerSGD's state goes
    into checkpoints under ``"powersgd"`` and is restored from them.
    """

    def __init__(
        self,
        compression: str = "none",
        powersgd_rank: int = 1,
        powersgd_start_iter: int = 10,
        error_feedback: bool = True,
        powersgd_fp16: bool = False,
        powersgd_warm_start: bool = True,
        powersgd_min_compression_rate: float = 2,
        powersgd_exclude: Sequence[str] = (),
        **kwargs,
    ):
        if compression not in MODES:
            raise ValueError(f"compression.mode={compression!r}: expected one of {', '.join(MODES)}")
        if compression == "powersgd" and (
            kwargs.get("process_group_backend") != "nccl" or not powersgd_warm_start
        ):
            # torch's PowerSGD hook issues its later all-reduces from future callbacks; on gloo those of
            # different buckets can reach the ranks in different orders (a collective mismatch that aborts
            # the process), so all gradients go in one bucket there. Without warm start the hook clears
            # every bucket's factors when one bucket finishes, which breaks the others in flight: one
            # bucket there too.
            kwargs.setdefault("bucket_cap_mb", 2**20)
        super().__init__(**kwargs)
        self.compression = compression
        self._hook_options = dict(
            powersgd_rank=powersgd_rank,
            powersgd_start_iter=powersgd_start_iter,
            error_feedback=error_feedback,
            powersgd_fp16=powersgd_fp16,
            powersgd_warm_start=powersgd_warm_start,
            powersgd_min_compression_rate=powersgd_min_compression_rate,
            powersgd_exclude=tuple(powersgd_exclude),
        )
        self.comm_stats: dict[str, float] = {}
        self.comm_hook_name: str | None = None
        self.powersgd: NamedPowerSGD | None = None
        self._uncompressed_bytes = 0.0
        self._saved_powersgd: dict | None = None

    def _register_ddp_hooks(self) -> None:
        named = [(n.removeprefix("module."), p) for n, p in self.model.named_parameters()]
        state, hook = comm_hook(self.compression, None, named_parameters=named, **self._hook_options)
        self.model.register_comm_hook(state, hook)
        _count_all_reduce_bytes()
        # what plain DDP would send: every trained parameter's gradient in fp32
        self._uncompressed_bytes = float(sum(p.numel() * 4 for _, p in named if p.requires_grad))
        # what DDP itself reports as registered (asserted by the tests, not assumed)
        self.comm_hook_name = self.model._get_ddp_logging_data().get("comm_hook")
        if self.compression == "powersgd":
            self.powersgd = getattr(hook, "powersgd", hook)
            if self._saved_powersgd is not None:
                self.powersgd.load_state_dict(self._saved_powersgd)
                self._saved_powersgd = None
        if self.global_rank == 0:
            log.info(
                "gradient compression %s: DDP comm hook %s attached", self.compression, self.comm_hook_name
            )
            if self.compression == "powersgd":
                o = self._hook_options
                log.info(
                    "PowerSGD rank %d from step %d: %s",
                    o["powersgd_rank"],
                    o["powersgd_start_iter"],
                    describe_plan(list(self.powersgd.plans.values()), 2 if o["powersgd_fp16"] else 4),
                )

    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        super().pre_backward(closure_loss)
        _count.active, _count.bytes = True, 0

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        _count.active = False
        if _count.bytes:  # zero when the backward did not sync (gradient accumulation)
            self.comm_stats = {"bytes": float(_count.bytes), "uncompressed": self._uncompressed_bytes}

    # PowerSGD's state in checkpoints (every rank saves: the residuals are averaged over ranks first)
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if self.powersgd is not None:
            checkpoint[CHECKPOINT_KEY] = self.powersgd.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None and self.compression == "powersgd":
            if self.powersgd is not None:
                self.powersgd.load_state_dict(saved)
            else:  # the hook is attached later, in setup
                self._saved_powersgd = saved
        return checkpoint
