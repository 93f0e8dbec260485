"""``python -m bench [--only NAME ...] [--quick] [--json PATH]``: run the benchmarks, print
the table, write the figures as JSON (default bench/results.json)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from bench.harness import Figure, machine, table, write_results

#: Benchmark modules in run order, by name; each has run(quick) -> list[Figure].
BENCHES = {
    "socket": "bench.socket_api",
    "restart": "bench.restart",
    "reaction": "bench.reaction",
    "scale": "bench.scale",
    "sharing": "bench.sharing",
    "state": "bench.state",
    "proxy": "bench.proxy",
    "fleet": "bench.fleet",
    "scrape": "bench.scrape",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="benchmarks to run")
    p.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results.json")
    args = p.parse_args(argv)
    figures: list[Figure] = []
    for name, module_name in BENCHES.items():
        if args.only and name not in args.only:
            continue
        print(f"running {name}…", file=sys.stderr, flush=True)
        figures += importlib.import_module(module_name).run(args.quick)
    info = machine()
    print(f"\n{info['date']} · {info['cpu']} × {info['cpus']} · Python {info['python']}")
    print(f"{info['platform']}\n")
    print(table(figures))
    if not args.only:
        write_results(args.json, figures)
        print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
