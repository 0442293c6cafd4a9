"""The fan-out workload split into N = 1, 2 and 4 shards, all started at once on one machine.

    .venv/bin/python benchmarks/shards.py [--rounds 3] [--ids 12000] [--wait-ids 4000]
                                          [--delay 0.02] [--shards 1,2,4]

Two servers (benchmarks/server.py, each in a process of its own), two workloads:

- **cpu**: `--ids` lookups answered at once: the clients' CPU is the bound, so the speed-up
  is what the cores allow (on two cores, with the server on them too, less than 2x);
- **wait**: `--wait-ids` lookups, each answered after `--delay` seconds (an API's latency):
  every shard keeps 16 requests in flight, so N shards should take about 1/N of the time.

Each configuration starts its N `runner run benchmarks/flows/fanout_sharded.yaml --shard
I/N` processes together; its wall time runs from the first start to the last exit, and
each shard's records/s is its own records over its own wall time. The hand-written aiohttp
loop (peers/loop.py, gather + semaphore, orjson on uvloop, like for like with the runner)
is the unsharded baseline. "CPUs busy" is the CPU time of the clients and the server over
the wall time times the cores: near 100 %, the machine, not the runner, is the bound.
Rounds alternate the configurations; medians are printed and written to
benchmarks/results/shards.md and shards.json.
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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import Server, count_lines

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
RUNNER = str(Path(PY).parent / "runner")
FLOW = HERE / "flows" / "fanout_sharded.yaml"


@dataclass
class Config:
    name: str
    shards: int  # 0: the hand-written loop
    walls: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)  # CPU used (clients + server) / available
    rates: list[float] = field(default_factory=list)  # every shard's records/s, all rounds
    errors: list[str] = field(default_factory=list)


def run_config(config: Config, server: Server, base: str, expected: int, work: Path) -> None:
    """Starts the configuration's processes together and waits for all of them."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env["BENCH_URL"] = base
    if config.shards == 0:
        outs = [work / "loop.jsonl"]
        argvs = [[PY, str(HERE / "peers" / "loop.py"), "fanout", base, str(outs[0])]]
        argvs[0] += ["--orjson", "--uvloop"]
    else:
        n = config.shards
        outs = [work / str(i) / "items.jsonl" for i in range(n)]
        argvs = [
            [RUNNER, "run", str(FLOW), "--shard", f"{i}/{n}", "--output-dir", str(work / "{shard}")]
            for i in range(n)
        ]
    logs = [work / f"stderr-{i}.txt" for i in range(len(argvs))]
    ended = [0.0] * len(argvs)
    cpu = [0.0] * len(argvs)

    def wait(i: int, proc: subprocess.Popen[bytes]) -> None:
        _, status, usage = os.wait4(proc.pid, 0)
        ended[i] = time.perf_counter()  # each process's own end, whatever the others do
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu[i] = usage.ru_utime + usage.ru_stime

    server_cpu = server.cpu_seconds()
    started = time.perf_counter()
    procs = []
    for argv, log in zip(argvs, logs, strict=True):
        with log.open("wb") as err:
            procs.append(
                subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
            )
    waiters = [threading.Thread(target=wait, args=(i, p)) for i, p in enumerate(procs)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    wall = max(ended) - started
    used = sum(cpu) + server.cpu_seconds() - server_cpu
    failed = [
        f"exit {proc.returncode}: {log.read_text(errors='replace')[-400:]}"
        for proc, log in zip(procs, logs, strict=True)
        if proc.returncode != 0
    ]
    counts = [count_lines(out) for out in outs]
    if failed or sum(counts) != expected:
        config.errors.append(f"{sum(counts)}/{expected} records; " + "; ".join(failed))
        return
    config.walls.append(wall)
    config.busy.append(used / (wall * (os.cpu_count() or 1)))
    config.rates += [count / (end - started) for count, end in zip(counts, ended, strict=True)]


def measure(
    workload: str, delay: float, ids: int, shard_counts: list[int], rounds: int, work: Path
) -> dict[str, object]:
    server = Server(delay)
    base = server.base(ids)
    configs = [Config("hand-written loop", 0)]
    configs += [Config(f"runner, {n} shard{'s' if n > 1 else ''}", n) for n in shard_counts]
    try:
        for round_no in range(rounds):
            # Alternate the order, so that no configuration always runs on a warm machine.
            for config in configs if round_no % 2 == 0 else configs[::-1]:
                run_config(config, server, base, ids, work / workload / str(config.shards))
    finally:
        server.stop()
    one = next((c for c in configs if c.shards == 1 and c.walls), None)
    loop = configs[0]
    rows = []
    for config in configs:
        if not config.walls:
            rows.append({"name": config.name, "errors": config.errors})
            continue
        wall = statistics.median(config.walls)
        row: dict[str, object] = {
            "name": config.name,
            "shards": config.shards,
            "wall_s": round(wall, 3),
            "records_per_s": round(ids / wall),
            "per_shard_records_per_s": round(statistics.median(config.rates)),
            "cpu_busy": round(statistics.median(config.busy), 2),
            "runs": len(config.walls),
            "errors": config.errors,
        }
        if one is not None and config.shards:
            row["speedup_vs_1_shard"] = round(statistics.median(one.walls) / wall, 2)
        if loop.walls:
            row["vs_loop"] = round(wall / statistics.median(loop.walls), 2)
        rows.append(row)
    return {"workload": workload, "ids": ids, "delay_s": delay, "rows": rows}


def table(result: dict[str, object]) -> str:
    rows = result["rows"]
    assert isinstance(rows, list)
    head = (
        f"**{result['workload']}**: {result['ids']} lookups, {result['delay_s']} s latency each\n\n"
        "| | wall (median) | records/s | per shard records/s | speed-up vs 1 shard "
        "| wall ÷ loop's | CPUs busy |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = []
    for row in rows:
        if "wall_s" not in row:
            lines.append(f"| {row['name']} | failed: {row['errors'][:1]} | | | | | |")
            continue
        speedup = row.get("speedup_vs_1_shard")
        lines.append(
            f"| {row['name']} | {row['wall_s']:.2f} s | {row['records_per_s']:,} "
            f"| {row['per_shard_records_per_s']:,} | {f'{speedup:.2f}x' if speedup else ''} "
            f"| {row.get('vs_loop', '')} | {row['cpu_busy']:.0%} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", "3")))
    parser.add_argument("--ids", type=int, default=12000, help="lookups of the cpu workload")
    parser.add_argument("--wait-ids", type=int, default=4000, help="lookups of the wait one")
    parser.add_argument("--delay", type=float, default=0.02, help="latency of the wait one")
    parser.add_argument("--shards", default="1,2,4")
    args = parser.parse_args()
    shard_counts = [int(n) for n in args.shards.split(",")]
    with tempfile.TemporaryDirectory(prefix="runner-shards-") as tmp:
        work = Path(tmp)
        results = [
            measure("cpu", 0.0, args.ids, shard_counts, args.rounds, work),
            measure("wait", args.delay, args.wait_ids, shard_counts, args.rounds, work),
        ]
    machine = f"{platform.python_version()}, {os.cpu_count()} CPUs, {args.rounds} rounds"
    text = f"# Shards on one machine ({machine})\n\n" + "\n".join(table(r) for r in results)
    print(text)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "shards.md").write_text(text, encoding="utf-8")
    (out / "shards.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
