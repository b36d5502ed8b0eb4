"""When the live TWA follower tells training to stop: the stop rules, as pure functions of the probe records.

``--stop-rule`` takes one of:

* ``plateau`` (the default): stop when the last ``--stop-patience`` P probes raised the best TWA probe
  accuracy by less than ``--stop-epsilon`` points over the best before them, and the latest TWA probe is at
  least the SGD accuracy (the training run's latest epoch ``val_accuracy`` in its metrics.json: the only
  SGD number training records; the probes themselves are on the hold-out split). Needs P + 1 probes.
* ``target:ACC``: stop once a TWA probe reaches accuracy ACC (0..1).
* ``none``: never stop (probes are recorded, nothing is decided).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from twa_scale.errors import ConfigError

__all__ = ["StopRule", "parse_stop_rule"]


@dataclasses.dataclass(frozen=True)
class StopRule:
    kind: str                      # plateau | target | none
    target: float | None = None    # target:ACC
    epsilon_points: float = 0.2
    patience: int = 3

    @property
    def name(self) -> str:
        return f"target:{self.target:g}" if self.kind == "target" else self.kind

    def decide(self, twa: Sequence[float | None], sgd_accuracy: float | None) -> tuple[bool, str]:
        """(stop?, why) after the probes whose TWA accuracies are ``twa`` (oldest first; None: a failed probe)."""
        if self.kind == "none" or not twa or twa[-1] is None:
            return False, "no rule" if self.kind == "none" else "no TWA probe accuracy yet"
        last = twa[-1]
        if self.kind == "target":
            if last >= self.target:
                return True, f"TWA probe accuracy {last:.4f} reached the target {self.target:g}"
            return False, f"TWA probe accuracy {last:.4f} below the target {self.target:g}"
        if len(twa) < self.patience + 1:
            return False, f"{len(twa)} probe(s), the plateau rule needs {self.patience + 1}"
        before = [a for a in twa[:-self.patience] if a is not None]
        recent = twa[-self.patience:]
        if not before or None in recent:  # a failed probe says nothing about a plateau
            return False, f"a failed probe among the last {self.patience + 1}"
        gain = 100 * (max(recent) - max(before))
        if gain >= self.epsilon_points:
            return False, f"TWA probe still improving: +{gain:.2f} points over the last {self.patience} probes"
        if sgd_accuracy is None:
            return False, "plateau, but no SGD accuracy in the run's metrics yet"
        if last < sgd_accuracy:
            return False, f"plateau, but TWA probe {last:.4f} < SGD val accuracy {sgd_accuracy:.4f}"
        return True, (f"TWA probe plateaued (+{gain:.2f} < {self.epsilon_points:g} points over the last "
                      f"{self.patience} probes) at {last:.4f} >= SGD val accuracy {sgd_accuracy:.4f}")


def parse_stop_rule(spec: str, *, epsilon_points: float, patience: int) -> StopRule:
    """``--stop-rule`` plus its parameters; a one-line ConfigError naming the flag at fault."""
    if epsilon_points < 0:
        raise ConfigError(f"--stop-epsilon: must be >= 0 (accuracy points), got {epsilon_points}")
    if patience < 1:
        raise ConfigError(f"--stop-patience: must be >= 1 probe, got {patience}")
    if spec in ("plateau", "none"):
        return StopRule(spec, epsilon_points=epsilon_points, patience=patience)
    kind, _, value = spec.partition(":")
    if kind == "target":
        try:
            target = float(value)
        except ValueError:
            target = -1.0
        if not 0 < target <= 1:
            raise ConfigError(f"--stop-rule {spec}: target:ACC needs an accuracy in (0, 1], e.g. target:0.93")
        return StopRule("target", target=target, epsilon_points=epsilon_points, patience=patience)
    raise ConfigError(f"--stop-rule {spec}: must be plateau, target:ACC or none")
