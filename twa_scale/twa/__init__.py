"""The distributed TWA stage: sharded snapshot load, subspace basis, coefficient loop.

    from twa_scale.twa import TwaConfig, run_twa
    result = run_twa(TwaConfig(snapshot_url="file:///runs", run_id="resnet20-digits-s0"))

Modules: ``subspace`` (basis maths), ``quant`` (how P is stored and multiplied),
``solver`` (the coefficient loop), ``stage`` (the driver), ``bn``, ``config``; live TWA: ``follow``
(the follower of a running job, ``launch/twa.py --follow``) and ``stoprule`` (when it says stop).
"""
from __future__ import annotations

from twa_scale.twa.config import TwaConfig, parse_twa_args
from twa_scale.twa.stage import TwaResult, run_twa

__all__ = ["TwaConfig", "TwaResult", "run_twa", "parse_twa_args"]
