"""bench/scale_validate.py: the docs table is the committed JSON's, the memory model counts P's bytes as the
stage stores them, and (slow) measured TWA runs on 1 and 2 gloo ranks read and hold exactly what the model says."""
import json
from pathlib import Path

import pytest
import torch

from bench.scale_model import predict
from bench.scale_validate import compare, docs_tables, markdown, measure, packed_p_bytes
from tests.support import REPO, free_port

RESULT = REPO / "bench/results/scale_validate-cpu.json"


def test_docs_scaling_shows_the_committed_validation():
    assert docs_tables() == markdown(json.loads(RESULT.read_text())), \
        "docs/scaling.md is stale: python bench/scale_validate.py --markdown bench/results/scale_validate-cpu.json"


def test_committed_validation_has_every_world_and_width():
    doc = json.loads(RESULT.read_text())
    assert sorted((r["world"], r["bits"]) for r in doc["validation"]["rows"]) == [
        (w, b) for w in (1, 2, 4) for b in (4, 32)]
    for r in doc["validation"]["rows"]:  # bytes read and fp32 P are exact; steps follow the loader
        q = r["quantities"]
        assert q["read_bytes_per_rank"]["rel_error"] == 0 and q["steps_per_epoch"]["rel_error"] == 0
        assert q["p_bytes_per_rank_layout"]["rel_error"] == 0


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1), (3, 0)])
def test_packed_p_bytes_is_what_the_stage_stores(world, rank):
    """The tile-aware count against GroupedP's own nbytes, on a ResNet-20 layout whose slices cut blocks."""
    from twa_scale.layout import FlatLayout
    from twa_scale.models import build_model
    from twa_scale.twa.subspace import build_basis

    layout = FlatLayout.from_model(build_model("resnet20", 10))
    s, e = layout.slices(world)[rank]
    x = torch.randn(5, e - s, generator=torch.Generator().manual_seed(0))
    basis = build_basis(x, s, e, layout.blocks(), bits=4)
    assert basis.k == 5
    assert packed_p_bytes(layout.blocks(), s, e, basis.k, 4) == basis.nbytes
    # the plain model n·d·bits/8 is the floor that tiles, ranges and fp32 block tails sit on
    assert predict(D=layout.D, n=5, bits=4, world=world, samples=1, batch=1, samples_per_second=1.0,
                   proj_s_per_byte=0.0, link_Bps=1.0, hop_s=0.0, rank_read_Bps=1.0, store_read_Bps=1.0,
                   store_gets_per_s=1.0, k_per_epoch=1, ranks_per_node=1)["p_bytes_per_rank"] < basis.nbytes


@pytest.mark.multirank
@pytest.mark.slow
def test_measured_bytes_and_memory_match_the_model_on_1_and_2_ranks(tmp_path):
    from tests.support.twa import digits_config, make_trajectory, write_run
    from twa_scale.layout import FlatLayout

    cfg = digits_config()
    model, snaps = make_trajectory(cfg, 4)
    url = f"file://{tmp_path}/store"
    write_run(url, "mlp", model, snaps, cfg=cfg, writer_world=2)
    layout = FlatLayout.from_model(model)
    args = ["--select", "1:", "--epochs", "1", "--batch-size", "48", "--lr", "0.05", "--no-guard", "--no-plot",
            "--eval-every", "0", "--bn-batches", "1", "--limit-val", "48"]
    runs = [measure(url, "mlp", world=w, bits=b, twa_args=args, work=Path(tmp_path), port=free_port())
            for w, b in ((1, 32), (2, 4))]
    v = compare(runs, D=layout.D, blocks=layout.blocks(), n=4, samples=240,  # --no-guard: all 240 training images
                proj_json=REPO / "bench/results/twa_step-cpu.json")
    one, two = (r["quantities"] for r in v["rows"])
    for q in (one, two):
        assert q["read_bytes_per_rank"]["rel_error"] == 0
        assert q["p_bytes_per_rank_layout"]["rel_error"] == 0
    assert one["p_bytes_per_rank"]["rel_error"] == 0                       # fp32: n·d·4 exactly
    assert one["comm_bytes_per_step"]["measured"] == 0                     # one rank sends nothing
    # two ranks: the all-gather of w sends (W-1)/W·D·4 bytes, plus gloo's few bytes of framing
    ag = two["all_gather_bytes_per_step"]
    assert ag["predicted"] <= ag["measured"] <= ag["predicted"] * 1.01 + 1024
