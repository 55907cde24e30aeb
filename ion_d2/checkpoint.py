"""
What IONTrainer's checkpoints hold beyond Detectron2's, so that ``--resume`` continues a run
exactly: the optimizer (as upstream Detectron2's ``DefaultTrainer`` saves it, under the same
"_trainer" key; v0.6 saves only the iteration and the LR scheduler), the random number
generators and the data loader's seed.
"""

import logging
import random
from typing import Any, Dict

import numpy as np
import torch
from detectron2.engine import TrainerBase
from detectron2.solver.lr_scheduler import LRMultiplier
from detectron2.utils import comm

__all__ = ["get_rng_states", "set_rng_states", "extend_trainer_state", "load_trainer_state"]

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
