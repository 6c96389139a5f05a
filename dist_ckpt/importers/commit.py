"""Write an :class:`ImportedState` as a committed checkpoint of a run, the way a manager would:
under the run's writer lock, with the commit protocol (fenced ``COMMITTED``), a progress
record naming the objects (so ``load_weights`` and ``export`` know the models), and the
manifest updated by compare-and-swap."""

from __future__ import annotations

import time
from dataclasses import dataclass

from dist_ckpt import manifest as mf
from dist_ckpt.api import resolve_codec, save_to
from dist_ckpt.errors import ConfigError, StepAlreadyExists
from dist_ckpt.importers.source import ImportedState
from dist_ckpt.layout import committed_key
from dist_ckpt.progress import KEY, Progress
from dist_ckpt.run_lock import RunLock
from dist_ckpt.run_store import RunStore, step_prefix
from dist_ckpt.write_guard import require_conditional_writes
from storage_backends import open_backend


@dataclass(frozen=True)
class ImportResult:
    """What :func:`dist_ckpt.import_checkpoint` committed."""

    source: str
    format: str
    uri: str
    step: int
    objects: dict[str, str]
    tensors: int
    values: int
    tensor_bytes: int


def _check_keys(state: ImportedState) -> None:
    # a tracked name is a keyword of track(): "0.weight" or a key without a dot comes from a
    # bare model state dict (dcp.save(model.state_dict())), which needs --name
    loose = sorted(k for k in state.entries if "." not in k or not k.partition(".")[0].isidentifier())
    if loose:
        raise ConfigError(
            f"{state.source}: keys {loose[:5]} are not under an object name (a state dict saved without "
            "{'model': ...} around it); pass name='model' (--name model) to import them as a tracked model's"
        )
    reserved = sorted({k.partition(".")[0] for k in state.entries} & {KEY, "rng"})
    if reserved:
        raise ConfigError(f"{state.source}: top-level names {reserved} are reserved by dist_ckpt; pass --name NAME")


def write_imported(
    state: ImportedState, dst_run: str, *, step: int, compression: str = "none", unsafe_single_writer: bool = False
) -> ImportResult:
    _check_keys(state)
    prefix = step_prefix(step)  # validates step
    try:
        backend = open_backend(dst_run)
    except ValueError as e:
        raise ConfigError(f"import destination {dst_run!r}: {e}") from e
    codec = resolve_codec(compression)
    require_conditional_writes(
        backend, unsafe_single_writer=unsafe_single_writer, opt_in="unsafe_single_writer=True (--unsafe-single-writer)"
    )
    store = RunStore(backend)
    lock = RunLock(backend)
    lock.acquire()  # RunLocked (naming the job) while a training job writes this run
    try:
        uri = f"{backend.uri}/{prefix}"
        if backend.exists(committed_key(step)):
            raise StepAlreadyExists(
                f"{uri} is already committed and is never overwritten; import as another step (--step)"
            )
        last = max((e.step for e in store.committed_entries()), default=None)
        if last is not None and step < last:
            raise ConfigError(
                f"{backend.uri}: step {step} is behind the run's last checkpoint (step {last}); a run's "
                f"steps only go forward: import with --step {last + 1} or later, or into a new run root"
            )
        sd = dict(state.entries)
        sd[KEY] = Progress(step=step, objects=dict(state.objects)).encode()
        info = {
            "step": step,
            "epoch": None,
            "metrics": {},
            "time": time.time(),
            "codec": codec.name if codec else "none",
            "imported_from": {"format": state.format, "source": state.source},
        }
        save_to(backend, prefix, sd, codec=codec, commit_info=info, fence=lock.fence)

        def change(current: mf.Manifest | None) -> mf.Manifest:
            base = current or mf.Manifest()
            return mf.rebuild(store.committed_entries(), base.best_modes, base.tracker_run_id, base.config_hash)

        lock.fence.check(backend, f"updating {backend.uri}/manifest.json")
        store.update_manifest(change)
    finally:
        lock.release()
    values = len(state.entries) - state.tensor_count
    return ImportResult(
        state.source, state.format, uri, step, dict(state.objects), state.tensor_count, values, state.tensor_bytes
    )
