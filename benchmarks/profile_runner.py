"""Profile `runner run` in-process, optionally with a "what-if" patch applied first.

    python benchmarks/profile_runner.py [--cprofile OUT.prof] [--top 25] [--whatif NAME]... \
        -- run FLOW --output-dir DIR

The what-if patches are measurements of proposed engine/HTTP changes, monkeypatched here
only: they never ship. `--whatif list` names them. Without --cprofile it just times the run,
which is how a patch's gain is measured (compare wall times with and without it).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any


def _no_trust_env() -> None:
    """http.py: ClientSession(trust_env=False), the env proxy resolved once per session.

    With trust_env=True aiohttp does two thread-pool round trips per request (netrc and
    proxy lookups: `run_in_executor(_get_netrc_auth)` and `to_thread(get_env_proxy_for_url)`).
    """
    import aiohttp

    original = aiohttp.ClientSession.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["trust_env"] = False
        original(self, *args, **kwargs)

    aiohttp.ClientSession.__init__ = init  # type: ignore[method-assign]


def _loopback_cache() -> None:
    """http.py: is_loopback memoised (functools.lru_cache): it parses an ipaddress on every
    request, twice (engine._check_scheme and http._check_scheme)."""
    import functools

    from runner import engine, http

    cached = functools.lru_cache(maxsize=256)(http.is_loopback)
    http.is_loopback = cached  # type: ignore[assignment]
    engine.is_loopback = cached  # type: ignore[attr-defined]


def _batch_map() -> None:
    """engine.py: FlowRun._shape uses expressions.compile_shape (one generated function per
    step's fields) and _map hands a page's records to Outputs.write_many at the root sink."""
    from runner import engine
    from runner.expressions import compile_shape

    original_shape = engine.FlowRun._shape

    def shape(self: Any, fields: Any, records: list[Any], rscope: dict[str, Any]) -> Any:
        if all(f.expression is not None for f in fields):
            fn = compile_shape(tuple((f.name, f.expression) for f in fields))
            return [fn(r) for r in records]
        return original_shape(self, fields, records, rscope)

    engine.FlowRun._shape = shape  # type: ignore[method-assign]

    # _map calls sink.emit per record; at the root sink, collect a page and write it at once.
    original_emit = engine.Sink.emit
    collecting: dict[int, list[Any]] = {}

    def emit(self: Any, stream: str, record: Any) -> None:
        pending = collecting.get(id(self))
        if pending is None:
            original_emit(self, stream, record)
        else:
            pending.append(record)

    engine.Sink.emit = emit  # type: ignore[method-assign]
    original_map = engine.FlowRun._map

    def map_(self: Any, step: Any, ctx: Any, rscope: Any, pager: Any) -> Any:
        sink = ctx.sink
        if not step.emit or sink.parent is not None:
            return original_map(self, step, ctx, rscope, pager)
        pending: list[Any] = []
        collecting[id(sink)] = pending
        try:
            result = original_map(self, step, ctx, rscope, pager)
        finally:
            del collecting[id(sink)]
        self.outputs.write_many(step.emit, pending)
        return result

    engine.FlowRun._map = map_  # type: ignore[method-assign]


WHATIFS: dict[str, Callable[[], None]] = {
    "no-trust-env": _no_trust_env,
    "loopback-cache": _loopback_cache,
    "batch-map": _batch_map,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cprofile", help="write a cProfile dump here and print the top")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--whatif", action="append", default=[])
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    if "list" in opts.whatif:
        for name, fn in WHATIFS.items():
            print(f"{name}: {(fn.__doc__ or '').strip()}")
        return 0
    for name in opts.whatif:
        WHATIFS[name]()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    from runner.cli import main as runner_main

    started = time.perf_counter()
    if opts.cprofile:
        profiler = cProfile.Profile()
        code = profiler.runcall(runner_main, args)
        profiler.dump_stats(opts.cprofile)
        stats = pstats.Stats(opts.cprofile, stream=sys.stderr)
        stats.sort_stats(opts.sort).print_stats(opts.top)
    else:
        code = runner_main(args)
    print(f"wall {time.perf_counter() - started:.3f} s", file=sys.stderr)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
