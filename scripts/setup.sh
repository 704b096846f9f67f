#!/usr/bin/env bash
# Create ./.venv and install fedsplit into it. A no-op when it is already up to date.
#
# torch: if the venv (or, with FEDSPLIT_SYSTEM_TORCH=1, the base Python) already has torch, it is
# kept, CUDA build included. Otherwise TORCH_SPEC (default torch==2.13.0) is installed first,
# which on this project's CPU machines resolves to the CPU wheel on disk. On a GPU host, install
# your CUDA torch into .venv first, or set TORCH_SPEC and pip's index options.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.fedsplit-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  if [ "${FEDSPLIT_SYSTEM_TORCH:-0}" = 1 ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}" >&2
  "$VENV/bin/python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
echo "$want" > "$STAMP"
echo "setup: .venv ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2
