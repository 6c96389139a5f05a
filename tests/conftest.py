"""Shared fixtures, and the test tiers. The S3 server fixtures live in tests/support/s3server.py;
``pythonpath`` in pyproject.toml puts tests/ on the import path, so ``support`` imports by name.

Tiers (markers registered in pyproject.toml), given here so that a new test file lands in one
without a decorator:

- ``s3``: the test starts an S3 server (it uses one of the server fixtures, or lives in tests/s3);
- ``multirank``: the test starts several processes (torchrun, spawned ranks, a job the test
  kills or runs beside another one): by directory, or by file in the directories that mix kinds;
- ``unit``: the rest of tests/unit: one process, no server, seconds (``make test-unit``);
- ``integration``: the rest elsewhere: one process, end to end (faults, CLI, async saves, flags,
  importers), with the real file system, CLI subprocesses and writer processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.s3_fixtures import *  # noqa: F401,F403  (pytest fixtures: s3_server, s3_uri, ...)

TESTS = Path(__file__).resolve().parent

# every test in these directories starts several processes
_MULTIRANK_DIRS = {"distributed", "multinode", "integrations"}
# files in mixed directories whose tests start several processes (a whole file is marked even
# where one of its tests runs in one process: it stays in `make test`, only leaves test-unit)
_MULTIRANK_FILES = {
    "async_save/test_async_multirank.py",
    "async_save/test_overlap_torchrun.py",
    "async_save/test_sigterm_torchrun.py",
    "faults/test_async_faults.py",
    "faults/test_crash_points.py",
    "faults/test_incremental_retention.py",
    "faults/test_run_lock_fencing.py",
    "faults/test_run_lock_liveness.py",
    "faults/test_sigkill_rank.py",
    "faults/test_soak.py",
    "faults/test_two_jobs.py",
    "flags/test_flags_invalid.py",
    "flags/test_flags_valid.py",
    "importers/test_import_dcp.py",
    "s3/test_s3_manager.py",
    "tiers/test_tiers_local.py",
    "tiers/test_tiers_multinode.py",
    "unit/test_run_lock.py",
}
# tests in tests/unit that start a process
_MULTIRANK_TESTS = {
    "unit/test_float_jit.py::test_importing_the_codec_does_not_import_numba",
    "unit/test_zstd_codec.py::test_pool_works_in_a_forked_child",
}
_MULTIRANK_FIXTURES = {"fsdp_ckpt"}  # tests/cli: a 2-rank FSDP2 job
_S3_DIRS = {"s3"}
_S3_FIXTURES = {"s3_server", "seaweedfs_server", "moto_s3_server", "s3_env", "s3_uri"}


def _tiers(item: pytest.Item) -> set[str]:
    rel = Path(item.path).resolve().relative_to(TESTS).as_posix()
    top = rel.split("/", 1)[0]
    fixtures = set(getattr(item, "fixturenames", ()))
    tiers: set[str] = set()
    in_file = f"{rel}::{getattr(item, 'originalname', item.name)}"
    if (
        top in _MULTIRANK_DIRS
        or rel in _MULTIRANK_FILES
        or in_file in _MULTIRANK_TESTS
        or fixtures & _MULTIRANK_FIXTURES
    ):
        tiers.add("multirank")
    # `[s3]` parametrizations fetch the server with request.getfixturevalue
    callspec = getattr(item, "callspec", None)
    s3_param = callspec is not None and "s3" in callspec.id.split("-")
    if top in _S3_DIRS or fixtures & _S3_FIXTURES or s3_param:
        tiers.add("s3")
    tiers.update(m for m in ("multirank", "s3") if item.get_closest_marker(m))  # a test's own decorator
    return tiers or {"unit" if top == "unit" else "integration"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for tier in sorted(_tiers(item)):
            if not item.get_closest_marker(tier):
                item.add_marker(tier)
