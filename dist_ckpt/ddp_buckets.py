"""Exact resume with DDP's defaults: the gradient-bucket layout travels with the checkpoint.

``DistributedDataParallel`` reduces gradients in buckets. It starts with a layout in parameter
order and, after a process's first backward, *rebuilds* it once in the order the gradients
became ready (``Reducer::rebuild_buckets``). With more than 2 ranks, gloo's (and NCCL's) ring
all-reduce sums each element in an order that depends on its offset in the bucket, so the
first step of a resumed process — still on the initial layout — differs in the last bit from
the uninterrupted run, which had long switched to the rebuilt one.

So every checkpoint records, per DDP module, the bucket layout (parameter names per bucket, in
bucket order) once DDP has settled it, and ``restore`` re-creates DDP's reducer with that
layout *already rebuilt*, before the first backward: exactly what ``DDP.__setstate__`` does to
create a reducer (``_ddp_init_helper``), with the parameters handed over in the saved order,
followed by the reducer's own one-time rebuild (``_push_all_rebuilt_params`` +
``_rebuild_buckets``), which recomputes the saved buckets from that order with the same size
limits and marks the reducer as rebuilt, so it never rebuilds again. The result is read back
and compared with the saved layout; any difference is warned about, never silent.

DDP has no public API for any of this: every use of its internals is in this module, which
``tests/distributed/test_ddp_buckets.py`` checks against torch 2.13.0 (``CHECKED_TORCH``).
Communication hooks registered with ``register_comm_hook`` are registered again on the new
reducer. Where exactness cannot be provided — the world size or a bucket setting changed, a
built-in comm hook, DDP's ``mixed_precision``, the compiled-autograd "python_reducer", or a
``static_graph`` checkpoint taken between its first and second iteration — ``restore`` leaves
DDP to rebuild its layout as it would and warns once (on rank 0) naming the reason.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_ckpt.errors import CorruptCheckpoint

log = logging.getLogger(__name__)

CHECKED_TORCH = "2.13.0"  # the torch version whose DDP internals this module was checked against
_FORMAT = 1
_COMPILE_WRAPPER = "_orig_mod"  # torch.compile's OptimizedModule holds the compiled module here
# The DDP settings that decide the layout DDP computes; a resume with other values gets DDP's own.
_LAYOUT_SETTINGS = (
    "bucket_bytes_cap",
    "first_bucket_bytes_cap",
    "bucket_bytes_cap_list",
    "find_unused_parameters",
    "static_graph",
)
# A rebuilt layout never changes while its reducer lives: remembered per DDP module, with the id of
# the reducer it belongs to (not the reducer itself, which would outlive a replaced one).
_settled: weakref.WeakKeyDictionary[DistributedDataParallel, tuple[int, BucketLayout]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class BucketLayout:
    """One DDP module's gradient buckets as saved in a checkpoint (JSON in the progress record)."""

    world_size: int
    buckets: tuple[tuple[str, ...], ...]  # parameter names (relative to ddp.module), per bucket, in bucket order
    rebuilt: bool  # DDP has rebuilt its buckets: this layout is final for the rest of the run
    static_graph_pending: bool  # static_graph: the first iteration ran, the rebuild is still to come
    settings: Mapping[str, Any]
    torch_version: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "world_size": self.world_size,
            "buckets": [list(b) for b in self.buckets],
            "rebuilt": self.rebuilt,
            "static_graph_pending": self.static_graph_pending,
            "settings": dict(self.settings),
            "torch_version": self.torch_version,
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> BucketLayout:
        try:
            if doc["format"] != _FORMAT:
                raise ValueError(f"format {doc['format']!r}, this dist_ckpt reads format {_FORMAT}")
            buckets = tuple(tuple(_str(n) for n in b) for b in doc["buckets"])
            return cls(
                int(doc["world_size"]),
                buckets,
                bool(doc["rebuilt"]),
                bool(doc["static_graph_pending"]),
                dict(doc["settings"]),
                str(doc["torch_version"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpoint(f"{where}: the DDP bucket layout is malformed ({type(e).__name__}: {e})") from e


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a parameter name must be a string, got {type(value).__name__}")
    return value


# -- finding DDP modules ------------------------------------------------------------------------
def find_ddp_modules(models: Mapping[str, nn.Module]) -> dict[str, DistributedDataParallel]:
    """Every DDP module among the tracked models, keyed ``<tracked name>`` or
    ``<tracked name>.<path>`` — the same key whether or not the model is ``torch.compile``d."""
    found: dict[str, DistributedDataParallel] = {}
    for name, model in models.items():
        for path, module in model.named_modules():
            if isinstance(module, DistributedDataParallel):
                inner = _without_compile_wrapper(path)
                found[f"{name}.{inner}" if inner else name] = module
    return found


# -- capture --------------------------------------------------------------------------------------
def capture(models: Mapping[str, nn.Module]) -> dict[str, Any]:
    """The bucket layout of every DDP module among ``models`` (JSON). Every rank calls it at the
    same point (it may settle a pending rebuild, a broadcast on DDP's process group)."""
    return {key: _capture_one(ddp).to_json() for key, ddp in find_ddp_modules(models).items()}


def _capture_one(ddp: DistributedDataParallel) -> BucketLayout:
    if not hasattr(ddp, "reducer") or _never_rebuilds(ddp):  # nothing to restore: not read (no allocation)
        return BucketLayout(_world(ddp), (), False, False, _settings(ddp), torch.__version__)
    cached = _settled.get(ddp)
    if cached is not None and cached[0] == id(ddp.reducer) and ddp._has_rebuilt_buckets:
        return cached[1]  # final once rebuilt (reading it allocates a zero copy of every bucket)
    # A backward has run and DDP would rebuild its buckets at the next forward: do it now, the
    # same call on the same state, so the checkpoint holds the layout every later step uses.
    if ddp.reducer._rebuild_buckets():
        ddp._has_rebuilt_buckets = True
    rebuilt = bool(ddp._has_rebuilt_buckets)
    pending = bool(ddp.static_graph and ddp._static_graph_delay_allreduce_enqueued and not rebuilt)
    layout = BucketLayout(_world(ddp), _read_buckets(ddp), rebuilt, pending, _settings(ddp), torch.__version__)
    if rebuilt:
        _settled[ddp] = (id(ddp.reducer), layout)
    return layout


def _never_rebuilds(ddp: DistributedDataParallel) -> bool:
    """find_unused_parameters without static_graph: DDP keeps its initial layout for good."""
    return bool(ddp.find_unused_parameters and not ddp.static_graph)


def _parameters_by_name(ddp: DistributedDataParallel) -> dict[str, nn.Parameter]:
    """``ddp.module``'s parameters by name, without torch.compile's wrapper segment (a layout saved
    by a compiled model names the same parameters as one saved without compiling)."""
    return {_without_compile_wrapper(n): p for n, p in ddp.module.named_parameters()}


def _without_compile_wrapper(path: str) -> str:
    return ".".join(p for p in path.split(".") if p and p != _COMPILE_WRAPPER)


def _read_buckets(ddp: DistributedDataParallel) -> tuple[tuple[str, ...], ...]:
    names = {id(p): n for n, p in _parameters_by_name(ddp).items()}
    return tuple(tuple(names[id(p)] for p in b.parameters()) for b in ddp.reducer._get_zeros_like_grad_buckets())


def _world(ddp: DistributedDataParallel) -> int:
    return int(ddp.process_group.size())


def _settings(ddp: DistributedDataParallel) -> dict[str, Any]:
    cfg = ddp._bucket_config
    return {
        "bucket_bytes_cap": int(cfg.bucket_bytes_cap),
        "first_bucket_bytes_cap": int(cfg.first_bucket_bytes_cap),
        "bucket_bytes_cap_list": [int(c) for c in cfg.per_bucket_bytes_caps],
        "find_unused_parameters": bool(ddp.find_unused_parameters),
        "static_graph": bool(ddp.static_graph),
        "gradient_as_bucket_view": bool(ddp.gradient_as_bucket_view),
    }


# -- restore --------------------------------------------------------------------------------------
def restore(
    models: Mapping[str, nn.Module], saved: Mapping[str, Any], *, saved_world: int, rank: int, where: str
) -> None:
    """Give every DDP module among ``models`` the bucket layout ``saved`` recorded (before the
    first backward). Every rank calls it (the reducer's rebuild broadcasts). Warns once, on rank
    0, for each reason a layout is not restored."""
    reasons: list[str] = []
    for key, ddp in find_ddp_modules(models).items():
        reason = _restore_one(ddp, saved.get(key), saved_world, f"{where}, DDP module {key!r}")
        if reason is not None and reason not in reasons:
            reasons.append(reason)
    if rank == 0:
        for reason in reasons:
            warnings.warn(reason, stacklevel=3)
            log.warning(reason)


def _restore_one(ddp: DistributedDataParallel, doc: Any, saved_world: int, where: str) -> str | None:
    """Restore one module's layout; the warning to give instead, or None."""
    world = _world(ddp)
    if saved_world != world:
        return (
            f"world size changed ({saved_world} -> {world} ranks): DDP rebuilds its gradient buckets as it "
            "would in a new run, so the gradient all-reduce sums in another order and the resumed run is "
            "not bit-exact with one that kept the old world size (the state loaded is the saved state)."
        )
    if not hasattr(ddp, "reducer") or _never_rebuilds(ddp):
        return None  # no buckets, or DDP never rebuilds them: the layout is a function of the model
    if doc is None:
        if world <= 2:
            return None  # a sum of two terms does not depend on their order
        return (
            f"{where}: the checkpoint holds no bucket layout for this DDP module (saved by an older dist_ckpt, "
            "or without DDP): the first steps after the resume all-reduce with DDP's initial layout and are "
            "not bit-exact with an uninterrupted run."
        )
    layout = BucketLayout.from_json(doc, where)
    if not layout.rebuilt and not layout.static_graph_pending:
        return None  # saved before any backward: the resumed process goes through the same rebuild
    obstacle = _obstacle(ddp, layout)
    if obstacle is not None:
        return f"{where}: {obstacle}"
    by_name = _parameters_by_name(ddp)
    _recreate_reducer(ddp, [by_name[n] for b in layout.buckets for n in b])
    result = _read_buckets(ddp)
    if result != layout.buckets:
        return (
            f"{where}: DDP rebuilt a bucket layout that differs from the saved one (an environment setting "
            f"such as DDP_SET_LAST_BUCKET_CAP, or a torch other than {CHECKED_TORCH} / the saving run's "
            f"{layout.torch_version}); the resume is not bit-exact."
        )
    _settled[ddp] = (id(ddp.reducer), BucketLayout(world, result, True, False, _settings(ddp), torch.__version__))
    return None


def _obstacle(ddp: DistributedDataParallel, layout: BucketLayout) -> str | None:
    """Why the saved layout cannot be re-established exactly, or None."""
    not_exact = "DDP rebuilds its bucket layout as it would, and the first steps after the resume are not bit-exact"
    if layout.static_graph_pending:
        return (
            "static_graph=True and the checkpoint was taken after DDP's first iteration, before its bucket "
            "rebuild (which follows the second backward): the resumed run rebuilds one step later than the "
            "uninterrupted one and is not bit-exact; checkpoints of later steps are."
        )
    if ddp._use_python_reducer:
        return f"torch._dynamo.config.optimize_ddp='python_reducer' (compiled autograd) is set: {not_exact}."
    if ddp.mixed_precision is not None:
        return f"DistributedDataParallel(mixed_precision=...) is set: {not_exact}."
    if not ddp._comm_hooks and ddp._get_ddp_logging_data().get("comm_hook"):
        return f"a built-in DDP communication hook (_register_builtin_comm_hook) is registered: {not_exact}."
    current = _settings(ddp)
    changed = [s for s in _LAYOUT_SETTINGS if layout.settings.get(s) != current[s]]
    if changed:
        detail = ", ".join(f"{s}={layout.settings.get(s)!r} -> {current[s]!r}" for s in changed)
        return f"DDP settings changed since the checkpoint ({detail}): {not_exact}."
    reduced = {id(p) for p in ddp._build_params_for_reducer()[0]}
    names = sorted(n for b in layout.buckets for n in b)
    if names != sorted(n for n, p in _parameters_by_name(ddp).items() if id(p) in reduced):
        return f"the model's parameters differ from those the saved layout names: {not_exact}."
    return None


def _recreate_reducer(ddp: DistributedDataParallel, ordered: list[nn.Parameter]) -> None:
    """A new reducer over ``ordered`` (the saved bucket order), rebuilt at once from that order."""
    params, sparse = ddp._build_params_for_reducer()
    sparse_of = {id(p): s for p, s in zip(params, sparse)}
    ddp._ddp_init_helper(
        ordered, [sparse_of[id(p)] for p in ordered], ddp._build_debug_param_to_name_mapping(ordered), ddp.static_graph
    )
    if ddp.static_graph:  # as DDP.__setstate__ does; the new reducer starts at its first iteration
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
        ddp._static_graph_delay_allreduce_enqueued = False
    for hook, state in ddp._comm_hooks:  # as register_comm_hook does, on the new reducer
        ddp.logger._set_comm_hook_name(hook.__qualname__)
        torch.distributed._register_comm_hook(ddp.reducer, state, hook)
    ddp.reducer._push_all_rebuilt_params()
    ddp.reducer._rebuild_buckets()  # a broadcast of the bucket indices (identical on every rank)
    ddp._has_rebuilt_buckets = True
