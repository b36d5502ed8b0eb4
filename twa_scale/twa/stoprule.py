"""When the live TWA follower tells training to stop: the stop rules, as pure functions of the probe records.

A rule reads a probe only through :class:`ProbeView`: hold-out numbers, never the validation or test split.
The follower scores both the TWA probe and the latest SGD snapshot on the run's hold-out split, each with
BatchNorm recalibrated the same way; training's own metrics (val) feed dashboards, never a rule.

``--stop-rule`` takes one of:

* ``gain`` (the default): the price rule. A probe's per-example correctness on the hold-out is kept, so two
  probes of the same images are compared pairwise: d_i = correct_now_i - correct_then_i against the latest
  probe at least :data:`LOOKBACK_EPOCHS` epochs earlier. The gain per epoch is mean(d) / Δepochs, and its
  one-sided 95% upper bound adds 1.645 standard errors of the paired mean. Training stops when that upper
  bound falls below ``--stop-price`` accuracy points per epoch (the least gain one more epoch must be likely
  to buy), provided the TWA probe is at least the SGD snapshot on the same hold-out. It acts only while the
  run's lr is in its first phase (before the first milestone of a `step` schedule, the first half of
  `step-per-iter`; at any time under `constant`, `cosine` or `linear`): it decides when to hand the high-lr
  trajectory to TWA, and past that point it says so and lets the run finish. With ``--stop-at-phase-end`` it
  also hands over at the last probe of the first phase (the next probe, at the probes' spacing so far, would
  fall past the phase's end), provided the TWA probe is at least the SGD snapshot on the hold-out: the high-lr
  trajectory ends there, so TWA gets it then or never.
* ``plateau``: the last ``--stop-patience`` P probes raised the best TWA probe accuracy by less than
  ``--stop-epsilon`` points over the best before them, and the TWA probe is at least the SGD snapshot's
  accuracy on the same hold-out. Needs P + 1 probes.
* ``target:ACC``: stop once a TWA probe reaches accuracy ACC (0..1) on the hold-out.
* ``none``: never stop (probes are recorded, nothing is decided).
"""
from __future__ import annotations

import base64
import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from twa_scale.errors import ConfigError

__all__ = ["StopRule", "ProbeView", "Decision", "parse_stop_rule", "pack_correct", "unpack_correct",
           "first_phase_end", "LOOKBACK_EPOCHS", "Z_ONE_SIDED_95"]

LOOKBACK_EPOCHS = 2.0   # the gain is measured against the latest probe at least this many epochs back
Z_ONE_SIDED_95 = 1.645  # one-sided 95% normal quantile of the paired mean


def pack_correct(correct: Any) -> str:
    """Per-example correctness (0/1, the hold-out in the eval loader's order) as base64 of packed bits."""
    bits = np.asarray(correct, dtype=np.uint8)
    return f"{bits.size}:" + base64.b64encode(np.packbits(bits).tobytes()).decode()


def unpack_correct(packed: str) -> np.ndarray:
    n, _, data = packed.partition(":")
    return np.unpackbits(np.frombuffer(base64.b64decode(data), dtype=np.uint8))[: int(n)].astype(np.int8)


def first_phase_end(schedule: str, epochs: int, lr_milestones: Sequence[int] | None = None) -> float:
    """Training progress (epochs) up to which the run's lr is still in its first phase; inf when the schedule
    has no phases (constant, cosine, linear: the hand-over to TWA may come at any time)."""
    from twa_scale.train.schedule import milestones

    if schedule == "step":
        return float(milestones(epochs, lr_milestones)[0])
    if schedule == "step-per-iter":
        return 0.5 * epochs
    return math.inf


@dataclasses.dataclass(frozen=True)
class ProbeView:
    """What a stop rule may read of a probe record: hold-out numbers only."""
    epoch: float
    twa_accuracy: float | None
    sgd_accuracy: float | None
    """The latest SGD snapshot on the same hold-out, BatchNorm recalibrated as the probe's."""
    twa_correct: str | None = None
    """Packed per-example correctness of the TWA probe on the hold-out (:func:`pack_correct`)."""
    first_phase: bool = True
    """The probe's last snapshot was taken while the run's lr was in its first phase."""
    phase_end: float | None = None
    """Where the run's first lr phase ends, in epochs (None: it has no end, or the record predates the key)."""

    @classmethod
    def of(cls, rec: dict) -> "ProbeView":
        return cls(epoch=float(rec["epoch"]), twa_accuracy=rec.get("twa_accuracy"),
                   sgd_accuracy=rec.get("sgd_holdout_accuracy"), twa_correct=rec.get("twa_correct"),
                   first_phase=bool(rec.get("first_phase", True)), phase_end=rec.get("phase_end"))


@dataclasses.dataclass(frozen=True)
class Decision:
    stop: bool
    reason: str
    statistic: float | None = None
    """The rule's statistic in accuracy points (gain: per epoch; plateau: over the window)."""
    bound: float | None = None
    """Its upper confidence bound (gain rule), in the same unit."""

    def to_dict(self) -> dict:
        return {"would_stop": self.stop, "decision": self.reason, "statistic": self.statistic, "bound": self.bound}


@dataclasses.dataclass(frozen=True)
class StopRule:
    kind: str                      # gain | plateau | target | none
    target: float | None = None    # target:ACC
    epsilon_points: float = 0.2
    patience: int = 3
    price_points: float = 1.0      # gain: least upper-bounded gain per epoch worth another epoch
    at_phase_end: bool = False     # gain: also hand over at the last probe of the first lr phase

    @property
    def name(self) -> str:
        return f"target:{self.target:g}" if self.kind == "target" else self.kind

    def decide(self, probes: Sequence[ProbeView]) -> Decision:
        """Whether to stop after ``probes`` (oldest first; a failed probe has no TWA accuracy)."""
        if self.kind == "none" or not probes or probes[-1].twa_accuracy is None:
            return Decision(False, "no rule" if self.kind == "none" else "no TWA probe accuracy yet")
        last = probes[-1]
        if self.kind == "target":
            if last.twa_accuracy >= self.target:
                return Decision(True, f"TWA probe accuracy {last.twa_accuracy:.4f} reached the target {self.target:g}")
            return Decision(False, f"TWA probe accuracy {last.twa_accuracy:.4f} below the target {self.target:g}")
        if self.kind == "gain":
            return self._gain(probes)
        return self._plateau(probes)

    def _sgd_check(self, last: ProbeView) -> str | None:
        """Why not to stop against SGD (None: the TWA probe is at least the SGD snapshot on the hold-out)."""
        if last.sgd_accuracy is None:
            return "no SGD hold-out accuracy for this probe"
        if last.twa_accuracy < last.sgd_accuracy:
            return f"TWA probe {last.twa_accuracy:.4f} < SGD snapshot {last.sgd_accuracy:.4f} on the hold-out"
        return None

    def _plateau(self, probes: Sequence[ProbeView]) -> Decision:
        twa = [p.twa_accuracy for p in probes]
        if len(twa) < self.patience + 1:
            return Decision(False, f"{len(twa)} probe(s), the plateau rule needs {self.patience + 1}")
        before = [a for a in twa[:-self.patience] if a is not None]
        recent = twa[-self.patience:]
        if not before or None in recent:  # a failed probe says nothing about a plateau
            return Decision(False, f"a failed probe among the last {self.patience + 1}")
        gain = 100 * (max(recent) - max(before))
        if gain >= self.epsilon_points:
            return Decision(False, f"TWA probe still improving: +{gain:.2f} points over the last {self.patience} "
                                   "probes", statistic=gain)
        why_not = self._sgd_check(probes[-1])
        if why_not:
            return Decision(False, f"plateau, but {why_not}", statistic=gain)
        return Decision(True, f"TWA probe plateaued (+{gain:.2f} < {self.epsilon_points:g} points over the last "
                              f"{self.patience} probes) at {twa[-1]:.4f} >= the SGD snapshot's "
                              f"{probes[-1].sgd_accuracy:.4f} on the hold-out", statistic=gain)

    def _gain(self, probes: Sequence[ProbeView]) -> Decision:
        last = probes[-1]
        if not last.first_phase:
            return Decision(False, "past the run's first lr phase: the rule hands over only the high-lr trajectory, "
                                   "so the run goes on to its end")
        handover = self.at_phase_end and _last_in_phase(probes)
        gain = bound = None
        base = next((p for p in reversed(probes[:-1]) if p.epoch <= last.epoch - LOOKBACK_EPOCHS + 1e-9
                     and p.twa_correct and p.twa_accuracy is not None), None)
        if base is None or not last.twa_correct:
            what = f"no earlier probe with per-example results at least {LOOKBACK_EPOCHS:g} epochs back yet"
        else:
            now, then = unpack_correct(last.twa_correct), unpack_correct(base.twa_correct)
            if now.size != then.size or now.size < 2:
                return Decision(False, f"the hold-out changed size between probes ({then.size} -> {now.size}): "
                                       "no paired comparison")
            d = (now - then).astype(np.float64)
            span = last.epoch - base.epoch
            gain = 100 * d.mean() / span
            bound = 100 * (d.mean() + Z_ONE_SIDED_95 * d.std(ddof=1) / math.sqrt(d.size)) / span
            what = (f"gain {gain:+.2f} points/epoch since epoch {base.epoch:g} (95% upper bound {bound:+.2f}, "
                    f"{d.size} paired hold-out images)")
        priced_out = bound is not None and bound < self.price_points
        if not priced_out and not handover:
            if bound is None:
                return Decision(False, what)
            return Decision(False, f"{what} >= the price {self.price_points:g}: another epoch may still pay",
                            statistic=gain, bound=bound)
        why = (f"{what} < the price {self.price_points:g} points/epoch" if priced_out else
               f"{what}; the last probe of the first lr phase (it ends at epoch {last.phase_end:g}): the high-lr "
               "trajectory goes to TWA now or never")
        why_not = self._sgd_check(last)
        if why_not:
            return Decision(False, f"{why}, but {why_not}", statistic=gain, bound=bound)
        return Decision(True, f"{why}, and TWA {last.twa_accuracy:.4f} >= SGD {last.sgd_accuracy:.4f} on the "
                              "hold-out", statistic=gain, bound=bound)


def _last_in_phase(probes: Sequence[ProbeView]) -> bool:
    """The newest probe is the first phase's last: the next, at the spacing of the last two (or of the first
    from epoch 0), would fall past the phase's end."""
    last = probes[-1]
    if last.phase_end is None or not math.isfinite(last.phase_end):
        return False
    spacing = last.epoch - (probes[-2].epoch if len(probes) > 1 else 0.0)
    return last.epoch + max(spacing, 1e-9) > last.phase_end + 1e-9


def parse_stop_rule(spec: str, *, epsilon_points: float, patience: int, price_points: float = 1.0,
                    at_phase_end: bool = False) -> StopRule:
    """``--stop-rule`` plus its parameters; a one-line ConfigError naming the flag at fault."""
    if epsilon_points < 0:
        raise ConfigError(f"--stop-epsilon: must be >= 0 (accuracy points), got {epsilon_points}")
    if patience < 1:
        raise ConfigError(f"--stop-patience: must be >= 1 probe, got {patience}")
    if not price_points > 0:
        raise ConfigError(f"--stop-price: must be > 0 (accuracy points per epoch), got {price_points}")
    if spec in ("gain", "plateau", "none"):
        return StopRule(spec, epsilon_points=epsilon_points, patience=patience, price_points=price_points,
                        at_phase_end=at_phase_end)
    kind, _, value = spec.partition(":")
    if kind == "target":
        try:
            target = float(value)
        except ValueError:
            target = -1.0
        if not 0 < target <= 1:
            raise ConfigError(f"--stop-rule {spec}: target:ACC needs an accuracy in (0, 1], e.g. target:0.93")
        return StopRule("target", target=target, epsilon_points=epsilon_points, patience=patience,
                        price_points=price_points)
    raise ConfigError(f"--stop-rule {spec}: must be gain, plateau, target:ACC or none")
