"""Which launcher variables twa_scale.comm trusts (the node count decides who uploads and commits checkpoints)."""
import re
from pathlib import Path

import pytest

from tests.support import launch
from twa_scale import comm


def test_deepspeeds_local_size_wins_over_an_inherited_local_world_size(monkeypatch):
    # DeepSpeed's launcher sets LOCAL_SIZE and leaves LOCAL_WORLD_SIZE as the parent had it (here the
    # single-process fallback of comm.init in the process that ran `deepspeed`): 2 ranks on this node.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert comm.local_world_size() == 2
    monkeypatch.delenv("LOCAL_SIZE")  # torchrun: only LOCAL_WORLD_SIZE
    assert comm.local_world_size() == 1


def test_node_rank_reads_deepspeeds_cross_rank(monkeypatch):
    for key in ("NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CROSS_RANK", "3")
    assert comm.node_rank() == 3


@pytest.mark.multirank
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_deepspeed_job_leaves_nothing_in_dev_shm(tmp_path, ranks):
    # DeepSpeed's CPU shm all-reduce creates a 69 MB /dev/shm file per rank and never unlinks it;
    # comm.init unlinks it once every rank has mapped it. Before that fix, each job leaked 69 MB a rank
    # of RAM-backed tmpfs, and the test suite's many jobs filled /dev/shm until the OOM killer hit.
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys, torch\n"
        "from twa_scale import comm\n"
        "comm.init()\n"
        "t = comm.all_reduce(torch.ones(4))\n"  # the shared buffer still works after its name is gone
        f"assert t.tolist() == [{ranks}.0] * 4, t\n"
        "if comm.rank() == 0:\n"
        "    print('PORT', os.environ['MASTER_PORT'], 'LOCAL_SIZE', os.environ.get('LOCAL_SIZE'), flush=True)\n"
        "comm.destroy()\n")
    out = launch.deepspeed(str(script), [], ranks=ranks, timeout=300).stdout
    port = re.search(rf"PORT (\d+) LOCAL_SIZE {ranks}\b", out)
    assert port, out[-2000:]
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port.group(1)}_*")]
    assert left == []
