"""bf16 or fp32 on the CPU: chosen from the CPU's flags, and the gate's numbers alike either way.

Where the CPU has bf16 instructions (`avx512_bf16`, `amx_bf16`) the engine evaluates with its matrix
products in bf16 (a retrain's 260 answers in 22-24 s instead of 36-38 s) and the trainer trains under bf16
autocast; chats are served in fp32 on every CPU unless asked (bot/engines/local.py says why). The suite's
one real retrain was evaluated as this CPU's flags chose; here its adapter is evaluated again in fp32, and
the held-out scores must agree within what dataset seeds alone move them (RECIPES.md, "In-process
training": one way's identity spread over 0.125 between seeds, bleed by up to the gate's own tolerance of 13).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.hardware import cpu_has_fast_bf16
from finetune.evaluate import WAYS

SEED_NOISE_IDENTITY = 0.125  # the widest spread of one way's identity over 10 seeds of the default recipe
SEED_NOISE_BLEED = 13  # the gate's bleed tolerance (10% of 132 answers), also the spread seen over seeds


def test_the_engine_serves_in_bf16_exactly_when_the_flags_offer_it(monkeypatch, embedded_model):
    from bot.engines import local

    monkeypatch.setattr(local, "BF16_ON_CPUS_THAT_HAVE_IT", True)
    for flags, precision in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(local, "cpu_has_fast_bf16", lambda flags_text=None, answer=flags: answer)
        engine = local.LocalEngine(embedded_model, device="cpu", max_new_tokens=4)
        try:
            assert engine.precision == precision
            assert str(engine.base.dtype) == {"bf16": "torch.bfloat16", "fp32": "torch.float32"}[precision]
        finally:
            engine.close()


@pytest.mark.slow
def test_the_live_adapter_scores_alike_evaluated_in_bf16_and_fp32(retrained, embedded_model, cache_dir):
    """The shared retrain was evaluated as the engine chose from this CPU's flags (bf16 products where it has
    bf16 instructions; fp32 after all if it checked a near refusal as served); evaluated again the other way,
    every score agrees within what seeds alone move it."""
    from bot.engines import AdapterRef
    from bot.engines.local import LocalEngine
    from finetune import jobs
    from store import Store

    if not cpu_has_fast_bf16():
        pytest.skip("this CPU has no bf16 instructions: bf16 would be emulated, and is never chosen here")
    report = retrained["report"]
    assert report["status"] == "promoted", report.get("reason")
    evaluated_in = report["eval_precision"]
    assert evaluated_in == "bf16" or report["first_look"]["precision"] == "bf16", report
    first = report["metrics"]["candidate"]
    other = "fp32" if evaluated_in == "bf16" else "bf16"

    store = Store(Path(retrained["data_dir"]) / "selfcog.db")
    engine = LocalEngine(embedded_model, active_adapter=store.adapters.active, eval_dtype=other, max_new_tokens=64)
    try:
        assert (engine.precision, engine.eval_precision) == ("fp32", other)
        assert engine.adapter_version == report["adapter"]
        general = jobs.general_answers(engine, embedded_model, cache_dir, evaluation=True)  # its own base answers
        again = jobs.evaluate_weights(engine, AdapterRef.ACTIVE, store.identity.current(), general,
                                      previous=jobs.earlier_profiles(store))
    finally:
        engine.close()
    for way in WAYS:
        assert abs(again.identity[way] - first["identity"][way]) <= SEED_NOISE_IDENTITY, (way, again.identity, first)
    assert abs(again.bleed - first["bleed"]) <= SEED_NOISE_BLEED, (again.bleed, first["bleed"])
    assert again.identity["product"] >= 0.9 - SEED_NOISE_IDENTITY
