"""Install detectron2 into the running Python environment for ion_d2.

Run with the environment's interpreter (``make setup`` does this).  Three cases, in order:

1. ``$ION_D2_DETECTRON2`` names the user's own detectron2 (a source checkout or a wheel): it is
   pip-installed as is (a checkout builds its compiled extension against the installed torch).
   No fallback is added.
2. A detectron2 with its compiled extension is already importable: it is kept. No fallback.
3. Otherwise the exact Python sources of the official v0.6 release are taken from PyPI's
   ``pb1-detectron2==0.6`` sdist, which lacks ``detectron2/layers/csrc``.  They are installed
   without building the extension, with ``d2_fallback_C.py`` (beside this file) added as
   ``detectron2/_C.py`` so that v0.6's import-time ``from detectron2 import _C`` works;
   compiled-only ops raise a clear error.  The distribution is renamed ``detectron2`` so that
   installing a full build later replaces it cleanly.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Optional, Tuple

REPO = Path(__file__).resolve().parents[2]
FALLBACK = Path(__file__).resolve().with_name("d2_fallback_C.py")
SDIST_REQ = "pb1-detectron2==0.6"

# Reports which detectron2 is importable: "none", "fallback" or "compiled".
_PROBE = """
import importlib.util, sys
if importlib.util.find_spec("detectron2") is None:
    print("none"); sys.exit()
try:
    import detectron2._C as C
except ImportError:
    print("broken"); sys.exit()
print("fallback" if getattr(C, "ION_D2_FALLBACK", False) else "compiled")
print(C.__file__)
"""


def _run(cmd):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.check_call([str(c) for c in cmd])


def _pip(*args):
    _run([sys.executable, "-m", "pip", *args])


def probe() -> Tuple[str, Optional[Path]]:
    """
    Returns:
        tuple: the state, "none", "broken", "fallback" or "compiled" (see _PROBE), and the path
        of the importable ``detectron2._C`` (None when there is none).
    """
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, cwd="/"
    )
    lines = out.stdout.split()
    return lines[0], Path(lines[1]) if len(lines) > 1 else None


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise RuntimeError(
            f"Unexpected detectron2 setup.py: expected exactly one {old!r} to patch. "
            f"Is {SDIST_REQ} still the v0.6 release?"
        )
    return text.replace(old, new)


# Appended to detectron2/evaluation/fast_eval_api.py of the Python-only install: COCOEvaluator's
# default use_fast_impl=True would call the compiled AP code, which this install lacks
# (Detectron2's own tools/train_net.py builds it so).
FAST_EVAL_PATCH = """

# Added by ion_d2's Python-only detectron2 install (tools/bootstrap/install_detectron2.py): this
# detectron2 has no compiled extension, so COCOeval_opt's C++ evaluate/accumulate cannot run.
# COCOEvaluator(use_fast_impl=True), its default, evaluates with the official pycocotools code
# instead, which use_fast_impl=False selects: the same AP, more slowly.
COCOeval_opt = COCOeval
"""


def fast_eval_file(package_dir: Path) -> Path:
    return package_dir / "evaluation" / "fast_eval_api.py"


def patch_fast_eval(package_dir: Path) -> bool:
    """Append :data:`FAST_EVAL_PATCH` once; returns whether the file changed."""
    path = fast_eval_file(package_dir)
    text = path.read_text()
    if FAST_EVAL_PATCH in text:
        return False
    path.write_text(text + FAST_EVAL_PATCH)
    return True


def install_python_only(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    dl = work / "sdist"
    if not any(dl.glob("pb1-detectron2-0.6.tar.gz")):
        # --no-build-isolation: v0.6's setup.py imports torch just to compute metadata.
        _pip("download", "--no-deps", "--no-build-isolation", "-d", dl, SDIST_REQ)
    (tarball,) = dl.glob("pb1-detectron2-0.6.tar.gz")
    src = work / "pb1-detectron2-0.6"
    if src.exists():
        shutil.rmtree(src)
    with tarfile.open(tarball) as tf:
        tf.extractall(work, filter="data")
    setup_py = src / "setup.py"
    text = setup_py.read_text()
    text = _replace_once(text, 'name="pb1-detectron2"', 'name="detectron2"')
    # Build no extension: its C++/CUDA sources are not in the sdist.
    text = _replace_once(text, "ext_modules=get_extensions(),", "ext_modules=[],")
    # The sdist already holds detectron2/model_zoo/configs; ship them as package data.
    text = _replace_once(
        text,
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
    )
    # v0.6 pins black==21.4b2 (only used to pretty-print LazyConfig files; it breaks with current
    # click) and needs "future" only for caffe2 export: drop them so `pip check` stays clean.
    text = _replace_once(text, '"black==21.4b2",', "")
    text = _replace_once(text, '"future",  # used by caffe2', "")
    setup_py.write_text(text)
    shutil.copyfile(FALLBACK, src / "detectron2" / "_C.py")
    patch_fast_eval(src / "detectron2")
    # Dependencies are installed by setup_env.sh in versions that work together.
    _pip("install", "--no-deps", "--no-build-isolation", "--force-reinstall", src)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default=str(REPO / "build" / "detectron2"))
    args = parser.parse_args()

    user_d2 = os.environ.get("ION_D2_DETECTRON2", "").strip()
    if user_d2:
        if not Path(user_d2).exists():
            sys.exit(
                f"ION_D2_DETECTRON2={user_d2!r} does not exist; set it to a detectron2 source "
                "checkout or a detectron2 wheel file, or unset it to use the Python-only v0.6."
            )
        # The user's checkout compiles against the torch already in this environment.
        _pip("install", "--no-build-isolation", user_d2)
        state, _ = probe()
        if state != "compiled":
            sys.exit(
                f"ION_D2_DETECTRON2={user_d2!r} installed, but detectron2._C is {state!r}, not a "
                "compiled extension. Check the build log above."
            )
        print(f"detectron2: using your build from {user_d2}")
        return

    state, c_module = probe()
    if state == "compiled":
        print("detectron2: a compiled detectron2 is already installed; keeping it")
        return
    if state == "fallback" and c_module.read_bytes() == FALLBACK.read_bytes():
        if patch_fast_eval(c_module.parent):
            print("detectron2: COCOEvaluator's fast AP now falls back to pycocotools' code")
        print("detectron2: Python-only v0.6 with ion_d2's _C fallback is already installed")
        return
    install_python_only(Path(args.work_dir))
    state, _ = probe()
    if state != "fallback":
        sys.exit(f"detectron2 install failed: detectron2._C is {state!r} after installing.")
    print("detectron2: installed Python-only v0.6 with ion_d2's _C fallback")


if __name__ == "__main__":
    main()
