"""
Multi-process training on machines without CUDA: Detectron2's ``launch`` where it supports
that, the smallest adapter where it does not, and DistributedDataParallel for CPU models.

Upstream Detectron2's ``launch`` starts its processes on GLOO when CUDA is unavailable;
v0.6's asserts CUDA and always uses NCCL. Both versions' ``create_ddp_model`` pass
``device_ids=[local_rank]``, which DistributedDataParallel refuses for a CPU module.
"""

import functools
import gc
import inspect
import logging
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "launch",
    "d2_launch_supports_cpu",
    "create_ddp_model_any_device",
    "unwrap_ddp",
    "run_then_leave_group",
]

logger = logging.getLogger(__name__)

_TIMEOUT = timedelta(minutes=30)


@functools.lru_cache(maxsize=None)
def d2_launch_supports_cpu() -> bool:
    """
    Returns:
        bool: whether the installed Detectron2's ``launch`` starts processes without CUDA (its
        worker picks GLOO when CUDA is unavailable, as upstream's does; v0.6's does not).
    """
    module = inspect.getmodule(d2_launch)
    worker = getattr(module, "_distributed_worker", None)
    try:
        return worker is not None and "gloo" in inspect.getsource(worker).lower()
    except (OSError, TypeError):
        return False


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=()):
    """
    :func:`detectron2.engine.launch` with the same arguments. Without CUDA, ``num_gpus_per_machine``
    is the number of CPU processes per machine; they communicate over GLOO, through Detectron2's
    ``launch`` when it supports that and through :func:`_cpu_worker` otherwise.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1 or torch.cuda.is_available():
        return d2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args
        )
    logger.warning(
        f"No CUDA: starting {num_gpus_per_machine} CPU processes per machine ({world_size} in "
        "all) on the GLOO backend; set MODEL.DEVICE cpu."
    )
    main_func = functools.partial(run_then_leave_group, main_func)
    if d2_launch_supports_cpu():
        return d2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; give tcp://HOST:PORT.")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args),
        daemon=False,
    )


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def run_then_leave_group(main_func, *args):
    """
    Runs ``main_func(*args)`` in a process of a GLOO group, then has every rank wait for the
    others and tears the group down before the process exits. Left to interpreter exit, a rank
    whose peer had already gone could abort with SIGABRT ("terminate called without an active
    exception") after training had finished. After an exception the group is left as it is
    (waiting for the other ranks could hang).

    Returns:
        what ``main_func`` returns.
    """
    result = main_func(*args)
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        gc.collect()  # frees DistributedDataParallel's reducer, which holds the group
        dist.destroy_process_group()
    return result


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args):
    """Detectron2 v0.6's ``_distributed_worker`` on GLOO, without its CUDA calls."""
    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=_TIMEOUT
    )
    # comm.get_local_rank()/get_local_size() read the process group of this machine's ranks.
    for i in range(world_size // num_per_machine):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)


def create_ddp_model_any_device(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """
    :func:`detectron2.engine.defaults.create_ddp_model` for CUDA and CPU models alike:
    ``device_ids`` are given only for a CUDA module (DistributedDataParallel refuses them for a
    CPU one). Returns the model itself in a single process.
    """
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cuda":
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    return DistributedDataParallel(model, **kwargs)


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a :class:`DistributedDataParallel` (what
    :func:`create_ddp_model_any_device` wraps), or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model
