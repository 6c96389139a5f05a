"""CheckpointManager's options are explicit keyword-only parameters that mirror ManagerConfig
(issue 13: `help(CheckpointManager)` showed only `**options`)."""

from __future__ import annotations

import ast
import inspect
import pydoc
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

import dist_ckpt.config
from dist_ckpt import CheckpointManager, ConfigError, ManagerConfig

NOT_OPTIONS = ("process_group", "backend")  # constructor arguments that are not ManagerConfig fields


def _keyword_parameters() -> list[inspect.Parameter]:
    params = inspect.signature(CheckpointManager).parameters.values()
    return [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in NOT_OPTIONS]


def _field_docs() -> dict[str, str]:
    """ManagerConfig's attribute docstrings (the string after each field), whitespace-normalised."""
    tree = ast.parse(Path(dist_ckpt.config.__file__).read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ManagerConfig"]
    docs = {}
    for node, after in zip(cls.body, cls.body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def test_keyword_parameters_equal_manager_config_fields() -> None:
    params = _keyword_parameters()
    assert [p.name for p in params] == [f.name for f in fields(ManagerConfig)]  # same names, same order
    assert not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(CheckpointManager).parameters.values()
    )
    for p, f in zip(params, fields(ManagerConfig)):
        if f.default is MISSING:  # a default factory (a dict): None in the signature
            assert p.default is None and f.default_factory() == {}, p.name
        else:
            assert p.default == f.default, p.name


def test_every_option_is_documented_in_the_constructor_docstring() -> None:
    doc = " ".join((CheckpointManager.__init__.__doc__ or "").split())
    field_docs = _field_docs()
    assert sorted(field_docs) == sorted(f.name for f in fields(ManagerConfig))  # every field has one
    for name, text in field_docs.items():
        assert f"{name}: {text}" in doc, f"CheckpointManager.__init__ documents {name!r} differently from ManagerConfig"
    shown = pydoc.render_doc(CheckpointManager, renderer=pydoc.plaintext)
    assert "**options" not in shown
    for name in (*NOT_OPTIONS, *field_docs):
        assert f"{name}=" in shown or f"{name}:" in shown, name


@pytest.mark.parametrize(
    ("typo", "suggested"),
    [("kep_last", "keep_last"), ("save_every_steps", "save_every_n_steps"), ("asyncsave", "async_save")],
)
def test_unknown_option_says_did_you_mean(tmp_path: Path, typo: str, suggested: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown option '{typo}' \\(did you mean '{suggested}'\\?\\)"):
        CheckpointManager(str(tmp_path / "run"), **{typo: 3})
    assert not (tmp_path / "run").exists()


def test_options_still_validated_and_kept_in_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keep_last"):
        CheckpointManager(str(tmp_path / "a"), keep_last=0)
    with CheckpointManager(
        str(tmp_path / "b"), keep_last=2, best={"loss": "min"}, backend_options={"fsync": False}
    ) as mgr:
        assert mgr.config == ManagerConfig(keep_last=2, best={"loss": "min"}, backend_options={"fsync": False})
        assert mgr.best == {}
