"""Which committed snapshots a TWA run uses: by sequence number (``--select``) or by epoch (``--select-epochs``).

Every snapshot record carries (seq, epoch, step, epoch_fraction); ``epoch_fraction`` is the training
progress in epochs when it was taken (2.4 = 40% into the third epoch; the end of epoch 3 is 3.0),
and for records written before it existed the completed-epoch count stands in. So a selection in
epochs means the same whatever the snapshot cadence was: ``--select-epochs 0:60`` takes every
snapshot taken up to the end of epoch 60, seq 0 (the initial weights, at 0.0) included: 61
snapshots at one per epoch, 301 at five per epoch (the authors' ImageNet "60+2" protocol).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from twa_scale.errors import ConfigError

__all__ = ["parse_range", "parse_select", "parse_select_epochs", "resolve_percent", "position", "select_by_epochs",
           "check_select_seqs"]

log = logging.getLogger(__name__)


def parse_range(spec: str, *, flag: str, number: type, unit: str, example: str) -> tuple[Any, Any, int]:
    """``A:B[:STRIDE]`` with A, B of type ``number`` (either may be empty) and STRIDE >= 1 (default 1);
    a one-line :class:`ConfigError` naming ``flag`` otherwise. Shared by --select and --select-epochs."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ConfigError(f"{flag} {spec}: expected A:B or A:B:STRIDE {unit} (e.g. {example})")
    try:
        a = number(parts[0]) if parts[0] else None
        b = number(parts[1]) if parts[1] else None
        stride = int(parts[2]) if len(parts) == 3 and parts[2] else 1
    except ValueError:
        kind = "integers" if number is int else "numbers"
        raise ConfigError(f"{flag} {spec}: A and B must be {kind} ({unit}), STRIDE an integer") from None
    if stride < 1:
        raise ConfigError(f"{flag} {spec}: STRIDE must be >= 1")
    return a, b, stride


def parse_select(spec: str | None) -> tuple[int | None, int | None, int]:
    """``A:B[:STRIDE]`` over snapshot sequence numbers, Python slice semantics (A <= seq < B).

    None selects every committed snapshot, seq 0 (the initial weights) included.
    """
    if spec is None:
        return None, None, 1
    return parse_range(spec, flag="--select", number=int, unit="of snapshot seqs", example="1:101 or 0::2")


def resolve_percent(spec: str, run_epochs: int) -> str:
    """``spec`` with each end written as a percentage of the run's configured epochs (``0:50%``, the
    paper's head: epochs 0..E/2) turned into epochs; ends without ``%`` are kept as they are."""
    parts = spec.split(":")
    for i in range(min(2, len(parts))):
        if parts[i].endswith("%"):
            try:
                pct = float(parts[i][:-1])
            except ValueError:
                raise ConfigError(f"--select-epochs {spec}: {parts[i]!r} is not a percentage (e.g. 0:50%)") from None
            parts[i] = f"{run_epochs * pct / 100:g}"
    return ":".join(parts)


def parse_select_epochs(spec: str | None) -> tuple[float | None, float | None, int]:
    """``A:B[:STRIDE]`` in epochs, both ends included (A <= epoch position <= B); STRIDE counts snapshots.
    An end may be a percentage of the run's configured epochs (see :func:`resolve_percent`); it is checked
    here as a percentage of 100 epochs, and resolved against the run in :func:`select_by_epochs`."""
    if spec is None:
        return None, None, 1
    a, b, stride = parse_range(resolve_percent(spec, 100), flag="--select-epochs", number=float, unit="in epochs",
                               example="0:60, 0:60:2 or 0:50%")
    if (a is not None and a < 0) or (a is not None and b is not None and b < a):
        raise ConfigError(f"--select-epochs {spec}: expected 0 <= A <= B")
    return a, b, stride


def position(info: Any) -> float:
    """Training progress in epochs when the snapshot was taken (``epoch_fraction``, else ``epoch``)."""
    frac = getattr(info, "epoch_fraction", None)
    return float(info.epoch if frac is None else frac)


def _fmt(x: float) -> str:
    return f"{x:g}"


def select_by_epochs(infos: Sequence[Any], spec: str, run_epochs: int | None = None) -> list[Any]:
    """The committed snapshots (``reader.snapshots()`` items, in seq order) that ``spec`` names;
    ``run_epochs`` (the run's configured E) resolves percentage ends.

    Raises a one-line :class:`ConfigError` when an end names an epoch after the last committed
    snapshot, or when the selection holds fewer than 2 snapshots.
    """
    shown = spec
    if "%" in spec:
        if not run_epochs:
            raise ConfigError(f"--select-epochs {spec}: a percentage needs the run's configured epochs, and its "
                              "manifest records none")
        resolved = resolve_percent(spec, run_epochs)
        shown, spec = f"{spec} (= {resolved} of the run's {run_epochs} epochs)", resolved
    a, b, stride = parse_select_epochs(spec)
    infos = sorted(infos, key=lambda i: i.seq)
    if not infos:
        raise ConfigError(f"--select-epochs {shown}: the run has no committed snapshot")
    last = max(infos, key=position)
    for name, end in (("A", a), ("B", b)):
        if end is not None and end > position(last) + 1e-9:
            raise ConfigError(f"--select-epochs {shown}: epoch {_fmt(end)} ({name}) is not committed: the last "
                              f"committed snapshot is seq {last.seq} at epoch {_fmt(position(last))}")
    lo = -1.0 if a is None else a - 1e-9
    hi = float("inf") if b is None else b + 1e-9
    picked = [i for i in infos if lo <= position(i) <= hi][::stride]
    if len(picked) < 2:
        which = ", ".join(f"seq {i.seq} at epoch {_fmt(position(i))}" for i in picked) or "none"
        raise ConfigError(f"--select-epochs {shown}: TWA needs at least 2 snapshots, the selection holds "
                          f"{len(picked)} ({which})")
    return picked


def check_select_seqs(infos: Sequence[Any], spec: str | None) -> None:
    """``--select A:B``: both ends must name committed seqs (A, and B - 1), so a range that runs past
    the end of the run, or starts at a failed snapshot, is an error instead of a silently shorter set."""
    if spec is None:
        return

    a, b, _ = parse_select(spec)
    seqs = sorted(i.seq for i in infos)
    end = seqs[-1] + 1 if seqs else 0  # negative ends count back from here: -5: is the last five
    a = a + end if a is not None and a < 0 else a
    b = b + end if b is not None and b < 0 else b
    have = set(seqs)
    span = f"committed: seq {seqs[0]}..{seqs[-1]}" if seqs else "no snapshot is committed"
    for what, seq in (("A", a), ("B - 1", None if b is None else b - 1)):
        if seq is not None and seq not in have:
            raise ConfigError(f"--select {spec}: seq {seq} ({what}) is not committed ({span})")
    if a is not None and b is not None:
        gaps = [s for s in range(a, b) if s not in have]
        if gaps:
            log.warning("--select %s: seqs %s inside the range are not committed (failed snapshots?); "
                        "using the others", spec, gaps)


def check_selection(spec: str | None, committed: Sequence[int], damaged: dict[int, str], *,
                    allow_gaps: bool = False) -> None:
    """Refuse a --select range that holds a damaged snapshot (naming its seq: an invalid commit
    marker or a missing object, see ``RunReader.scan``) or, without ``allow_gaps``, a seq that is not
    committed. A selection that avoids the damaged seqs works."""

    a, b, stride = parse_select(spec)
    known = sorted(set(committed) | set(damaged))
    if not known:
        return
    end = known[-1] + 1
    a = a + end if a is not None and a < 0 else a
    b = b + end if b is not None and b < 0 else b
    lo = known[0] if a is None else a
    hi = end if b is None else b
    sel = f"--select {spec}" if spec else "the selection (every snapshot)"
    bad = [s for s in range(lo, hi, stride) if s in damaged]
    if bad:
        raise ConfigError(f"{sel} includes damaged snapshot seq {bad[0]} ({damaged[bad[0]]})"
                          + (f" and seqs {bad[1:]}" if bad[1:] else "") + "; choose a selection that avoids it")
    have = set(committed)
    gaps = [s for s in range(lo, min(hi, end), stride) if s not in have]
    if gaps and not allow_gaps:
        raise ConfigError(f"{sel}: snapshot seq(s) {gaps} are not committed; pass --allow-gaps to use the "
                          "selection without them")
