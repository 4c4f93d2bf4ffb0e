"""Gathering shards to rank 0 without a shared filesystem: 3 gloo ranks, process group and rsync."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.whole  # every test here launches runs or rank processes


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict:
    if shutil.which("rsync") is None:
        pytest.fail("rsync is not installed; .ci/run installs it (apt-get install rsync)")
    base = tmp_path_factory.mktemp("gather")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
           str(REPO / "tests" / "gather_worker.py"), str(base)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((base / "result.json").read_text())


def test_process_group_transfer_resumes_and_checks_sha256(observed):
    pg = observed["process_group"]
    assert pg["shared"] is False and all(pg["files"].values()), pg["files"]
    assert pg["skipped"] == ["a.bin"]             # complete with the right checksum: not sent again
    assert pg["resumed"] == ["b.bin", "c.bin"]    # partial copies continue where they stopped
    # b: 4100-1500; c: 3000-1200 resumed, wrong sha256, then 3000 again; d: stale, 999; empty: 0
    assert pg["received_bytes"] == 2600 + 1800 + 3000 + 999
    assert pg["dirs"]["1"].endswith("host0/work/rank1") and pg["dirs"]["2"].endswith("host0/work/rank2")


def test_rsync_transfer(observed):
    rs = observed["rsync"]
    assert rs["shared"] is False and all(rs["files"].values()), rs["files"]
    assert rs["received_bytes"] > 0


def test_auto_detects_a_visible_work_dir_and_copies_nothing(observed):
    auto = observed["auto"]
    assert auto["shared"] is True
    assert [auto["dirs"][r].rsplit("/", 3)[-3:] for r in "012"] == [
        ["host0", "work", "rank0"], ["host1", "work", "rank1"], ["host2", "work", "rank2"]]

def test_forced_shared_that_is_not_fails_on_every_rank(observed):
    errors = observed["forced_shared"]
    assert len(errors) == 3 and len(set(errors)) == 1
    assert "gather.shared is true but rank 0 cannot see rank 2's work directory" in errors[0]
    assert "set gather.shared: auto (or false)" in errors[0]
