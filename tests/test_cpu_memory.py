"""ION_KEEP_FREED_CPU_MEMORY (ion_d2/engine/cpu_memory.py): freed memory is reused without page
faults, the trainer applies it by the key, and a C library other than glibc is reported."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ion_d2.engine import cpu_memory

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# A fresh process (the setting is the process's): the minor page faults of allocating, filling
# and freeing a 64 MB tensor, the second time, with and without the setting.
_PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from ion_d2.engine.cpu_memory import keep_freed_cpu_memory, malloc_keeps_freed_memory
    applied = keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    counts = []
    for _ in range(12):
        before = faults()
        x = torch.empty(16 * 2**20)  # 64 MB
        x.fill_(1.0)
        del x
        counts.append(faults() - before)
    print(json.dumps({"applied": applied, "kept": malloc_keeps_freed_memory(), "faults": counts}))
    """)


def _probe(mode):
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(cpu_memory._glibc() is None, reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    """Without the setting each 64 MB tensor is a fresh mapping: all its 16384 pages fault in
    again every time; with it the heap keeps them and, once it has grown (a few rounds: an
    aligned request does not always fit the chunk just freed), later tensors reuse them."""
    default = _probe("default")
    kept = _probe("keep")
    assert not default["kept"] and kept["applied"] and kept["kept"]
    assert min(default["faults"]) > 8000, default
    assert sum(kept["faults"][-6:]) < 1000, kept


def test_other_c_library_is_reported_not_applied(monkeypatch, caplog):
    monkeypatch.setattr(cpu_memory, "_APPLIED", False)
    monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    with caplog.at_level("WARNING", logger="ion_d2.engine.cpu_memory"):
        assert cpu_memory.keep_freed_cpu_memory() is False
    assert "not applied" in caplog.text and "musl" in caplog.text
    assert not cpu_memory.malloc_keeps_freed_memory()


def test_refused_setting_raises(monkeypatch):
    class RefusingLibc:
        @staticmethod
        def mallopt(param, value):
            return 0

    monkeypatch.setattr(cpu_memory, "_APPLIED", False)
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: RefusingLibc())
    with pytest.raises(RuntimeError, match=r"mallopt\(M_MMAP_MAX, 0\) failed"):
        cpu_memory.keep_freed_cpu_memory()


@pytest.mark.parametrize("keep", [True, False])
def test_trainer_applies_the_key(keep, monkeypatch, tmp_path):
    """IONTrainer (train_net.py, train_and_evaluate) sets the allocator when
    ION_KEEP_FREED_CPU_MEMORY is True (the default), and leaves it alone when False."""
    from model_utils import load_cfg, synthetic_slice

    from ion_d2.engine import IONTrainer, trainer

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_cpu_memory", lambda: calls.append(1) or True)
    cfg = load_cfg(os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml"))
    assert cfg.ION_KEEP_FREED_CPU_MEMORY is True
    with synthetic_slice(
        str(tmp_path), num_train=2, num_val=1, seed=4, name_prefix=f"cpumem{keep}"
    ) as names:
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (names[0],), ()
        cfg.OUTPUT_DIR = str(tmp_path / "run")
        cfg.ION_KEEP_FREED_CPU_MEMORY = keep
        IONTrainer(cfg)
    assert calls == ([1] if keep else [])


@pytest.mark.parametrize("name", ["ION_VGG16_synthetic", "ION_R50_FPN_1x"])
def test_lazy_configs_hold_the_key(name):
    """ion_d2's LazyConfigs hold train.ion_keep_freed_cpu_memory (True, as the YAML default), so
    the override that turns it off is accepted and read."""
    from detectron2.config import LazyConfig, get_cfg

    from ion_d2.config import add_ion_config
    from ion_d2.engine.overrides import apply_lazy_overrides

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "lazy", name + ".py"))
    yaml_default = get_cfg()
    add_ion_config(yaml_default)
    assert cfg.train.ion_keep_freed_cpu_memory is yaml_default.ION_KEEP_FREED_CPU_MEMORY is True
    cfg = apply_lazy_overrides(cfg, ["train.ion_keep_freed_cpu_memory=false"])
    assert cfg.train.ion_keep_freed_cpu_memory is False
