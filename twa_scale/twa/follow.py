"""Live TWA: follow a running training job's snapshots, probe TWA as they arrive, and say when to stop.

    deepspeed --num_gpus 1 launch/twa.py --follow --snapshot-url file:///runs --run-id r1 --probe-every 2

The follower is its own job (any world size, independent of the trainer's). Rank 0 looks at the run every
``--poll-seconds`` and broadcasts what is new; every rank reads only its column slice of each new snapshot
and appends it to a :class:`GrowingBasis` (its inner products with the earlier ones and one all-reduce of
n + 1 floats: nothing is rebuilt). Every ``--probe-every`` new snapshots a *probe* runs the follower's one
:class:`TwaStage` on that basis: a short fit (``--probe-steps`` steps, the guard on), BatchNorm recalibrated on
``--probe-bn-batches`` batches, evaluated on the run's hold-out split (never on val, which the report
uses). The newest SGD snapshot is scored on the same hold-out, BatchNorm recalibrated the same way, and both
keep their per-example correctness for the rule's paired comparisons. The probe is appended to
``<run>/twa/probes.json`` (the whole list, one atomic put) and exported as metrics; the stop rule
(:mod:`twa_scale.twa.stoprule`) then decides from hold-out numbers only (never val, never training's
metrics), and when it fires ``STOP.json`` is written (:mod:`twa_scale.store.control`), which the training job obeys
at its next snapshot. Once training has finished or stopped (its metrics.json has ``final``), the follower
runs a probe that fell due with the last snapshots, then the final TWA exactly as ``launch/twa.py`` does
(:meth:`TwaStage.run`), on the configured selection, with the same stage: the run, model and data are
opened and built once.

``--replay`` follows a finished run as if live: every snapshot is appended in order and a probe runs wherever
a follower that kept up would have run one, each decision recorded and none acted on (no STOP.json). That is
how the stop rule's parameters are chosen on runs already trained (experiments/stop_validation.py).

Faults: a run that does not exist yet is waited for (``--follow-timeout``, saying what for); a finished run
goes straight to the final TWA; a restarted follower resumes from probes.json (a probe is recorded once, by
its last seq); a follower that fell behind probes only at the newest snapshot and logs how many probes it
skipped; a look at the run that fails (store error) is a warning and the next look retries.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch

from twa_scale import comm, metrics, tracking
from twa_scale.errors import ConfigError, TransientError
from twa_scale.store.format import FormatError, ProbeLog
from twa_scale.train.config import TrainConfig
from twa_scale.twa.config import TwaConfig
from twa_scale.twa.selection import position
from twa_scale.twa.solver import SnapshotRef
from twa_scale.twa.stage import Splits, TwaGuardError, TwaResult, TwaStage, load_inputs
from twa_scale.twa.stoprule import ProbeView, first_phase_end, pack_correct
from twa_scale.twa.subspace import GrowingBasis

__all__ = ["run_follow", "Follower"]

log = logging.getLogger(__name__)

# probes.json is worth a retry through a store hiccup, not a hang of the follower
PROBES_WRITE_RETRY_SECONDS = 60.0


def _say(msg: str, *, warn: bool = False) -> None:
    """Rank 0 logs what the follower does (and waits for): its operator reads this, not a debugger."""
    if comm.rank() == 0:
        (log.warning if warn else log.info)("%s", msg)


def run_follow(cfg: TwaConfig) -> TwaResult:
    """Follow the run until training ends, then run the final TWA; returns its result (every rank)."""
    comm.init()
    metrics.setup(run_id=cfg.run_id, role="twa", port=cfg.metrics_port, addr=cfg.metrics_addr)
    waited = _wait_for_run(cfg)
    inp = load_inputs(cfg, select=False)
    if not inp.data.holdout:
        raise ConfigError(f"--follow: run {cfg.snapshot_url.rstrip('/')}/{cfg.run_id} has no hold-out split; "
                          "probes evaluate on it, never on val: train it with --holdout-fraction > 0 (e.g. 0.1)")
    stage = TwaStage(cfg, inp)
    tracking.setup(cfg.logger, run_url=f"{cfg.snapshot_url.rstrip('/')}/{cfg.run_id}", run_id=cfg.run_id,
                   stage="follow", storage_options=cfg.storage_options)  # the probes; the final TWA opens "twa"
    try:
        Follower(cfg, stage, started_before_run=waited).follow()
    finally:
        tracking.close()
    stage.select()
    return stage.run()


def _wait_for_run(cfg: TwaConfig) -> bool:
    """Wait (bounded by --follow-timeout) until the run's run.json exists; True when it had to wait."""
    from twa_scale.store import RunPaths, open_store

    def wait() -> bool | None:
        st, key = open_store(cfg.snapshot_url, cfg.storage_options), RunPaths(cfg.run_id).manifest
        deadline, said = time.monotonic() + cfg.follow_timeout, False
        while not st.exists(key):
            if time.monotonic() > deadline:
                return None
            if not said:
                log.info("waiting for the training run: %s does not exist yet (up to %gs, --follow-timeout)",
                         st.describe(key), cfg.follow_timeout)
                said = True
            time.sleep(cfg.poll_seconds)
        return said

    waited = comm.broadcast_object(wait() if comm.rank() == 0 else None)
    if waited is None:
        raise TransientError(f"--follow: no run {cfg.run_id!r} under {cfg.snapshot_url} after {cfg.follow_timeout:g}s "
                             "(--follow-timeout); is the training job running?")
    return waited


class Follower:
    """The follow loop's state on one rank: the stage its probes run on, the growing basis, the snapshots in it,
    the probe records."""

    def __init__(self, cfg: TwaConfig, stage: TwaStage, *, started_before_run: bool = False):
        self.cfg, self.stage, self.rule = cfg, stage, cfg.rule
        self.inp = inp = stage.inputs
        # Started before the run existed, the follower follows it from the start, however fast training is:
        # it probes what fell due even when the run has finished by its first look.
        self.started_before_run = started_before_run
        self.reader, self.paths = inp.reader, inp.reader.paths
        device = comm.device()
        self.flat = flat = stage.flat
        self.start, self.stop = flat.start, flat.stop
        self.last_x: torch.Tensor | None = None    # this rank's slice of the newest snapshot (the SGD point)
        # The rule acts in the run's first lr phase: the hand-over of the high-lr trajectory. A manifest without
        # the keys (written before they were stored) ran TrainConfig's defaults.
        ran = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | inp.run_config
        self.phase_end = first_phase_end(ran["schedule"], ran["epochs"], ran["lr_milestones"])
        self.basis = GrowingBasis(self.start, self.stop, reduce=comm.all_reduce, tol=cfg.rank_tol,
                                  spread_tol=cfg.rank_spread_tol, device=device)
        self.refs: list[SnapshotRef] = []          # every snapshot in the basis, in order (dropped ones too)
        self.per_rank = stage.per_rank_batch
        self.probes: list[dict] = comm.broadcast_object(self._read_probes() if comm.rank() == 0 else None)
        self.stop_written = any(p.get("stop_written") for p in self.probes)
        self.said_past_phase = False
        if self.probes:
            _say(f"resuming after {len(self.probes)} recorded probe(s) (the last at seq {self.probes[-1]['last_seq']})")

    # --- the loop ---------------------------------------------------------------------------------
    def follow(self) -> None:
        cfg = self.cfg
        idle_since, first = time.monotonic(), True
        while True:
            look = comm.broadcast_object(self._look(idle_since) if comm.rank() == 0 else None)
            if look["timed_out"]:
                raise TransientError(f"--follow: no new snapshot of {self.reader.url}/{self.reader.run_id} for "
                                     f"{cfg.follow_timeout:g}s and training has not finished (--follow-timeout)")
            if look["done"] and first and not (self.started_before_run or cfg.replay):
                _say("the training run has already finished: running the final TWA as launch/twa.py does")
                return
            first = False
            for info in look["new"]:
                if self._closes_phase(info):
                    self._probe()  # the first lr phase's last snapshot is probed before a later one joins the basis
                self._append(info)
                if cfg.replay and self._pending() >= cfg.probe_every and self._probing():
                    self._probe()  # a replay probes where a follower that kept up would have
            # A probe that falls due with the run's last snapshots still runs: the probe record then covers
            # the whole run (what a record-only follower is for), before the final TWA.
            pending = self._pending()
            if pending >= cfg.probe_every and self._probing():
                if pending >= 2 * cfg.probe_every:
                    _say(f"fell behind: {pending} snapshots since the last probe; skipping "
                         f"{pending // cfg.probe_every - 1} probe(s), probing at the newest (seq {self.refs[-1].seq})",
                         warn=True)
                self._probe()
            if look["done"]:
                _say(f"training finished ({len(self.refs)} snapshot(s) followed, {len(self.probes)} probe(s)): "
                     "running the final TWA")
                return
            if look["new"]:
                idle_since = time.monotonic()
            else:
                time.sleep(cfg.poll_seconds)

    def _in_first_phase(self, epoch: float) -> bool:
        return epoch <= self.phase_end + 1e-9

    def _probing(self) -> bool:
        """Probes still pay: past the run's first lr phase the gain rule cannot fire, so the follower stops
        probing there (said once); other rules probe to the end."""
        if self.rule.kind != "gain" or not self.refs or self._in_first_phase(self.refs[-1].epoch):
            return True
        if not self.said_past_phase:
            self.said_past_phase = True
            _say(f"past the run's first lr phase (it ended at epoch {self.phase_end:g}): the gain rule cannot "
                 "fire any more, so no more probes; the final TWA runs when training ends")
        return False

    def _closes_phase(self, info) -> bool:
        """``info`` is the first snapshot past the first lr phase, and the gain rule has not yet seen the phase's
        last snapshot: that probe is what the rule's hand-over decides on."""
        return (self.rule.kind == "gain" and bool(self.refs) and self._pending() > 0
                and self._in_first_phase(self.refs[-1].epoch) and not self._in_first_phase(position(info)))

    def _pending(self) -> int:
        """Snapshots in the basis since the last probe (or since the first snapshot)."""
        last_probe = self.probes[-1]["last_seq"] if self.probes else self.refs[0].seq if self.refs else 0
        return sum(1 for r in self.refs if r.seq > last_probe)

    def _look(self, idle_since: float) -> dict:
        """Rank 0: what is new in the run. The training metrics are read before the listing: training writes
        ``final`` only after its last snapshot is committed, so "done" never hides a snapshot. Only ``final``'s
        presence is read from them: no accuracy of training's reaches a stop rule."""
        from twa_scale.store.format import TrainMetrics

        last = self.refs[-1].seq if self.refs else -1
        train = TrainMetrics(run_id=self.reader.run_id, epochs=())
        try:
            try:
                train = TrainMetrics.from_json(self.reader.store.get(self.paths.metrics),
                                               self.reader.describe(self.paths.metrics))
            except FileNotFoundError:
                pass
            infos = self.reader.snapshots()
        except Exception as e:  # noqa: BLE001 - a failed look is retried at the next poll (bounded by the timeout)
            log.warning("cannot look at %s/%s (%s: %s); retrying in %gs", self.reader.url, self.reader.run_id,
                        type(e).__name__, e, self.cfg.poll_seconds)
            train, infos = TrainMetrics(run_id=self.reader.run_id, epochs=()), []
        new = [i for i in infos if i.seq > last]
        return {"new": new, "done": train.final is not None,
                "timed_out": not new and time.monotonic() - idle_since > self.cfg.follow_timeout}

    def _append(self, info) -> None:
        """Read this rank's slice of a committed snapshot and grow the basis by it."""
        x = comm.agree(lambda: self.reader.read(info.seq, self.start, self.stop), f"reading snapshot {info.seq}")
        if not self.basis.append(x.to(self.basis.device)):
            _say(f"snapshot seq {info.seq} is nearly dependent on the earlier ones: no new direction", warn=True)
        self.refs.append(SnapshotRef(info.seq, info.step, position(info)))
        self.last_x = x

    # --- probes ---------------------------------------------------------------------------------------
    def _holdout(self, desc: str) -> dict:
        """The model as it stands on the hold-out, with per-example correctness."""
        from twa_scale.data.datasets import make_loader
        from twa_scale.evaluation import evaluate

        loader = make_loader(self.inp.data.holdout, batch_size=self.per_rank, train=False,
                             num_workers=self.cfg.num_workers)
        return evaluate(self.inp.model, loader, comm.device(), desc=desc, per_example=True)

    def _score_sgd(self) -> dict:
        """The newest SGD snapshot on the hold-out, BatchNorm recalibrated as the probe's (same batches)."""
        from twa_scale.data.datasets import make_loader
        from twa_scale.twa.bn import has_batchnorm, recalibrate_bn

        model, cfg = self.inp.model, self.cfg
        self.flat.assemble(self.last_x.to(self.flat.local.device), self.inp.layout.trainable(model))
        if has_batchnorm(model):
            bn = make_loader(self.inp.data.train, batch_size=self.per_rank, train=True, seed=cfg.seed, epoch=10_000,
                             num_workers=cfg.num_workers)
            recalibrate_bn(model, bn, comm.device(), max_batches=cfg.probe_bn_batches)
        return self._holdout("SGD snapshot (hold-out)")

    def _probe(self) -> None:
        """One probe over every snapshot so far: record it, export it, apply the stop rule."""
        cfg, inp, stage = self.cfg, self.inp, self.stage
        if len(self.basis.kept) < 2:
            _say(f"probe skipped: the {self.basis.n} snapshot(s) so far span fewer than 2 directions")
            return
        t0 = time.perf_counter()
        index = len(self.probes)
        # Probes are paper mode on the growing basis, one short epoch at a decaying lr, evaluated on hold-out.
        pcfg = dataclasses.replace(cfg, epochs=1, schedule="linear", warmup=0.0, eval_every=0, start=None,
                                   select=None, select_epochs=None, directions="raw", coefficients="global",
                                   p_bits=32, bn_batches=cfg.probe_bn_batches, plot=False)
        # The fit: exactly --probe-steps global batches, a seeded sample of the training data (passes over it
        # repeated when the probe is longer than an epoch); the guard checks on --guard-samples of them.
        train = inp.data.train
        need = cfg.probe_steps * self.per_rank * comm.world_size()
        gen = torch.Generator().manual_seed(cfg.seed + 7_877 * index)
        idx = torch.cat([torch.randperm(len(train), generator=gen) for _ in range(-(-need // len(train)))])[:need]
        fit = torch.utils.data.Subset(train, idx.tolist())
        guard = torch.utils.data.Subset(train, idx[:cfg.guard_samples].unique().tolist())
        try:
            stage.prepare(self.refs, cfg=pcfg, basis=self.basis.basis(),
                          splits=Splits(fit=fit, val=inp.data.holdout, bn=train, guard=guard,
                                        guard_name=f"probe fit sample ({len(guard)})"))
            stage.fit()
            result = stage.summarise()
            swa, lr = result.swa_accuracy, result.lr_final
            # the final TWA would return the start point too: the rule sees what a stop would deliver
            outcome = "ok" if result.returned == "twa" else "guard fallback: start point"
            twa_eval = self._holdout("TWA probe (hold-out)")  # the model holds what the fit returned
        except TwaGuardError as e:  # every lr failed on this probe: recorded, and the rule sees no accuracy
            twa_eval, swa, lr = None, None, None
            outcome = f"guard failed: {e}"
        sgd_eval = self._score_sgd()
        last = self.refs[-1]
        twa = twa_eval["accuracy"] if twa_eval else None
        rec = {"probe": index, "first_seq": self.refs[0].seq, "last_seq": last.seq, "snapshots": len(self.refs),
               "epoch": last.epoch, "step": last.step, "twa_accuracy": twa, "swa_accuracy": swa,
               "sgd_holdout_accuracy": sgd_eval["accuracy"], "lr": lr, "split": "holdout", "outcome": outcome,
               "first_phase": self._in_first_phase(last.epoch),
               "phase_end": self.phase_end if math.isfinite(self.phase_end) else None,
               "twa_correct": pack_correct(twa_eval["correct"].numpy()) if twa_eval else None,
               "sgd_correct": pack_correct(sgd_eval["correct"].numpy()),
               "seconds": round(time.perf_counter() - t0, 3)}
        decision = self.rule.decide([ProbeView.of(p) for p in [*self.probes, rec]])
        rec.update(rule=self.rule.name, **decision.to_dict(), stop_written=False)
        would = decision.stop
        _say(f"probe {index} at seq {last.seq} (epoch {last.epoch:g}): TWA {_pct(twa)}, SWA {_pct(swa)}, "
             f"SGD {_pct(sgd_eval['accuracy'])} (hold-out), lr {lr}, {rec['seconds']:.1f}s; "
             f"{self.rule.name}: {decision.reason}")
        if would and cfg.stop_marker and not cfg.replay and not self.stop_written:
            rec["stop_written"] = self.stop_written = True
        self.probes.append(rec)
        comm.agree(lambda: self._publish(rec), f"recording probe {index} in {self.reader.describe(self.paths.probes)}")

    def _publish(self, rec: dict) -> None:
        """Rank 0: STOP.json first when the rule fired (a restart repeats an unrecorded probe, and with it
        this idempotent put), then the whole probe list, then the metrics."""
        if comm.rank() != 0:
            return
        from twa_scale.store.control import write_stop
        from twa_scale.store import RetryPolicy

        if rec["stop_written"]:
            write_stop(self.reader.url, self.reader.run_id, reason=rec["decision"], rule=rec["rule"], by="twa",
                       probes=self.probes, storage_options=self.cfg.storage_options, require_run=False)
            log.warning("stop rule %s fired: wrote %s (%s)", rec["rule"], self.reader.describe(self.paths.stop),
                        rec["decision"])
        data = ProbeLog(run_id=self.reader.run_id, probes=tuple(self.probes)).to_json()
        RetryPolicy(deadline_seconds=PROBES_WRITE_RETRY_SECONDS).call(
            f"writing {self.reader.describe(self.paths.probes)}",
            lambda: self.reader.store.put_small(self.paths.probes, data))
        metrics.twa_probe(epoch=rec["epoch"], twa_accuracy=rec["twa_accuracy"], swa_accuracy=rec["swa_accuracy"],
                          seconds=rec["seconds"], lr=rec["lr"], would_stop=rec["would_stop"])
        tracking.log_metrics({f"probe/{k}": float(rec[k]) for k in ("epoch", "twa_accuracy", "swa_accuracy", "seconds",
                                                                    "lr", "would_stop", "last_seq")
                              if rec.get(k) is not None}, step=rec["probe"])
        tracking.flush()

    def _read_probes(self) -> list[dict]:
        """Rank 0: the probe records of an earlier follower of this run (empty when none or unreadable)."""
        try:
            return list(ProbeLog.from_json(self.reader.store.get(self.paths.probes),
                                           self.reader.describe(self.paths.probes)).probes)
        except FileNotFoundError:
            return []
        except FormatError as e:
            log.warning("ignoring %s; probing from the start", e)
            return []


def _pct(acc: float | None) -> str:
    return "n/a" if acc is None else f"{acc:.4f}"
