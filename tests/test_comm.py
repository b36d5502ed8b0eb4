"""Which launcher variables twa_scale.comm trusts (the node count decides who uploads and commits checkpoints)."""
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
