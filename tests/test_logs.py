"""twa_scale.logs: one handler, rank-0 INFO, quiet libraries, JSON lines, progress without a TTY.

(The log of a real two-rank job on S3 is checked in tests/test_tracking.py.)"""
import io
import json
import logging

import pytest

from twa_scale import logs

pytestmark = pytest.mark.unit


def _emit(**kw) -> str:
    out = io.StringIO()
    with logs.configured(stream=out, **kw):
        logging.getLogger("twa_scale.x").info("an info line")
        logging.getLogger("twa_scale.x").warning("a warning")
        logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
        logging.getLogger("botocore.credentials").warning("a botocore warning")
        logging.getLogger().warning("the root logger")  # not ours: no handler of ours sees it
    return out.getvalue()


def test_rank0_logs_info_once_and_libraries_only_warnings():
    text = _emit(rank=0)
    assert text.count("an info line") == 1 and text.count("a warning") == 1
    assert "Found credentials" not in text and "root logger" not in text


def test_other_ranks_log_warnings_marked_with_their_rank_unless_all_ranks():
    text = _emit(rank=1)
    assert "an info line" not in text and "WARNING [rank 1] twa_scale.x: a warning" in text
    assert "an info line" in _emit(rank=1, all_ranks=True)


def test_json_lines():
    rows = [json.loads(line) for line in _emit(rank=2, all_ranks=True, log_format="json").splitlines()]
    assert [(r["level"], r["rank"], r["message"]) for r in rows] == [("INFO", 2, "an info line"),
                                                                     ("WARNING", 2, "a warning")]
    assert rows[0]["logger"] == "twa_scale.x" and rows[0]["time"][:2] == "20"


def test_configured_restores_the_loggers_and_replaces_its_own_handler():
    logger = logging.getLogger("twa_scale")
    before = (list(logger.handlers), logger.propagate, logging.getLogger("botocore").level)
    with logs.configured(rank=0, stream=io.StringIO()):
        logs.configure(rank=0, stream=io.StringIO())  # the flags refine it: still one handler
        assert len([h for h in logger.handlers if isinstance(h, logs._Handler)]) == 1
    assert (list(logger.handlers), logger.propagate, logging.getLogger("botocore").level) == before


def test_progress_off_a_terminal_is_plain_lines_on_rank0_only(caplog):
    with caplog.at_level(logging.INFO, logger="twa_scale.progress"):
        bar = logs.progress(range(3), "train 1/2", rank=0, seconds=0.0)  # pytest's stderr is not a TTY
        bar.set_postfix(loss="0.5000", refresh=False)
        assert list(bar) == [0, 1, 2] and len(bar) == 3
        assert list(logs.progress(range(3), "train 1/2", rank=1, seconds=0.0)) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[-1].startswith("train 1/2: 3/3 (") and lines[-1].endswith("loss 0.5000)")
    assert not any("\r" in line for line in lines)
