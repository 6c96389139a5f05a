"""Under torchrun an error surfaces once per rank and a warning once per job (issue 13).

Before: a failed restore printed its message three times per rank (our error, then DCP's
CheckpointException repeating every rank's traceback and message as the cause), and every
rank printed the same warnings."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.dist import RanksFailed, run_torchrun

SCRIPT = Path(__file__).with_name("_once_per_job.py")


def test_error_once_per_rank_and_warning_once_per_job(tmp_path: Path) -> None:
    with pytest.raises(RanksFailed) as failed:
        run_torchrun(SCRIPT, 2, str(tmp_path / "run"), timeout=240)
    out = failed.value.failures[-1]
    assert out.count("rank 0 resumed") == out.count("rank 1 resumed") == 1, out  # both got through the warning phase
    # the note that no data loader is tracked: once per job too
    assert out.count("restore(): no data loader is tracked") == 1, out

    # the warning: once per job (rank 0), through warnings and through logging
    assert out.count("UserWarning: run config changed since the checkpoint: lr: 0.1 -> 0.2") == 1, out
    assert out.count("LOG WARNING dist_ckpt.resume: run config changed since the checkpoint: lr: 0.1 -> 0.2") == 1, out

    # the error: our own exception, once per rank, naming the changed config key ...
    assert (
        out.count("dist_ckpt.errors.IncompatibleCheckpoint: the checkpoint does not fit the state being loaded") == 2
    ), out
    assert out.count("does not fit the state being loaded") == 2, out
    assert out.count("The run config changed since this checkpoint: hidden: 4 -> 8") == 2, out
    assert out.count("model.weight: checkpoint shape [4, 3], state shape [8, 3]") == 2, out
    # ... caused by DCP's report in one line per rank, not its per-rank tracebacks
    assert out.count("dist_ckpt.dcp_errors.RankFailures: DCP reported rank 0: IncompatibleCheckpoint") == 2, out
    assert "Traceback (most recent call last): (RANK" not in out, out
    assert "CheckpointException ranks" not in out, out
