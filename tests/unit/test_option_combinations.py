"""Options that do not work together yet are refused at construction, naming both."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import ConfigError


def test_incremental_with_a_local_tier_is_refused_naming_both_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        CheckpointManager(str(tmp_path / "run"), incremental=True, local_root=str(tmp_path / "local"))
    assert "incremental=True" in str(err.value) and "local_root" in str(err.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written
