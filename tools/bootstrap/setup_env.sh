#!/usr/bin/env bash
# One idempotent setup step for ion_d2 (run by `make setup`, `make test`, `make demo`):
# a virtual environment in the repo (.venv, or $ION_D2_VENV), torch, detectron2 and ion_d2 in
# editable mode, pytest and the pinned linters (requirements-dev.txt). A second run with nothing
# changed finishes in seconds.
#
# Environment:
#   PYTHON             interpreter that creates the venv (default: python3)
#   ION_D2_VENV        venv folder (default: .venv in the repo)
#   ION_D2_TORCH       pip requirement(s) for torch (default: torch==2.14.1 torchvision==0.29.1)
#   ION_D2_DETECTRON2  your own detectron2 (source checkout or wheel) to install instead of the
#                      Python-only v0.6
set -euo pipefail
cd "$(dirname "$0")/../.."
BOOT=tools/bootstrap

PYTHON=${PYTHON:-python3}
VENV=${ION_D2_VENV:-.venv}
TORCH_REQ=${ION_D2_TORCH:-torch==2.14.1 torchvision==0.29.1}
STAMP="$VENV/.ion_d2_setup_stamp"

# Everything that decides what gets installed goes into the stamp.
key=$(
  {
    cat "$BOOT/setup_env.sh" "$BOOT/install_detectron2.py" "$BOOT/d2_fallback_C.py" \
      "$BOOT/requirements-detectron2.txt" "$BOOT/requirements-dev.txt" setup.py
    # The installed metadata's version: setup.py reads it from this line.
    grep "^__version__" ion_d2/__init__.py || true
    echo "$TORCH_REQ|${ION_D2_DETECTRON2:-}"
  } | sha256sum | cut -d' ' -f1
)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] \
  && "$VENV/bin/python" -c "import detectron2, ion_d2" >/dev/null 2>&1; then
  echo "setup: $VENV is up to date"
  exit 0
fi

start=$(date +%s)
rm -f "$STAMP"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Exactly one OpenCV wheel: the contrib one (requirements-detectron2.txt), which ion_d2
# then requires instead of the plain one (setup.py). All OpenCV wheels install the same `cv2`
# folder, so another one beside it would overwrite its files, and removing either would break
# `cv2`; remove any other (earlier setups installed the plain wheel) together with the contrib
# one, which the requirements below then install afresh.
others=$("$PY" -m pip list --format=freeze 2>/dev/null | cut -d= -f1 \
  | grep -i -x -E 'opencv[-_](contrib[-_])?python([-_]headless)?' \
  | grep -i -v -x -E 'opencv[-_]contrib[-_]python[-_]headless' || true)
if [ -n "$others" ]; then
  echo "setup: replacing $(echo $others) with opencv-contrib-python-headless"
  # shellcheck disable=SC2086
  "$PY" -m pip uninstall -q -y $others opencv-contrib-python-headless
fi
export ION_D2_OPENCV=contrib
# pip 26 refuses to even download an sdist from PyPI whose metadata names a URL dependency,
# which pb1-detectron2's optional [all] extra does; pip 25 downloads it.
"$PY" -m pip install -q "pip>=23,<26" "setuptools<81" wheel
# torch is pinned in every install so that nothing else can pull in a different build of it.
# shellcheck disable=SC2086
"$PY" -m pip install -q -r "$BOOT/requirements-detectron2.txt" $TORCH_REQ
"$PY" "$BOOT/install_detectron2.py"
# shellcheck disable=SC2086
"$PY" -m pip install -q --no-build-isolation -e ".[test]" -r "$BOOT/requirements-detectron2.txt" \
  -r "$BOOT/requirements-dev.txt" $TORCH_REQ
"$PY" -c "import detectron2.modeling, detectron2.evaluation, ion_d2"
echo "$key" >"$STAMP"
echo "setup: done in $(($(date +%s) - start)) s ($VENV)"
