#!/usr/bin/env bash
# Corral's two commands, on a machine with only Python 3.11+ (they set up everything else):
#
#   bash deploy/local.sh up      # the whole platform on embedded defaults + a demo workflow
#   bash deploy/local.sh test    # the whole test suite (extra arguments go to pytest)
#
# The first run creates a virtual environment (.venv, or $CORRAL_VENV) and installs Corral
# into it; llama-cpp-python compiles from source once (about 5 minutes; pip caches the wheel).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${CORRAL_VENV:-$root/.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/corral" ] || [ "$root/pyproject.toml" -nt "$venv/.corral-installed" ]; then
  echo "setting up $venv (first run compiles llama-cpp-python: a few minutes)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e "$root[dev]"
  touch "$venv/.corral-installed"
fi

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  up)
    cd "$root"
    exec "$venv/bin/corral" up "$@"
    ;;
  test)
    cd "$root"
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  install)
    ;;
  *)
    echo "usage: bash deploy/local.sh up|test|install [args...]" >&2
    exit 2
    ;;
esac
