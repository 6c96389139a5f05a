"""The resume flags every training script can share, and what they do.

:func:`add_checkpoint_args` adds ``--ckpt``, ``--resume``, ``--init-from`` and
``--list-checkpoints`` to an argparse parser; ``CheckpointManager.start(state, args)``
(:func:`start`) applies them: it resumes, loads initial weights, or starts fresh, and returns the
:class:`~dist_ckpt.manager_restore.ResumeInfo` (None when training starts at step 0).

Invalid combinations are refused the way argparse refuses bad arguments — one line
``<prog>: error: <message>`` on stderr, exit status 2 — and leave the run root untouched:

- At parse time. argparse has no hook that runs once all arguments are known, so
  :func:`add_checkpoint_args` wraps this parser's ``parse_known_args`` (which ``parse_args``
  calls): once the flags are parsed they are checked against the run root, read-only, before
  the script builds its manager — whose start takes the run's lock, collects garbage and
  reconciles the manifest. ``--list-checkpoints`` prints and exits there too, like
  ``--version``, so listing a run never needs (or waits for) its writer lock. Under torchrun
  every rank checks (each reads the same run) and exits; only rank 0 (``RANK``) prints
  (torchrun itself then reports the failed workers with its own exit status).
- In :func:`start`, again, decided on rank 0 and broadcast so every rank agrees (for a
  namespace built in code, or a run that changed since parsing). There the manager already
  exists: it is closed (its lock released) before every rank exits with status 2, rank 0
  printing the line. :class:`CheckpointArgsError` carries the message until then.

This module prints — the refusal, the listing — because it is the command-line layer, as
``dist_ckpt.cli`` is; the rest of the library only logs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from dist_ckpt import manifest as mf
from dist_ckpt.api import split_checkpoint_uri
from dist_ckpt.errors import CheckpointArgsError, CheckpointNotFound, ConfigError
from dist_ckpt.run_store import RunStore, parse_step_prefix, step_prefix

if TYPE_CHECKING:
    from torch import nn

    from dist_ckpt.manager_listing import CheckpointInfo
    from dist_ckpt.manager_parts import Collective
    from dist_ckpt.manager_restore import LoadedWeights, ResumeInfo
    from dist_ckpt.state import TrainingState
    from storage_backends import Backend

    class StartingManager(Collective, Protocol):
        """What :func:`start` needs of the manager (its public API and rank 0's decisions)."""

        root: str
        backend: Backend

        def checkpoints(self) -> list[CheckpointInfo]: ...
        def restore(self, state: TrainingState, which: Any = "last") -> ResumeInfo | None: ...
        def load_weights(self, module: nn.Module, which: Any = "last", *, name: str | None = None) -> LoadedWeights: ...
        def close(self) -> None: ...


log = logging.getLogger(__name__)

EXIT_USAGE = 2
# The namespace attributes add_checkpoint_args adds: they say how a launch starts, so they are
# no part of the run's config (a restart with another --resume is the same run).
CHECKPOINT_ARGS = ("ckpt", "resume", "init_from", "list_checkpoints")
_SHOW_STEPS = 10

RESUME_HELP = (
    "what to continue from (default: auto). auto: the run's latest checkpoint if it has one, else a fresh "
    "start; last: the latest (an error if there is none); best:<metric>: the best checkpoint by that metric; "
    "a step (1200 or step_000001200); the path or URI of any checkpoint (another run's, to branch from it); "
    "none: a fresh start (an error if --ckpt already holds checkpoints)"
)
INIT_HELP = (
    "start fresh (step 0, new optimizer, new progress) from the model weights of: a checkpoint "
    "(RUN/step_000001200, path or s3:// URI), a .safetensors file, or a Hugging Face folder (config.json "
    "with model.safetensors, or the shards model.safetensors.index.json lists). Refused when --ckpt already "
    "holds checkpoints, unless --resume auto is given explicitly: then a restarted job resumes its own latest "
    "checkpoint"
)


def add_checkpoint_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add ``--ckpt``, ``--resume``, ``--init-from`` and ``--list-checkpoints`` to ``parser``
    (in an argument group, which is returned) and check them whenever it parses (see the
    module docstring). Pass the parsed namespace to ``CheckpointManager.start(state, args)``."""
    group = parser.add_argument_group(
        "checkpoints (dist_ckpt)",
        "Invalid combinations exit with status 2 and leave the run root untouched.",
    )
    group.add_argument(
        "--ckpt",
        required=True,
        metavar="RUN",
        help="run root: a directory, or s3://bucket/prefix (where checkpoints are saved)",
    )
    group.add_argument("--resume", default=None, metavar="WHICH", help=RESUME_HELP)
    group.add_argument("--init-from", default=None, metavar="SOURCE", help=INIT_HELP)
    group.add_argument(
        "--list-checkpoints",
        action="store_true",
        help="print the run's checkpoints (what `dist-ckpt list RUN` prints) and exit",
    )
    parse_known_args = parser.parse_known_args

    def parse_and_check(
        args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = parse_known_args(args, namespace)
        _check_parsed(parser, parsed)
        return parsed, rest

    parser.parse_known_args = parse_and_check  # type: ignore[method-assign]
    return group


# -- what the flags mean --------------------------------------------------------------------
@dataclass(frozen=True)
class RunSummary:
    """The committed checkpoints of the run root, as the checks need them."""

    uri: str
    steps: tuple[int, ...]
    pointers: Mapping[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """``"steps 5, 10 (best:loss=5, last=10)"``: what exists, for an error message."""
        if not self.steps:
            return "no checkpoints"
        shown = ", ".join(str(s) for s in self.steps[-_SHOW_STEPS:])
        steps = (
            f"steps {shown}"
            if len(self.steps) <= _SHOW_STEPS
            else f"{len(self.steps)} checkpoints, the latest steps {shown}"
        )
        names = ", ".join(f"{k}={v}" for k, v in sorted(self.pointers.items()))
        return f"{steps} ({names})" if names else steps


@dataclass(frozen=True)
class StartPlan:
    """What :func:`start` does: ``"fresh"``, ``"resume"`` (``which`` goes to ``restore``) or
    ``"init"`` (weights from ``source``, a ``"checkpoint"``, ``"safetensors"`` file or ``"hf"``
    folder)."""

    action: str
    which: str | int | None = None
    source: str | None = None
    source_kind: str | None = None


def plan_start(resume: str | None, init_from: str | None, run: RunSummary) -> StartPlan:
    """What ``--resume``/``--init-from`` ask of ``run`` (``resume=None``: not given, auto).
    Raises :class:`CheckpointArgsError` for a combination the run cannot do. Reads only."""
    kind, value = _parse_resume(resume)
    if init_from is not None and kind not in ("auto", "none"):
        raise CheckpointArgsError(
            f"--resume {resume} and --init-from {init_from} cannot be combined: --resume restores a whole training "
            "state (weights, optimizer, progress), --init-from starts fresh from weights only; pass one of them"
        )
    if init_from is not None:
        if run.steps and kind == "auto" and resume is not None:
            return StartPlan("resume", mf.LAST)  # explicit --resume auto: a restarted job continues its own run
        if run.steps:
            raise CheckpointArgsError(
                f"--init-from {init_from}: {run.uri} already holds checkpoints ({run.describe()}); --init-from "
                "starts a new run: use a new run root (--ckpt), or --resume to continue this one (--resume auto "
                "--init-from ... does both: the weights at the first start, the run's latest after a restart)"
            )
        source_kind, source = _classify_init_source(init_from)
        return StartPlan("init", source=source, source_kind=source_kind)
    if kind == "none":
        if run.steps:
            raise CheckpointArgsError(
                f"--resume none starts a fresh run, but {run.uri} already holds checkpoints ({run.describe()}) and a "
                "run's steps only go forward: use a new run root (--ckpt), or --resume auto|last to continue this one"
            )
        return StartPlan("fresh")
    if kind == "auto":
        return StartPlan("resume", mf.LAST) if run.steps else StartPlan("fresh")
    if kind == "last":
        if not run.steps:
            raise CheckpointArgsError(
                f"--resume last: {run.uri} has no checkpoint to resume; --resume auto starts fresh when there is none"
            )
        return StartPlan("resume", mf.LAST)
    if kind == "best":
        if value not in run.pointers:
            raise CheckpointArgsError(
                f"--resume {resume}: {run.uri} has no {value} checkpoint; it has {run.describe()}"
            )
        return StartPlan("resume", str(value))
    if kind == "step":
        return StartPlan("resume", _step_of_run(resume, int(value), run))  # type: ignore[arg-type]
    return StartPlan("resume", _checkpoint_uri(str(resume), run))


def _parse_resume(resume: str | None) -> tuple[str, str | int | None]:
    if resume is None or resume == "auto":
        return "auto", None
    if resume in ("none", "last"):
        return resume, None
    if resume.startswith(mf.BEST_PREFIX) and len(resume) > len(mf.BEST_PREFIX):
        return "best", resume
    if resume.isdigit():
        return "step", int(resume)
    if (step := parse_step_prefix(resume)) is not None:
        return "step", step
    if "/" in resume:
        return "uri", resume
    raise CheckpointArgsError(
        f"--resume {resume}: expected auto, last, best:<metric>, a step (1200 or step_000001200), the path or URI "
        "of a checkpoint, or none"
    )


def _step_of_run(flag: str | None, step: int, run: RunSummary) -> int:
    if step not in run.steps:
        raise CheckpointArgsError(
            f"--resume {flag}: {run.uri} has no checkpoint of step {step}; it has {run.describe()}"
        )
    return step


def _checkpoint_uri(uri: str, run: RunSummary) -> str | int:
    """A checkpoint path/URI: this run's step (by number), or another run's committed checkpoint."""
    uri = uri.rstrip("/")
    if not uri.startswith("s3://"):
        uri = os.path.abspath(uri)
    try:
        root, name = split_checkpoint_uri(uri)
    except ConfigError as e:
        raise CheckpointArgsError(f"--resume {uri}: {e}") from e
    if root == run.uri and (step := parse_step_prefix(name)) is not None:
        return _step_of_run(uri, step, run)
    _located_checkpoint("--resume", uri)
    return uri


def _located_checkpoint(flag: str, uri: str) -> str:
    """``uri`` when it names a committed checkpoint; a refusal saying what is there otherwise."""
    from dist_ckpt.checkpoint_view import locate

    try:
        kind, backend, prefix = locate(uri)
    except (CheckpointNotFound, ConfigError) as e:
        raise CheckpointArgsError(f"{flag} {uri}: {e}") from e
    if kind == "run":
        entries = RunStore(backend).committed_entries()
        latest = f", e.g. {backend.uri}/{step_prefix(entries[-1].step)} (its latest)" if entries else ""
        raise CheckpointArgsError(
            f"{flag} {uri}: this is a run root, not one checkpoint; name a checkpoint folder{latest}"
        )
    return f"{backend.uri}/{prefix}"


def _classify_init_source(source: str) -> tuple[str, str]:
    from dist_ckpt.init_weights import find_weight_files

    if not source.startswith("s3://"):
        try:
            files = find_weight_files(source)
        except ConfigError as e:
            raise CheckpointArgsError(f"--init-from {source}: {e}") from e
        if files is not None:
            return files.kind, files.source
        if os.path.isfile(source):
            raise CheckpointArgsError(
                f"--init-from {source}: a file, but not a .safetensors file; expected a checkpoint folder, a "
                ".safetensors file or a Hugging Face folder (config.json + model.safetensors)"
            )
        source = os.path.abspath(source)
    return "checkpoint", _located_checkpoint("--init-from", source)


def summarize_run(root: str) -> RunSummary:
    """The run root's committed checkpoints and pointers, read without writing anything."""
    from storage_backends import open_backend

    try:
        backend = open_backend(root)
    except ValueError as e:
        raise CheckpointArgsError(f"--ckpt {root}: {e}") from e
    manifest = RunStore(backend).reconciled_manifest({}, write=False)
    return RunSummary(backend.uri, tuple(manifest.steps()), dict(manifest.pointers))


# -- parse time -----------------------------------------------------------------------------
def _rank_zero_by_env() -> bool:
    """Before the process group exists, torchrun's ``RANK`` says which process prints."""
    return os.environ.get("RANK", "0") == "0"


def _check_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if getattr(args, "ckpt", None) is None:
        return  # a parse that stopped early (e.g. a subcommand without these flags)
    if args.list_checkpoints:
        parser.exit(_list_checkpoints(args.ckpt, show=_rank_zero_by_env()))
    if args.resume in (None, "auto") and args.init_from is None:
        return  # the default always works: no need to read the run here
    try:
        plan_start(args.resume, args.init_from, summarize_run(args.ckpt))
    except CheckpointArgsError as e:
        _refuse(parser.prog, e, show=_rank_zero_by_env())


def _list_checkpoints(root: str, *, show: bool) -> int:
    """What ``dist-ckpt list root`` prints and its exit status."""
    from dist_ckpt.cli import main

    if show:
        return main(["list", root])
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        return main(["list", root])


def _refuse(prog: str, error: CheckpointArgsError, *, show: bool) -> NoReturn:
    if show:
        message = " ".join(str(error).split())
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE) from error


# -- CheckpointManager.start ----------------------------------------------------------------
def start(mgr: StartingManager, state: TrainingState, args: argparse.Namespace) -> ResumeInfo | None:
    """Apply the flags of ``args`` (see :func:`add_checkpoint_args`) to ``state``; every rank
    calls it. Returns the ``ResumeInfo`` of the checkpoint resumed, or None when training
    starts at step 0 (fresh, or from ``--init-from`` weights). Exits with status 2 on every
    rank (one line on rank 0's stderr) for a combination the run cannot do."""
    resume, init_from = getattr(args, "resume", None), getattr(args, "init_from", None)
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"  # argparse's default prog
    if getattr(args, "list_checkpoints", False):
        status = mgr._agree(lambda: _list_checkpoints(mgr.root, show=True))
        mgr.close()
        raise SystemExit(status)

    def decide() -> StartPlan:
        infos = mgr.checkpoints()
        pointers = {name: c.step for c in infos for name in c.pointers}
        return plan_start(resume, init_from, RunSummary(mgr.backend.uri, tuple(c.step for c in infos), pointers))

    try:
        plan = mgr._agree(decide)
    except CheckpointArgsError as e:
        mgr.close()  # releases the run's lock: the run root is left as it was found
        _refuse(prog, e, show=mgr.rank == 0)
    return _apply(mgr, state, plan)


def _apply(mgr: StartingManager, state: TrainingState, plan: StartPlan) -> ResumeInfo | None:
    if plan.action == "resume":
        info = mgr.restore(state, plan.which)
        if info is not None and mgr.rank == 0:
            log.info("resumed %s at step %d", info.uri, info.step)
        return info
    if plan.action == "init":
        models = state.models
        if not models:
            raise ConfigError(f"--init-from {plan.source}: no model is tracked to load the weights into")
        if plan.source_kind == "checkpoint":
            for name, module in models.items():
                # one tracked model takes the checkpoint's only model whatever its name
                mgr.load_weights(module, str(plan.source), name=None if len(models) == 1 else name)
        else:
            from dist_ckpt.init_weights import find_weight_files, load_weight_files

            files = find_weight_files(str(plan.source))
            if files is None:  # gone since it was checked
                raise CheckpointNotFound(
                    f"--init-from {plan.source}: no longer a .safetensors file or Hugging Face folder"
                )
            load_weight_files(files, models)
        if mgr.rank == 0:
            log.info("fresh start of %s from the weights of %s (%s)", mgr.root, plan.source, ", ".join(models))
        return None
    if mgr.rank == 0:
        log.info("fresh start of %s", mgr.root)
    return None
