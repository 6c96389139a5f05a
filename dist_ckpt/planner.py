"""DCP planners that store non-tensor values as JSON and check keys and shapes on load.

DCP's default planners ``torch.save`` non-tensor values and ``torch.load`` them back, which
unpickles whatever a checkpoint file holds. Ours encode them with
:mod:`dist_ckpt.format.json_values` and decode them without ever calling pickle. Every value
is encoded in ``set_up_planner``, so an unsupported one fails on every rank before a byte is
written.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, WriteItem, WriteItemType

from dist_ckpt import compact_plan
from dist_ckpt.dcp_internals import duplicated_flatten_key, set_element
from dist_ckpt.errors import IncompatibleCheckpoint, UnsupportedValue
from dist_ckpt.format import json_values
from dist_ckpt.format.dcp_view import narrow_for

_MAX_LISTED = 20


class JsonSavePlanner(DefaultSavePlanner):
    """Saves tensors as DCP does and every other value as tagged JSON."""

    def __init__(
        self, *, spread: frozenset[str] = frozenset(), agree: Callable[[str | None], bool] | None = None, **kwargs: Any
    ):
        # A replicated tensor is written by rank 0, not by whichever rank DCP's size balancing
        # picks: replicas can differ (BatchNorm running stats after DDP's last forward are each
        # rank's own; DDP broadcasts rank 0's at the next forward), and an exact resume needs
        # the copy the uninterrupted run goes on with. Sharded (FSDP2) state is unaffected.
        # Except ``spread``: keys identical on every rank (DDP parameters and their optimizer
        # state), written by all ranks in balanced parts (dist_ckpt/spread_writes.py).
        kwargs.setdefault("dedup_save_to_lowest_rank", True)
        super().__init__(**kwargs)
        self._spread = spread
        self._encoded: dict[str, bytes] = {}
        self._kept: tuple[WriteItem, ...] = ()  # items a split rule describes: not sent (compact_plan)
        self.ruled_fqns: frozenset[str] = frozenset()  # read by DistCkptWriter: no WriteResult per chunk
        self.coordinator_items: int | None = None  # items the coordinator was sent (tests, benchmark)
        # collective: do all ranks hold the same unruled items (compact_plan.agreement). Not with
        # ``spread``: every rank writes a part of the replicated items, so they are not left to the
        # coordinator; ``spread`` follows from the model's structure, so every rank or none skips it.
        self._agree = agree if not spread else None
        self._failed: Exception | None = None  # set_up_planner's error, raised after the agreement

    def set_up_planner(
        self, state_dict: dict[str, Any], storage_meta: StorageMeta | None = None, is_coordinator: bool = False
    ) -> None:
        self._failed: Exception | None = None
        self.is_coordinator = is_coordinator
        try:
            self._set_up(state_dict, storage_meta, is_coordinator)
        except Exception as e:
            if self._agree is None:
                raise
            # Raised by create_local_plan once this rank has taken part in the agreement (a
            # collective every rank must reach); DCP then gathers the error as it would have.
            self._failed = e

    def _set_up(self, state_dict: dict[str, Any], storage_meta: StorageMeta | None, is_coordinator: bool) -> None:
        try:
            super().set_up_planner(state_dict, storage_meta, is_coordinator)
        except ValueError as e:
            key = duplicated_flatten_key(e)
            if key is None:
                raise
            raise UnsupportedValue(
                f"cannot store {key}: two entries of the state flatten to the same key (a dict "
                "holding both 1 and '1', or a key containing '.' that shadows a nested one). "
                "Rename one of them."
            ) from e
        mappings = getattr(self, "mappings", None) or {}
        self._encoded = {
            fqn: json_values.encode(value, _key_path(mappings.get(fqn), fqn))
            for fqn, value in self.state_dict.items()
            if not isinstance(value, torch.Tensor)
        }

    def create_local_plan(self) -> SavePlan:
        agreed = False

        def agree(digest: str | None) -> bool:
            nonlocal agreed
            agreed = True
            return self._agree(digest)  # type: ignore[misc]

        try:
            if self._failed is not None:
                raise self._failed
            return self._keep_ruled(self._local_plan(), agree if self._agree is not None else None)
        except Exception:
            if self._agree is not None and not agreed:
                self._agree(None)  # the collective, as a rank that cannot agree
            raise

    def _local_plan(self) -> SavePlan:
        """This rank's whole local plan as DCP sends it (unusable: the cached one is reused)."""
        return super().create_local_plan()

    def _splits(self) -> dict[str, compact_plan.MeshSplit]:
        return {fqn: s for fqn, v in self.state_dict.items() if (s := compact_plan.split_of(v)) is not None}

    def _keep_ruled(self, sent: SavePlan, agree: Callable[[str | None], bool] | None) -> SavePlan:
        """What goes to the coordinator: not the items a split rule describes (compact_plan)."""
        split = compact_plan.split_local_plan(
            sent, self.plan, self._splits(), coordinator=self.is_coordinator, agree=agree
        )
        self._kept, self.ruled_fqns = split.kept, split.ruled_fqns
        return split.sent

    def _create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        self.coordinator_items = sum(len(p.items) for p in all_plans)
        unpacked = compact_plan.unpack(all_plans)
        if unpacked is None:
            return super()._create_global_plan(all_plans)
        plans, data = unpacked
        ruled = compact_plan.resolve(data)  # first: a rank that disagrees is named, not DCP's symptom
        global_plan, metadata = super()._create_global_plan(plans)
        return global_plan, compact_plan.add_ruled(metadata, ruled, data)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        plan = super().finish_plan(new_plan)
        if self._kept:  # the ruled items were never sent: this rank writes them all the same
            plan = dataclasses.replace(plan, items=[*self._kept, *plan.items])
            self.plan = plan
        return plan

    def transform_object(self, write_item: WriteItem, object: Any) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._encoded[write_item.index.fqn])
        return object

    def _dedup_save_plans(self, all_plans: list[SavePlan]) -> list[SavePlan]:
        if not self._spread:
            return super()._dedup_save_plans(all_plans)
        from dist_ckpt.spread_writes import spread_plans

        return spread_plans(all_plans, self._spread)


def _key_path(path: tuple[str | int, ...] | None, fqn: str) -> str:
    """``("opt", "param_groups", 0, "fn")`` → ``opt.param_groups[0].fn`` (list indices in
    brackets, as json_values names paths inside a value)."""
    if not path:
        return fqn
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.size())  # DTensor.size() is the global shape
    return None


DEFAULT_HINT = (
    "Load into a state with the same keys and shapes (same model and optimizer configuration); to start "
    "a changed model from these weights, mgr.load_weights(model, which=..., strict=False) loads the tensors "
    "whose names and shapes match and returns the missing and unexpected keys."
)


class JsonLoadPlanner(DefaultLoadPlanner):
    """Loads JSON values without unpickling and reports key/shape mismatches by name."""

    def __init__(self, *, allow_partial_load: bool = False, hint: str | None = None, **kwargs: Any):
        super().__init__(allow_partial_load=allow_partial_load, **kwargs)
        self.hint = hint if hint is not None else DEFAULT_HINT

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        self._check_compatible(self.metadata)
        # Format 2: DCP's planner sees, per tensor, only the saved chunks overlapping this
        # rank's part (found from the layout rule), not every rank's chunk.
        full = self.metadata
        self.metadata = narrow_for(full, self.state_dict)
        try:
            return super().create_local_plan()
        finally:
            self.metadata = full

    def _check_compatible(self, metadata: Metadata) -> None:
        stored = metadata.state_dict_metadata
        missing = [] if self.allow_partial_load else sorted(k for k in self.state_dict if k not in stored)
        mismatched: list[str] = []
        for fqn, value in self.state_dict.items():
            md = stored.get(fqn)
            if md is None:
                continue
            want = _shape(value)
            if isinstance(md, TensorStorageMetadata):
                if want is None:
                    mismatched.append(
                        f"{fqn}: checkpoint has a tensor {list(md.size)}, state has a {type(value).__name__}"
                    )
                elif tuple(md.size) != want:
                    mismatched.append(f"{fqn}: checkpoint shape {list(md.size)}, state shape {list(want)}")
            elif isinstance(md, BytesStorageMetadata) and want is not None:
                mismatched.append(f"{fqn}: checkpoint has a non-tensor value, state has a tensor {list(want)}")
        if missing or mismatched:
            parts = []
            if missing:
                more = f" (+{len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
                parts.append(f"keys missing from the checkpoint: {', '.join(missing[:_MAX_LISTED])}{more}")
            if mismatched:
                parts.append("shape/type mismatches: " + "; ".join(mismatched[:_MAX_LISTED]))
            raise IncompatibleCheckpoint(
                "the checkpoint does not fit the state being loaded — " + " | ".join(parts) + ". " + self.hint
            )

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        decoded = json_values.decode(value.getvalue(), where=f"value {fqn!r}")
        if self.flatten_state_dict:
            _set_value(self.original_state_dict, self.mappings[fqn], decoded)
        else:
            self.state_dict[fqn] = decoded


def _set_value(root: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    """Replace the value at ``path`` in the nested state ``root``.

    DCP's flattening turns every mapping key into ``str(key)``, so its ``set_element`` would
    add a new key ``"1"`` beside an int key ``1`` instead of replacing the value. The load
    state was flattened from ``root`` itself, so each path element names an existing key:
    find it (exact match first, then by ``str``)."""
    missing = object()
    container: Any = root
    for i, part in enumerate(path):
        if isinstance(container, Mapping):
            key: Any = part if part in container else next((k for k in container if str(k) == part), missing)
        elif isinstance(container, list) and isinstance(part, int) and 0 <= part < len(container):
            key = part
        else:
            key = missing
        if key is missing:  # not in the state (cannot happen for a flattened key); DCP's fallback
            set_element(root, path, value)
            return
        if i == len(path) - 1:
            container[key] = value
            return
        container = container[key]
