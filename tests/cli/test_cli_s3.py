"""`dist-ckpt copy` local → S3 → local, and `list`/`verify` on S3 (SeaweedFS test server)."""

from __future__ import annotations

from pathlib import Path

import torch
from cli_support import Run, as_json, assert_one_line_error, build_model, cli, cli_in, cli_many

from dist_ckpt import CheckpointManager


def test_copy_local_s3_local_then_verify_list_and_resume(run_dir: Run, s3_uri: str, tmp_path: Path):
    up = cli("copy", run_dir.root, s3_uri, "--json", check_rc=0)
    doc = as_json(up)
    assert [c["destination"] for c in doc["copied"]] == [f"{s3_uri}/step_{s:09d}" for s in (2, 5, 7, 8)]
    assert doc["manifest"]["pointers"] == {"best:acc": 2, "best:loss": 5, "last": 8}

    local2 = tmp_path / "back"
    s3_list, s3_verify, down = cli_many(
        ["list", s3_uri, "--json"],
        ["verify", s3_uri],
        ["copy", f"{s3_uri}/step_000000008", local2],
    )
    local_list = cli_in("list", run_dir.root, "--json")
    assert s3_list.returncode == 0 and local_list.returncode == 0, s3_list.stderr
    strip = lambda d: [{k: v for k, v in c.items() if k != "uri"} for c in d["checkpoints"]]  # noqa: E731
    assert strip(as_json(s3_list)) == strip(as_json(local_list))
    assert as_json(s3_list)["pointers"] == as_json(local_list)["pointers"] == {"last": 8, "best:loss": 5, "best:acc": 2}
    assert s3_verify.returncode == 0 and "4 of 4 checkpoints OK" in s3_verify.stdout, (
        s3_verify.stdout + s3_verify.stderr
    )
    assert down.returncode == 0, down.stderr
    assert f"-> {local2}/step_000000008" in down.stdout and "checksums verified" in down.stdout

    ckpt = local2 / "step_000000008"
    check = cli_in("verify", ckpt, "--json")
    again = cli_in("copy", f"{s3_uri}/step_000000008", s3_uri)
    assert check.returncode == 0 and as_json(check)["ok"] is True, check.stdout
    assert "already committed" in assert_one_line_error(again, 6)

    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with CheckpointManager(str(tmp_path / "resumed"), best={"loss": "min"}) as mgr:
        state = mgr.track(model=model, optimizer=opt, counters={})
        info = mgr.restore(state, which=str(ckpt))
    assert info is not None and info.step == 8 and info.tracker_run_id == "wandb-123"
    for k, v in run_dir.models[8].items():
        assert torch.equal(model.state_dict()[k], v), k
