"""Training-data throughput: images/s per core of today's ImageFolder + PIL path against packed shards
with the fast decoder (local files and SeaweedFS S3), and a synthetic upper bound.

    python bench/data_throughput.py --out bench/results/data_throughput-cpu.json

ImageNet-sized JPEGs are generated at run time from the shared CIFAR-10 (upscaled to 500×375,
quality 90) into a temporary directory and deleted afterwards; they are never committed.

Per core = images ÷ CPU seconds of the loader (main process + its workers, from getrusage), so the
figure does not move with other load on a shared machine; wall-clock images/s is reported too.
The S3 server's own CPU is reported separately (on a cluster it runs elsewhere). Every path runs
the ImageNet training recipe (RandomResizedCrop 224 + flip). Batches are normalised float32 on the
CPU, except the ``*_uint8`` paths: what a CUDA host runs (uint8 batches to the device, normalised
there); today's PIL path normalises on the CPU on any host.
Goals: packed fast path ≥ 2× PIL per core; from S3 ≥ 0.9× its local-file rate.
On a CUDA host, ``--decode gpu`` (nvJPEG) is measured against ResNet-50's 4,640 img/s step rate.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from devtools.s3server import SeaweedS3  # noqa: E402
from twa_scale.data import datasets as data_mod  # noqa: E402
from twa_scale.data import shards  # noqa: E402
from twa_scale.data.config import DataConfig  # noqa: E402
from twa_scale.data.datasets import build_data, make_loader  # noqa: E402
from twa_scale.data.decode import pil_transform  # noqa: E402

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
# img/s, ResNet-50 on an H200 (plain PyTorch, AMP, channels_last; 55.2 ms per batch of 256, measured)
R50_STEP_RATE = 4640.0


def make_images(root: Path, per_class: int, size=(500, 375), quality: int = 90) -> Path:
    from PIL import Image

    for split, n in (("train", per_class), ("val", max(2, per_class // 10))):
        for c in sorted(os.listdir(CIFAR10 / "train")):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for f in sorted(os.listdir(CIFAR10 / "train" / c))[:n]:
                with Image.open(CIFAR10 / "train" / c / f) as im:
                    im.convert("RGB").resize(size, Image.BICUBIC).save(root / split / c / f, quality=quality)
    return root


def _stat_cpu(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(exclude: int | None = None) -> float:
    """CPU seconds of this process, its reaped children, and its live children (persistent loader
    workers), except the S3 server's process group."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != exclude:
            try:
                ppid, cpu = _stat_cpu(int(entry))
            except (OSError, IndexError, ValueError):
                continue
            if ppid == os.getpid():
                total += cpu
    return total


def _proc_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    total = 0.0
    for p in [pid] + [int(x) for x in os.popen(f"pgrep -g {pid}").read().split()]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError):
            pass
    return total


_SERVER = [None]


def one_pass(make, epoch: int, server_pid: int | None = None) -> dict:
    """One pass over the loader ``make(epoch)``: images, wall, CPU seconds (ours and the server's)."""
    cpu0, srv0, t0 = _cpu_seconds(_SERVER[0]), _proc_cpu(server_pid), time.perf_counter()
    n = 0
    for x, y in make(epoch):
        assert x.dtype in (torch.float32, torch.uint8) and x.shape[-2:] == (224, 224)
        n += len(y)
    return {"images": n, "wall_seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds(_SERVER[0]) - cpu0,
            "server_cpu_seconds": _proc_cpu(server_pid) - srv0}


def summarize(rows: list[dict], server: bool) -> dict:
    best = rows[1:] or rows  # the first pass includes worker start-up and page-cache warm-up
    out = {"images_per_second": round(statistics.median(r["images"] / r["wall_seconds"] for r in best), 1),
           "images_per_core_second": round(statistics.median(r["images"] / r["cpu_seconds"] for r in best), 1),
           "passes": rows}
    if server:
        out["server_cpu_seconds_per_1k_images"] = round(
            1000 * statistics.median(r["server_cpu_seconds"] / r["images"] for r in best), 3)
    return out


def measure(make, *, epochs: int, server_pid: int | None = None) -> dict:
    return summarize([one_pass(make, e, server_pid) for e in range(epochs)], server_pid is not None)


def pil_loader(root: Path, workers: int, batch: int):
    """Today's path: torchvision ImageFolder, PIL decode, transforms v1, a shuffling DataLoader."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root / "train"), transform=pil_transform(500, train=True))

    def make(epoch):
        g = torch.Generator().manual_seed(epoch)
        return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                           generator=g)
    return make


def new_loader(spec: str, workers: int, batch: int, decode: str = "cpu", device=None, uint8: bool = False):
    data = build_data(DataConfig(data=spec, decode=decode))

    def make(epoch):
        return make_loader(data.train, batch_size=batch, train=True, seed=0, epoch=epoch, num_workers=workers,
                           device=device, uint8=uint8)
    return make


class _Synthetic(torch.utils.data.Dataset):
    """Upper bound: the same batch hand-off (uint8 batch, normalised in the worker), no read or decode."""

    def __init__(self, n_batches: int, batch: int):
        self.n, self.batch = n_batches, batch

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        from twa_scale.data.decode import normalize, recipe_for

        x = torch.from_numpy(np.random.default_rng(k).integers(0, 256, (self.batch, 3, 224, 224), dtype=np.uint8))
        return normalize(x, recipe_for(224, True)), torch.zeros(self.batch, dtype=torch.long)


def synthetic_loader(n_images: int, workers: int, batch: int):
    def make(epoch):
        return torch.utils.data.DataLoader(_Synthetic(n_images // batch, batch), batch_size=None,
                                           num_workers=workers)
    return make


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=80, help="train images per class (10 classes)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3, help="passes per configuration (the first is warm-up)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shard-size", default="4MB")
    ap.add_argument("--out", default="bench/out/data_throughput.json")
    args = ap.parse_args()
    if not (CIFAR10 / "train").is_dir():
        print(f"error: CIFAR-10 not found at {CIFAR10}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # workers and main each use one core; per-core figures stay comparable
    results: dict = {"bench": "data_throughput", "host": platform.node(), "cpus": os.cpu_count(),
                     "torch": torch.__version__, "recipe": "RandomResizedCrop(224)+flip, float32 normalised",
                     "batch": args.batch, "paths": {}}
    with tempfile.TemporaryDirectory() as tmp, SeaweedS3(Path(tmp) / "weed") as server:
        os.environ.update(server.env)
        _SERVER[0] = server.proc.pid
        root = make_images(Path(tmp) / "imgs", args.per_class)
        files = list((root / "train").rglob("*.*"))
        results["images"] = {"train": len(files), "width": 500, "height": 375, "jpeg_quality": 90,
                             "mean_bytes": int(np.mean([f.stat().st_size for f in files]))}
        local = f"file://{tmp}/packed"
        s3 = "s3://bench-data/packed"
        t0 = time.perf_counter()
        shards.pack(str(root), local, shard_bytes=shards.parse_size(args.shard_size), progress=False)
        results["pack_local_seconds"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        shards.pack(str(root), s3, shard_bytes=shards.parse_size(args.shard_size), progress=False)
        results["pack_s3_seconds"] = round(time.perf_counter() - t0, 2)
        results["shards"] = len(shards.open_index(local).split("train").shards)
        n = len(files)
        paths = {
            "imagefolder_pil": lambda w: pil_loader(root, w, args.batch),
            "imagefolder_fast": lambda w: new_loader(str(root), w, args.batch),
            "packed_local_fast": lambda w: new_loader(local, w, args.batch),
            "packed_s3_fast": lambda w: new_loader(s3, w, args.batch),
            # what a CUDA host runs: uint8 batches leave the CPU, normalisation happens on the GPU
            "packed_local_fast_uint8": lambda w: new_loader(local, w, args.batch, uint8=True),
            "packed_s3_fast_uint8": lambda w: new_loader(s3, w, args.batch, uint8=True),
            "synthetic": lambda w: synthetic_loader(n, w, args.batch),
        }
        # Passes are interleaved across configurations (pass 0 of each, then pass 1 of each, ...), so
        # drifting load on a shared machine hits every configuration alike; loaders stay warm meanwhile.
        data_mod._MAX_LOADERS = 64
        configs = [(name, w, build(w)) for name, build in paths.items() for w in args.workers]
        rows: dict = {}
        for epoch in range(args.epochs):
            for name, w, make in configs:
                pid = server.proc.pid if name.startswith("packed_s3") else None
                rows.setdefault((name, w), []).append(one_pass(make, epoch, pid))
        for name, w, _ in configs:
            r = summarize(rows[name, w], name.startswith("packed_s3"))
            results["paths"].setdefault(name, {})[f"workers={w}"] = r
            print(f"{name:24s} workers={w}: {r['images_per_second']:7.1f} img/s  "
                  f"{r['images_per_core_second']:7.1f} img/s per core", flush=True)
        if torch.cuda.is_available():
            for w in args.workers:
                r = measure(new_loader(s3, w, args.batch, decode="gpu", device=torch.device("cuda")),
                            epochs=args.epochs)
                r["vs_resnet50_step_rate"] = round(r["images_per_second"] / R50_STEP_RATE, 3)
                results["paths"].setdefault("packed_s3_gpu_decode", {})[f"workers={w}"] = r
                print(f"packed_s3_gpu      workers={w}: {r['images_per_second']:7.1f} img/s", flush=True)
    p = results["paths"]
    def per_core(name, w):
        return p[name][f"workers={w}"]["images_per_core_second"]

    results["ratios"] = {
        f"workers={w}": {
            "packed_s3_uint8_vs_pil_per_core": round(per_core("packed_s3_fast_uint8", w)
                                                     / per_core("imagefolder_pil", w), 2),
            "packed_s3_vs_local_uint8_per_core": round(per_core("packed_s3_fast_uint8", w)
                                                       / per_core("packed_local_fast_uint8", w), 2),
            "packed_local_fast_vs_pil_per_core": round(per_core("packed_local_fast", w)
                                                       / per_core("imagefolder_pil", w), 2),
            "packed_s3_fast_vs_pil_per_core": round(per_core("packed_s3_fast", w) / per_core("imagefolder_pil", w), 2),
            "packed_s3_vs_local_per_core": round(per_core("packed_s3_fast", w) / per_core("packed_local_fast", w), 2),
            "packed_s3_vs_local_wall": round(p["packed_s3_fast"][f"workers={w}"]["images_per_second"]
                                             / p["packed_local_fast"][f"workers={w}"]["images_per_second"], 2),
        } for w in args.workers}
    results["goals"] = {"packed_fast_vs_pil_per_core": ">= 2.0", "s3_vs_local": ">= 0.9"}
    print(json.dumps(results["ratios"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
