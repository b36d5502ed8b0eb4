"""Every environment variable twa_scale reads, declared once, under the one prefix ``TWA_SCALE_``.

Tunables a Kubernetes manifest sets without new flags. A malformed value fails with an error that names
the variable. docs/configuration.md's "Environment variables" table is generated from the declarations
here (python -m devtools.docgen; tests/test_docs.py keeps the two in step). Besides these the code reads
only variables other tools define: the launcher's RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR, AWS_*
for S3, and OMP_NUM_THREADS / PROMETHEUS_MULTIPROC_DIR.

Every flag of both stages can also come from the environment (see :mod:`twa_scale.train.config`):
``TWA_SCALE_TRAIN_<FLAG>`` and ``TWA_SCALE_TWA_<FLAG>``, e.g. ``TWA_SCALE_TRAIN_EPOCHS=3`` or
``TWA_SCALE_TWA_CONFIG=twa.yaml``.

Renamed (the old names are no longer read): TWA_METRICS_DIR, TWA_METRICS_LINGER_SECONDS and
TWA_NODE_NAME gained the ``TWA_SCALE_`` prefix; TWA_CHUNK_COLUMNS and TWA_GROUPED_KERNEL (packed-P
kernel choices, read on every step) are replaced by TWA_SCALE_P_CHUNK_COLUMNS and TWA_SCALE_P_KERNEL,
resolved once when P is built (:mod:`twa_scale.twa.quant`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

__all__ = ["Knob", "KNOBS", "env_int", "env_float", "TRAIN_CONFIG_ENV_PREFIX", "TWA_CONFIG_ENV_PREFIX",
           "UPLOAD_PART_BYTES", "UPLOAD_CONCURRENCY", "CHECKSUM_CHUNK_BYTES", "SNAPSHOT_BACKPRESSURE",
           "UPLOAD_TIMEOUT_SECONDS", "COMMIT_TIMEOUT_SECONDS", "STORE_RETRY_SECONDS", "STORE_CONNECT_TIMEOUT_SECONDS",
           "STORE_READ_TIMEOUT_SECONDS", "STOP_POLL_SECONDS", "CHECKPOINT_WAIT_SECONDS", "LEASE_TIMEOUT_SECONDS",
           "LEASE_HEARTBEAT_SECONDS", "JOB_ID", "SIGTERM_FLUSH_SECONDS", "FAULT_KILL_AT_STEP",
           "METRICS_DIR",
           "METRICS_LINGER_SECONDS", "NODE_NAME", "P_KERNEL", "P_KERNELS", "P_CHUNK_COLUMNS", "p_kernel",
           "p_chunk_columns"]

PREFIX = "TWA_SCALE_"
TRAIN_CONFIG_ENV_PREFIX = PREFIX + "TRAIN_"
TWA_CONFIG_ENV_PREFIX = PREFIX + "TWA_"


def _env_number(name: str, default: Any, kind: type, what: str) -> Any:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not {what}") from None


def env_int(name: str, default: int) -> int:
    return _env_number(name, default, int, "an integer")


def env_float(name: str, default: float) -> float:
    return _env_number(name, default, float, "a number")


def _env_str(name: str, default: str | None) -> str | None:
    return os.environ.get(name) or default


@dataclasses.dataclass(frozen=True)
class Knob:
    """One environment variable: its name, default, meaning, and how it is read."""

    name: str
    default: Any
    doc: str
    read: Callable[[str, Any], Any]
    choices: tuple[str, ...] | None = None

    def get(self) -> Any:
        """The current value (read now, so a test or a launcher may set the variable late)."""
        value = self.read(self.name, self.default)
        if self.choices and value not in self.choices:
            raise ValueError(f"environment variable {self.name}={value!r} is not one of {', '.join(self.choices)}")
        return value


KNOBS: dict[str, Knob] = {}


def _declare(name: str, default: Any, doc: str, read: Callable[[str, Any], Any] = env_int, **kw) -> Knob:
    assert name.startswith(PREFIX) and name not in KNOBS, name
    KNOBS[name] = knob = Knob(name, default, doc, read, **kw)
    return knob


# --- snapshot streaming (twa_scale.train.streamer) ------------------------------------------------
UPLOAD_PART_BYTES = _declare("TWA_SCALE_UPLOAD_PART_BYTES", 16 << 20,
                             "Multipart part size of snapshot uploads to S3 (>= 5 MiB).")
UPLOAD_CONCURRENCY = _declare("TWA_SCALE_UPLOAD_CONCURRENCY", 16, "Parts uploaded at once per rank.")
CHECKSUM_CHUNK_BYTES = _declare("TWA_SCALE_CHECKSUM_CHUNK_BYTES", 4 << 20,
                                "Bytes per CRC-32 chunk of a shard (the unit of verified ranged reads).")
SNAPSHOT_BACKPRESSURE = _declare("TWA_SCALE_SNAPSHOT_BACKPRESSURE", "block",
                                 "`block`: training waits for a free host buffer (counted as stall); `skip`: "
                                 "drop the snapshot, counted and logged.", _env_str, choices=("block", "skip"))
UPLOAD_TIMEOUT_SECONDS = _declare("TWA_SCALE_UPLOAD_TIMEOUT_SECONDS", 600.0,
                                  "How long one shard upload may retry before its snapshot is reported failed.",
                                  env_float)
COMMIT_TIMEOUT_SECONDS = _declare("TWA_SCALE_COMMIT_TIMEOUT_SECONDS", 900.0,
                                  "How long rank 0 waits for every rank's shard before reporting a snapshot "
                                  "failed.", env_float)
SIGTERM_FLUSH_SECONDS = _declare("TWA_SCALE_SIGTERM_FLUSH_SECONDS", 25.0,
                                 "The exit deadline after SIGTERM (preemption): the checkpoint at the current step, "
                                 "its upload and the snapshot flush all end within it.",
                                 env_float)
# --- the store (twa_scale.store): retries and the writer lease ----------------------------------
S3_CLIENT = _declare("TWA_SCALE_S3_CLIENT", "s3fs",
                     "The client of S3 shard uploads and ranged reads: `s3fs` (the default), or `obstore` (Rust, no "
                     "GIL; opt-in until bench/store_clients.py shows it ahead on a quiet host: so far its ranged "
                     "reads measured 0.78-0.87x s3fs). Small objects, creates and listings always use s3fs.",
                     lambda name, default: (os.environ.get(name) or default).strip().lower(),
                     choices=("obstore", "s3fs"))
STORE_RETRY_SECONDS = _declare("TWA_SCALE_STORE_RETRY_SECONDS", 600.0,
                               "Deadline of the store's retry policy for the training job's small writes "
                               "(run.json, metrics, commit markers, lease): a store outage shorter than this "
                               "stalls that write, longer fails the job with exit 75.", env_float)
STORE_CONNECT_TIMEOUT_SECONDS = _declare("TWA_SCALE_STORE_CONNECT_TIMEOUT_SECONDS", 10.0,
                                         "Connect timeout of every S3 call (stores that retry on their own, "
                                         "writers and probes, use half of it); `config_kwargs.connect_timeout` in "
                                         "--storage-options overrides it.", env_float)
STORE_READ_TIMEOUT_SECONDS = _declare("TWA_SCALE_STORE_READ_TIMEOUT_SECONDS", 60.0,
                                      "Read timeout of every S3 call: how long a reply may be silent (a stalled "
                                      "server still accepts connections, so this is what bounds a call to it); "
                                      "`config_kwargs.read_timeout` in --storage-options overrides it.",
                                      env_float)
STOP_POLL_SECONDS = _declare("TWA_SCALE_STOP_POLL_SECONDS", 5.0,
                             "How often rank 0 reads the run's control/STOP.json, in a background thread; each "
                             "read also gives up after this long (connect and read timeout).", env_float)
CHECKPOINT_WAIT_SECONDS = _declare("TWA_SCALE_CHECKPOINT_WAIT_SECONDS", 10.0,
                                   "The longest a checkpoint (not a SIGTERM one) waits for the store to hold what "
                                   "it covers (earlier snapshots committed, metrics rows written): it waits 4x the "
                                   "store's latest upload or write time (at least 1 s), up to this. Longer, as in a "
                                   "store outage, it is skipped with a warning and the next one covers it (the "
                                   "next ones wait 1 s at most until one is saved; the last epoch's waits).",
                                   env_float)
LEASE_TIMEOUT_SECONDS = _declare("TWA_SCALE_LEASE_TIMEOUT_SECONDS", 120.0,
                                 "A run's writer lease without a heartbeat for this long is stale: a --resume "
                                 "may take it over. Keep it well above clock skew between nodes.", env_float)
LEASE_HEARTBEAT_SECONDS = _declare("TWA_SCALE_LEASE_HEARTBEAT_SECONDS", None,
                                   "How often the lease holder rewrites its heartbeat (default: a quarter of "
                                   "the lease timeout, at most 10 s).", env_float)
JOB_ID = _declare("TWA_SCALE_JOB_ID", None,
                  "Identity of the job that launches training, e.g. the JobSet's uid (the manifests set it): a "
                  "relaunch of the same job with --resume takes over the run's writer lease at once, even while "
                  "it looks alive (its holder was the same job's killed launch); any other job waits until it is "
                  "stale.", _env_str)
FAULT_KILL_AT_STEP = _declare("TWA_SCALE_FAULT_KILL_AT_STEP", None,
                              "Fault injection for tests: `RANK:STEP` makes that rank SIGKILL itself right after "
                              "optimizer step STEP (a `kill -9` at a known point); `RANK:STEP:TERM` sends it "
                              "SIGTERM instead (a preemption that reaches one rank first).", _env_str)
# --- metrics (twa_scale.metrics) ------------------------------------------------------------
METRICS_DIR = _declare("TWA_SCALE_METRICS_DIR", None,
                       "Directory the local ranks share for Prometheus multiprocess values (default: a "
                       "per-launch directory under the system temp dir).", _env_str)
METRICS_LINGER_SECONDS = _declare("TWA_SCALE_METRICS_LINGER_SECONDS", 30.0,
                                  "At exit, how long a scraped exporter waits for one last scrape.", env_float)
NODE_NAME = _declare("TWA_SCALE_NODE_NAME", None, "The `node` label of metrics (default: the hostname).", _env_str)
# --- packed-P kernels (twa_scale.twa.quant), resolved once when P is built ----------------
P_KERNELS = ("auto", "native", "compile", "eager")
P_KERNEL = _declare("TWA_SCALE_P_KERNEL", "auto",
                    "How packed (1/2/4/8-bit) P is multiplied: `auto` (the C kernel on CPU when a compiler is "
                    "found, torch.compile on CUDA, else eager), `native`, `compile` or `eager`.",
                    lambda name, default: (os.environ.get(name) or default).strip().lower(), choices=P_KERNELS)
P_CHUNK_COLUMNS = _declare("TWA_SCALE_P_CHUNK_COLUMNS", 1 << 15,
                           "Columns per step of the eager packed-P path (bounds its temporaries); replaces "
                           "TWA_CHUNK_COLUMNS.")


def p_kernel() -> str:
    """TWA_SCALE_P_KERNEL (see :data:`P_KERNEL`)."""
    return P_KERNEL.get()


def p_chunk_columns() -> int:
    """TWA_SCALE_P_CHUNK_COLUMNS (see :data:`P_CHUNK_COLUMNS`), at least 1."""
    return max(1, P_CHUNK_COLUMNS.get())
