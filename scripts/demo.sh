#!/usr/bin/env bash
# Starts the bundled demo API on 127.0.0.1, runs every example flow against it, and shows
# where the records went. Used by `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${OUT:-out/demo}
rm -rf "$OUT"
mkdir -p "$OUT"

# Port 0: the demo API picks a free port and prints its URL on its first line.
coproc DEMO { exec "$BIN/python" -m runner.demo_api --port 0; }
trap 'kill "$DEMO_PID" 2>/dev/null || true' EXIT
read -r DEMO_API_URL <&"${DEMO[0]}"
export DEMO_API_URL
# The demo API's own credentials; real flows take these from the environment or $RUNNER_SECRETS_DIR.
export DEMO_TOKEN=demo-token DEMO_CLIENT_SECRET=demo-secret DEMO_PASSWORD=demo-password
echo "demo API at $DEMO_API_URL"
echo

status=0
for flow in flows/*.yaml; do
  name=$(basename "$flow" .yaml)
  printf '%-22s ' "$name"
  if "$BIN/runner" run "$flow" --output-dir "$OUT/$name" --state "$OUT/$name.state.json" \
       --summary "$OUT/$name.summary.json" 2>"$OUT/$name.log"; then
    "$BIN/python" - "$OUT/$name/manifest.json" <<'PY'
import json, sys
manifest = json.load(open(sys.argv[1]))
streams = manifest["streams"]
print(", ".join(f"{s}: {v['count']} records" for s, v in streams.items()) or "no streams")
PY
  else
    echo "FAILED (exit $?), see $OUT/$name.log"
    tail -n 5 "$OUT/$name.log" | sed 's/^/    /'
    status=1
  fi
done

# The same records into a database: SQLite, the embedded one (the state lives in it too).
echo
DB="$OUT/demo.db"
printf '%-22s ' "contacts -> SQLite"
if "$BIN/runner" run flows/contacts.yaml --sink "sqlite:///$DB" 2>"$OUT/contacts.sqlite.log"; then
  echo "loaded into $DB"
  QUERY="SELECT id, email, company_id, updated_at FROM contacts ORDER BY id LIMIT 5;"
  echo "$QUERY"
  if command -v sqlite3 >/dev/null; then
    sqlite3 -header -column "$DB" "$QUERY"
  else
    "$BIN/python" - "$DB" "$QUERY" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
cursor = db.execute(sys.argv[2])
names = [d[0] for d in cursor.description]
rows = [[str(v) for v in row] for row in cursor]
widths = [max(len(x) for x in col) for col in zip(names, *rows)]
for row in [names, ["-" * w for w in widths], *rows]:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
PY
  fi
else
  echo "FAILED (exit $?), see $OUT/contacts.sqlite.log"
  tail -n 5 "$OUT/contacts.sqlite.log" | sed 's/^/    /'
  status=1
fi

# One flow split into 3 shards started at once, as a Kubernetes Indexed Job or Airflow would.
echo
printf '%-22s ' "companies in 3 shards"
pids=()
for i in 0 1 2; do
  "$BIN/runner" run flows/companies_sharded.yaml --shard "$i/3" --output-dir "$OUT/shards/{shard}" \
    2>"$OUT/shards.$i.log" &
  pids+=($!)
done
shard_status=0
for pid in "${pids[@]}"; do wait "$pid" || shard_status=$?; done
if [[ $shard_status -eq 0 ]]; then
  for i in 0 1 2; do
    printf 'shard %s/3: %s companies  ' "$i" "$(wc -l <"$OUT/shards/$i/companies.jsonl")"
  done
  echo
else
  echo "FAILED (exit $shard_status), see $OUT/shards.*.log"
  status=1
fi

echo
echo "Records are in $OUT/<flow>/<stream>.jsonl, with manifest.json beside them;"
echo "summaries in $OUT/<flow>.summary.json, logs in $OUT/<flow>.log; the contacts also in $DB."
echo "Run one flow again incrementally (state in $OUT/contacts.state.json):"
echo "  DEMO_API_URL=... DEMO_TOKEN=demo-token $BIN/runner run flows/contacts.yaml --state $OUT/contacts.state.json"
exit $status
