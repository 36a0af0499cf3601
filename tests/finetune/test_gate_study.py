"""The gate against what was measured: 20 seeds of the default recipe must pass, bad adapters must not.

finetune/data/gate_study/ holds every report of the study RECIPES.md describes ("The gate"): the
five-correction scenario and a rename after it, 10 dataset seeds each, plus an adapter trained on
identity rows alone and a random LoRA. Re-scoring them under the code's gate needs no model, so a
change that would refuse real improvements (or let the bad ones through) fails here.
"""

import json
from pathlib import Path

from finetune.evaluate import EvalReport, gate
from finetune.gate_study import rescore

STUDY = Path(__file__).resolve().parents[2] / "finetune" / "data" / "gate_study"


def reports(scenario: str) -> dict[str, EvalReport]:
    lines = (STUDY / f"{scenario}.jsonl").read_text(encoding="utf-8").splitlines()
    return {json.loads(line)["label"]: EvalReport.from_dict(json.loads(line)["report"]) for line in lines}


def test_the_default_recipe_promotes_in_at_least_9_of_10_seeds():
    five = reports("five")
    base = five.pop("base")
    assert len(five) == 10
    assert sum(gate(r, base).passed for r in five.values()) >= 9


def test_a_rename_promotes_in_at_least_9_of_10_seeds_with_no_old_name_left():
    rename = reports("rename")
    base, live = rename.pop("base"), rename.pop("live")
    assert live.old_identity > 100  # the live adapter still says "Aurora": the comparison is a real one
    assert len(rename) == 10
    assert sum(gate(r, base, live).passed for r in rename.values()) >= 9
    assert all(r.old_identity == 0 for r in rename.values())


def test_a_random_adapter_and_an_identity_only_adapter_are_refused():
    bad = reports("bad")
    base = bad.pop("base")
    assert set(bad) == {"random", "identity-only"}
    for label, report in bad.items():
        assert not gate(report, base).passed, label
    assert "bleed" in gate(bad["identity-only"], base).line  # it speaks the identity well: bleed is the harm


def test_rescore_prints_the_table_recipes_md_shows():
    table = rescore(STUDY)
    assert "five: passed 10 of 10" in table and "rename: passed 10 of 10" in table
