"""`make bench`: the CPU benchmarks, one after the other, then bench/RESULTS.md regenerated.

    python -m bench.run_cpu              # everything below
    python -m bench.run_cpu --quick      # fewer tokens and rounds: a smoke run

Each benchmark is a module of bench/ with a ``main()`` that reads sys.argv (so ``--quick`` reaches
it), writes bench/out/<name>.json, and a ``summary(results)`` that bench/results.py turns into
RESULTS.md tables. To add one, write a module that way and add its name to BENCHMARKS.
"""

from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = [
    "cpu_decode",  # chat decode, 8 chats at once, adapter swap
    "cpu_retrain",  # trigger -> evaluated adapter live on this CPU, two real retrains
]


def main() -> None:
    quick = "--quick" in sys.argv
    for name in BENCHMARKS:
        started = time.perf_counter()
        print(f"== bench.{name}", flush=True)
        sys.argv = [f"bench.{name}"] + (["--quick"] if quick else [])
        importlib.import_module(f"bench.{name}").main()
        print(f"== bench.{name} took {time.perf_counter() - started:.0f} s", flush=True)
    from bench import results

    print(f"wrote {results.write()}")


if __name__ == "__main__":
    main()
