"""TWA results for people (a table, a PNG) and machines (result.json), written through fsspec."""
from __future__ import annotations

import io
import json
from typing import Any

import torch

__all__ = ["format_table", "plot_result", "write_outputs", "RESULT_NAME", "MODEL_NAME", "PLOT_NAME"]

RESULT_NAME = "result.json"
MODEL_NAME = "model.safetensors"
PLOT_NAME = "coefficients.png"


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def format_table(result: dict) -> str:
    """A short summary: snapshots, basis, SWA/start and TWA accuracy, per-epoch rows, timings."""
    snaps = result.get("snapshots", [])
    seqs = [s["seq"] for s in snaps]
    lines = [
        f"TWA ({result.get('mode')} mode) on {len(snaps)} snapshots "
        f"(seq {seqs[0] if seqs else '-'}..{seqs[-1] if seqs else '-'}), world size {result.get('world_size')}, "
        f"effective rank {result.get('effective_rank')}",
    ]
    basis = result.get("basis", {})
    if basis.get("dropped"):
        near = basis.get("near_duplicates") or []
        lines.append(f"  dropped {len(basis['dropped'])} snapshot(s) from the basis: {basis['dropped']}"
                     + (f" ({len(near)} near-duplicate(s) within {basis.get('spread_tol'):g} x the spread)"
                        if near else " (nearly dependent)"))
    start = "SWA" if result.get("start") == "swa" else f"start (seq {result.get('start')})"
    lines += ["", f"{'point':<18}val accuracy", f"{'-' * 18}------------",
              f"{start:<18}{_fmt(result.get('start_accuracy'))}", f"{'TWA':<18}{_fmt(result.get('twa_accuracy'))}"]
    if result.get("epochs"):
        lines += ["", "epoch  lr          train loss  val acc", "-----  ----------  ----------  -------"]
        for row in result["epochs"]:
            lines.append(f"{row['epoch']:>5}  {row['lr']:<10.4g}  {row['train_loss']:<10.4f}  "
                         f"{_fmt(row.get('val_accuracy'))}")
    t = result.get("timings", {})
    lines += ["", "timings: " + ", ".join(f"{k.replace('_seconds', '')} {v:.2f}s" for k, v in t.items()
                                          if k.endswith("_seconds"))
              + f", projection {t.get('projection_ms_per_step', 0):.3f} ms/step"]
    if "bytes_read_per_rank" in result:
        lines.append("bytes read per rank: " + ", ".join(f"{b / 1e6:.2f} MB" for b in result["bytes_read_per_rank"]))
    return "\n".join(lines)


def plot_result(result: dict) -> bytes:
    """PNG: averaging weight alpha per snapshot (left), validation accuracy per TWA epoch (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    seqs = [s["seq"] for s in result.get("snapshots", [])]
    alpha = torch.tensor(result.get("alpha", []), dtype=torch.float64)
    if alpha.dim() == 2:  # layer-wise: mean over blocks, with the spread
        ax1.fill_between(seqs, alpha.min(1).values.tolist(), alpha.max(1).values.tolist(), alpha=0.25,
                         label="min..max over blocks")
        alpha = alpha.mean(1)
    if len(seqs) == alpha.numel():
        ax1.bar(seqs, alpha.tolist(), width=0.8, label="TWA alpha")
        ax1.axhline(1.0 / max(len(seqs), 1), color="k", ls="--", lw=1, label="SWA 1/n")
    ax1.set_xlabel("snapshot seq")
    ax1.set_ylabel("alpha (w = sum alpha_i w_i)")
    ax1.legend(fontsize=8)
    rows = [r for r in result.get("epochs", []) if r.get("val_accuracy") is not None]
    xs = [0] + [r["epoch"] for r in rows]
    ys = [result.get("start_accuracy")] + [r["val_accuracy"] for r in rows]
    ax2.plot(xs, ys, marker="o")
    ax2.set_xlabel("TWA epoch")
    ax2.set_ylabel("val accuracy")
    ax2.set_title(f"start {_fmt(result.get('start_accuracy'))} -> TWA {_fmt(result.get('twa_accuracy'))}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def model_metadata(*, model: str, num_classes: int, classes: list[str] | None, normalization: dict,
                   snapshots: list[int], run: str) -> dict[str, str]:
    """What the model file says about itself (safetensors metadata is str -> str; lists and dicts as JSON),
    so that it loads into a plain torchvision model without twa_scale:

        from safetensors import safe_open; from safetensors.torch import load_file; import torchvision
        meta = safe_open("model.safetensors", "pt").metadata()
        net = torchvision.models.get_model(meta["model"], num_classes=int(meta["num_classes"]))
        net.load_state_dict(load_file("model.safetensors"))  # strict; meta["normalization"]: its input
    """
    from twa_scale import __version__

    return {"model": model, "num_classes": str(num_classes), "classes": json.dumps(classes),
            "normalization": json.dumps(normalization), "snapshots": json.dumps(snapshots), "run": run,
            "twa_scale_version": __version__}


def write_outputs(result: dict, state_dict: dict[str, torch.Tensor], url: str, *, plot: bool = True,
                  storage_options: dict | str | None = None, metadata: dict[str, str] | None = None) -> dict:
    """Write model, plot, then result.json (last: its presence marks a complete result).

    The model is a safetensors file of the state_dict (weights + BatchNorm buffers):
    nothing to unpickle; ``metadata`` (:func:`model_metadata`) goes into its header. Returns {name: url}.
    """
    from safetensors.torch import save as st_save

    from twa_scale.store import StoreAccessError, StoreUnreachable, open_store

    out = open_store(url, storage_options)
    try:
        out.check_writable()
    except (StoreUnreachable, StoreAccessError) as e:
        raise type(e)(f"--output {url}: {e}") from e
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    # an older result.json must not vouch for the files this run is about to replace
    out.delete(RESULT_NAME)
    model = st_save(tensors, metadata={"format": "pt", **(metadata or {})})
    out.put_large(MODEL_NAME, memoryview(model))
    names = [MODEL_NAME]
    if plot:
        out.put_small(PLOT_NAME, plot_result(result))
        names.append(PLOT_NAME)
    names.append(RESULT_NAME)
    result = dict(result, outputs={k: out.describe(k) for k in names})
    out.put_small(RESULT_NAME, json.dumps(result, indent=1).encode())
    return result["outputs"]
