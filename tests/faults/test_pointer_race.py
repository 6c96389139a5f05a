"""Pointer race: two writers update manifest.json at the same moment (both read version v, then
both compare-and-swap against v — forced with a barrier). One CAS loses, re-reads and retries;
the final manifest is valid, holds both entries, and agrees with the COMMITTED markers. Local
(lock file + rename) and S3 (If-Match on the ETag)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from _fault_lib import QUIET, LocalJob, check_run
from support.faulty_backend import FaultyBackend, Rule

from dist_ckpt import manifest as mf
from dist_ckpt.run_store import MANIFEST, RunStore, entry_from_committed, step_prefix
from dist_ckpt.verify import verify_run
from storage_backends import open_backend

pytestmark = QUIET
BEST = {"loss": "min"}


def _race(root: str, make_backend, steps: tuple[int, int]) -> list[FaultyBackend]:
    barrier = threading.Barrier(2, timeout=30)
    backends = [
        FaultyBackend(
            make_backend(),
            [Rule("read_versioned", MANIFEST, "call", when="after", hook=lambda op, key: barrier.wait())],
        )
        for _ in steps
    ]
    errors: list[BaseException] = []

    def writer(backend: FaultyBackend, step: int) -> None:
        try:
            store = RunStore(backend)
            key = f"{step_prefix(step)}/COMMITTED"
            entry = entry_from_committed(step, backend.read(key), key)
            store.update_manifest(lambda cur: mf.with_entry(cur or mf.Manifest(), entry, BEST))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(b, s)) for b, s in zip(backends, steps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return backends


def _setup(root: str, refs: Path, backend=None) -> None:
    """Steps 1-3 committed; the manifest knows only step 1 (two commits not yet recorded)."""
    job = LocalJob(root, refs, backend=backend)
    for step in (1, 2, 3):
        job.save(step)
    job.close()
    b = backend or open_backend(root)
    stale = mf.rebuild([entry_from_committed(1, b.read("step_000000001/COMMITTED"), "x")], BEST)
    b.write_bytes(MANIFEST, mf.dumps(stale))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_writers_update_the_manifest_concurrently(tmp_path: Path, where: str, request) -> None:
    refs = tmp_path / "refs"
    if where == "local":
        root = str(tmp_path / "run")

        def make_backend():
            return open_backend(root)
    else:
        from support.s3server import make_s3_backend

        server = request.getfixturevalue("s3_server")
        root = request.getfixturevalue("s3_uri")

        def make_backend():
            return make_s3_backend(server, root)

    _setup(root, refs, make_backend() if where == "s3" else None)
    backends = _race(root, make_backend, (2, 3))
    cas = sum(b.calls["compare_and_swap"] for b in backends)
    assert cas == 3, f"expected one lost CAS and its retry, saw {cas} compare-and-swaps"
    doc = json.loads(make_backend().read(MANIFEST))
    manifest = mf.loads(json.dumps(doc).encode())  # valid
    assert manifest.steps() == [1, 2, 3] and manifest.pointers["last"] == 3
    report = verify_run(make_backend())
    assert report.ok, report.to_json()
    check_run(root, refs, expect_last=3, backend=make_backend())
