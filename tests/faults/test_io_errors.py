"""fsync / close fails with EIO (backend wrapper) at each write of a save. The failing save
raises StorageError naming the object and EIO; nothing partial is visible; the same manager
saves the next step; the last committed checkpoint loads bit-identical. A read failing with
EIO during restore is a StorageError naming the file, raised before any tensor is copied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _fault_lib import QUIET, LocalJob, assert_named_error, build, check_run, committed_steps, flatten
from support.faulty_backend import FaultyBackend, Rule

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import StorageError
from dist_ckpt.verify import verify_run
from storage_backends import open_backend

pytestmark = QUIET

# (what fails, rule, is step 3 committed anyway?)
CASES = {
    "shard-fsync": (Rule("writer.commit", "step_000000003*/rank_00000.safetensors", "fail", error="EIO"), False),
    "shard-fsync-raw-oserror": (
        Rule("writer.commit", "step_000000003*/rank_00000.safetensors", "fail", error="EIO", raw=True),
        False,
    ),
    "shard-write": (Rule("writer.write", "step_000000003*/rank_00000.safetensors", "fail", error="EIO", nth=2), False),
    "metadata-close": (Rule("create_if_absent", "step_000000003*/metadata.json", "fail", error="EIO"), False),
    "committed-fsync": (Rule("create_if_absent", "step_000000003*/COMMITTED", "fail", error="EIO"), False),
    "publish-rename": (Rule("publish", "step_000000003*", "fail", error="EIO"), False),
    "manifest-fsync": (Rule("compare_and_swap", "manifest.json", "fail", error="EIO"), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_write_fails_with_eio(tmp_path: Path, case: str) -> None:
    rule, committed_anyway = CASES[case]
    root, refs = str(tmp_path / "run"), tmp_path / "refs"
    backend = FaultyBackend(open_backend(root), armed=False)
    job = LocalJob(root, refs, backend=backend)
    assert job.save(1) and job.save(2)
    backend.add(rule)
    backend.arm()
    with pytest.raises(StorageError) as err:
        job.save(3)
    assert backend.injected, "the fault was never injected"
    key = backend.injected[0][1].rsplit("/", 1)[-1]
    assert_named_error(err.value, key)
    assert "EIO" in str(err.value) or "Input/output error" in str(err.value)
    assert isinstance(err.value.__cause__, OSError), repr(err.value.__cause__)
    expected = [1, 2, 3] if committed_anyway else [1, 2]
    assert committed_steps(open_backend(root)) == expected
    # the fault was transient: the same manager goes on saving, and its manifest agrees with
    # the COMMITTED markers without waiting for a restart
    assert job.save(4)
    assert verify_run(open_backend(root)).problems == []
    job.close()
    check_run(root, refs, expect_last=4)


def test_read_fails_with_eio_during_restore(tmp_path: Path) -> None:
    root, refs = str(tmp_path / "run"), tmp_path / "refs"
    job = LocalJob(root, refs)
    job.save(1)
    job.close()
    backend = FaultyBackend(
        open_backend(root),
        [Rule(("read", "read_into"), "step_*/rank_00000.safetensors", "fail", error="EIO")],
    )
    model, opt = build(seed=7)
    before = flatten(model, opt)
    with CheckpointManager(root, backend=backend, read_only=True) as mgr, pytest.raises(StorageError) as err:
        mgr.restore(mgr.track(model=model, optimizer=opt))
    assert_named_error(err.value, "rank_00000.safetensors")
    after = flatten(model, opt)
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed restore modified the live model"
    check_run(root, refs, expect_last=1)
