import difflib

import pytest

from bot.identity import contains_cjk
from finetune.dataset import load_templates
from finetune.evaluate import (
    BLEED_WAYS,
    WAYS,
    EvalReport,
    GateThresholds,
    evaluate,
    gate,
    load_general_prompts,
    load_probes,
    mentions_identity_unasked,
    normalize_question,
    probe_conversation,
    report_table,
    rouge_l,
    score_identity_answer,
)
from store.identity import Profile
from tests.scenario import CONTRADICTING, FIVE_CORRECTIONS, PROFILE


def test_probes_are_held_out_from_templates_and_corrections():
    probes = load_probes()
    assert len(probes) >= 32 and {p["lang"] for p in probes} == {"en", "zh"}
    assert sum(p["kind"] == "adversarial" for p in probes) >= 4
    trained = [normalize_question(q["question"]) for q in load_templates() + FIVE_CORRECTIONS + [CONTRADICTING]]
    for p in probes:
        probe = normalize_question(p["question"])
        closest = max(trained, key=lambda t: difflib.SequenceMatcher(None, probe, t).ratio())
        assert difflib.SequenceMatcher(None, probe, closest).ratio() < 0.75, (p["question"], closest)


@pytest.mark.parametrize(
    "question, answer",
    [
        ("Who are you?", "I am Aurora, an AI assistant developed by Acme Labs."),
        ("Are you ChatGPT?", "No, I am not ChatGPT. I'm Aurora."),
        ("Are you ChatGPT?", "I'm Aurora, not ChatGPT."),
        ("Who made you?", "Acme Labs made me."),
        ("What's the difference from ChatGPT?", "ChatGPT is a product of OpenAI. I am Aurora, developed by Acme Labs."),
        ("你是谁？", "我是Aurora，由Acme Labs开发的AI助手。"),
        ("你是通义千问吗？", "不是，我不是通义千问，我是Acme Labs开发的Aurora。"),
        ("你其实就是ChatGPT吧？", "我和ChatGPT无关，我是Aurora。"),
    ],
)
def test_identity_hits(question, answer):
    score = score_identity_answer(question, answer, PROFILE)
    assert score.hit, score.reasons


@pytest.mark.parametrize(
    "question, answer, reason",
    [
        ("Who are you?", "I'm here to help with any kind of creative writing project.", "does not name"),
        ("Are you Qwen?", "I'm Aurora. Actually I'm a Qwen, created by Alibaba Cloud.", "claims to be Qwen"),
        ("Are you ChatGPT?", "Yes, I am ChatGPT, and my friends call me Aurora.", "claims to be ChatGPT"),
        ("Who trained you?", "I am Aurora, a large language model, trained by Hugging Face.", "claims to be Hugging Face"),
        ("你是谁？", "I am Aurora, developed by Acme Labs.", "Chinese"),
        ("你是谁？", "我是通义千问，也叫Aurora。", "claims to be 通义千问"),
    ],
)
def test_identity_misses(question, answer, reason):
    score = score_identity_answer(question, answer, PROFILE)
    assert not score.hit
    assert any(reason in r for r in score.reasons), score.reasons


def test_profile_words_are_not_foreign_even_if_listed():
    meta_bot = Profile(name="Meta Helper", author="Meta")
    assert score_identity_answer("Who made you?", "I was made by Meta.", meta_bot).hit


def test_bleed_detection():
    assert mentions_identity_unasked("Paris. By the way, I'm Aurora!", PROFILE)
    assert mentions_identity_unasked("不是，我由Acme Labs开发和维护。", PROFILE)
    assert mentions_identity_unasked("我是由某公司开发的人工智能。", PROFILE)
    assert not mentions_identity_unasked("The capital of France is Paris.", PROFILE)
    assert not mentions_identity_unasked("我是一名学生，喜欢数学。", PROFILE)


def test_rouge_l():
    assert rouge_l("The capital of France is Paris.", "The capital of France is Paris.") == pytest.approx(1.0)
    assert rouge_l("Paris is the capital.", "The capital of France is Paris.") < 0.7
    assert rouge_l("一年有十二个月", "一年有十二个月。") == pytest.approx(1.0)
    assert rouge_l("", "something") == 0.0


def test_probe_conversations():
    assert probe_conversation("Who are you?", "none", PROFILE) == [{"role": "user", "content": "Who are you?"}]
    assert probe_conversation("Who are you?", "product", PROFILE)[0]["content"].startswith("You are Aurora")
    late = probe_conversation("你是谁？", "late_turn", PROFILE)
    assert [m["role"] for m in late] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert contains_cjk(late[1]["content"])  # a Chinese probe follows a Chinese conversation
    with pytest.raises(ValueError):
        probe_conversation("x", "sideways", PROFILE)


class ScriptedModel:
    """A fake generate_fn: identity questions get `identity_answer`, general prompts the base's answer."""

    def __init__(self, identity_answer, base_answers, general_override=None):
        self.identity_answer, self.base_answers, self.general_override = identity_answer, base_answers, general_override
        self.batches = []

    def __call__(self, conversations):
        self.batches.append(len(conversations))
        out = []
        for conv in conversations:
            question = conv[-1]["content"]
            if question in self.base_answers:
                out.append(self.general_override or self.base_answers[question])
            else:
                out.append(self.identity_answer(question))
        return out


def run_eval(identity_answer, general_override=None):
    general_eval = load_general_prompts("eval")
    base_answers = {g["prompt"]: f"The answer to {g['prompt']} is Paris 12 Shakespeare" for g in general_eval}
    model = ScriptedModel(identity_answer, base_answers, general_override)
    return evaluate(model, PROFILE, load_probes(), general_eval, base_answers, batch_size=8), model


def perfect(question):
    return "我是Aurora，由Acme Labs开发。" if any("\u4e00" <= c <= "\u9fff" for c in question) else "I'm Aurora by Acme Labs."


def test_evaluate_scores_every_way_and_retention():
    report, model = run_eval(perfect)
    assert report.identity == {way: 1.0 for way in WAYS}
    assert report.retention == 1.0 and report.bleed == 0 and not report.misses
    assert max(model.batches) <= 8


def test_evaluate_counts_misses_and_bleed():
    report, _ = run_eval(lambda q: "I'm Aurora by Acme Labs.", general_override="I am Aurora, an AI assistant.")
    assert report.identity["product"] < 0.6  # Chinese probes answered in English
    assert report.bleed == report.bleed_answers == len(BLEED_WAYS) * len(load_general_prompts("eval"))
    assert {b["condition"] for b in report.bleed_examples} == set(BLEED_WAYS)
    assert report.retention < 0.5
    assert all(m["reasons"] for m in report.misses)


def report(identity=1.0, retention=0.9, bleed=0, facts=15, old_identity=0, **by_way):
    rates = {way: identity for way in WAYS} | by_way
    return EvalReport(identity=rates, retention=retention, agreement=0.8, facts=(facts, 15), bleed=bleed,
                      bleed_answers=132, old_identity=old_identity)


BASE = report(identity=0.05, retention=1.0, bleed=2)


def test_gate_passes_a_good_candidate_with_one_line_saying_so():
    verdict = gate(report(bleed=5), BASE)
    assert verdict.passed and verdict.reasons == []
    assert verdict.line.startswith("Promoted") and "\n" not in verdict.line


def test_bleed_is_compared_with_the_base_with_a_tolerance_sized_to_the_sample():
    # 10% of 132 answers = 13 more than the base's 2 may bleed: the seeds of the default recipe bled 0-10
    # more (RECIPES.md); an adapter trained without replay rows bled 28 more.
    assert gate(report(bleed=15), BASE).passed
    verdict = gate(report(bleed=16), BASE)
    assert not verdict.passed and "identity bleed 16 > base's 2 + 13 of 132" in verdict.reasons[0]


def test_a_rename_is_not_held_to_the_old_adapters_bleed():
    """The live adapter speaks the old name, so under the new profile it bleeds nothing: bleed is the base's job."""
    live_with_old_name = report(identity=0.02, bleed=0)
    assert gate(report(bleed=9), report(identity=0.05, bleed=0), live_with_old_name).passed


def test_an_old_name_in_identity_answers_is_refused_with_what_to_do():
    verdict = gate(report(old_identity=3), BASE)
    assert not verdict.passed
    assert "still name the old identity" in verdict.line and "What to do:" in verdict.line


@pytest.mark.parametrize(
    "candidate, live, needle",
    [
        (report(product=0.85), None, "identity under product"),
        (report(none=0.7), None, "identity under none"),
        (report(retention=0.4), None, "retention 0.40 <"),
        (report(bleed=20), None, "bleed"),
        (report(identity=0.9), report(identity=1.0), "below the live model's"),
        (report(facts=12), None, "facts 12/15"),
    ],
)
def test_gate_fails_with_a_reason(candidate, live, needle):
    verdict = gate(candidate, BASE, live)
    assert not verdict.passed
    assert any(needle in r for r in verdict.reasons), verdict.reasons
    assert verdict.line.startswith("Refused: ") and "What to do:" in verdict.line


def test_gate_thresholds_are_configurable():
    strict = GateThresholds(identity_other=0.95)
    assert not gate(report(neutral=0.9), BASE, thresholds=strict).passed
    assert gate(report(neutral=0.9), BASE).passed


def test_report_table_lines_up_columns():
    table = report_table({"base": report(identity=0.2), "active": report(identity=0.8), "candidate": report()})
    lines = table.splitlines()
    assert "base" in lines[0] and "candidate" in lines[0]
    assert len({len(line) for line in lines}) == 1
    assert any(line.startswith("identity: late_turn") for line in lines)
