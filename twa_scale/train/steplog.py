"""Per-step training values kept on the device and read by the host every N steps.

A ``loss.item()`` per step blocks the host until the GPU has finished that step, so the
next step's kernels are queued only after the GPU went idle. ``StepLog`` writes each
step's values into a small device buffer (an asynchronous device copy) and reads the
buffer once every ``every`` steps: one synchronisation per window instead of one per step.
At each read, every step of the window is still exported (Prometheus ``train_step_*``,
the progress bar), so the per-step series keep their resolution, at that cadence.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple, Sequence

import torch

__all__ = ["StepLog", "StepRow"]


class StepRow(NamedTuple):
    """One step's values, as the host sees them after a read."""

    loss: float
    samples: int
    lr: float
    seconds: float
    """The window's mean step time: single steps are not timed, since timing one needs a sync."""
    extra: tuple[float, ...] = ()


class StepLog:
    """Device buffer of per-step values, read every ``every`` steps (and by :meth:`flush`).

    ``step(loss, samples, lr, *extra)`` records one step: ``loss`` (and each of ``extra``, e.g. a
    correct-prediction count) is a device scalar; ``samples`` and ``lr`` are host numbers. The loss
    weighted by samples is summed in float64 on the host, from the same float32 values a per-step
    ``loss.item()`` would have returned, so epoch means are unchanged by the cadence.

    ``on_rows(rows)`` receives the window's :class:`StepRow` list after each read (export metrics
    there); ``bar`` (a tqdm) gets the last loss as its postfix.
    """

    def __init__(self, every: int, device: torch.device | str, *, extra: int = 0,
                 on_rows: Callable[[Sequence[StepRow]], None] | None = None, bar=None):
        if every < 1:
            raise ValueError(f"log_every_steps must be >= 1, got {every}")
        self.every, self.on_rows, self.bar = every, on_rows, bar
        self._buf = torch.zeros(every, 1 + extra, dtype=torch.float32, device=device)
        self._host: list[tuple[int, float]] = []  # (samples, lr) of the buffered steps
        self._t0 = time.perf_counter()
        self.loss_sum = 0.0  # sum of loss × samples, over every step read so far
        self.extra_sums = [0.0] * extra
        self.samples = 0
        self.steps = 0
        self.syncs = 0
        self.last_loss: float | None = None

    def step(self, loss: torch.Tensor, samples: int, lr: float, *extra: torch.Tensor) -> list[StepRow] | None:
        """Record one step without a host sync; when that fills the window, read it and return its rows."""
        i = len(self._host)
        row = self._buf[i]
        row[0].copy_(loss.detach(), non_blocking=True)
        for j, v in enumerate(extra, start=1):
            row[j].copy_(v.detach(), non_blocking=True)
        self._host.append((int(samples), float(lr)))
        if len(self._host) == self.every:
            return self.flush()
        return None

    def flush(self) -> list[StepRow]:
        """Read the buffered steps (one sync), add them to the sums, export them; returns their rows."""
        k = len(self._host)
        if k == 0:
            return []
        values = self._buf[:k].tolist()
        now = time.perf_counter()
        per_step = (now - self._t0) / k
        self._t0 = now
        rows = []
        for (samples, lr), vals in zip(self._host, values):
            rows.append(StepRow(vals[0], samples, lr, per_step, tuple(vals[1:])))
            self.loss_sum += vals[0] * samples
            for j, v in enumerate(vals[1:]):
                self.extra_sums[j] += v
            self.samples += samples
        self._host.clear()
        self.steps += k
        self.syncs += 1
        self.last_loss = rows[-1].loss
        if self.on_rows is not None:
            self.on_rows(rows)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.last_loss:.4f}", refresh=False)
        return rows
