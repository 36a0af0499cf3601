"""bench/results.py: RESULTS.md regenerated from the JSON in bench/out/, hand-made sections kept in place."""

from __future__ import annotations

import json

from bench import common, results

RUN = {"machine": {"date": "2026-11-30 07:00 UTC", "gpu": "NVIDIA H200", "torch": "2.11"},
       "note": "a note the run carries",
       "serve_whole_gpu": {"peak_gib_whole_gpu": 87.2, "engine_slots": 256, "prepare_ahead_s": 6.2,
                           "chats": {"answer": 15, "notice": 121, "error": 0},
                           "first": {"wall_s": 18.7, "status": "promoted", "compared": None,
                                     "phases": {"dataset": 0, "worker_start": 3.0, "training": 11.6, "evaluation": 2.8,
                                                "swap": 1.2},
                                     "training_split": {"steps": 11.0, "after_steps": 0.5}}}}

PRESENT = """# Benchmark results

old intro

## gpu_inprocess_retrain

stale figures

## gpu_prepare_ahead

made by hand from two runs

## Notes: what the figures say

old notes
"""


def test_a_section_with_json_is_made_anew_and_one_without_is_kept_in_its_place(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu_inprocess_retrain.json").write_text(json.dumps(RUN))
    (out / "gpu_inprocess_retrain_lora_dtype.json").write_text(json.dumps(RUN))
    (out / "no_such_bench.json").write_text(json.dumps(RUN))
    monkeypatch.setattr(common, "OUT", out)
    path = tmp_path / "RESULTS.md"
    path.write_text(PRESENT)

    text = results.write(path).read_text()

    titles = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert titles[:3] == ["gpu_inprocess_retrain", "gpu_inprocess_retrain_lora_dtype", "gpu_prepare_ahead"]
    assert "no_such_bench" not in titles, "a JSON no bench module summarises makes no section"
    assert "stale figures" not in text and "old intro" not in text
    assert "made by hand from two runs" in text
    assert "a note the run carries" in text and "2026-11-30 07:00 UTC: NVIDIA H200" in text
    assert "| first   | 18.7" in text and "11.6 (11.0 + 0.5)" in text and "256 cache slots" in text
    assert text == results.write(path).read_text(), "regenerating again changes nothing"


def test_the_module_is_the_longest_bench_name_the_file_starts_with():
    assert results.module_for("gpu_inprocess_retrain_1129").__name__ == "bench.gpu_inprocess_retrain"
    assert results.module_for("cpu_decode").__name__ == "bench.cpu_decode"
    assert results.module_for("retrain_seeds") is None  # it has no summary()
    assert results.module_for("nothing_here") is None
