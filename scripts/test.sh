#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not multirank"` or `bash scripts/test.sh tests/mcore`.
# Tests run on one pytest-xdist worker per core (at most 4), a module at a time (`-n 0`: one
# process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLOG_v=${GLOG_v:-3}
exec .venv/bin/python -m pytest -q --durations=15 -n auto --maxprocesses 4 --dist loadfile "$@"
