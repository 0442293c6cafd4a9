"""Replay against online: the sequential workload (500 pages, 50,000 records) run against the
local benchmark server, then replayed by `runner test` from its recording.

    .venv/bin/python benchmarks/replay.py [--rounds 5] [--total 50000]

Records the run once (`runner run --record`), checks that the replay's records equal the
online run's, then alternates online runs and replays, each a whole CLI process; prints the
medians of wall time and peak RSS, and writes benchmarks/results/replay.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FLOW = ROOT / "benchmarks/flows/sequential.yaml"

# A small parent measures the child: its ru_maxrss is the CLI's own peak, not ours.
_MEASURE = """\
import os, subprocess, sys, time
started = time.monotonic()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.buffer.write(err)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, time.monotonic() - started)
"""


def measured(*args: str, env: dict[str, str], cwd: Path) -> tuple[float, int]:
    proc = subprocess.run(
        [PYTHON, "-c", _MEASURE, PYTHON, "-m", "runner.cli", *args],
        capture_output=True, text=True, env=env, cwd=cwd, check=False,
    )  # fmt: skip
    code, peak, duration = proc.stdout.split()
    if code != "0":
        raise SystemExit(f"runner {' '.join(args)} exited {code}:\n{proc.stderr}")
    return float(duration), int(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--total", type=int, default=50_000)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    server = subprocess.Popen(
        [PYTHON, str(ROOT / "benchmarks/server.py"), "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stdout is not None
    base = server.stdout.readline().strip()
    work = Path(tempfile.mkdtemp(prefix="runner-replay-bench-"))
    try:
        url = f"{base}/n/{args.total}"
        env["BENCH_URL"] = url
        shutil.copy(FLOW, work / "sequential.yaml")
        measured("run", "sequential.yaml", "--record", "rec.har", "--output-dir", "rec",
                 env=env, cwd=work)  # fmt: skip
        (work / "sequential.test.yaml").write_text(
            "version: 1\nflow: sequential.yaml\ncases:\n"
            "  - name: every page\n    recording: rec.har\n"
            f"    env: {{BENCH_URL: '{url}'}}\n"
            "    expect:\n      outputs: {items: rec/items.jsonl}\n"
            f"      summary: {{records: {{items: {args.total}}}}}\n"
        )
        har_mb = (work / "rec.har").stat().st_size / 1e6
        pages = len(json.loads((work / "rec.har").read_text())["log"]["entries"])
        online: list[tuple[float, int]] = []
        replay: list[tuple[float, int]] = []
        for _ in range(args.rounds):
            online.append(
                measured("run", "sequential.yaml", "--output-dir", "o", env=env, cwd=work)
            )
            replay.append(measured("test", "sequential.test.yaml", env=env, cwd=work))
        rows = []
        for name, runs in (("online run", online), ("replay (runner test)", replay)):
            wall = statistics.median(r[0] for r in runs)
            rss = statistics.median(r[1] for r in runs) / 1024
            rows.append(f"| {name} | {wall:.2f} s | {rss:.0f} MiB |")
        ratio = statistics.median(r[0] for r in online) / statistics.median(r[0] for r in replay)
        report = "\n".join(
            [
                f"# Replay against online ({time.strftime('%Y-%m-%d')})",
                "",
                f"{args.total:,} records in {pages} pages; recording {har_mb:.1f} MB; "
                f"medians of {args.rounds} alternating rounds, each a whole CLI process.",
                "",
                "| run | wall time | peak RSS |",
                "| --- | --- | --- |",
                *rows,
                "",
                f"The replay takes {1 / ratio:.2f}x the online run's time "
                f"(online / replay = {ratio:.2f}); the replay also compares all "
                f"{args.total:,} records with the snapshot.",
                "",
            ]
        )
        print(report)
        results = ROOT / "benchmarks/results"
        results.mkdir(exist_ok=True)
        (results / "replay.md").write_text(report)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
