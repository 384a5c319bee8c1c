"""Training checkpoints with torch.distributed.checkpoint (DCP), and the export to the released single-file layout.

A checkpoint is a folder: DCP shards of {"model", "optimizer"} (fully-qualified names, so it reshards onto any
number of ranks and any FSDP/TP layout) plus `extra.json` + `extra.safetensors` (step, RNG, data position).
Saves are atomic: everything is written to `<dir>.tmp` and renamed once complete, so a crash mid-save never leaves
a folder that looks loadable. Works the same in a single process with no process group.
"""

from __future__ import annotations

import os
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from krea2.errors import Krea2Error

EXTRA_FILE = "extra.json"  # plain values; tensor values (RNG states) go to extra.safetensors: no pickle anywhere
EXTRA_TENSORS = "extra.safetensors"
# DCP warns on every single-process call that it assumes a single process; that is exactly the intent here
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_async_group = None  # a dedicated gloo group so background saves never interleave with training collectives


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _tmp_dir(directory: Path) -> Path:
    return directory.with_name(directory.name + ".tmp")


def _prepare_tmp(directory: Path) -> Path:
    """Rank 0 clears a stale temp folder left by a crashed save; everyone waits so no rank writes into it early."""
    tmp = _tmp_dir(directory)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def _old_dir(directory: Path) -> Path:
    return directory.with_name(directory.name + ".old")


def _publish(tmp: Path, directory: Path) -> None:
    """Rank 0 swaps the finished temp folder into place (replacing an older save of the same name).

    Two renames, so a complete checkpoint exists at every instant: the old one moves aside to `<dir>.old`, the new
    one takes its name, then the old one is deleted. A kill between the renames leaves `<dir>.tmp` (complete) and
    `<dir>.old`; `recover_checkpoint` puts the newest complete one back under `<dir>`."""
    old = _old_dir(directory)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(directory: str | os.PathLike) -> bool:
    """After a kill inside `_publish`: restore `<dir>` from the complete `<dir>.tmp` (newer) or `<dir>.old`.
    Returns whether `<dir>` now holds a complete checkpoint. Call on rank 0 before resuming."""
    directory = Path(directory)
    if is_checkpoint(directory):
        return True
    for candidate in (_tmp_dir(directory), _old_dir(directory)):
        if is_checkpoint(candidate):
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(candidate, directory)
            shutil.rmtree(_old_dir(directory), ignore_errors=True)  # superseded (or just restored from)
            return True
    return False


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optimizer": osd}


def save_training_state(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        extra: dict | None = None, *, async_save: bool = False) -> Future | None:
    """Save model (+ optimizer) shards and `extra` to `directory`; every rank calls it.

    With async_save=True the state is staged to CPU before returning and written in a background thread; the returned
    future completes (on rank 0: after the folder is renamed into place) when the save is durable. Wait on it before
    the next save. Synchronous saves return None.
    """
    directory = Path(directory)
    tmp = _prepare_tmp(directory)
    if _rank() == 0:
        write_extra(tmp, dict(extra or {}))
    state = _training_state(model, optimizer)
    if not async_save:
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
        _barrier()  # every rank's shards are written before rank 0 renames
        if _rank() == 0:
            _publish(tmp, directory)
        _barrier()
        return None

    global _async_group
    if _distributed() and _async_group is None:
        _async_group = dist.new_group(backend="gloo")
    response = dcp.async_save(state, checkpoint_id=str(tmp), process_group=_async_group,
                              no_dist=not _distributed())
    future = getattr(response, "upload_completion", response)
    done: Future = Future()

    def finish(f: Future) -> None:
        try:
            f.result()
            # DCP's coordinator (rank 0) writes .metadata only after every rank reported its writes, so rank 0's
            # future completing means the whole checkpoint is on disk.
            if _rank() == 0:
                _publish(tmp, directory)
            done.set_result(directory)
        except BaseException as e:  # surface the failure on the returned future, never in the background thread
            done.set_exception(e)

    future.add_done_callback(finish)
    return done


def is_checkpoint(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / ".metadata").is_file() and (d / EXTRA_FILE).is_file()


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The most recently written complete checkpoint folder under root (temp folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [d for d in root.iterdir() if d.is_dir() and not d.name.endswith(".tmp") and is_checkpoint(d)]
    return max(found, key=lambda d: (d / ".metadata").stat().st_mtime_ns, default=None)


def load_training_state(directory: str | os.PathLike, model: nn.Module,
                        optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load model (+ optimizer) in place from `directory`, resharding to this run's layout; returns `extra`."""
    directory = Path(directory)
    if not is_checkpoint(directory):
        raise Krea2Error(f"{directory} is not a complete krea2 checkpoint (no .metadata or {EXTRA_FILE})")
    state = _training_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(directory), no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # DCP's own CheckpointException is a BaseException
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise Krea2Error(f"the training state in {directory} is damaged or does not fit this run ({first}); "
                         f"restore it, or move it aside to restart that stage from its start") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return read_extra(directory)


def write_extra(directory: Path, extra: dict) -> None:
    import json

    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in extra.items() if isinstance(v, torch.Tensor)}
    (directory / EXTRA_FILE).write_text(json.dumps({k: v for k, v in extra.items() if k not in tensors}))
    save_file(tensors, str(directory / EXTRA_TENSORS))


def read_extra(directory: Path) -> dict:
    import json

    from safetensors.torch import load_file

    try:
        extra = json.loads((directory / EXTRA_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Krea2Error(f"the training state in {directory} is damaged ({EXTRA_FILE} is not valid JSON); restore it, "
                         "or move it aside to restart that stage from its start") from None
    if (directory / EXTRA_TENSORS).is_file():
        extra.update(load_file(str(directory / EXTRA_TENSORS)))
    return extra


def full_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Gathered, unsharded model weights on CPU under the released names (rank 0 gets them; others get {})."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=options)  # a collective under FSDP/TP: every rank calls it
    if _rank() != 0:
        return {}
    # get_model_state_dict already strips wrapper prefixes (activation checkpointing, torch.compile)
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def export_safetensors(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = torch.bfloat16,
                       metadata: dict[str, str] | None = None) -> Path | None:
    """Write the full model as one safetensors file in the released layout (official names); rank 0 writes.

    Every rank calls it (the gather is collective). Returns the path on rank 0, None elsewhere.
    """
    from safetensors.torch import save_file

    path = Path(path)
    sd = full_state_dict(model, dtype)
    written = None
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(sd, str(tmp), metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
        written = path
    _barrier()
    return written
