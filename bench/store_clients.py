"""S3 clients against one local SeaweedFS, one run: s3fs (the store's fsspec path), boto3's transfer
manager and obstore (Rust ``object_store``), for large puts and ranged gets; medians of interleaved pairs.

    python bench/store_clients.py --out bench/results/store_clients-cpu.json      # 128 MB, 5 rounds
    python bench/store_clients.py --mb 256 1024 --rounds 3                       # real slice sizes

Each round uploads the same bytes once per client, in a fixed order, so load drifting on a shared
machine hits every client of a round alike; a ratio is taken within the round, then the median over
rounds. Clients:

* ``boto3_upload_file``: ``upload_file`` of a /dev/shm file (boto3's defaults: 8 MB parts, 10
  threads): the baseline of the upload goal;
* ``s3fs``: the store's ``put_large`` with ``TWA_SCALE_S3_CLIENT=s3fs`` (the default);
* ``obstore``: the store's ``put_large`` with ``TWA_SCALE_S3_CLIENT=obstore`` (opt-in);
* reads: the 4 reader slices of the object (what 4 TWA ranks fetch), through the store's
  ``get_ranges`` with each client, and boto3 ``get_object(Range=...)`` for reference.

Goals (the issue): upload >= 1.2x boto3 ``upload_file``; ranged read >= 1.5x s3fs.
With ``--pin`` (default on 2+ cores) the S3 server runs on its own core, as the store is another
machine on a cluster.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devtools.s3server import SeaweedS3  # noqa: E402

BUCKET = "twa-clients"


def _store(client: str):
    from twa_scale.store import open_store

    os.environ["TWA_SCALE_S3_CLIENT"] = client
    try:
        return open_store(f"s3://{BUCKET}/bench")
    finally:
        del os.environ["TWA_SCALE_S3_CLIENT"]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_size(nbytes: int, rounds: int) -> dict:
    import boto3

    from twa_scale.knobs import UPLOAD_CONCURRENCY, UPLOAD_PART_BYTES

    data = os.urandom(nbytes)
    view = memoryview(data)
    stores = {c: _store(c) for c in ("s3fs", "obstore")}
    client = boto3.client("s3")
    part, conc = UPLOAD_PART_BYTES.get(), UPLOAD_CONCURRENCY.get()
    slices = [(i * nbytes // 4, (i + 1) * nbytes // 4) for i in range(4)]
    up = {k: [] for k in ("boto3_upload_file", "s3fs", "obstore")}
    rd = {k: [] for k in ("boto3_get_object", "s3fs", "obstore")}
    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        f.write(data)
        f.flush()
        for r in range(rounds + 1):  # round 0 warms connection pools and is dropped
            t = {"boto3_upload_file": _timed(lambda: client.upload_file(f.name, BUCKET, f"bench/boto3-{r}.bin"))}
            for c, st in stores.items():
                t[c] = _timed(lambda: st.put_large(f"{c}-{r}.bin", view, part_bytes=part, concurrency=conc))
            key = f"obstore-{r}.bin"
            g = {"boto3_get_object": _timed(lambda: [client.get_object(
                Bucket=BUCKET, Key=f"bench/{key}", Range=f"bytes={a}-{b - 1}")["Body"].read() for a, b in slices])}
            for c, st in stores.items():
                blobs = []
                g[c] = _timed(lambda: blobs.extend(st.get_ranges([key] * 4, [a for a, _ in slices],
                                                                  [b for _, b in slices])))
                if b"".join(bytes(x) for x in blobs) != data:
                    raise RuntimeError(f"{c}: ranged read returned other bytes")
            for c in stores:
                st = stores[c]
                if st.get(f"{c}-{r}.bin") != data:
                    raise RuntimeError(f"{c}: uploaded object differs")
                st.delete(f"{c}-{r}.bin")
            client.delete_object(Bucket=BUCKET, Key=f"bench/boto3-{r}.bin")
            if r:
                for k in up:
                    up[k].append(t[k])
                for k in rd:
                    rd[k].append(g[k])
    med = lambda xs: statistics.median(xs)  # noqa: E731
    mb = nbytes / 1e6
    return {
        "bytes": nbytes, "rounds": rounds, "part_bytes": part, "concurrency": conc,
        "upload_MBps": {k: mb / med(v) for k, v in up.items()},
        "read_MBps": {k: mb / med(v) for k, v in rd.items()},
        "upload_seconds": up, "read_seconds": rd,
        # the goals, as medians of per-round ratios (throughput ratio = inverse time ratio)
        "obstore_upload_vs_boto3": med([b / o for b, o in zip(up["boto3_upload_file"], up["obstore"])]),
        "s3fs_upload_vs_boto3": med([b / o for b, o in zip(up["boto3_upload_file"], up["s3fs"])]),
        "obstore_read_vs_s3fs": med([s / o for s, o in zip(rd["s3fs"], rd["obstore"])]),
        "boto3_read_vs_s3fs": med([s / o for s, o in zip(rd["s3fs"], rd["boto3_get_object"])]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, nargs="+", default=[128], help="object sizes in MiB (real slices: 100-1000)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=(os.cpu_count() or 1) >= 2,
                    help="S3 server on its own core (taskset), this process on the others")
    ap.add_argument("--out", default="bench/out/store_clients.json")
    args = ap.parse_args(argv)
    import obstore

    result: dict = {"bench": "store_clients", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "load_average_before": os.getloadavg(), "obstore": obstore.__version__, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp, SeaweedS3(Path(tmp) / "weed") as server:
        os.environ.update(server.env)
        if args.pin:
            from bench.streamer import _pin

            result["pinning"] = _pin(server.proc.pid, enabled=True)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        for mb in args.mb:
            r = bench_size(mb << 20, args.rounds)
            result["sizes"][f"{mb}MiB"] = r
            print(f"{mb} MiB: upload MB/s {({k: round(v) for k, v in r['upload_MBps'].items()})}, "
                  f"obstore/boto3 {r['obstore_upload_vs_boto3']:.2f} (goal >= 1.2); read MB/s "
                  f"{({k: round(v) for k, v in r['read_MBps'].items()})}, obstore/s3fs "
                  f"{r['obstore_read_vs_s3fs']:.2f} (goal >= 1.5)", flush=True)
    result["load_average_after"] = os.getloadavg()
    result["goals"] = {"upload_vs_boto3": 1.2, "read_vs_s3fs": 1.5}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
