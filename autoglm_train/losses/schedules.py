"""Scalar schedules for loss hyperparameters (margin, temperature): a value as a function of the step."""

from __future__ import annotations

import math


class Schedule:
    def __call__(self, step: int) -> float:
        raise NotImplementedError


class Constant(Schedule):
    def __init__(self, value: float):
        self.value = float(value)

    def __call__(self, step: int) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"Constant({self.value})"


class _Ramp(Schedule):
    """From ``start`` to ``end`` over ``steps`` optimizer steps along ``_shape``, then ``end``."""

    def __init__(self, start: float, end: float, steps: int):
        if steps < 0:
            raise ValueError(f"schedule steps must be >= 0, got {steps}")
        self.start, self.end, self.steps = float(start), float(end), int(steps)

    def __call__(self, step: int) -> float:
        if self.steps == 0 or step >= self.steps:
            return self.end
        return self._shape(step / self.steps)

    def _shape(self, progress: float) -> float:
        raise NotImplementedError


class Linear(_Ramp):
    """From ``start`` to ``end`` linearly over ``steps`` optimizer steps, then ``end`` (a warm-up)."""

    def _shape(self, progress: float) -> float:
        return self.start + (self.end - self.start) * progress


class Cosine(_Ramp):
    """From ``start`` to ``end`` along a half cosine over ``steps`` optimizer steps, then ``end``."""

    def _shape(self, progress: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * progress))


def as_schedule(value) -> Schedule:
    return value if isinstance(value, Schedule) else Constant(value)


SCHEDULES = {"linear": Linear, "cosine": Cosine}


def make_schedule(kind: str | None, start: float, end: float, steps: int) -> Schedule | None:
    """For configs: ``kind`` null -> None (not scheduled), ``constant`` -> ``end``, else linear/cosine."""
    if kind is None:
        return None
    if kind == "constant":
        return Constant(end)
    if kind not in SCHEDULES:
        raise ValueError(f"schedule kind must be null, constant, {' or '.join(SCHEDULES)}; got {kind!r}")
    return SCHEDULES[kind](start, end, steps)
