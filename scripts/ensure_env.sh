#!/usr/bin/env bash
# Create or refresh the project-local virtual environment (.venv) from requirements.lock.
# Idempotent: reinstalls only when requirements.lock or pyproject.toml changed since the last install.
# Honours PIP_FIND_LINKS (a local folder of wheels, e.g. a CPU torch build). On a machine without an
# NVIDIA driver and without PIP_FIND_LINKS, the CPU wheel index of PyTorch is added so that pip does
# not pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
[ -n "$PY" ] || { echo "ensure_env: no python3 found (Python 3.11 expected)" >&2; exit 1; }
stamp_want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)

# `lm_eval --model spiel`: lm-eval has no model plugin discovery; a startup hook registers the model
# lazily when lm-eval fills its model registry (spielbench/lm_eval_plugin.py).
install_lm_eval_hook() {
  local site
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  [ -f "$site/spiel_lm_eval.pth" ] || echo "import spielbench.lm_eval_plugin" > "$site/spiel_lm_eval.pth"
}

if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.lock-stamp" ] && [ "$(cat "$VENV/.lock-stamp")" = "$stamp_want" ]; then
  install_lm_eval_hook
  exit 0
fi
echo "ensure_env: installing the locked environment into $VENV (a few minutes the first time)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
extra=()
if [ -n "${PIP_FIND_LINKS:-}" ]; then
  extra+=(--find-links "$PIP_FIND_LINKS")
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  extra+=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install --quiet "${extra[@]}" -r requirements.lock
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
install_lm_eval_hook
echo "$stamp_want" > "$VENV/.lock-stamp"
