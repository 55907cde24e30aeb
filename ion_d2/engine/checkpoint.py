"""
IONTrainer's checkpoints: how they are written and read (:class:`IONCheckpointer`: atomically,
refusing files that are not checkpoints by name, weights holding NaN or inf, and, for
evaluation and prediction, weights that do not match the model; resuming from the newest
readable one), and
what they hold beyond Detectron2's, so that ``--resume`` continues a run exactly: the optimizer
(as upstream Detectron2's ``DefaultTrainer`` saves it, under the same "_trainer" key; v0.6
saves only the iteration and the LR scheduler), the random number generators and the data
loader's seed.
"""

import contextlib
import errno
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import TrainerBase
from detectron2.solver.lr_scheduler import LRMultiplier
from detectron2.utils import comm

from ..modeling.context.irnn import IRNN
from ..modeling.meta_arch import IONRCNN
from ..modeling.skip_pooling import IONSkipPooler
from .launch import unwrap_ddp

__all__ = [
    "IONCheckpointer",
    "UnreadableCheckpoint",
    "UnusableWeights",
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
    """
    A file given as a checkpoint that is not one: empty, truncated, not a torch file or pickle,
    or one holding no weights (a single tensor, a dict of other things, a pickled model).
    """


class UnusableWeights(ValueError):
    """
    A checkpoint that can be read but would give a silently wrong model: tensors holding NaN or
    inf, or (when loading strictly, for evaluation or prediction) no weights at all, or weights
    that leave some of the model's keys unloaded, name keys it does not have, or have other
    shapes.
    """


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
    a torch file (a PNG image, ...)"; None when it may be one. A ``.pkl`` (Detectron2's
    model-zoo pickles, read by Detectron2 with ``pickle``, of any protocol) is refused only when
    it starts as another kind of file does (a pickle of a dict never does).
    """
    if not os.path.isfile(path):
        return "does not exist"
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(8)
    if path.endswith(".pkl"):
        if head.startswith(_ZIP_MAGIC):
            return (
                f"is a torch zip archive ({size} bytes) under a .pkl name, which Detectron2 "
                "reads with pickle: rename it to .pth"
            )
        kind = next((k for magic, k in _FILE_KINDS if head.startswith(magic)), None)
        return None if kind is None else f"is not a pickle ({kind}, {size} bytes)"
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return f"is truncated ({size} bytes: a torch zip archive without its end)"
        return None
    if head.startswith(_PICKLE_MAGIC):
        return None
    kind = next((k for magic, k in _FILE_KINDS if head.startswith(magic)), f"it starts {head!r}")
    return f"is not a torch file ({kind}, {size} bytes)"


def _first(names: Sequence[str], shown: int = 3, sep: str = ", ") -> str:
    more = len(names) - shown
    return sep.join(names[:shown]) + (f"{sep}... ({more} more)" if more > 0 else "")


def _describe_weights(weights: Any) -> Optional[str]:
    """
    What ``weights`` (a checkpoint's "model" entry, or the whole file where it has none, as
    Detectron2 takes it) holds when it is not a state dict (names to tensors or arrays); None
    when it is one.
    """
    if isinstance(weights, torch.Tensor):
        return f"a {type(weights).__name__} of shape {tuple(weights.shape)}"
    if not isinstance(weights, Mapping):
        return f"an object of type {type(weights).__module__}.{type(weights).__qualname__}"
    if not weights:
        return "an empty dict"
    others = [k for k, v in weights.items() if not isinstance(v, (torch.Tensor, np.ndarray))]
    if len(others) == len(weights):
        return f"a dict without weights (keys: {_first([repr(k) for k in others])})"
    if others:
        kinds = [f"{k!r} ({type(weights[k]).__name__})" for k in others]
        return f"a state dict with entries that are not tensors: {_first(kinds)}"
    return None


def _describe_torch_file(path: str) -> Optional[str]:
    """
    What a torch file that Detectron2 could not take as a checkpoint holds, read with
    ``weights_only`` (which runs no code from the file); None when that does not tell.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
        names = sorted(find(path)) if find is not None else []
        return (
            "pickled Python objects"
            + (f" ({_first(names)})" if names else "")
            + ", not only tensors (save model.state_dict(), not the model)"
        )
    except Exception:  # what it holds stays unknown: the caller raises its own error
        return None
    return _describe_weights(obj["model"] if isinstance(obj, Mapping) and "model" in obj else obj)


def _nan_inf(value: Any) -> Sequence[int]:
    """The numbers of NaN and of infinite values of a tensor or array; (0, 0) for others."""
    # One float64 sum, which is not finite when a value is not (and, for float64 tensors, when
    # it overflows), costs no copy of the tensor; the values are counted only then.
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        if np.isfinite(value.sum(dtype=np.float64)):
            return 0, 0
        return int(np.isnan(value).sum()), int(np.isinf(value).sum())
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        if torch.isfinite(value.sum(dtype=torch.float64)):
            return 0, 0
        return int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
    return 0, 0


def _disk_full(error: Optional[BaseException]) -> Optional[int]:
    """ENOSPC or EDQUOT when ``error``, or one it was raised from or while handling, is that."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error.errno
        error = error.__cause__ or error.__context__
    return None


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
    except BaseException as e:
        if os.path.exists(partial):
            os.remove(partial)
        code = _disk_full(e)
        if code is not None:
            # torch.save reports a full disk as "unexpected pos ..." (its zip writer's check),
            # with the OSError only as the context, higher up the traceback.
            folder = os.path.dirname(os.path.abspath(path))
            free = shutil.disk_usage(folder).free / 2**20
            raise OSError(
                code,
                f"{os.strerror(code)} while writing {path} (its partial file "
                f"{os.path.basename(partial)} was removed; {free:.1f} MiB free in {folder} "
                "now). Free some space, or set OUTPUT_DIR on a larger disk.",
            ) from e
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
      torch file or pickle, a single tensor, a dict without weights, a pickled model);
    * loading weights with NaN or inf values raises :class:`UnusableWeights` naming the
      tensors (except, when not ``strict``, a skip-pooling scale still pending: all NaN until
      training measures it);
    * with ``strict`` (evaluation, prediction), loading no weights, or weights that do not
      match the model (missing, unexpected or mis-shaped keys, which Detectron2 only logs)
      raises :class:`UnusableWeights` naming them;
    * :meth:`resume_or_load` skips a newest checkpoint that cannot be read, with a warning,
      and resumes from the newest that can.

    Remote paths (``PathManager`` URLs) are written as Detectron2 writes them.
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = False, **kwargs: Any):
        """
        Args:
            model, save_dir, kwargs: see :class:`DetectionCheckpointer`.
            strict (bool): refuse to load no weights or weights that leave the model partly at
                its initial values (``MODEL.ION.ALLOW_PARTIAL_WEIGHTS`` False for evaluation
                and prediction). Training from ImageNet weights, whose heads are new, is not
                strict. Keys of an :class:`IONRCNN`'s segmentation head, which only training
                runs, are not counted.
        """
        super().__init__(model, save_dir, **kwargs)
        self.strict = strict
        self._loading: Optional[str] = None

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """See :meth:`DetectionCheckpointer.load`, with the checks of this class."""
        if self.strict and not path:
            raise UnusableWeights(
                "No weights to load (MODEL.WEIGHTS is empty, and no checkpoint to resume from): "
                "evaluating or predicting would use the model's random initial weights. Set "
                "MODEL.WEIGHTS to a trained checkpoint, or MODEL.ION.ALLOW_PARTIAL_WEIGHTS True "
                "to run the untrained model."
            )
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None
            # Upstream Detectron2's load sets this and resets it only when it succeeds: after a
            # file it could not read, every later load of this checkpointer (resume's fallback
            # to an older file) would fail its `assert self._parsed_url_during_load is None`.
            if getattr(self, "_parsed_url_during_load", None) is not None:
                self._parsed_url_during_load = None

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
        expected = (
            "expected a dict with 'model' (a state dict: parameter names to tensors), as "
            "Detectron2's checkpointer writes, or a state dict."
        )
        try:
            loaded = super()._load_file(filename)
        except (EOFError, pickle.UnpicklingError, RuntimeError, TypeError, AttributeError) as e:
            text = str(e)
            if isinstance(e, EOFError) or "truncated" in text or "corrupt" in text:
                raise UnreadableCheckpoint(
                    f"{filename} is truncated ({os.path.getsize(filename)} bytes): "
                    f"{type(e).__name__}: {text}"
                ) from e
            # Detectron2 unpickles a .pkl itself; a torch file is read again without running
            # any of its code, to say what it holds (a tensor, a pickled model).
            what = None if filename.endswith(".pkl") else _describe_torch_file(filename)
            if what is not None:
                raise UnreadableCheckpoint(
                    f"{filename} is not a checkpoint: it holds {what}; {expected}"
                ) from e
            raise
        what = _describe_weights(loaded.get("model"))
        if what is not None:
            raise UnreadableCheckpoint(
                f"{filename} is not a checkpoint: it holds {what}; {expected}"
            )
        self._check_finite(filename, loaded["model"])
        return loaded

    def _check_finite(self, filename: str, weights: Mapping[str, Any]) -> None:
        # A pending skip-pooling scale (SCALE_INIT -1) is NaN on purpose until training
        # measures it, and stays so in a checkpoint written before that: training measures it
        # after loading; inference refuses it (IONSkipPooler.forward), here when strict.
        scales = {
            f"{name}.scale"
            for name, module in unwrap_ddp(self.model).named_modules()
            if isinstance(module, IONSkipPooler) and module.scale is not None
        }
        found, pending = [], []
        for key, value in weights.items():
            nan, inf = _nan_inf(value)
            if not (nan or inf):
                continue
            size = value.numel() if isinstance(value, torch.Tensor) else value.size
            name = key[len("module.") :] if key.startswith("module.") else key
            if name in scales and nan == size:
                if not self.strict:
                    continue
                pending.append(key)
            counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n)
            found.append(f"{key} ({counts} of {size} values)")
        if not found:
            return
        hint = (
            f" {_first(pending)} is a skip-pooling scale never measured (all NaN: "
            "MODEL.ION.SKIP_POOL.SCALE_INIT -1, saved before training measured it)."
            if pending
            else ""
        )
        tensors = f"{len(found)} tensor" + ("s" if len(found) > 1 else "")
        raise UnusableWeights(
            f"{filename} holds NaN or inf in {tensors}: {_first(found)}. A model with them "
            f"scores every box NaN (AP nan, no detections).{hint} Load an earlier checkpoint "
            "of the run, or the weights it started from."
        )

    def _match_irnn_wiring(self, weights: Mapping[str, Any]) -> None:
        # MODEL.ION.CONTEXT.IRNN.WIRING's default became "paper" in 0.2.0: a checkpoint of the
        # "per_layer" wiring whose stored config does not name it (written before the key
        # existed) is recognised from its keys and the IRNN rebuilt to load it, for a model
        # that is not being trained (no optimizer holds the old parameters). In training
        # IRNN._load_from_state_dict refuses the mismatch, naming the key to set.
        if "optimizer" in self.checkpointables:
            return
        for name, module in unwrap_ddp(self.model).named_modules():
            if not isinstance(module, IRNN):
                continue
            found = IRNN.wiring_of(weights, f"{name}." if name else "")
            if found is None or found == module.wiring:
                continue
            module.rewire(found)
            self.logger.warning(
                f"{self._loading}: the IRNN context {name!r} has the {found!r} wiring (from its "
                f"keys); the model was built with MODEL.ION.CONTEXT.IRNN.WIRING "
                f"{'paper' if found == 'per_layer' else 'per_layer'!r}, so it was rebuilt as "
                f"{found!r} to load them. Set WIRING {found!r} to build it so."
            )

    def _load_model(self, checkpoint: Dict[str, Any]):
        """See :meth:`DetectionCheckpointer._load_model`; with ``strict``, raises
        :class:`UnusableWeights` naming what did not load."""
        self._match_irnn_wiring(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        if not self.strict:
            return incompatible
        shapes = {k: (tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes}
        # fvcore drops a mis-shaped entry before loading, so it is also reported as missing.
        missing = [k for k in incompatible.missing_keys if k not in shapes]
        unexpected = list(incompatible.unexpected_keys)
        if isinstance(unwrap_ddp(self.model), IONRCNN):
            missing = [k for k in missing if not k.startswith("sem_seg_head.")]
            unexpected = [k for k in unexpected if not k.startswith("sem_seg_head.")]
        problems = []
        if missing:
            total = len(self.model.state_dict())
            problems.append(
                f"{len(missing)} of the model's {total} keys are not in it ({_first(missing)})"
            )
        if unexpected:
            problems.append(
                f"{len(unexpected)} of its keys are not the model's ({_first(unexpected)})"
            )
        if shapes:
            shown = [f"{k}: {a} in the file, {b} in the model" for k, (a, b) in shapes.items()]
            problems.append(f"{len(shapes)} have another shape ({_first(shown, sep='; ')})")
        if problems:
            raise UnusableWeights(
                f"{self._loading} does not match the model: " + "; ".join(problems) + ". What "
                "did not load would keep its random initial values. Load the checkpoint trained "
                "with this config, or set MODEL.ION.ALLOW_PARTIAL_WEIGHTS True to load only "
                "what matches."
            )
        return incompatible

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
            UnusableWeights: the newest readable one holds NaN or inf (an older one is not
                tried: the run diverged or its files are damaged, which needs a decision), or,
                with ``strict``, does not match the model.
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
