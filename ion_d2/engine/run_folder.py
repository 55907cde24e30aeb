"""
A run folder's claim: the resolved config stored with each run, the lock held while it trains,
and the check that a folder is reused only by the config that trained it.
"""

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import yaml
from detectron2.config import CfgNode
from detectron2.utils import comm

from ..config import get_ion_cfg
from .stages import training_stages

__all__ = [
    "CONFIG_FILE",
    "IGNORED_KEYS",
    "LOCK_FILE",
    "RESUME_SCHEDULE_KEYS",
    "RunClaim",
    "claim_run",
    "config_differences",
    "kept_run_config",
    "lock_run_dir",
    "prepare_run_dir",
    "write_run_config",
]

logger = logging.getLogger(__name__)

# Where Detectron2's default_setup (train_net.py) writes the resolved config; we use the same.
CONFIG_FILE = "config.yaml"
# Keys whose change leaves a trained model as it is, so a run trained with other values is
# still this config's run. Keys under a listed node are ignored too.
IGNORED_KEYS = (
    # Where the run lives, how fast data is read, and how often it is saved: with ion_d2's
    # iteration-indexed loader and exact resume (README "What is guaranteed") the weights do
    # not depend on them.
    "OUTPUT_DIR",
    "DATALOADER.NUM_WORKERS",
    "SOLVER.CHECKPOINT_PERIOD",
    "VIS_PERIOD",
    # Only how many boxes wholly outside their image the dataset check accepts; the loader
    # drops those boxes either way.
    "DATALOADER.ION_MAX_OUTSIDE_BOX_FRACTION",
    # Only a name for the proposal keys get_ion_cfg derives from it, which are compared: a run
    # of a selective-search config stored before the key existed is still the derived one's run.
    "MODEL.ION.PROPOSALS",
    # Test-time settings: train_and_evaluate evaluates again with the current values each time.
    "DATASETS.TEST",
    "DATASETS.PROPOSAL_FILES_TEST",
    "INPUT.MIN_SIZE_TEST",
    "INPUT.MAX_SIZE_TEST",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "MODEL.ROI_HEADS.NMS_THRESH_TEST",
    "MODEL.ION.BOX_VOTING",
    "MODEL.ION.ALLOW_PARTIAL_WEIGHTS",
    "TEST.DETECTIONS_PER_IMAGE",
    "TEST.EXPECTED_RESULTS",
    "TEST.AUG",
)
# Keys that set only the schedule from the current iteration on: with resume, a run continues
# under new values (each change logged, then stored); without resume they make another run, as
# its learning rate (IONExponentialLR decays over MAX_ITER) differs from the first step.
RESUME_SCHEDULE_KEYS = (
    "SOLVER.MAX_ITER",
    "SOLVER.STEPS",
    "SOLVER.ION_STAGE2.MAX_ITER",
    "TEST.EVAL_PERIOD",
)
# The keys of RESUME_SCHEDULE_KEYS that change a stage's final weights, which the next stage of
# section 4.1's schedule starts from.
_WEIGHT_SCHEDULE_KEYS = ("SOLVER.MAX_ITER", "SOLVER.STEPS")
# Held (fcntl.flock) by the training process that claimed the folder until it ends; the kernel
# drops it when the process exits, even by kill -9, so a crashed run never blocks --resume. It
# names its holder for a refused second run, and its presence marks the folder as claimed by a
# training run (a config.yaml alone may be an --eval-only's copy, see kept_run_config).
LOCK_FILE = ".ion_d2_run.lock"
# Top-level nodes of every Detectron2 config's dump since v0.1: a stored config.yaml without one
# was cut short (the dump is sorted, VIS_PERIOD last) or is not a YAML config.
_TOP_LEVEL_KEYS = (
    "CUDNN_BENCHMARK",
    "DATALOADER",
    "DATASETS",
    "GLOBAL",
    "INPUT",
    "MODEL",
    "OUTPUT_DIR",
    "SEED",
    "SOLVER",
    "TEST",
    "VERSION",
    "VIS_PERIOD",
)
# Written by a run's first checkpoint (Detectron2's Checkpointer).
_CHECKPOINT = "last_checkpoint"
# Files of a run that a retrain moves aside (log.txt stays: it may be open).
_RUN_FILES = (_CHECKPOINT, "metrics.json", CONFIG_FILE, "inference")
_RUN_PREFIXES = ("model_", "events.out.tfevents")


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def _under(key: str, nodes: Tuple[str, ...]) -> bool:
    """Whether ``key`` is one of ``nodes`` or under one."""
    return any(key == k or key.startswith(k + ".") for k in nodes)


def config_differences(stored: str, current: str, defaults: Optional[str] = None) -> List[str]:
    """
    Args:
        stored, current (str): two configs as YAML (:meth:`CfgNode.dump`).
        defaults (str or None): the defaults of ``current`` as YAML. A key that ``stored`` lacks
            and whose current value is its default is no difference: it was added after the
            stored run was trained, which then ran with that default.

    Returns:
        list[str]: "KEY: stored -> current" for each key, not in :data:`IGNORED_KEYS`, whose
        value differs or that only one of them has.
    """
    default = yaml.safe_load(defaults) if defaults is not None else {}
    diffs = _differences(yaml.safe_load(stored), yaml.safe_load(current), default)
    return [line for _, line in diffs]


def _differences(stored: dict, current: dict, default: dict) -> List[Tuple[str, str]]:
    """(KEY, "KEY: stored -> current") for :func:`config_differences`'s keys."""
    old, new, default = _flatten(stored), _flatten(current), _flatten(default)
    missing = object()
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a is missing and key in default and b == default[key]:
            continue
        if a != b and not _under(key, IGNORED_KEYS):
            a = "(absent)" if a is missing else repr(a)
            b = "(absent)" if b is missing else repr(b)
            diffs.append((key, f"{key}: {a} -> {b}"))
    return diffs


def write_run_config(cfg: CfgNode) -> str:
    """
    Write ``cfg`` to ``OUTPUT_DIR/config.yaml`` (where default_setup writes it) atomically: a
    temporary file in the same folder, flushed to disk, then renamed over it, so that a crash
    leaves the old file or the new one, never a part. Returns the path.
    """
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    path = os.path.join(cfg.OUTPUT_DIR, CONFIG_FILE)
    _write_atomically(path, cfg.dump())
    return path


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself
    finally:
        os.close(folder)


def _read_run_config(path: str, output_dir: str) -> dict:
    """The stored config at ``path``; a damaged one (empty, not YAML, cut short) is refused."""
    with open(path) as f:
        text = f.read()
    problem, data = None, None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = f"it is not YAML ({getattr(e, 'problem', None) or e}{where})"
    if problem is None and data is None:
        problem = "it is empty" if not text.strip() else "it holds no YAML value, only comments"
    elif problem is None and not isinstance(data, dict):
        problem = f"it holds a {type(data).__name__}, not a config's mapping"
    elif problem is None:
        lacking = [k for k in _TOP_LEVEL_KEYS if k not in data]
        if lacking:
            problem = (
                f"it lacks {', '.join(lacking)}, which every Detectron2 config has: it was cut "
                "short, or is not a YAML config"
            )
    if problem is not None:
        raise ValueError(
            f"{path} is damaged: {problem}. It no longer tells which config trained the run in "
            f"{output_dir}. Pass retrain=True (--retrain) to move that run aside and train "
            "again, or restore the file with the run's config (train_net.py logs it in "
            f"{os.path.join(output_dir, 'log.txt')} after 'Running with full config:')."
        )
    return data


def _move_run_aside(output_dir: str) -> str:
    target = os.path.join(output_dir, "replaced_" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(target)
    for name in sorted(os.listdir(output_dir)):
        if name in _RUN_FILES or name.startswith(_RUN_PREFIXES):
            shutil.move(os.path.join(output_dir, name), os.path.join(target, name))
    return target


def _default_config() -> CfgNode:
    return get_ion_cfg()


class _FolderLock:
    """One folder's :data:`LOCK_FILE`, held with ``fcntl.flock``; re-entrant in its process."""

    def __init__(self, key: str, fd: int):
        self.key, self.fd = key, fd
        self.count, self.pid = 1, os.getpid()

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            _HELD.pop(self.key, None)


# The folder locks this process holds, by real path: they live until released or the process
# ends, whoever keeps the RunClaim.
_HELD: Dict[str, _FolderLock] = {}


class RunClaim:
    """
    Run folders claimed by this process (:func:`claim_run`, :func:`prepare_run_dir`,
    :func:`lock_run_dir`): their locks, held until :meth:`release` or the end of the process.
    Used as a context manager, it releases them on exit.
    """

    def __init__(self, locks: Optional[List[_FolderLock]] = None):
        self._locks = list(locks or [])

    def release(self) -> None:
        while self._locks:
            self._locks.pop().release()

    def __enter__(self) -> "RunClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(output_dir: str) -> _FolderLock:
    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    held = _HELD.get(key)
    if held is not None and held.pid == os.getpid():
        held.count += 1
        return held
    path = os.path.join(output_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            # A file system without flock (some network or FUSE mounts): train unlocked.
            logger.warning(f"Cannot lock {path} ({e}); a second run there is not refused.")
            _HELD[key] = _FolderLock(key, fd)
            return _HELD[key]
        holder = os.read(fd, 1024).decode(errors="replace").strip()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        raise RuntimeError(
            f"{output_dir} is in use by another training run ({holder or 'pid not written yet'}"
            f"; lock {path}). Two runs in one OUTPUT_DIR overwrite each other's checkpoints: "
            "wait until it ends, or choose another OUTPUT_DIR."
        ) from None
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode())
    _HELD[key] = _FolderLock(key, fd)
    return _HELD[key]


def lock_run_dir(output_dir: str) -> RunClaim:
    """
    Take ``output_dir``'s :data:`LOCK_FILE` for this process (again, if it holds it already),
    without the config check of :func:`claim_run`: for runs whose config is not a
    :class:`CfgNode` (tools/lazyconfig_train_net.py).

    Raises:
        RuntimeError: another live process holds it, named by its pid and host.
    """
    return RunClaim([_lock(output_dir)])


def _check_run_dir(
    cfg: CfgNode, *, claimed: bool, resume: bool, retrain: bool, followed_by: Optional[str]
) -> List[str]:
    """
    See :func:`claim_run`; ``claimed``: the folder was claimed before (its lock file existed),
    ``followed_by``: the folder of the stage that starts from this one's final weights.

    Returns:
        list[str]: the schedule changes resume accepts, as "KEY: stored -> current".
    """
    out = cfg.OUTPUT_DIR
    path = os.path.join(out, CONFIG_FILE)
    has_run = os.path.isfile(os.path.join(out, _CHECKPOINT))
    if not (has_run or (claimed and os.path.isfile(path))):
        return []  # a new folder, or one whose config.yaml is an --eval-only's copy
    if retrain:
        logger.info(f"Retraining: the previous run in {out} is moved to {_move_run_aside(out)}.")
        return []
    if not os.path.isfile(path):
        raise ValueError(
            f"{out} holds a run without its config ({path}), so it cannot be told apart "
            "from another config's run. Pass retrain=True (--retrain) to move it aside and "
            "train again, or choose another OUTPUT_DIR."
        )
    current, default = (yaml.safe_load(c.dump()) for c in (cfg, _default_config()))
    diffs = _differences(_read_run_config(path, out), current, default)
    schedule = [line for key, line in diffs if _under(key, RESUME_SCHEDULE_KEYS)]
    if len(schedule) < len(diffs) or (schedule and not resume):
        hint = (
            "These keys only set the schedule: pass resume=True (--resume) to continue that "
            "run with them. "
            if len(schedule) == len(diffs)
            else ""
        )
        raise ValueError(
            f"{out} holds a run of another config ({path}); it differs in {len(diffs)} "
            "key(s):\n  " + "\n  ".join(line for _, line in diffs) + f"\n{hint}Pass "
            "retrain=True (--retrain) to move that run aside and train again, or choose "
            "another OUTPUT_DIR."
        )
    weights = [line for key, line in diffs if _under(key, _WEIGHT_SCHEDULE_KEYS)]
    if weights and followed_by and os.path.isfile(os.path.join(followed_by, _CHECKPOINT)):
        raise ValueError(
            f"{out}'s schedule changes ({'; '.join(weights)}), but {followed_by} holds a run "
            "trained from its earlier final weights. Pass retrain=True (--retrain) to train "
            "both again, or keep this stage's schedule (SOLVER.ION_STAGE2.MAX_ITER sets stage "
            "2's)."
        )
    return schedule


def _claim(
    runs: List[CfgNode], followed_by: List[Optional[str]], *, resume: bool, retrain: bool
) -> RunClaim:
    # Lock every folder, then check every one, then write: a refusal leaves all as they were.
    claim = RunClaim()
    try:
        claimed = [os.path.isfile(os.path.join(run.OUTPUT_DIR, LOCK_FILE)) for run in runs]
        for run in runs:
            claim._locks.append(_lock(run.OUTPUT_DIR))
        changes = [
            _check_run_dir(run, claimed=c, resume=resume, retrain=retrain, followed_by=nxt)
            for run, c, nxt in zip(runs, claimed, followed_by)
        ]
        for run, changed in zip(runs, changes):
            path = write_run_config(run)
            if changed:
                logger.info(
                    f"Resuming the run in {run.OUTPUT_DIR} with another schedule: "
                    + "; ".join(changed)
                    + f" ({path} stores it)."
                )
    except BaseException:
        claim.release()
        raise
    return claim


def prepare_run_dir(cfg: CfgNode, *, resume: bool = False, retrain: bool = False) -> RunClaim:
    """
    Claim ``cfg.OUTPUT_DIR`` as ``cfg``'s run folder alone (:func:`claim_run` claims every
    folder of a training): lock it, check what it holds and store ``cfg`` there.
    """
    return _claim([cfg], [None], resume=resume, retrain=retrain)


def claim_run(cfg: CfgNode, *, resume: bool = False, retrain: bool = False) -> RunClaim:
    """
    Claim the folders that training ``cfg`` writes, before it starts: ``OUTPUT_DIR`` and, for
    section 4.1's two stages (:func:`training_stages`), each stage's. For each folder:

    * its :data:`LOCK_FILE` is taken (:func:`lock_run_dir`) and held until the claim is
      released or the process ends: a second live run in it is refused, naming the first;
    * a folder that a run claimed before (its lock file) or that holds a checkpoint must hold
      that run's ``config.yaml``, and ``cfg`` must equal it but for :data:`IGNORED_KEYS`
      (and, with ``resume``, :data:`RESUME_SCHEDULE_KEYS`, each change logged), whether or
      not the run wrote a checkpoint yet; with ``retrain``, the previous run is moved to
      ``OUTPUT_DIR/replaced_<time>/`` and training starts again;
    * then ``cfg`` is stored as its ``config.yaml``, atomically (:func:`write_run_config`).

    Nothing is moved or written unless every folder passes.

    Returns:
        RunClaim: the folders' locks (release them when training is over, or let the process
        end).

    Raises:
        RuntimeError: another live process trains in one of the folders.
        ValueError: a folder holds a run of another config, a run without its config, or a
            damaged ``config.yaml`` (each naming the file and the way out), or, with
            ``resume``, an earlier stage's ``SOLVER.MAX_ITER`` or ``STEPS`` changes while a
            later stage holds a run trained from its final weights.
    """
    stages = training_stages(cfg)
    runs = ([cfg] if len(stages) > 1 else []) + stages
    followed_by = [None] * (len(runs) - len(stages))
    followed_by += [s.OUTPUT_DIR for s in stages[1:]] + [None]
    return _claim(runs, followed_by, resume=resume, retrain=retrain)


@contextlib.contextmanager
def kept_run_config(output_dir: str) -> Iterator[None]:
    """
    Keep a claimed run folder's ``config.yaml`` as it is across the block, around
    Detectron2's ``default_setup``, which rewrites it in place with the config it is given: an
    --eval-only run's config would take the run's place, and a crash amid that write would
    leave a part. Afterwards the kept file is written back atomically. Only the main process
    writes, as ``default_setup``.
    """
    path = os.path.join(output_dir, CONFIG_FILE)
    claimed = any(os.path.isfile(os.path.join(output_dir, f)) for f in (LOCK_FILE, _CHECKPOINT))
    kept = None
    if comm.is_main_process() and claimed and os.path.isfile(path):
        with open(path) as f:
            kept = f.read()
    yield
    if kept is not None:
        _write_atomically(path, kept)
