"""
IONTrainer's checkpoints: how they are written and read (:class:`IONCheckpointer`: atomically,
refusing files that are not checkpoints by name, resuming from the newest readable one), and
what they hold beyond Detectron2's, so that ``--resume`` continues a run exactly: the optimizer
(as upstream Detectron2's ``DefaultTrainer`` saves it, under the same "_trainer" key; v0.6
saves only the iteration and the LR scheduler), the random number generators and the data
loader's seed.
"""

import contextlib
import logging
import os
import pickle
import random
import re
import zipfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import TrainerBase
from detectron2.solver.lr_scheduler import LRMultiplier
from detectron2.utils import comm

__all__ = [
    "IONCheckpointer",
    "UnreadableCheckpoint",
    "describe_unreadable_checkpoint",
    "get_rng_states",
    "set_rng_states",
    "extend_trainer_state",
    "load_trainer_state",
]

logger = logging.getLogger(__name__)

# What each entry restores, for the warning about checkpoints written without it.
_RESTORES = {
    "_trainer": "the optimizer state (momentum buffers, learning rates)",
    "rng": "the random number generators (Python, NumPy, torch)",
    "data_loader": "the data loader's seed",
}


def get_rng_states() -> Dict[str, Any]:
    """
    Returns:
        dict: the global RNG states, as tensors and Python numbers only, since torch.load (which
        fvcore's checkpointer uses) refuses other types by default.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def extend_trainer_state(trainer, state: Dict[str, Any]) -> Dict[str, Any]:
    """
    Add to ``state`` (the :meth:`DefaultTrainer.state_dict` of ``trainer``) the optimizer
    state where Detectron2 has not already saved it, the RNG states and the data loader's.
    """
    if "_trainer" not in state:
        state["_trainer"] = trainer._trainer.state_dict()
    state["rng"] = get_rng_states()
    if hasattr(trainer.data_loader, "state_dict"):
        state["data_loader"] = trainer.data_loader.state_dict()
    return state


def load_trainer_state(trainer, state: Dict[str, Any]) -> None:
    """
    Restore what :func:`extend_trainer_state` saved. A checkpoint written without some of it
    (by Detectron2 v0.6 or an older ion_d2) still loads, with a warning naming what could not
    be restored; the learning rate is then taken from the restored LR scheduler.
    """
    state = dict(state)
    extra = {key: state.pop(key, None) for key in _RESTORES}
    # The iteration and the hooks (the LR scheduler), as both v0.6 and upstream restore them;
    # not DefaultTrainer.load_state_dict, which on upstream requires "_trainer".
    TrainerBase.load_state_dict(trainer, state)
    if extra["_trainer"] is not None:
        trainer._trainer.load_state_dict(extra["_trainer"])
    else:
        _lr_from_scheduler(trainer)
    if extra["rng"] is not None:
        if comm.is_main_process():
            set_rng_states(extra["rng"])
        else:
            logger.info("The checkpoint holds rank 0's RNG states; this process keeps its own.")
    loader = trainer.data_loader
    if extra["data_loader"] is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(extra["data_loader"])
    missing = [_RESTORES[key] for key, value in extra.items() if value is None]
    if missing:
        logger.warning(
            f"The checkpoint (iteration {state.get('iteration')}) was written without "
            + "; ".join(missing)
            + ". Resuming from it is not exact: those start afresh."
        )


def _lr_from_scheduler(trainer) -> None:
    # Detectron2's LRMultiplier computes the LR in closed form from the restored iteration.
    scheduler = getattr(trainer, "scheduler", None)
    if isinstance(scheduler, LRMultiplier):
        for group, lr in zip(trainer.optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = lr


class UnreadableCheckpoint(ValueError):
    """A file given as a checkpoint that is not one: empty, truncated, or not a torch file."""


# What a file that is not a checkpoint starts with, for the message.
_FILE_KINDS = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip file"),
    (b"{", "text (JSON?)"),
)
# torch.save writes a zip archive (PyTorch >= 1.6) or, in the legacy format, a pickle.
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"
_CHECKPOINT_NAME = re.compile(r"^model_(\d+|final)\.pth$")


def describe_unreadable_checkpoint(path: str) -> Optional[str]:
    """
    What is wrong with ``path`` as a checkpoint, as far as its size and first and last bytes
    tell (nothing is unpickled): "does not exist", "is empty (0 bytes)", "is truncated", "is not
    a torch file (a PNG image, ...)"; None when it may be one. Of a ``.pkl`` (Detectron2's
    model-zoo pickles, read by Detectron2 with ``pickle``) only existence and size are checked.
    """
    if not os.path.isfile(path):
        return "does not exist"
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    if path.endswith(".pkl"):  # any pickle protocol; Detectron2 reads it with pickle itself
        return None
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return f"is truncated ({size} bytes: a torch zip archive without its end)"
        return None
    if head.startswith(_PICKLE_MAGIC):
        return None
    kind = next((k for magic, k in _FILE_KINDS if head.startswith(magic)), f"it starts {head!r}")
    return f"is not a torch file ({kind}, {size} bytes)"


def _write_atomically(path: str, write: Callable[[Any], None]) -> None:
    # The file appears under its name only once complete and on disk (os.replace is atomic
    # within a folder); on any failure (a full disk, an interrupt) the partial file is removed,
    # which also gives its space back to the logs and metrics written after.
    partial = path + ".partial"
    try:
        with open(partial, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    try:
        folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    except OSError:  # a folder cannot be opened on some platforms; the rename stands
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class IONCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` whose files are never partial and whose load errors name
    the file:

    * :meth:`save` and ``last_checkpoint`` write to ``<name>.partial`` in the same folder,
      flush and ``os.fsync`` it, then ``os.replace`` it to its name (a partial file left by
      a killed process keeps the ``.partial`` name and is removed on resume);
    * loading a file that is not a checkpoint (``MODEL.WEIGHTS`` or the resume path) raises
      :class:`UnreadableCheckpoint` naming it and saying what it is (empty, truncated, not a
      torch file);
    * :meth:`resume_or_load` skips a newest checkpoint that cannot be read, with a warning,
      and resumes from the newest that can.

    Remote paths (``PathManager`` URLs) are written as Detectron2 writes them.
    """

    def save(self, name: str, **kwargs: Any) -> None:
        """See :meth:`fvcore.common.checkpoint.Checkpointer.save`; written atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _write_atomically(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """See :meth:`fvcore.common.checkpoint.Checkpointer.tag_last_checkpoint`; atomic."""
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        _write_atomically(path, lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, filename: str) -> Dict[str, Any]:
        problem = describe_unreadable_checkpoint(filename)
        if problem is not None:
            raise UnreadableCheckpoint(
                f"{filename} {problem}; expected a checkpoint written by torch.save (.pth) or "
                "a Detectron2 model-zoo .pkl."
            )
        try:
            return super()._load_file(filename)
        except (EOFError, pickle.UnpicklingError, RuntimeError) as e:
            text = str(e)
            if isinstance(e, EOFError) or "truncated" in text or "corrupt" in text:
                raise UnreadableCheckpoint(
                    f"{filename} is truncated ({os.path.getsize(filename)} bytes): "
                    f"{type(e).__name__}: {text}"
                ) from e
            raise

    def _resume_candidates(self, newest: str) -> List[str]:
        def rank(name: str) -> float:
            match = _CHECKPOINT_NAME.match(name)
            return float("inf") if match.group(1) == "final" else float(match.group(1))

        files = [n for n in os.listdir(self.save_dir) if _CHECKPOINT_NAME.match(n)]
        newest_name = os.path.basename(newest)
        limit = rank(newest_name) if _CHECKPOINT_NAME.match(newest_name) else float("inf")
        older = sorted((n for n in files if rank(n) < limit), key=rank, reverse=True)
        return [newest] + [os.path.join(self.save_dir, n) for n in older]

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """
        See :meth:`fvcore.common.checkpoint.Checkpointer.resume_or_load`. When resuming, a
        newest checkpoint that cannot be read is skipped with a warning, and the newest
        readable one (by iteration, ``model_final.pth`` last) is loaded.

        Raises:
            UnreadableCheckpoint: no checkpoint of the folder can be read.
        """
        if not (resume and self.has_checkpoint()) or "://" in self.save_dir:
            return super().resume_or_load(path, resume=resume)
        for name in os.listdir(self.save_dir) if self.save_to_disk else ():
            if name.endswith(".partial"):
                self.logger.info(f"Removing {name}, left by a run killed while writing it.")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.save_dir, name))
        skipped = []
        for candidate in self._resume_candidates(self.get_checkpoint_file()):
            try:
                if not os.path.isfile(candidate):
                    raise UnreadableCheckpoint(f"{candidate} does not exist.")
                checkpoint = self.load(candidate)
            except UnreadableCheckpoint as e:
                skipped.append(str(e))
                logger.warning(f"Not resuming from {candidate}: {e} Trying the previous one.")
                continue
            if skipped:
                logger.warning(
                    f"Resumed from {candidate}, the newest checkpoint that can be read "
                    f"({len(skipped)} newer skipped)."
                )
            return checkpoint
        raise UnreadableCheckpoint(
            f"No checkpoint in {self.save_dir} can be read: " + " ".join(skipped) + " Train "
            "without --resume (resume=False) to start again."
        )
