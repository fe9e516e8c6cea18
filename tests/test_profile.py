"""``core.profile``: steps add up by name, also when the body raises, and ``log`` writes them once."""

from __future__ import annotations

import time

import mlflow
import pytest

from core import profile


def test_steps_add_up_by_name_and_log_writes_them_to_the_active_run(tracking: str) -> None:
    profile.take()
    with profile.step("decode"):
        time.sleep(0.02)
    with pytest.raises(RuntimeError), profile.step("decode"):
        time.sleep(0.02)
        raise RuntimeError("a failed batch still took its time")
    profile.add("prefill", 1.5)
    with mlflow.start_run() as run:
        totals = profile.log()
    assert totals["prefill"] == 1.5 and 0.04 <= totals["decode"] < 1.0
    assert mlflow.get_run(run.info.run_id).data.metrics == {"profile/prefill_seconds": 1.5,
                                                           "profile/decode_seconds": totals["decode"]}
    assert profile.take() == {}  # log started over
