#!/usr/bin/env bash
# Creates .venv (Python 3.12) in the repository root and installs ki with its test extras.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  local candidates=(python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)"/versions/3.12*/bin/python3.12)
  fi
  candidates+=("$HOME"/.pyenv/versions/3.12*/bin/python3.12)
  local c
  for c in "${candidates[@]}"; do
    # A pyenv shim exists even when no 3.12 is selected, so run it rather than trusting `command -v`.
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  py=$(find_python312) || { echo "error: Python 3.12 not found (looked for python3.12 on PATH and under pyenv)" >&2; exit 1; }
  echo "creating .venv with $py"
  "$py" -m venv .venv
fi

stamp=.venv/.ki-install-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log=.venv/install.log
  echo "installing ki and its dependencies into .venv (first time: a minute or more, torch is large; log: $log)"
  # uv (from the registry) installs the same versions as pip, several times faster: it downloads torch and its CUDA
  # libraries in parallel (a fresh .venv here: 57 s against pip's 5:21, each beside a training run). uv does not read
  # pip's configuration, so where uv cannot be installed or cannot install from its index, pip does it all.
  # --compile-bytecode: uv, unlike pip, leaves the .py files uncompiled, and where PYTHONDONTWRITEBYTECODE is set (as
  # on this project's machines) every process compiled what it imported again (lerobot, torch, jax, flax: 14 s → 7 s).
  install_with() {
    "$@" -e '.[test]' &&
    # openpi's client, unmodified, for tests/test_serve.py: without its numpy<2 pin (see pyproject.toml)
    "$@" --no-deps 'openpi-client==0.1.2'
  }
  {
    { .venv/bin/python -m pip install -q uv &&
      install_with .venv/bin/python -m uv pip install -q --compile-bytecode --python .venv/bin/python; } ||
    { echo "uv could not install; installing with pip"; install_with .venv/bin/python -m pip install -q; }
  } > "$log" 2>&1 || { tail -n 40 "$log" >&2; echo "error: the install failed (whole log: $log)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
