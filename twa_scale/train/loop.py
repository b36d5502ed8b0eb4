"""The training job: DeepSpeed engine + per-epoch eval, metrics.json, checkpoints, snapshot streaming.

``run_training(cfg)`` is what ``launch/train.py`` calls on every rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import uuid

import torch
import torch.nn.functional as F

from twa_scale import comm, knobs, logs, metrics, tracking
from twa_scale.background import Background
from twa_scale.data.datasets import build_data, make_loader
from twa_scale.errors import ConfigError, TransientError
from twa_scale.evaluation import evaluate
from twa_scale.layout import FlatLayout
from twa_scale.models import build_model
from twa_scale.train import checkpoints, preemption
from twa_scale.train.config import TrainConfig
from twa_scale.train.engine import build_engine, load_ds_config, resolve_batch
from twa_scale.train.steplog import StepLog

__all__ = ["run_training", "KEEP_CHECKPOINTS", "Trainer", "Checkpointer", "SnapshotPlan", "StopCheck"]

log = logging.getLogger("twa_scale.train")
KEEP_CHECKPOINTS = checkpoints.KEEP_CHECKPOINTS


class StopCheck:
    """Obeys <run>/control/STOP.json (see twa_scale/store/control.py): called on every rank after each snapshot is
    queued. Rank 0 reads the marker in a background thread (every TWA_SCALE_STOP_POLL_SECONDS, each read
    bounded by that too); the ranks agree on it through the step agreement's all-reduce (preemption.py), so
    all ranks end after the same snapshot, the first one after they agreed, and none waits for the store."""

    def __init__(self, cfg: TrainConfig, agreement: preemption.StepAgreement):
        from twa_scale.store.control import StopWatch

        self.enabled = cfg.obey_stop
        self.watch = None
        if self.enabled and comm.rank() == 0:
            every = knobs.STOP_POLL_SECONDS.get()
            self.watch = StopWatch(cfg.snapshot_url, cfg.run_id, storage_options=cfg.storage_options,
                                   timeout_seconds=every).start(every)
        self.agreement = agreement
        agreement.stop_seen = self.seen
        self.fields: dict | None = None  # set once the stop is taken: what metrics.json records

    def seen(self) -> bool:
        """Rank 0's poll has found a marker (what the step agreement carries)."""
        return self.watch is not None and self.watch.marker is not None

    def __call__(self, seq: int, step: int, epoch_fraction: float, *, agree_now: bool = False) -> bool:
        """True when training must end after snapshot ``seq`` (the same answer on every rank).
        ``agree_now``: before any step (the initial snapshot), agree with one blocking all-reduce."""
        if not self.enabled:
            return False
        if agree_now:
            self.agreement.finish()
        if not self.agreement.stop_requested:
            return False
        marker = self.watch.marker if self.watch is not None else None
        fields = None if marker is None else {
            "stopped_by": marker.by, "stop_reason": marker.reason, "stop_rule": marker.rule,
            "stopped_epoch": epoch_fraction, "stopped_step": step, "stopped_seq": seq}
        self.fields = comm.broadcast_object(fields)  # once, as training ends: the marker is in memory
        if comm.rank() == 0:
            print(f"stop requested by {self.fields['stopped_by']} ({self.fields['stop_reason']}): training ends "
                  f"after snapshot {seq} (epoch {epoch_fraction:g}, step {step})", flush=True)
        return True

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()


@dataclasses.dataclass(frozen=True)
class SnapshotPlan:
    """Which snapshots a run takes, and their seqs. Snapshot 0 is the initial weights.

    Per epoch (``per_epoch`` None): after every ``every``-th epoch, seq = epochs done // every.
    Sub-epoch (``per_epoch`` K): K per epoch, evenly spaced by optimizer steps, the last at the epoch's
    end; in epoch e (0-based) snapshot j = 1..K comes after optimizer step floor(j·S/K) of the epoch
    and has seq e·K + j. The seqs depend only on (epoch, j), so a resumed run re-takes the same ones.
    """

    every: int
    per_epoch: int | None
    steps_per_epoch: int

    @classmethod
    def from_config(cls, cfg: TrainConfig, steps_per_epoch: int) -> "SnapshotPlan":
        k = cfg.snapshots_per_epoch
        if k is not None and k > steps_per_epoch:
            raise ConfigError(f"--snapshots-per-epoch {k}: larger than the {steps_per_epoch} optimizer steps "
                              f"per epoch (use at most {steps_per_epoch}, or a smaller batch)")
        return cls(every=cfg.snapshot_every, per_epoch=k, steps_per_epoch=steps_per_epoch)

    def mid_epoch(self) -> list[tuple[int, int]]:
        """(optimizer step within the epoch, j) of the snapshots taken inside an epoch (not at its end)."""
        k = self.per_epoch
        return [] if not k else [(j * self.steps_per_epoch // k, j) for j in range(1, k)]

    def seq(self, epoch: int, j: int) -> int:
        """Seq of snapshot j (1..K) of epoch ``epoch`` (0-based)."""
        return epoch * self.per_epoch + j

    def seq_at_boundary(self, epochs_done: int) -> int | None:
        """Seq of the snapshot at the end of epoch ``epochs_done`` (0: the initial weights), or None."""
        if self.per_epoch:
            return epochs_done * self.per_epoch
        return epochs_done // self.every if epochs_done % self.every == 0 else None


def _share_cpu_threads(device: torch.device) -> None:
    """Split the node's cores between its local ranks: torch defaults every process to all
    cores, which oversubscribes a CPU node W-fold. An explicit OMP_NUM_THREADS wins."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.local_world_size()))


def _default_workers(cfg: TrainConfig) -> int:
    if cfg.num_workers is not None:
        return cfg.num_workers
    if cfg.data == "digits":
        return 0  # in-memory tensors
    return max(0, min(4, (os.cpu_count() or 1) // comm.local_world_size() - 1))


def run_training(cfg: TrainConfig) -> dict:
    """Train, snapshot and checkpoint; return the final metrics dict (same on every rank)."""
    from twa_scale import store

    comm.init()
    world, device = comm.world_size(), comm.device()
    _share_cpu_threads(device)
    metrics.setup(run_id=cfg.run_id, role="train", port=cfg.metrics_port, addr=cfg.metrics_addr)
    if cfg.auto_resume and not cfg.resume:
        _auto_resume(cfg)
    ds = load_ds_config(cfg.deepspeed_config)
    _, micro, accum = resolve_batch(ds, batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, world=world)
    data = build_data(cfg, storage_options=cfg.storage_options)
    steps_per_epoch = len(data.train) // world // micro // accum
    if steps_per_epoch == 0:
        raise ValueError(f"--data {cfg.data}: {len(data.train)} training images are fewer than one global batch "
                         f"({world} ranks × {micro} × {accum} accumulation steps)")
    plan = SnapshotPlan.from_config(cfg, steps_per_epoch)

    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = build_model(cfg.model, data.num_classes).to(device)
    layout = FlatLayout.from_model(model)
    if cfg.init_from:
        _load_snapshot(model, cfg)
    meta = {"model": cfg.model, "num_classes": data.num_classes, "classes": data.classes, "image_size": data.image_size,
            "data": cfg.data, "config": cfg.to_dict()}
    # The store is checked before any training step: an unwritable URL, an existing run without
    # --resume, a different configuration or a live writer fails here, on every rank.
    session = comm.broadcast_object(uuid.uuid4().hex[:12])
    writer = {}  # rank 0: the RunWriter that holds the run's writer lease

    def create_run() -> None:  # on rank 0; a failure is a one-line error on every rank
        if comm.rank() == 0:
            from twa_scale.errors import TransientError, is_transient

            try:
                writer["w"] = store.create_run(
                    cfg.snapshot_url, cfg.run_id, layout, meta=meta, world_size=world, dtype=cfg.snapshot_dtype,
                    storage_options=cfg.storage_options, identity=run_identity(cfg, layout, data.num_classes, ds),
                    resume=cfg.resume, session=session)
            except Exception as e:  # noqa: BLE001 - keep the class that decides the exit status: 75 or 2
                raise (TransientError if is_transient(e) else ValueError)(str(e)) from e

    comm.agree(create_run, f"creating run {cfg.run_id!r} in the store")
    try:
        tracking.setup(cfg.logger, run_url=cfg.run_url, run_id=cfg.run_id, stage="train",
                       storage_options=cfg.storage_options)
        tracking.log_params(cfg.to_dict())
        return Trainer(cfg, model=model, ds=ds, steps_per_epoch=steps_per_epoch, layout=layout, data=data,
                       micro=micro, plan=plan, session=session, writer=writer.get("w")).run()
    finally:
        tracking.close()
        if "w" in writer:
            writer["w"].close()  # releases the writer lease


def _auto_resume(cfg: TrainConfig) -> None:
    """--auto-resume: set cfg.resume when rank 0 finds a checkpoint (its own, or committed on the store)."""
    from twa_scale.errors import TransientError, is_connection_error

    url = None if cfg.checkpoint_url in ("", "none") else cfg.checkpoint_url

    def look() -> tuple[str, str] | None:
        if comm.rank() != 0:
            return None
        try:
            return checkpoints.newest(cfg.checkpoint_dir, url, cfg.storage_options)
        except Exception as e:  # an unreachable store at start is transient (exit 75), as in create_run
            if is_connection_error(e):
                raise TransientError(f"--auto-resume: checkpoint store {url} unreachable: {e}") from e
            raise

    found = comm.broadcast_object(comm.agree(look, "looking for a checkpoint (--auto-resume)"))
    if found:
        cfg.resume = True
        if comm.rank() == 0:
            print(f"--auto-resume: checkpoint {found[0]} found in {found[1]}: resuming", flush=True)


def run_identity(cfg: TrainConfig, layout: FlatLayout, num_classes: int, ds: dict) -> dict:
    """What defines a training run (stored in run.json; a --resume must match it)."""
    fields = ("model", "data", "seed", "lr", "momentum", "weight_decay", "schedule", "warmup_epochs", "epochs",
              "holdout_fraction", "limit_train", "snapshot_every", "snapshots_per_epoch", "snapshot_dtype",
              "init_from")
    conf = {f: getattr(cfg, f) for f in fields}
    return {"model": {"name": cfg.model, "num_classes": num_classes},
            "layout": {"fingerprint": layout.fingerprint, "D": layout.D, "entries": layout.to_json()["entries"]},
            "data": {k: conf.get(k) for k in ("data", "holdout_fraction", "limit_train")},
            "seed": cfg.seed,
            "optimizer": {"name": "sgd", "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
                          "decay_norm_bias": cfg.decay_norm_bias, "batch_size": ds.get("train_batch_size")},
            "schedule": {"schedule": cfg.schedule, "warmup_epochs": cfg.warmup_epochs, "epochs": cfg.epochs,
                         "lr_milestones": cfg.lr_milestones},
            "cadence": {k: conf[k] for k in ("snapshot_every", "snapshots_per_epoch", "snapshot_dtype")},
            "init_from": cfg.init_from}


class Trainer:
    """The training job on this rank, once its run exists in the store. :meth:`run` trains epoch after
    epoch (:meth:`_epoch`); the collaborators it calls: the :class:`SnapshotPlan` (which snapshots, their
    seqs), the streamer that takes them, the :class:`Checkpointer`, the :class:`StopCheck` (the stop
    marker) and the step agreement (preemption.py: all ranks act on a SIGTERM or a stop at one step)."""

    def __init__(self, cfg: TrainConfig, *, model: torch.nn.Module, ds: dict, steps_per_epoch: int,
                 layout: FlatLayout, data, micro: int, plan: SnapshotPlan, session: str, writer):
        from twa_scale import store
        from twa_scale.train.streamer import SnapshotStreamer, StreamerConfig

        self.cfg, self.data, self.micro, self.plan, self.writer = cfg, data, micro, plan, writer
        self.steps_per_epoch = steps_per_epoch
        self.rank, self.device = comm.rank(), comm.device()
        self.engine = build_engine(model, cfg, ds, steps_per_epoch=steps_per_epoch)
        self.channels_last = self.device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
        self.ckpt_url = None if cfg.checkpoint_url in ("", "none") else cfg.checkpoint_url
        self.start_epoch, self.history, self.point = self._resume()
        self.params = layout.trainable(model)
        # SIGTERM and the stop marker: all ranks act at one step (preemption.py)
        self.agreement = preemption.StepAgreement()
        self.stop = StopCheck(cfg, self.agreement)
        # Rank 0's metrics.json writes go to the store in the background: the latest state wins, every row is
        # written once (RunWriter.write_metrics); a checkpoint waits (bounded) for the rows it covers.
        self.metrics_out = Background("twa-metrics", lambda state: writer.write_metrics(*state)) \
            if self.rank == 0 else None
        self.streamer = SnapshotStreamer(
            cfg.snapshot_url, cfg.run_id, layout, rank=self.rank, world_size=comm.world_size(),
            config=StreamerConfig(dtype=cfg.snapshot_dtype, session=session,
                                  storage_options=store.parse_storage_options(cfg.storage_options)),
            writer=writer)
        self.checkpointer: Checkpointer | None = None  # made by run(), with the checkpoint uploader

    def _resume(self) -> tuple[int, list[dict], checkpoints.ResumePoint | None]:
        """--resume: load the newest checkpoint into the engine; (the epoch to start, the metrics rows
        before it, the checkpoint's position or None)."""
        cfg = self.cfg
        if not cfg.resume:
            return 0, [], None
        point = checkpoints.load(self.engine, cfg.checkpoint_dir, url=self.ckpt_url,
                                 storage_options=cfg.storage_options)
        if point is None:
            log.warning("--resume: no checkpoint in %s, starting from epoch 0", cfg.checkpoint_dir)
            return 0, [], None
        history = comm.broadcast_object(self.writer.read_metrics_rows(point.epoch) if self.rank == 0 else None)
        if self.rank == 0:
            where = f", step {point.step_in_epoch} of {self.steps_per_epoch}" if point.mid_epoch else ""
            print(f"resumed from {point.path} at epoch {point.epoch}{where} "
                  f"(global step {self.engine.global_steps})", flush=True)
        return point.epoch, history, point

    def run(self) -> dict:
        """Train the epochs left; return the final metrics dict (same on every rank)."""
        from twa_scale.train.streamer import flush_on_sigterm

        cfg = self.cfg
        # SIGTERM (preemption) unwinds the loop; pending snapshots then get a bounded flush. Checkpoints
        # upload in the background; the last one is waited for at the end (bounded: see Uploader.closing).
        with flush_on_sigterm(self.streamer), \
                checkpoints.Uploader.closing(self.ckpt_url, cfg.storage_options) as uploader, \
                _closing(self.stop, self.metrics_out):
            self.checkpointer = Checkpointer(self.engine, cfg.checkpoint_dir, streamer=self.streamer,
                                             uploader=uploader, metrics_out=self.metrics_out,
                                             agreement=self.agreement)
            # Snapshot 0 is the initial weights; after a resume the restored weights are re-snapshotted, and
            # the resumed epoch's sub-epoch snapshots re-taken: a committed seq is kept (the streamer checks),
            # so a snapshot lost with the killed process leaves no gap and none is written twice. (A
            # checkpoint is saved only once every earlier snapshot is committed: see checkpoints.save.)
            seq = self.plan.seq_at_boundary(self.start_epoch)
            if seq is not None and not (self.point and self.point.mid_epoch):
                self._boundary_snapshot(seq, self.start_epoch, agree_now=True)
            for epoch in range(self.start_epoch, cfg.epochs):
                if self.stop.fields:
                    break
                self._epoch(epoch)
        return self._finish(self.streamer.close())  # already closed: returns the summary

    def _epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` (0-based): its steps, evaluation, end-of-epoch snapshot, metrics row and checkpoint."""
        cfg, stop = self.cfg, self.stop
        t0 = time.perf_counter()
        point = self.point
        resume_at = point if point is not None and point.mid_epoch and epoch == self.start_epoch else None
        with preemption.deferred():  # a SIGTERM in the step loop is acted on at a step the ranks agree on
            train_loss = self._steps(epoch, resume_at)
        val = evaluate(self.engine.module, make_loader(self.data.val, batch_size=self.micro * 2, train=False,
                                                       num_workers=_default_workers(cfg)),
                       self.device, desc=f"eval {epoch + 1}/{cfg.epochs}", channels_last=self.channels_last)
        # A stop inside the epoch ends it at that snapshot: no end-of-epoch snapshot or checkpoint
        # (the epoch is not done); the row records the partial epoch's evaluation.
        stopped_inside = stop.fields is not None
        seq = None if stopped_inside else self.plan.seq_at_boundary(epoch + 1)
        if seq is not None:
            self._boundary_snapshot(seq, epoch + 1)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
               "val_accuracy": val["accuracy"], "lr": self.engine.get_lr()[0],
               "seconds": time.perf_counter() - t0}
        if stopped_inside:
            row["epoch_fraction"] = stop.fields["stopped_epoch"]
        self._record(row)
        if stopped_inside:
            return
        # The boundary snapshot queued above is re-taken by a resume: only earlier ones must be committed.
        # After the last epoch no step is left to protect: its checkpoint waits for the store.
        # A SIGTERM during this save lets it finish (bounded by the store waits) and then exits: the epoch
        # just trained is not lost to a signal that came a moment after it ended.
        final_epoch = epoch + 1 == cfg.epochs
        with preemption.deferred():
            self.checkpointer.save(epoch=epoch + 1, drain_below=seq,
                                   drain_seconds=math.inf if final_epoch else None)

    def _steps(self, epoch: int, resume: checkpoints.ResumePoint | None) -> float:
        """The optimizer steps of epoch ``epoch``; returns its training loss (mean over all ranks). After
        each optimizer step: the plan's mid-epoch snapshot when one is due (a stop request ends the epoch
        there), a checkpoint every --checkpoint-every-steps steps inside the epoch, and
        ``agreement.poll()``; once the ranks agree on a SIGTERM, :meth:`_sigterm_checkpoint`.
        ``resume``: continue a mid-epoch checkpoint (its batch, RNG state and loss sums)."""
        cfg, engine = self.cfg, self.engine
        device = engine.device
        # Dropout and augmentation draw from RNGs seeded by (seed, epoch, rank): resume-exact.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 7_919 + comm.rank())
        start_batch, done0 = (resume.batch, resume.step_in_epoch) if resume else (0, 0)
        if resume:
            checkpoints.restore_rng(resume)  # where the interrupted run's RNGs stood at that step
        loader = make_loader(self.data.train, batch_size=self.micro, train=True, seed=cfg.seed, epoch=epoch,
                             num_workers=_default_workers(cfg), start_batch=start_batch)
        engine.train()
        bar = logs.progress(loader, f"train {epoch + 1}/{cfg.epochs}")
        # Losses stay on the device; the host reads them every log_every_steps steps (no sync per step).
        steps = StepLog(cfg.log_every_steps, device, bar=bar, on_rows=lambda rows: _export_rows(rows, engine))
        if resume:
            steps.loss_sum, steps.samples = resume.loss_sum, resume.samples
        # (step, j) of the mid-epoch snapshots still to take: earlier ones are committed (checkpoints.save)
        pending = [(s, j) for s, j in self.plan.mid_epoch() if s > done0]
        first_step = engine.global_steps - done0
        every, last_ckpt = cfg.checkpoint_every_steps, engine.global_steps
        polled, batch = engine.global_steps, start_batch
        for batch, (x, y) in enumerate(bar, start=start_batch + 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
            steps.step(loss, y.numel(), engine.get_lr()[0])
            if pending and engine.global_steps - first_step >= pending[0][0] \
                    and self._mid_epoch_snapshot(epoch, pending.pop(0)[1]):
                break  # a stop request: the epoch ends at this snapshot
            gs = engine.global_steps
            if every and gs != last_ckpt and gs % every == 0 and gs - first_step < self.steps_per_epoch:
                last_ckpt = gs
                steps.flush()  # the loss sums so far go into the checkpoint
                self._checkpoint(epoch, batch, gs - first_step, steps)
            checkpoints.maybe_fault(gs)
            if gs != polled:  # an optimizer step (not a gradient-accumulation micro-batch)
                polled = gs
                if self.agreement.poll():
                    self._sigterm_checkpoint(epoch, batch, gs - first_step, steps, saved=last_ckpt == gs)
        if self.agreement.finish():  # a SIGTERM in the epoch's last step
            gs = engine.global_steps
            self._sigterm_checkpoint(epoch, batch, gs - first_step, steps, saved=last_ckpt == gs)
        steps.flush()
        loss_sum = torch.tensor([steps.loss_sum, steps.samples], dtype=torch.float64, device=device)  # NCCL: on device
        comm.all_reduce(loss_sum)
        return (loss_sum[0] / loss_sum[1].clamp(min=1)).item()

    def _boundary_snapshot(self, seq: int, epochs_done: int, *, agree_now: bool = False) -> None:
        """Snapshot ``seq`` at the end of epoch ``epochs_done`` (0: the initial weights), then the stop check."""
        self.streamer.snapshot(seq, self.engine.global_steps, epochs_done, self.params,
                               epoch_fraction=float(epochs_done))
        self.stop(seq, self.engine.global_steps, float(epochs_done), agree_now=agree_now)

    def _mid_epoch_snapshot(self, epoch: int, j: int) -> bool:
        """Snapshot j of epoch ``epoch`` (inside it); True when training must end there (a stop request)."""
        seq, fraction = self.plan.seq(epoch, j), epoch + j / self.plan.per_epoch
        self.streamer.snapshot(seq, self.engine.global_steps, epoch, self.params, epoch_fraction=fraction)
        return self.stop(seq, self.engine.global_steps, fraction)

    def _checkpoint(self, epoch: int, batch: int, step_in_epoch: int, steps: StepLog,
                    drain_seconds: float | None = None) -> None:
        """A checkpoint inside epoch ``epoch``, after ``batch`` (its loss sums so far included)."""
        self.checkpointer.save(epoch=epoch, batch=batch, step_in_epoch=step_in_epoch, loss_sum=steps.loss_sum,
                               samples=steps.samples, drain_seconds=drain_seconds)

    def _sigterm_checkpoint(self, epoch: int, batch: int, step_in_epoch: int, steps: StepLog, *,
                            saved: bool) -> None:
        """The ranks agreed on a SIGTERM at this step: checkpoint it when that fits the exit deadline
        (not when ``saved``: this step's checkpoint is saved already), then exit as preempted."""
        steps.flush()  # the loss sums so far go into the checkpoint
        if saved:  # this step's checkpoint is saved already
            preemption.raise_preempted()
        if self.agreement.checkpoint_fits(self.checkpointer.seconds_estimate()):
            self._checkpoint(epoch, batch, step_in_epoch, steps, drain_seconds=preemption.seconds_left())
        preemption.raise_preempted()

    def _record(self, row: dict) -> None:
        """An epoch's metrics row: to the history, Prometheus, the tracker, the console, and (rank 0) the store."""
        epoch = row["epoch"]
        self.history.append(row)
        metrics.train_epoch(epoch, row["val_accuracy"], row["val_loss"])
        tracking.log_metrics({"val/loss": row["val_loss"], "val/accuracy": row["val_accuracy"],
                              "train/epoch_loss": row["train_loss"], "train/epoch_seconds": row["seconds"],
                              **_snapshot_events(self.streamer)}, step=epoch)
        tracking.flush()
        if self.rank == 0:
            print(f"epoch {epoch}/{self.cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                  f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  {row['seconds']:.1f}s",
                  flush=True)
            # Queued before the checkpoint that covers this epoch, which waits for it: a resume never
            # lacks its row.
            self.metrics_out.submit((list(self.history), None))

    def _finish(self, summary: dict) -> dict:
        """The final metrics dict; rank 0 writes it to the store."""
        history, writer, metrics_out = self.history, self.writer, self.metrics_out
        last = history[-1] if history else {"val_accuracy": None, "val_loss": None}
        final = {"val_accuracy": last["val_accuracy"], "val_loss": last["val_loss"], "epochs": self.cfg.epochs,
                 "world_size": comm.world_size(), "train_seconds": sum(r["seconds"] for r in history),
                 "snapshots": summary, "run_url": self.cfg.run_url, **(self.stop.fields or {})}
        if self.rank == 0:  # the final state, flushed within the store's deadline (an error: exit 75)
            metrics_out.submit((history, final))
            if not metrics_out.close(knobs.STORE_RETRY_SECONDS.get()):
                raise TransientError(f"writing {writer.describe(writer.paths.metrics)}: not done after "
                                     f"{knobs.STORE_RETRY_SECONDS.get():.0f} s (TWA_SCALE_STORE_RETRY_SECONDS)")
        comm.barrier()
        return final


class Checkpointer:
    """Saves the job's checkpoints (checkpoints.save), each once the store holds what it covers (earlier
    snapshots committed, the metrics rows written), waiting for that a bounded time (:func:`checkpoint_wait`);
    a checkpoint the store could not cover in time is skipped, and the next ones wait less until one is
    saved. Each save is timed (``agreement.timed``): a SIGTERM checkpoint budgets for the last one."""

    def __init__(self, engine, checkpoint_dir: str, *, streamer, uploader: checkpoints.Uploader | None,
                 metrics_out: Background | None, agreement: preemption.StepAgreement):
        self.engine, self.checkpoint_dir, self.streamer, self.uploader = engine, checkpoint_dir, streamer, uploader
        self.metrics_out, self.agreement = metrics_out, agreement
        self.wait_cap = knobs.CHECKPOINT_WAIT_SECONDS.get()
        self.behind = False  # the last checkpoint was skipped

    def save(self, drain_seconds: float | None = None, **where) -> None:
        """checkpoints.save, waiting for the store at most ``drain_seconds`` (SIGTERM: what is left of the
        deadline; inf: no limit; None: see :func:`checkpoint_wait`)."""
        metrics_out = self.metrics_out
        if drain_seconds is None:
            drain_seconds = checkpoint_wait(self.wait_cap, self.behind, self.streamer.last_upload_seconds,
                                            metrics_out.last_seconds if metrics_out else None)
        with self.agreement.timed():
            tag = checkpoints.save(self.engine, self.checkpoint_dir, streamer=self.streamer, uploader=self.uploader,
                                   drain_seconds=None if math.isinf(drain_seconds) else drain_seconds,
                                   stored=metrics_out.idle if metrics_out else None, **where)
        self.behind = tag is None

    def seconds_estimate(self) -> float:
        """What the next checkpoint takes on this rank: the last one's save and upload time (0 before any)."""
        return self.agreement.save_seconds + (self.uploader.upload_seconds if self.uploader else 0.0)


def checkpoint_wait(cap: float, behind: bool, *store_seconds: float | None) -> float:
    """How long a checkpoint waits for the store to hold what it covers: 4x the time the store took for
    this job's latest snapshot upload or metrics write (the slower; at least 1 s), at most ``cap``
    (TWA_SCALE_CHECKPOINT_WAIT_SECONDS, also the wait before anything was timed). After a skipped
    checkpoint (``behind``), until one is saved: 1 s at most. A healthy store is waited for as long as it
    needs, and a stalled one costs the steps about a second per outage, not the whole cap."""
    seen = [t for t in store_seconds if t is not None]
    limit = cap if not seen else min(cap, max(1.0, 4.0 * max(seen)))
    return min(limit, 1.0) if behind else limit


@contextlib.contextmanager
def _closing(stop: StopCheck, metrics_out: Background | None):
    """Stop the stop-marker poll when training ends; on an exception (SIGTERM), give the metrics rows on
    their way what is left of the exit deadline."""
    try:
        yield
    except BaseException:
        if metrics_out is not None:
            left = preemption.seconds_left()
            metrics_out.close(knobs.SIGTERM_FLUSH_SECONDS.get() if left is None else left, check=False)
        raise
    finally:
        stop.close()


def _load_snapshot(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Initialise the trainable weights from --init-from (same on every rank)."""
    from twa_scale import store

    url, run_id, seq = cfg.parse_init_from()
    reader = store.open_run(url, run_id, storage_options=cfg.storage_options)
    infos, damaged = reader.scan()
    if seq in damaged:
        raise ValueError(f"--init-from {cfg.init_from}: snapshot {seq} of {url}/{run_id} is damaged: {damaged[seq]}")
    if seq not in {s.seq for s in infos}:
        raise ValueError(f"--init-from {cfg.init_from}: snapshot {seq} is not committed in {url}/{run_id}")
    model.load_state_dict(reader.state_dict(seq, model))


def _snapshot_events(streamer) -> dict[str, float]:
    """The streamer's counters so far (rank 0 commits, so its counts are the run's), for the tracker."""
    st = streamer.stats
    return {"snapshot/committed": len(st.get("committed", ())), "snapshot/failed": st.get("failed", 0),
            "snapshot/skipped": st.get("skipped", 0), "snapshot/stall_seconds": st.get("stall_seconds", 0.0),
            "snapshot/bytes_uploaded": st.get("bytes", 0)}


def _export_rows(rows, engine) -> None:
    """A window of steps read from the device: to Prometheus, and to the experiment tracker (rank 0)."""
    for r in rows:
        metrics.train_step(r.seconds, r.samples, r.loss, r.lr)
    if tracking.active():
        first = engine.global_steps - len(rows) + 1  # the rows are the window's last optimizer steps
        for i, r in enumerate(rows):
            tracking.log_metrics({"train/loss": r.loss, "train/lr": r.lr,
                                  "train/samples_per_second": r.samples * comm.world_size() / max(r.seconds, 1e-9)},
                                 step=first + i)
