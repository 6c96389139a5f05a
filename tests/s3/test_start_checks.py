"""What a writer checks when it starts on an S3 run root (issue 21, and a rough edge of issue 13).

Against SeaweedFS behind a real proxy that drops ``If-None-Match``/``If-Match`` and re-signs
(tests/support/stripping_proxy.py) — a server that silently ignores conditional writes:

- a writing manager, ``dist-ckpt copy``, ``prune`` and ``gc`` are refused at start with a
  StorageError naming the bucket, the endpoint and the missing guarantees, and write nothing;
- a read-only manager (and ``dist-ckpt list``, ``prune --dry-run``) still works;
- with ``unsafe_single_writer=True`` / ``--unsafe-single-writer`` the writes go through, and
  every start logs a warning.

And a writing manager on a bucket that does not exist says so (also where the server answers
403 AccessDenied, as SeaweedFS does to bucket-scoped credentials).
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from support.s3server import SCOPED_BUCKET, S3Server
from support.stripping_proxy import StrippingProxy
from torch import nn

from dist_ckpt import CheckpointManager
from dist_ckpt.cli import main
from dist_ckpt.errors import ConfigError, StorageError

MESSAGE_PARTS = ("does not enforce conditional writes", "If-None-Match", "If-Match")


@pytest.fixture
def stripping(s3_env: S3Server) -> Iterator[StrippingProxy]:
    with StrippingProxy.before(s3_env) as proxy:
        yield proxy


def _bucket(uri: str) -> str:
    return uri[len("s3://") :].split("/", 1)[0]


def _objects(server: S3Server, uri: str) -> list[str]:
    """Every key of the bucket of ``uri``."""
    return sorted(o["Key"] for o in server.client().list_objects_v2(Bucket=_bucket(uri)).get("Contents", []) or [])


def _assert_refusal(msg: str, uri: str, proxy: StrippingProxy, opt_in: str) -> None:
    for part in (*MESSAGE_PARTS, f"bucket {_bucket(uri)!r}", proxy.url, opt_in):
        assert part in msg, f"{part!r} missing from: {msg}"


def _model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(16, 4)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _save_steps(uri: str, steps: list[int], **options) -> dict[str, torch.Tensor]:
    model, opt = _model(0)
    with CheckpointManager(uri, **options) as mgr:
        state = mgr.track(model=model, optimizer=opt)
        for step in steps:
            model.weight.data += step
            assert mgr.save(step, state, force=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def test_writing_manager_is_refused_at_start_and_writes_nothing(
    s3_uri: str, s3_env: S3Server, stripping: StrippingProxy
) -> None:
    with pytest.raises(StorageError) as info:
        CheckpointManager(s3_uri, backend_options={"endpoint_url": stripping.url})
    _assert_refusal(str(info.value), s3_uri, stripping, "unsafe_single_writer=True")
    assert stripping.stripped["If-None-Match"] and stripping.stripped["If-Match"]  # the proxy did its part
    assert _objects(s3_env, s3_uri) == [], "no LOCK, no probe object, nothing"


def test_read_only_manager_restores_through_it(s3_uri: str, s3_env: S3Server, stripping: StrippingProxy) -> None:
    saved = _save_steps(s3_uri, [1, 2])  # written straight to the server, which enforces them
    model, opt = _model(1)
    with CheckpointManager(s3_uri, read_only=True, backend_options={"endpoint_url": stripping.url}) as mgr:
        info = mgr.restore(mgr.track(model=model, optimizer=opt))
    assert info is not None and info.step == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_unsafe_single_writer_saves_and_warns_at_every_start(
    s3_uri: str, s3_env: S3Server, stripping: StrippingProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dist_ckpt.write_guard")
    through_proxy = dict(backend_options={"endpoint_url": stripping.url}, unsafe_single_writer=True)
    _save_steps(s3_uri, [1], **through_proxy)
    saved = _save_steps(s3_uri, [2], **through_proxy)
    warnings = [r for r in caplog.records if r.name == "dist_ckpt.write_guard"]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    for record in warnings:
        msg = record.getMessage()
        assert f"bucket {_bucket(s3_uri)!r}" in msg and stripping.url in msg and "unsafe_single_writer=True" in msg
        assert "Only one job may write this run" in msg
    model, opt = _model(1)
    with CheckpointManager(s3_uri, read_only=True) as mgr:  # straight to the server
        info = mgr.restore(mgr.track(model=model, optimizer=opt))
        assert [c.step for c in mgr.checkpoints()] == [1, 2]
    assert info is not None and info.step == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_writing_cli_commands_are_refused_and_read_commands_work(
    s3_uri: str, s3_env: S3Server, stripping: StrippingProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save_steps(s3_uri, [1, 2, 3])
    leftover = f"{s3_uri.split('/', 3)[3]}/step_000000009/rank_00000.safetensors"
    s3_env.client().put_object(Bucket=_bucket(s3_uri), Key=leftover, Body=b"an interrupted save")
    local = tmp_path / "local"
    _save_steps(str(local), [5])
    before = _objects(s3_env, s3_uri)
    dest = f"s3://{_bucket(s3_uri)}/copied"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", stripping.url)  # every command below goes through the proxy

    for args in (["copy", local, dest], ["prune", s3_uri, "--keep-last", "1"], ["gc", s3_uri]):
        rc, _, err = _cli(*args)
        assert rc == 4, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dist-ckpt: error: refusing to write"), err
        _assert_refusal(lines[0], s3_uri, stripping, "--unsafe-single-writer")
    assert _objects(s3_env, s3_uri) == before  # the whole bucket: nothing pruned, collected or copied

    rc, out, err = _cli("list", s3_uri)
    assert rc == 0 and "3 committed checkpoints" in out, err
    rc, out, err = _cli("prune", s3_uri, "--keep-last", "1", "--dry-run")
    assert rc == 0 and "would delete" in out, err

    rc, out, err = _cli("gc", s3_uri, "--unsafe-single-writer")
    assert rc == 0 and "removed uncommitted step" in out, err
    assert "WARNING" in err and "--unsafe-single-writer" in err and "Only one job may write this run" in err
    assert leftover not in _objects(s3_env, s3_uri)


def test_writing_manager_on_a_missing_bucket_says_so(s3_env: S3Server) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    with pytest.raises(StorageError) as info:
        CheckpointManager(f"s3://{bucket}/run")
    msg = str(info.value)
    assert f"bucket {bucket!r} does not exist" in msg and s3_env.endpoint_url in msg and ".." not in msg, msg


def test_writing_manager_on_a_missing_bucket_with_bucket_scoped_credentials(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: SeaweedFS answers 403 to a PUT into a missing bucket with credentials scoped to
    another bucket; the manager reported `AccessDenied … check the AWS credentials..`."""
    admin = s3_env.client()
    try:
        admin.create_bucket(Bucket=SCOPED_BUCKET)
    except admin.exceptions.BucketAlreadyOwnedByYou:
        pass
    for name, value in s3_env.env(scoped=True).items():
        monkeypatch.setenv(name, value)
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    with pytest.raises(StorageError) as info:
        CheckpointManager(f"s3://{bucket}/run")
    msg = str(info.value)
    assert f"bucket {bucket!r} does not exist" in msg and ".." not in msg, msg
    CheckpointManager(f"s3://{SCOPED_BUCKET}/run-{uuid.uuid4().hex[:8]}").close()  # the bucket it may use works


def test_local_roots_are_not_probed_and_the_option_is_validated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dist_ckpt.write_guard")
    _save_steps(str(tmp_path / "run"), [1], unsafe_single_writer=True)
    assert not [r for r in caplog.records if r.name == "dist_ckpt.write_guard"]  # nothing unsafe to warn about
    assert not list((tmp_path / "run").glob(".dist-ckpt-probe*"))
    with pytest.raises(ConfigError, match="unsafe_single_writer='yes': expected True or False"):
        CheckpointManager(str(tmp_path / "run"), unsafe_single_writer="yes")
