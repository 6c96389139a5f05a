"""Each invalid combination of the resume flags exits with status 2 and one line on stderr, and
leaves the run root as it was (every file and its content; a missing root stays missing).

Checked where the script meets them: when the parser parses (before any manager exists), and
in ``mgr.start`` for a namespace built in code (after the manager's start; every rank agrees).
The user's bug — ``--resume last --fresh-start-from X`` silently accepted by the examples —
is reproduced with examples/train_ddp.py itself.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from _flags_job import build_parser
from flags_support import EXAMPLES, committed_steps, make_run, run_script, snapshot, start_with
from support.dist import run_ranks

from dist_ckpt import CheckpointManager

ONE_LINE = re.compile(r"^\S+: error: [^\n]+\n$")
A_HAS = "steps 0, 1, 2, 3, 4, 5 (best:score=3, last=5)"

# (flags, which root: "a" = run A with steps 0-5, "new" = a root that does not exist, the
# fragments the message must hold). {a} is run A's path, {src} a checkpoint to init from.
INVALID = {
    "resume-last-with-init-from": (
        ["--resume", "last", "--init-from", "{src}"],
        "new",
        ["--resume last and --init-from", "cannot be combined", "pass one of them"],
    ),
    "resume-step-with-init-from": (["--resume", "3", "--init-from", "{src}"], "a", ["--resume 3 and --init-from"]),
    "resume-best-with-init-from": (
        ["--init-from", "{src}", "--resume", "best:score"],
        "a",
        ["--resume best:score and --init-from"],
    ),
    "resume-uri-with-init-from": (["--resume", "{src}", "--init-from", "{src}"], "new", ["cannot be combined"]),
    "resume-missing-step": (["--resume", "7"], "a", ["has no checkpoint of step 7", A_HAS]),
    "resume-missing-step-folder": (["--resume", "step_000000009"], "a", ["has no checkpoint of step 9", A_HAS]),
    "resume-step-on-new-run": (["--resume", "3"], "new", ["has no checkpoint of step 3", "it has no checkpoints"]),
    "resume-untracked-best": (["--resume", "best:acc"], "a", ["has no best:acc checkpoint", A_HAS]),
    "resume-best-on-new-run": (["--resume", "best:score"], "new", ["has no best:score checkpoint", "no checkpoints"]),
    "init-from-into-a-run-with-checkpoints": (
        ["--init-from", "{src}"],
        "a",
        ["already holds checkpoints", A_HAS, "use a new run root", "--resume"],
    ),
    "resume-none-into-a-run-with-checkpoints": (
        ["--resume", "none"],
        "a",
        ["already holds checkpoints", "new run root"],
    ),
    "resume-last-on-new-run": (["--resume", "last"], "new", ["no checkpoint to resume", "--resume auto"]),
    "resume-uncommitted-path": (["--resume", "{a}/step_000000009"], "new", ["step_000000009"]),
    "resume-a-run-root": (["--resume", "{a}/"], "new", ["run root, not one checkpoint", "step_000000005"]),
    "init-from-missing-path": (["--init-from", "{a}/nothing-here"], "new", ["--init-from", "nothing-here"]),
    "init-from-a-run-root": (["--init-from", "{a}"], "new", ["run root, not one checkpoint"]),
    "resume-unknown-word": (["--resume", "latest"], "a", ["expected auto, last, best:<metric>"]),
}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("invalid") / "a"
    make_run(root, 6)
    assert committed_steps(root) == [0, 1, 2, 3, 4, 5]
    return root


def _case(name: str, run_a: Path, tmp_path: Path) -> tuple[list[str], Path, list[str]]:
    flags, which, fragments = INVALID[name]
    src = str(run_a / "step_000000005")
    flags = [f.format(a=run_a, src=src) for f in flags]
    return flags, (run_a if which == "a" else tmp_path / "new"), [f.format(a=run_a) for f in fragments]


def _assert_refused(code: object, err: str, fragments: list[str]) -> None:
    assert code == 2, err
    assert ONE_LINE.match(err), f"expected one line 'prog: error: ...', got {err!r}"
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


@pytest.mark.parametrize("name", sorted(INVALID))
def test_refused_when_parsed(name: str, run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags, root, fragments = _case(name, run_a, tmp_path)
    before, before_a = snapshot(root), snapshot(run_a)
    with pytest.raises(SystemExit) as exit_info:
        build_parser(prog="job.py").parse_args(["--ckpt", str(root), *flags, "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    _assert_refused(exit_info.value.code, err, fragments)
    assert err.startswith("job.py: error: ")
    assert snapshot(root) == before and snapshot(run_a) == before_a  # a missing root is still missing


@pytest.mark.parametrize("name", sorted(INVALID))
def test_refused_by_start(name: str, run_a: Path, tmp_path: Path) -> None:
    flags, root, fragments = _case(name, run_a, tmp_path)
    parsed = argparse.ArgumentParser()
    parsed.add_argument("--resume")
    parsed.add_argument("--init-from")
    args = parsed.parse_args(flags)
    before, before_a = snapshot(root), snapshot(run_a)
    code, err = start_with(0, 1, str(root), args.resume, args.init_from)
    _assert_refused(code, err, fragments)
    assert snapshot(run_a) == before_a
    if before is not None:
        assert snapshot(root) == before  # its lock released again
    else:
        # start() writes nothing; the manager it was called on had started already and, on a new
        # root, wrote what every manager start writes there: an empty manifest. (The check when
        # the parser parses comes before any manager, so there the root is not even created.)
        with CheckpointManager(str(tmp_path / "reference"), best={"score": "max"}, save_every_n_steps=1):
            pass
        after = snapshot(root)
        assert after == snapshot(tmp_path / "reference") and after is not None and set(after) == {"manifest.json"}


@pytest.mark.parametrize("name", ["resume-missing-step", "init-from-into-a-run-with-checkpoints"])
def test_every_rank_exits_2_and_rank_0_says_why(name: str, run_a: Path, tmp_path: Path) -> None:
    flags, root, fragments = _case(name, run_a, tmp_path)
    resume = flags[flags.index("--resume") + 1] if "--resume" in flags else None
    init_from = flags[flags.index("--init-from") + 1] if "--init-from" in flags else None
    before = snapshot(root)
    results = run_ranks(start_with, 2, str(root), resume, init_from, timeout=120)
    _assert_refused(results[0][0], results[0][1], fragments)
    assert results[1] == (2, "")  # the same decision, printed once
    assert snapshot(root) == before


def test_examples_refuse_resume_last_with_fresh_start_from(tmp_path: Path) -> None:
    """The bug: examples/train_ddp.py took `--resume last --fresh-start-from X` and started fresh."""
    source = tmp_path / "source"
    trained = run_script(EXAMPLES / "train_ddp.py", ["--ckpt", str(source), "--steps", "2", "--save-every", "1"])
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "run"
    for flag in ("--fresh-start-from", "--init-from"):
        proc = run_script(
            EXAMPLES / "train_ddp.py",
            ["--ckpt", str(run), "--steps", "2", "--resume", "last", flag, str(source / "step_000000001")],
        )
        _assert_refused(proc.returncode, proc.stderr, ["--resume last and --init-from", "cannot be combined"])
        assert proc.stderr.startswith("train_ddp.py: error: ")
        assert not run.exists()


def _objects(uri: str) -> dict[str, bytes]:
    from storage_backends import open_backend

    backend = open_backend(uri)
    return {o.key: backend.read(o.key) for o in backend.list("")}


def test_refused_on_an_s3_run_without_touching_it(
    s3_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(s3_uri, 4)  # type: ignore[arg-type]
    before = _objects(s3_uri)
    assert {k for k in before if k.endswith("/COMMITTED")} == {f"step_00000000{i}/COMMITTED" for i in range(4)}
    cases = [
        (["--resume", "9"], ["has no checkpoint of step 9", "steps 0, 1, 2, 3 (best:score=3, last=3)"]),
        (["--init-from", f"{s3_uri}/step_000000002"], ["already holds checkpoints", "use a new run root"]),
        (["--resume", f"{s3_uri}/step_000000007"], ["step_000000007"]),
    ]
    for flags, fragments in cases:
        with pytest.raises(SystemExit) as exit_info:
            build_parser(prog="job.py").parse_args(["--ckpt", s3_uri, *flags, "--report", str(tmp_path / "r.json")])
        _assert_refused(exit_info.value.code, capsys.readouterr().err, [s3_uri, *fragments])
        code, err = start_with(0, 1, s3_uri, *(flags[1], None) if flags[0] == "--resume" else (None, flags[1]))
        _assert_refused(code, err, [s3_uri, *fragments])
        assert _objects(s3_uri) == before
