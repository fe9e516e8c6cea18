"""``core.profile``: steps add up by name, also when the body raises, and ``log`` writes them once; each step's
peak resident memory is its own, against resident memory read from ``/proc`` here and ``getrusage``'s peak."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from core import profile

LINUX = Path("/proc/self/status").exists()


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
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    assert {k: v for k, v in metrics.items() if k.endswith("_seconds")} == {"profile/prefill_seconds": 1.5,
                                                                             "profile/decode_seconds": totals["decode"]}
    assert set(metrics) - {"profile/prefill_seconds", "profile/decode_seconds"} == (
        {"profile/decode_peak_rss_gib"} if LINUX else set())  # add() measures no memory
    assert profile.take() == {}  # log started over



def resident_gib() -> float:
    """``VmRSS`` of this process, in GiB (what is resident now, not a high-water mark)."""
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)[1]) / 2**20


def touched(mib: int) -> bytearray:
    """``mib`` MiB with every page written (resident)."""
    block = bytearray(mib * 2**20)
    block[::4096] = b"\1" * len(block[::4096])
    return block


@pytest.mark.skipif(not LINUX, reason="resident memory is read from /proc")
def test_each_steps_peak_memory_is_its_own_and_a_parents_holds_its_childrens(tracking: str) -> None:
    """A step that holds 256 MiB for a while peaks at least that far above what was resident before it, read
    by the sampling alone (the process's high-water mark was raised higher before, so it does not move); a later
    step that allocates nothing peaks below it, and their parent at least as high as the first. Logged once
    each, as ``profile/<name>_peak_rss_gib``."""
    profile.take()
    before = resident_gib()
    touched(512)  # the high-water mark above anything the steps reach; freed at once
    with profile.step("outer"):
        with profile.step("big"):
            block = touched(256)
            time.sleep(10 * profile.SAMPLE_SECONDS)
            del block
        after = resident_gib()
        with profile.step("small"):
            sum(range(1000))
    with mlflow.start_run() as run:
        profile.log()
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    big, small, outer = (metrics[f"profile/{name}_peak_rss_gib"] for name in ("big", "small", "outer"))
    assert big >= before + 0.24
    assert small < big - 0.2 and small <= after + 0.05
    assert outer >= big


@pytest.mark.skipif(not LINUX, reason="resident memory is read from /proc")
def test_a_spike_too_short_to_sample_that_sets_the_processs_peak_is_read_exactly() -> None:
    """In a fresh process (whose high-water mark is its start-up), a step that touches 512 MiB and frees it at
    once peaks at least that far above what was resident before it: the kernel's high-water mark rose during the
    step, whatever the sampling saw; and ``getrusage`` still reports the process's peak (the mark is not reset)."""
    code = (
        "import resource\n"
        "from core import profile\n"
        "from tests.test_profile import resident_gib, touched\n"
        "profile.SAMPLE_SECONDS = 60.0\n"
        "before = resident_gib()\n"
        "with profile.step('spike'):\n"
        "    touched(512)\n"
        "print(before, profile.peaks()['spike'], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    before, spike, maxrss = map(float, result.stdout.split())
    assert spike >= before + 0.49 and maxrss >= spike - 0.01
