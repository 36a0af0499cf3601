"""The benchmarks' baseline engine: bot/engine.py as it was before continuous batching.

Read from git history (commit BASELINE_COMMIT) instead of kept as a second copy in the tree: one
worker thread runs one job at a time, each streamed reply a transformers ``generate`` call with a
TextIteratorStreamer (batch 1, merged LoRA), ``generate`` batching conversations with left padding.
bench/cpu_decode.py and bench/gpu_decode.py run it side by side with bot.engines.local.LocalEngine.

Where there is no git history (the GPU machine gets a copy of the working tree), the file written
to bench/out/ here is used: carry ``bench/out`` along.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

BASELINE_COMMIT = "1fa56cd"  # the last commit with the one-job-at-a-time engine
SOURCE = Path(__file__).parent / "out" / "baseline_engine.py"


def baseline_engine_class():
    """LocalEngine of BASELINE_COMMIT, imported as the module ``bench_baseline_engine``."""
    if not SOURCE.exists():
        text = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:bot/engine.py"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout
        SOURCE.parent.mkdir(parents=True, exist_ok=True)
        SOURCE.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("bench_baseline_engine", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LocalEngine
