"""A scaling model of the TWA stage and the snapshot streamer, from measured per-byte costs.

    python bench/scale_model.py                                   # ResNet-50, n=301, 4-bit P, W=8..1024
    python bench/scale_model.py --model vit_l_16 --n 301 --bits 32 --world 8 64 512
    python bench/scale_model.py --markdown docs/scaling.md.table  # the table docs/scaling.md shows

For a model (D parameters), n snapshots, P bits and W ranks (column-sharded: rank r holds
P[:, S_r], d = D/W columns) it computes, per rank:

* memory of P: n·d·bits/8 bytes (+ the fp32 snapshot slice while P is built: n·d·4);
* bytes read from the store: n·d·4 (fp32 snapshots), and the load time: every rank reads at
  ``--rank-read-MBps`` until the store's aggregate ``--store-read-GBps`` caps it, or its request
  rate (``--store-gets-per-second``; one GET per piece of at most 64 MiB per snapshot) does;
* communication per TWA step: the gradient's reduce-scatter and the weights' all-gather, each
  (W-1)/W·D·4 bytes sent per rank (ring), plus an all-reduce of n+1 floats; the set-up adds one n×n
  Gram all-reduce;
* time per TWA epoch: steps = ⌊N/(W·batch)⌋ (the loader drops the ragged tail); a step costs the
  forward/backward of the rank's batch (``--samples-per-second`` per rank: an input, not measured
  here), the projection (two passes over P at the measured seconds per byte) and the collectives
  at ``--link-GBps`` per rank plus a latency per ring hop (``--hop-us``);
* the streamer's write bandwidth per node at K snapshots per epoch: each snapshot moves D·4 bytes
  across all training ranks, so a node of g ranks writes K·D·4·g·s/N bytes per second (s: samples
  per second per rank), whatever the number of nodes.

The per-byte cost of the projection comes from the committed ``bench/results/twa_step-cpu.json``
(or ``--twa-step-json``, e.g. a GPU run of the acceptance script).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {"resnet50": 25_557_032, "vit_b_16": 86_567_656, "vit_l_16": 304_326_632}  # torchvision parameter counts
IMAGENET_TRAIN = 1_281_167
PIECE_BYTES = 64 << 20  # the reader's largest ranged GET (twa_scale/store/s3client.py)


def projection_seconds_per_byte(twa_step_json: Path, bits: int) -> float:
    """Seconds per byte of P for one TWA step (project + reconstruct: two passes), the median over
    the measured configs at this width (fp32 configs for bits 16/32)."""
    rows = json.loads(twa_step_json.read_text())["configs"]
    want = 32 if bits >= 16 else bits
    per = [r["ours_ms"] / 1e3 / (2 * r["n"] * r["d_per_rank"] * (4 if want == 32 else want / 8))
           for r in rows if r["p_bits"] == want]
    if not per:
        raise SystemExit(f"{twa_step_json}: no {want}-bit configs to take the per-byte cost from")
    return statistics.median(per)


def predict(*, D: int, n: int, bits: int, world: int, samples: int, batch: int, samples_per_second: float,
            proj_s_per_byte: float, link_Bps: float, hop_s: float, rank_read_Bps: float, store_read_Bps: float,
            store_gets_per_s: float, k_per_epoch: int, ranks_per_node: int) -> dict:
    """The model for one configuration; every quantity in bytes and seconds (see the docstring)."""
    d = math.ceil(D / world)
    p_bytes = n * d * bits / 8
    read = n * d * 4
    gets = world * n * max(1, math.ceil(read / n / PIECE_BYTES))
    load = max(read / rank_read_Bps, world * read / store_read_Bps, gets / store_gets_per_s)
    ring = (world - 1) / world
    # sent per rank: reduce-scatter g + all-gather w + all-reduce of c (n floats, the loss riding along)
    comm_step = 2 * ring * D * 4 + 2 * ring * 4 * (n + 1)
    comm_step_s = 2 * ring * D * 4 / link_Bps + 3 * (world - 1) * hop_s * (world > 1)
    steps = max(1, samples // (world * batch))     # the loader drops the ragged tail
    step_s = batch / samples_per_second + 2 * p_bytes * proj_s_per_byte + comm_step_s
    per_node_Bps = k_per_epoch * D * 4 * ranks_per_node * samples_per_second / samples
    return {"world": world, "d": d, "p_bytes_per_rank": p_bytes, "build_peak_bytes_per_rank": p_bytes + read,
            "read_bytes_per_rank": read, "gets_total": gets, "load_seconds": load,
            "load_bound": ["rank bandwidth", "store bandwidth", "store request rate"][
                [read / rank_read_Bps, world * read / store_read_Bps, gets / store_gets_per_s].index(load)],
            "gram_bytes": 8 * n * n, "comm_bytes_per_step": comm_step, "comm_seconds_per_step": comm_step_s,
            "reduce_scatter_bytes_per_step": ring * D * 4, "all_gather_bytes_per_step": ring * D * 4,
            "all_reduce_bytes_per_step": 2 * ring * 4 * (n + 1),
            "projection_seconds_per_step": 2 * p_bytes * proj_s_per_byte, "steps_per_epoch": steps,
            "step_seconds": step_s, "epoch_seconds": steps * step_s,
            "streamer_write_Bps_per_node": per_node_Bps}


def table(rows: list[dict], model: str, n: int, bits: int) -> str:
    head = (f"{model}, n = {n}, {bits}-bit P\n\n| W | P / rank | peak while building | read / rank | GETs | load "
            "| bound | comm / step | projection / step | steps / epoch | TWA epoch |\n"
            "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|\n")
    mb = lambda x: f"{x / 1e6:,.1f} MB" if x < 1e9 else f"{x / 1e9:,.2f} GB"  # noqa: E731
    return head + "".join(
        f"| {r['world']} | {mb(r['p_bytes_per_rank'])} | {mb(r['build_peak_bytes_per_rank'])} | "
        f"{mb(r['read_bytes_per_rank'])} | {r['gets_total']:,} | {r['load_seconds']:.1f} s | {r['load_bound']} | "
        f"{mb(r['comm_bytes_per_step'])} | {r['projection_seconds_per_step'] * 1e3:.2f} ms | "
        f"{r['steps_per_epoch']:,} | {r['epoch_seconds']:.0f} s |\n" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    ap.add_argument("--n", type=int, default=301, help="snapshots (ImageNet protocol: 301)")
    ap.add_argument("--bits", type=int, default=4, choices=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--world", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    ap.add_argument("--samples", type=int, default=IMAGENET_TRAIN, help="training samples per epoch")
    ap.add_argument("--batch", type=int, default=64, help="samples per rank per TWA step")
    ap.add_argument("--samples-per-second", type=float, default=2500.0,
                    help="forward+backward samples/s of one rank (an input: ResNet-50 bf16 on an H100 is "
                         "about 2,500; ViT-B/16 about 900; ViT-L/16 about 300)")
    ap.add_argument("--twa-step-json", type=Path, default=REPO / "bench/results/twa_step-cpu.json",
                    help="measured projection costs (bench/twa_step.py output)")
    ap.add_argument("--link-GBps", type=float, default=25.0, help="collective bandwidth per rank (200 Gb/s IB)")
    ap.add_argument("--hop-us", type=float, default=10.0, help="latency per ring hop")
    ap.add_argument("--rank-read-MBps", type=float, default=1000.0, help="store read bandwidth of one rank")
    ap.add_argument("--store-read-GBps", type=float, default=50.0, help="the store's aggregate read bandwidth")
    ap.add_argument("--store-gets-per-second", type=float, default=5500.0,
                    help="GETs/s the store serves (S3: 5,500 per prefix per second)")
    ap.add_argument("--k", type=int, default=5, help="snapshots per epoch (the streamer's cadence)")
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--markdown", default=None, help="also write the table as Markdown here")
    ap.add_argument("--out", default="bench/out/scale_model.json")
    args = ap.parse_args(argv)

    s_per_byte = projection_seconds_per_byte(args.twa_step_json, args.bits)
    common = dict(D=MODELS[args.model], n=args.n, bits=args.bits, samples=args.samples, batch=args.batch,
                  samples_per_second=args.samples_per_second, proj_s_per_byte=s_per_byte,
                  link_Bps=args.link_GBps * 1e9, hop_s=args.hop_us * 1e-6, rank_read_Bps=args.rank_read_MBps * 1e6,
                  store_read_Bps=args.store_read_GBps * 1e9, store_gets_per_s=args.store_gets_per_second,
                  k_per_epoch=args.k, ranks_per_node=args.ranks_per_node)
    rows = [predict(world=w, **common) for w in args.world]
    md = table(rows, args.model, args.n, args.bits)
    print(md)
    print(f"streamer: {rows[0]['streamer_write_Bps_per_node'] / 1e6:.1f} MB/s per node at K={args.k} "
          f"({args.ranks_per_node} ranks/node at {args.samples_per_second:g} samples/s each)")
    out = {"bench": "scale_model", "args": {k: str(v) for k, v in vars(args).items()},
           "projection_seconds_per_byte": s_per_byte, "rows": rows}
    if args.markdown:
        Path(args.markdown).write_text(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
