#!/usr/bin/env bash
# Run the core and Lightning tests on the oldest torch that pyproject.toml accepts.
#
#   make test-oldest-torch            # or: bash scripts/test_oldest_torch.sh [pytest args]
#
# The oldest torch is read from the `torch>=X.Y` requirement in pyproject.toml and installed, as
# torch==X.Y.0, into its own virtual environment, .venv-oldest-torch (the main .venv is not
# touched). PyPI's Linux wheel of an older torch is a CUDA build with several GB of CUDA
# libraries: the first run downloads them (about 3 GB). With PUB_TORCH_INDEX set (e.g. a CPU
# wheel index) torch comes from there instead. Not part of `make test` (CI has no room for a
# second torch); run it when the floor or the optimizer transforms change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
floor=$(sed -n 's/.*"torch>=\([0-9][0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
if [ -z "$floor" ]; then
  echo "scripts/test_oldest_torch.sh: no \"torch>=X.Y\" requirement found in pyproject.toml" >&2
  exit 2
fi
case "$floor" in *.*.*) spec="torch==$floor" ;; *) spec="torch==$floor.0" ;; esac
spec=${PUB_TORCH_SPEC:-$spec}  # e.g. PUB_TORCH_SPEC="torch==2.8.0" to try another release
venv=${PUB_OLDEST_VENV:-.venv-oldest-torch}
stamp="$venv/.pub-optim-oldest-torch"
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$spec" ] && [ "$stamp" -nt pyproject.toml ]; }; then
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
  if [ -n "${PUB_TORCH_INDEX:-}" ]; then
    "${pip[@]}" "$spec" --index-url "$PUB_TORCH_INDEX"
  else
    "${pip[@]}" "$spec"
  fi
  # The constraint keeps pip from "upgrading" torch to satisfy an extra.
  echo "$spec" >"$venv/constraints.txt"
  "${pip[@]}" -c "$venv/constraints.txt" -e ".[cvxpy,lightning,dev]"
  echo "$spec" >"$stamp"
fi
"$venv/bin/python" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
PYTHONHASHSEED=0 "$venv/bin/python" -m pytest -q -p no:randomly tests/core tests/lightning "$@"
