#!/usr/bin/env bash
# `make bench`: makes the peers' virtualenvs (dlt, airbyte-cdk: for the benchmark only, never
# runtime dependencies of the runner), then runs benchmarks/bench.py with the project's venv.
#   ROUNDS=5 (default)   QUICK=1 (one round, smaller scaling run)   ONLY=sequential,fanout,...
#   NO_PEERS=1 (do not create the peers' venvs; a missing one is reported, not measured)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BENCH_PY=${BENCH_PY:-.venv/bin/python}

make_peer() {  # venv-dir requirements-file (one pinned package)
  local venv=$1 reqs=$2
  if [[ -x $venv/bin/python ]] && "$venv/bin/pip" freeze 2>/dev/null | grep -qixF "$(head -1 "$reqs")"; then
    return 0
  fi
  echo "bench: creating $venv from $reqs" >&2
  if ! { "$PYTHON" -m venv "$venv" && "$venv/bin/pip" install --quiet --upgrade pip \
        && "$venv/bin/pip" install --quiet -r "$reqs"; } >&2; then
    echo "bench: could not install $reqs into $venv: that peer will be reported as not measured" >&2
  fi
}

if [[ -z ${NO_PEERS:-} ]]; then
  make_peer benchmarks/.venv-dlt benchmarks/requirements-dlt.txt
  make_peer benchmarks/.venv-airbyte benchmarks/requirements-airbyte.txt
fi

args=()
[[ -n ${QUICK:-} ]] && args+=(--quick)
exec "$BENCH_PY" benchmarks/bench.py --rounds "${ROUNDS:-5}" "${args[@]}" "$@"
