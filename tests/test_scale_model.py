"""bench/scale_model.py's arithmetic against a case worked by hand."""
import json

import pytest

from bench.scale_model import predict, projection_seconds_per_byte


def test_scale_model_matches_hand_computed_case():
    # D = 1,000 parameters, n = 10 snapshots, 4-bit P, W = 4 ranks; 1,000 samples, batch 10 per rank
    r = predict(D=1000, n=10, bits=4, world=4, samples=1000, batch=10, samples_per_second=100.0,
                proj_s_per_byte=1e-3, link_Bps=1e3, hop_s=0.01, rank_read_Bps=100.0, store_read_Bps=1e6,
                store_gets_per_s=1e6, k_per_epoch=5, ranks_per_node=2)
    assert r["d"] == 250
    assert r["p_bytes_per_rank"] == 10 * 250 * 0.5 == 1250
    assert r["read_bytes_per_rank"] == 10 * 250 * 4 == 10_000
    assert r["gets_total"] == 4 * 10                       # one GET per snapshot per rank (< 16 MiB each)
    assert r["load_seconds"] == pytest.approx(10_000 / 100.0) and r["load_bound"] == "rank bandwidth"
    assert r["comm_bytes_per_step"] == pytest.approx(2 * 0.75 * 4000 + 2 * 0.75 * 44)  # + ring all-reduce of n+1
    assert r["comm_seconds_per_step"] == pytest.approx(2 * 0.75 * 4000 / 1e3 + 3 * 3 * 0.01)   # 6.09 s
    assert r["steps_per_epoch"] == 1000 // 40 == 25
    ragged = dict(D=1000, n=10, bits=4, world=4, samples=1039, batch=10, samples_per_second=100.0, proj_s_per_byte=0,
                  link_Bps=1e3, hop_s=0, rank_read_Bps=1.0, store_read_Bps=1.0, store_gets_per_s=1.0, k_per_epoch=1,
                  ranks_per_node=1)
    assert predict(**ragged)["steps_per_epoch"] == 25   # the loader drops the ragged tail (39 samples)
    assert r["step_seconds"] == pytest.approx(10 / 100 + 2 * 1250 * 1e-3 + 6.09)              # 8.69 s
    assert r["epoch_seconds"] == pytest.approx(25 * 8.69)
    assert r["streamer_write_Bps_per_node"] == pytest.approx(5 * 4000 * 2 * 100 / 1000)        # 400 B/s
    assert r["gram_bytes"] == 800


def test_store_limits_take_over_at_large_world():
    kw = dict(D=25_557_032, n=301, bits=4, samples=1_281_167, batch=64, samples_per_second=2500.0,
              proj_s_per_byte=1e-10, link_Bps=25e9, hop_s=1e-5, rank_read_Bps=1e9, store_read_Bps=50e9,
              store_gets_per_s=5500.0, k_per_epoch=5, ranks_per_node=8)
    assert predict(world=8, **kw)["load_bound"] == "rank bandwidth"
    big = predict(world=1024, **kw)
    assert big["load_bound"] == "store request rate" and big["load_seconds"] == pytest.approx(301 * 1024 / 5500)


def test_projection_cost_is_read_from_bench_json(tmp_path):
    rows = [{"n": 10, "d_per_rank": 100, "p_bits": 32, "ours_ms": 8.0},
            {"n": 10, "d_per_rank": 100, "p_bits": 4, "ours_ms": 2.0}]
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"configs": rows}))
    assert projection_seconds_per_byte(f, 32) == pytest.approx(8e-3 / (2 * 10 * 100 * 4))
    assert projection_seconds_per_byte(f, 4) == pytest.approx(2e-3 / (2 * 10 * 100 * 0.5))
    with pytest.raises(SystemExit, match="no 2-bit configs"):
        projection_seconds_per_byte(f, 2)
