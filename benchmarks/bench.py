"""The runner against a hand-written aiohttp loop, dlt's rest_api and Airbyte's declarative
source, on one local server; whole processes, alternating rounds, medians.

    python benchmarks/bench.py [--rounds 5] [--quick] [--only sequential,fanout,scaling,startup]

`bash benchmarks/run.sh` (`make bench`) makes the peers' virtualenvs first and calls this.
Each contender runs as its own process; wall time is spawn to exit, CPU and peak RSS come
from wait4() for that one child. Results: a table on stdout, and benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
RUNNER = str(Path(PY).parent / "runner")
DLT_PY = HERE / ".venv-dlt" / "bin" / "python"
AIRBYTE_PY = HERE / ".venv-airbyte" / "bin" / "python"

SEQ_RECORDS = 50_000
# What the runner was measured with: its own version and those of its speed dependencies, all
# part of a plain install (a missing one is reported as such: its fallback was measured).
SPEED_DEPENDENCIES = ("runner-flows", "orjson", "uvloop", "jsonschema-rs", "aiohttp")
FANOUT_ITEMS = 3_000


def installed() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in SPEED_DEPENDENCIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


@dataclass(slots=True)
class Sample:
    wall: float
    cpu: float
    rss_mb: float
    records: int


@dataclass(slots=True)
class Contender:
    name: str
    # Makes (argv, stdout file or None, counter of records) for one run into a fresh folder.
    make: Callable[[Path], tuple[list[str], Path | None, Callable[[], int]]]
    expected: int
    env: dict[str, str] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def count_lines(path: Path, needle: bytes | None = None) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as fh:
        if needle is None:
            return sum(1 for _ in fh)
        return sum(1 for line in fh if needle in line)


def run_once(c: Contender, work: Path) -> None:
    """One whole process: wall time spawn to exit; CPU and peak RSS of that child alone."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    argv, stdout_path, counter = c.make(work)
    env = {**os.environ, **c.env}
    err_path = work / "stderr.txt"
    out: IO[bytes] | int
    with err_path.open("wb") as err:
        out = stdout_path.open("wb") if stdout_path else subprocess.DEVNULL
        try:
            started = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if not isinstance(out, int):
                out.close()
    records = counter()
    if proc.returncode != 0 or records != c.expected:
        tail = err_path.read_text(errors="replace")[-600:]
        c.errors.append(f"exit {proc.returncode}, {records}/{c.expected} records: {tail}")
        return
    # ru_maxrss is in KiB on Linux.
    c.samples.append(Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, records))


# --- contenders ----------------------------------------------------------------------------


def runner_contender(
    name: str, flow: str, base: str, expected: int, env: dict[str, str] | None = None
) -> Contender:
    def make(work: Path) -> tuple[list[str], Path | None, Callable[[], int]]:
        out = work / "out"
        argv = [RUNNER, "run", str(HERE / "flows" / flow), "--output-dir", str(out)]
        return argv, None, lambda: count_lines(out / "items.jsonl")

    return Contender(name, make, expected, env={"BENCH_URL": base, **(env or {})})


def loop_contender(
    name: str, workload: str, base: str, expected: int, orjson: bool, uvloop: bool = False
) -> Contender:
    def make(work: Path) -> tuple[list[str], Path | None, Callable[[], int]]:
        out = work / "items.jsonl"
        argv = [PY, str(HERE / "peers" / "loop.py"), workload, base, str(out)]
        if orjson:
            argv.append("--orjson")
        if uvloop:
            argv.append("--uvloop")
        return argv, None, lambda: count_lines(out)

    return Contender(name, make, expected)


def dlt_contender(base: str, expected: int) -> Contender:
    def make(work: Path) -> tuple[list[str], Path | None, Callable[[], int]]:
        out = work / "dest"
        argv = [str(DLT_PY), str(HERE / "peers" / "dlt_peer.py"), base, str(out)]

        def counted() -> int:
            return sum(count_lines(p) for p in (out / "bench" / "items").glob("*.jsonl"))

        return argv, None, counted

    return Contender("dlt rest_api", make, expected)


def airbyte_contender(base: str, expected: int) -> Contender:
    def make(work: Path) -> tuple[list[str], Path | None, Callable[[], int]]:
        out = work / "messages.jsonl"
        argv = [str(AIRBYTE_PY), str(HERE / "peers" / "airbyte_peer.py"), base]
        return argv, out, lambda: count_lines(out, b'"type":"RECORD"')

    return Contender("airbyte declarative", make, expected)


def peer_ok(python: Path, module: str) -> str | None:
    """None if the peer's venv imports its package, else why not."""
    if not python.exists():
        return f"{python.parent.parent.name} missing (run benchmarks/run.sh)"
    probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot import {module}: {probe.stderr.decode(errors='replace')[-200:]}"
    return None


# --- the server ----------------------------------------------------------------------------


class Server:
    """benchmarks/server.py in a process of its own; `delay`: seconds before each lookup."""

    def __init__(self, delay: float = 0.0) -> None:
        self.proc = subprocess.Popen(
            [PY, str(HERE / "server.py"), "--port", "0", "--delay", str(delay)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.proc.kill()
            raise SystemExit(f"bench server did not start: {line!r}")
        self.url = line

    def base(self, total: int) -> str:
        return f"{self.url}/n/{total}"

    def cpu_seconds(self) -> float:
        """The server's CPU time so far (Linux: /proc), to see whether it kept up."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- workloads -----------------------------------------------------------------------------


def rounds_of(contenders: list[Contender], rounds: int, work: Path, label: str) -> None:
    for r in range(rounds):
        for c in contenders:
            run_once(c, work / c.name.replace(" ", "-"))
            last = f"{c.samples[-1].wall:.2f} s" if c.samples else "FAILED"
            print(f"  [{label} {r + 1}/{rounds}] {c.name}: {last}", file=sys.stderr, flush=True)


def summarize(contenders: list[Contender], baseline: str) -> list[dict[str, Any]]:
    base = next((c for c in contenders if c.name == baseline and c.samples), None)
    base_wall = statistics.median(s.wall for s in base.samples) if base else None
    base_cpu = statistics.median(s.cpu for s in base.samples) if base else None
    rows = []
    for c in contenders:
        if not c.samples:
            rows.append({"name": c.name, "error": c.errors[-1] if c.errors else "not run"})
            continue
        wall = statistics.median(s.wall for s in c.samples)
        cpu = statistics.median(s.cpu for s in c.samples)
        rows.append(
            {
                "name": c.name,
                "runs": len(c.samples),
                "failures": len(c.errors),
                "wall_s": round(wall, 3),
                "wall_min_s": round(min(s.wall for s in c.samples), 3),
                "cpu_s": round(cpu, 3),
                "records_per_s": round(c.expected / wall),
                "peak_rss_mb": round(statistics.median(s.rss_mb for s in c.samples), 1),
                "wall_vs_baseline": round(wall / base_wall, 2) if base_wall else None,
                "cpu_vs_baseline": round(cpu / base_cpu, 2) if base_cpu else None,
            }
        )
    return rows


def table(title: str, rows: list[dict[str, Any]], baseline: str) -> str:
    lines = [
        f"### {title}",
        "",
        f"| contender | wall s (median) | records/s | CPU s | peak RSS MB "
        f"| wall / {baseline} | CPU / {baseline} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | not measured: {row['error'][:120]} | | | | | |")
            continue
        lines.append(
            f"| {row['name']} | {row['wall_s']:.2f} | {row['records_per_s']:,} "
            f"| {row['cpu_s']:.2f} | {row['peak_rss_mb']:.0f} "
            f"| {row['wall_vs_baseline']:.2f} | {row['cpu_vs_baseline']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", "5")))
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("QUICK")))
    parser.add_argument(
        "--only",
        default=os.environ.get("ONLY", "sequential,fanout,scaling,startup"),
        help="comma-separated workloads",
    )
    parser.add_argument("--scale", type=int, default=1_000_000, help="records of the big run")
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args()
    only = set(args.only.split(","))
    rounds = 1 if args.quick else args.rounds
    scale = min(args.scale, 300_000) if args.quick else args.scale

    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_avg_start": os.getloadavg(),
        },
        "rounds": rounds,
        "quick": args.quick,
        "runner_install": installed(),
    }
    markdown: list[str] = [
        "The runner as a plain install (`pip install -e .`, no extras): "
        + ", ".join(f"{name} {version}" for name, version in report["runner_install"].items())
        + "\n"
    ]
    # As installed (pip writes .pyc files): an editable checkout under PYTHONDONTWRITEBYTECODE
    # would otherwise compile the runner's source on every start, ~60 ms the peers never pay.
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "runner")], check=False)
    server = Server()
    work = Path(tempfile.mkdtemp(prefix="runner-bench-"))
    try:
        seq_base, fan_base = server.base(SEQ_RECORDS), server.base(FANOUT_ITEMS)
        # Warm the server's body cache (not measured), so every contender sees the same server.
        for warm in (
            loop_contender("warm", "sequential", seq_base, SEQ_RECORDS, True),
            loop_contender("warm", "fanout", fan_base, FANOUT_ITEMS, True),
        ):
            run_once(warm, work / "warm")

        if "sequential" in only:
            seq = [
                runner_contender("runner", "sequential.yaml", seq_base, SEQ_RECORDS),
                loop_contender("aiohttp loop", "sequential", seq_base, SEQ_RECORDS, False),
                loop_contender("aiohttp loop + orjson", "sequential", seq_base, SEQ_RECORDS, True),
            ]
            skipped = []
            for python, module, make in (
                (DLT_PY, "dlt", lambda: dlt_contender(seq_base, SEQ_RECORDS)),
                (AIRBYTE_PY, "airbyte_cdk", lambda: airbyte_contender(seq_base, SEQ_RECORDS)),
            ):
                why = peer_ok(python, module)
                if why is None:
                    seq.append(make())
                else:
                    skipped.append(f"{module}: {why}")
            print(f"sequential: {SEQ_RECORDS} records, 500 pages, {rounds} rounds", file=sys.stderr)
            rounds_of(seq, rounds, work, "sequential")
            rows = summarize(seq, "aiohttp loop")
            report["sequential"] = {"rows": rows, "skipped": skipped}
            title = f"Sequential: {SEQ_RECORDS:,} records, 500 pages of 100, five fields, JSONL"
            markdown.append(table(title, rows, "loop"))
            markdown.extend(f"Not measured: {s}\n" for s in skipped)

        if "fanout" in only:
            fan = [
                runner_contender("runner", "fanout.yaml", fan_base, FANOUT_ITEMS),
                # The same without uvloop: what the event loop is worth.
                runner_contender(
                    "runner, asyncio event loop",
                    "fanout.yaml",
                    fan_base,
                    FANOUT_ITEMS,
                    env={"RUNNER_EVENT_LOOP": "asyncio"},
                ),
                loop_contender("gather + semaphore", "fanout", fan_base, FANOUT_ITEMS, False),
                loop_contender(
                    "gather + semaphore + orjson", "fanout", fan_base, FANOUT_ITEMS, True
                ),
                # The runner's own event loop under the loop too: its overhead, like for like.
                loop_contender(
                    "gather + semaphore + orjson + uvloop",
                    "fanout",
                    fan_base,
                    FANOUT_ITEMS,
                    True,
                    uvloop=True,
                ),
            ]
            print(f"fan-out: {FANOUT_ITEMS} requests at 16, {rounds} rounds", file=sys.stderr)
            rounds_of(fan, rounds, work, "fanout")
            rows = summarize(fan, "gather + semaphore")
            report["fanout"] = {"rows": rows}
            title = f"Fan-out: {FANOUT_ITEMS:,} single-record requests, concurrency 16"
            markdown.append(table(title, rows, "gather"))

        if "scaling" in only:
            sizes = [100_000, scale]
            scaled = [
                runner_contender(f"runner {n:,}", "sequential.yaml", server.base(n), n)
                for n in sizes
            ]
            print(f"scaling: runner at {sizes}", file=sys.stderr)
            rounds_of(scaled, 1, work, "scaling")
            rows = summarize(scaled, scaled[0].name)
            report["scaling"] = {"rows": rows}
            markdown.append(table("Scaling: peak memory against records", rows, "100k"))

        if "startup" in only:
            flow = str(HERE / "flows" / "sequential.yaml")
            start = Contender(
                "runner validate",
                lambda w: ([RUNNER, "validate", flow], None, lambda: 0),
                0,
            )
            # 200 flows of ~70 lines (the contacts example), for `runner validate` in CI.
            many = work / "flows200"
            many.mkdir(exist_ok=True)
            example = (HERE.parent / "flows" / "contacts.yaml").read_text()
            for index in range(200):
                (many / f"flow{index:03}.yaml").write_text(example)
            folder = Contender(
                "runner validate, 200 flows",
                lambda w: ([RUNNER, "validate", str(many)], None, lambda: 0),
                0,
            )
            bare = Contender("python -c pass", lambda w: ([PY, "-c", "pass"], None, lambda: 0), 0)
            n = 3 if args.quick else 10
            print(f"start-up: runner validate x{n}", file=sys.stderr)
            rounds_of([start, folder, bare], n, work, "startup")
            rows = summarize([start, folder, bare], "python -c pass")
            report["startup"] = {"rows": rows}
            lines = ["### Start-up: `runner validate` of one flow, and of 200 flows", ""]
            for row in rows:
                if "error" in row:
                    lines.append(f"- {row['name']}: failed: {row['error'][:200]}")
                else:
                    lines.append(
                        f"- {row['name']}: {row['wall_s']:.3f} s wall (median of {row['runs']}), "
                        f"{row['cpu_s']:.3f} s CPU, {row['peak_rss_mb']:.0f} MB"
                    )
            markdown.append("\n".join(lines) + "\n")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    report["machine"]["load_avg_end"] = os.getloadavg()
    text = "\n".join(markdown)
    print()
    print(text)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "latest.md").write_text(text)
    print(f"results written to {results}/latest.md and latest.json", file=sys.stderr)
    failed = any(
        "error" in row
        for part in ("sequential", "fanout", "scaling", "startup")
        for row in report.get(part, {}).get("rows", [])
        if not row["name"].startswith(("dlt", "airbyte"))
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
