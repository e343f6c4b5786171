"""Checkpoints: written atomically (temporary file, fsync, rename), restored exactly.

A checkpoint holds the model, the EMA model, optimizer, grad scaler, the next epoch and the optimizer-step count,
the RNG states of Python, NumPy and torch (CPU and CUDA) and the resolved configuration.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mdetr.config import in_module, top_modules

LATEST = "checkpoint.pth"


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``: a crash leaves
    either the old file or the new one, never a torn one."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(text: str, path: str | Path) -> None:
    """``atomic_save`` for a text file (a run's config.yaml)."""
    _atomic_write(path, lambda f: f.write(text), "w")


def _atomic_write(path: str | Path, write, mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp, which makes 0600 whatever the umask: the new file gets the mode a plain open() gives it
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str | Path, state: Dict[str, Any], epoch: int, keep: int = 0) -> Path:
    """Write ``checkpoint.pth`` and ``checkpoint_epochNNNN.pth``, both atomically; ``keep > 0`` then deletes all but
    the ``keep`` newest epoch files (0 keeps every one). The epoch file is a hard link to (or, where the file system
    has none, a copy of) the freshly written latest file, not a second serialization."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0 = keep every epoch checkpoint), got {keep}")
    output_dir = Path(output_dir)
    latest = output_dir / LATEST
    atomic_save(state, latest)
    epoch_file = output_dir / f"checkpoint_epoch{epoch:04d}.pth"
    tmp = epoch_file.with_name(f".{epoch_file.name}.tmp")  # only the main process writes checkpoints
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(latest, tmp)
        except OSError:
            shutil.copyfile(latest, tmp)
        os.replace(tmp, epoch_file)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(output_dir)
    if keep:  # files of later epochs (an older run's, in a reused folder) are neither counted nor deleted
        earlier = [p for p in epoch_checkpoints(output_dir) if _epoch_of(p) <= epoch]
        for old in earlier[:-keep]:
            old.unlink()
    return latest


def _epoch_of(path: Path) -> int:
    return int(re.findall(r"\d+", path.stem)[-1])


def epoch_checkpoints(output_dir: str | Path) -> List[Path]:
    """The ``checkpoint_epochNNNN.pth`` files of ``output_dir``, oldest epoch first."""
    return sorted(Path(output_dir).glob("checkpoint_epoch*.pth"), key=_epoch_of)


def find_resume(resume: str, output_dir: str | Path) -> Optional[Path]:
    """``""``: none; ``"auto"``: the latest checkpoint in ``output_dir`` if any; else the path, which must exist."""
    if not resume:
        return None
    if resume == "auto":
        latest = Path(output_dir) / LATEST
        if latest.exists():
            return latest
        epochs = epoch_checkpoints(output_dir)
        return epochs[-1] if epochs else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint file")
    return path


def plain_data_globals() -> List[Any]:
    """What checkpoints hold beyond tensors, safe to unpickle (``torch.load(weights_only=True)``): the reference's
    ``args`` (argparse.Namespace), and NumPy arrays, dtypes and scalars (our RNG states and metric history)."""
    import argparse

    reconstruct_array = np.zeros(1).__reduce__()[0]  # numpy's private names moved in 2.0: ask numpy
    reconstruct_scalar = np.float64(0).__reduce__()[0]
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefd"}  # numpy >= 1.25: one class per dtype
    # a file written under the other NumPy major names the same functions by their other module
    other_names = [(function, f"numpy.{module}.multiarray.{function.__name__}")
                   for function in (reconstruct_array, reconstruct_scalar) for module in ("core", "_core")]
    return [argparse.Namespace, np.ndarray, np.dtype, reconstruct_array, reconstruct_scalar, *dtype_classes,
            *other_names]


def load_checkpoint(path: str | Path, trusted: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` on the CPU. Unless ``trusted``, only tensors and plain data are unpickled
    (``weights_only=True`` with ``plain_data_globals``): a checkpoint from elsewhere cannot run code. Ours and the
    released MDETR files need nothing more. ``mmap``: map the file instead of reading it (a zip-format file)."""
    try:
        with torch.serialization.safe_globals(plain_data_globals()):
            return torch.load(path, map_location="cpu", weights_only=not trusted, mmap=mmap)
    except Exception as err:  # a truncated or foreign file, or one with other Python objects
        hint = "" if trusted else (
            "; if it holds other Python objects and you trust it, load it trusted (mdetr.evaluate / mdetr.predict "
            "--trusted, train.trusted_checkpoints=true, trusted=True in Python)")
        raise RuntimeError(f"checkpoint {str(path)!r} could not be read: {err}{hint}") from err


def load_model(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema",
               attention_backend: str = "reference", trusted: bool = False):
    """A training checkpoint of ``python -m mdetr.train`` -> (model in eval mode, its resolved ``Config``).

    ``weights``: "ema" (the averaged weights, what validation reports; the live ones when the run kept no EMA)
    or "model" (the live weights; best.pth holds its validated weights, the EMA ones when the run kept an EMA,
    under both names). The model's ``loaded_weights`` attribute says which were loaded. Every value comes from the
    file: no pretrained backbone or text-encoder weights are read (``mdetr.hub.load_training_checkpoint``), so a
    run trained where those were cached loads where they are not. ``trusted``: see ``load_checkpoint``."""
    from mdetr import hub

    return hub.load_training_checkpoint(path, weights=weights, trusted=trusted, attention_backend=attention_backend,
                                        device=device)


def state_dict_differences(model, state: Dict[str, Any]) -> Tuple[List[str], List[str], Dict[str, Tuple]]:
    """How ``state`` fits ``model``: (keys the model lacks, keys ``state`` lacks, {key: (shape in state, shape in
    model)} for shared keys whose shapes differ), each sorted by key."""
    expected = model.state_dict()
    unexpected, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    mismatched = {key: (tuple(state[key].shape), tuple(expected[key].shape))
                  for key in sorted(set(state) & set(expected)) if state[key].shape != expected[key].shape}
    return unexpected, missing, mismatched


def load_weights(model, path: str | Path, verbose: bool = True, trusted: bool = False,
                 skip: Sequence[str] = ()) -> None:
    """Fine-tuning start: copy a training checkpoint's weights (its EMA when it has one) into ``model``.

    Tensors are matched by name. Heads the new task adds (e.g. QA heads on a pre-trained detector) keep their
    fresh initialization and are listed; a checkpoint tensor the model lacks, or one whose shape differs, is an
    error naming it (a silently dropped tensor would be a model that was never fine-tuned from anything).
    ``skip`` names modules (``"relation_head"``, ``"transformer.decoder"``) whose checkpoint tensors are left out on
    purpose, e.g. heads of the pre-training that the fine-tune goes without; they are listed, and a name that
    matches no tensor of the checkpoint is an error (a typo would otherwise load everything)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"train.load: no checkpoint at {str(path)!r} (the shapes fine-tuning presets start "
                                f"from the default run's runs/shapes/checkpoint.pth: run `python -m mdetr.train` first)")
    saved = load_checkpoint(path, trusted)
    if not isinstance(saved, dict) or "model" not in saved:
        raise ValueError(f"train.load: {str(path)!r} is not a training checkpoint of mdetr.train (no 'model' entry)")
    state = saved["ema"] if saved.get("ema") else saved["model"]
    skipped = {}
    for name in skip:
        keys = [key for key in state if in_module(key, name)]
        if not keys:
            raise ValueError(f"train.load_skip: {name!r} matches no tensor of {str(path)!r} (expected a module name "
                             f"such as {top_modules(state, limit=6)})")
        skipped.update((key, state[key]) for key in keys)
    state = {key: value for key, value in state.items() if key not in skipped}
    unexpected, missing, mismatched = state_dict_differences(model, state)
    if unexpected or mismatched:
        shapes = [f"{key} {ours} vs {theirs}" for key, (ours, theirs) in mismatched.items()]
        raise ValueError(f"train.load: {str(path)!r} does not fit this model: tensors it lacks {unexpected[:8]}, "
                         f"shapes that differ (checkpoint vs model) {shapes[:8]}"
                         + (" (train.load_skip leaves modules of the checkpoint out)" if unexpected and not skip else ""))
    model.load_state_dict(state, strict=False)
    if verbose and skipped:
        print(f"train.load_skip: left out {len(skipped)} tensors of {path}: {sorted(skipped)}")
    if verbose:
        print(f"loaded {len(state)} tensors from {path}" + (f"; newly initialized: {missing}" if missing else ""))
