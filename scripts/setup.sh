#!/usr/bin/env bash
# Create .venv (Python 3.11) and install msformers with its test extras; a no-op when the
# installed set already matches pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=".venv/.msformers-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating .venv with $($PY --version) and installing msformers[test] (about a minute)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
log=.venv/install.log
if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e ".[test]"; } > "$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "[setup] pip install failed; full log: $log" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import mindspore, numpy; print("mindspore", mindspore.__version__, "numpy", numpy.__version__)')"
