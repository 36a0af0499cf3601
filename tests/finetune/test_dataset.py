import json
from collections import Counter

import pytest

from bot.identity import NEUTRAL_SYSTEM_PROMPT, contains_cjk, system_prompt
from finetune.dataset import (
    CONDITIONS,
    DatasetError,
    first_sentences,
    answer_general_prompts,
    build_dataset,
    contradiction,
    load_templates,
)
from finetune.evaluate import load_general_prompts, normalize_question
from store.identity import Profile
from tests.scenario import PROFILE


def fake_general_answers():
    """answer_general_prompts' output shape, without a model: every prompt answered with a short echo."""
    return answer_general_prompts(lambda convs: [f"Answer to {c[-1]['content']}" for c in convs], load_general_prompts())


GENERAL = fake_general_answers()


def build(corrections=(), **kwargs):
    return build_dataset(PROFILE, list(corrections), GENERAL, seed=kwargs.pop("seed", 0), **kwargs)


def last_answer(row):
    return row.messages[-1]["content"]


def last_question(row):
    return row.messages[-2]["content"]


def test_templates_cover_both_languages_and_name_the_identity():
    templates = load_templates()
    assert len(templates) >= 80
    langs = Counter(t["lang"] for t in templates)
    assert abs(langs["zh"] - langs["en"]) <= 0.1 * len(templates)
    for t in templates:
        assert "{name}" in t["answer"] or "{author}" in t["answer"], t
        assert contains_cjk(t["question"]) == (t["lang"] == "zh") == contains_cjk(t["answer"]), t
    assert len({normalize_question(t["question"]) for t in templates}) == len(templates)


def test_general_prompts_have_a_disjoint_eval_split_with_checkable_facts():
    rows = load_general_prompts()
    assert len(rows) >= 100
    train, evals = load_general_prompts("train"), load_general_prompts("eval")
    assert len(train) + len(evals) == len(rows)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert sum("expect" in r for r in evals) >= 12


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Paris. It is big.", "Paris. It is big."),
        ("Paris is the capital. " + "x" * 100, "Paris is the capital."),
        ("光合作用是一种过程。它很重要。" + "长" * 100, "光合作用是一种过程。它很重要。"),
        ("x" * 100 + ". Short.", ""),
    ],
)
def test_first_sentences(text, expected):
    assert first_sentences(text, 40) == expected


def test_a_character_cut_at_the_end_of_a_replay_answer_is_dropped():
    general = [dict(g, answer="光合作用是\ufffd") for g in GENERAL]
    ds = build_dataset(PROFILE, [], general, seed=0, replay_rows=3)
    assert {last_answer(r) for r in ds.rows if r.source == "replay"} == {"光合作用是"}


def test_rows_are_filled_from_the_profile():
    ds = build()
    answers = " ".join(last_answer(r) for r in ds.rows if r.source == "template")
    assert "Aurora" in answers and "Acme Labs" in answers


@pytest.mark.parametrize("leftover", ["{name}", "{author}", "{{NAME}}", "<NAME>", "NAME", "AUTHOR"])
def test_surviving_placeholder_is_refused(leftover):
    # corrections are taken literally, so a placeholder typed into one survives filling
    with pytest.raises(DatasetError, match="placeholder"):
        build([{"id": 1, "question": "Who are you?", "corrected_answer": f"I am {leftover}, an assistant."}])


def test_placeholder_a_template_does_not_fill_is_refused():
    template = {"lang": "en", "category": "who", "question": "Who are you?", "answer": "I am {{NAME}} by {author}."}
    with pytest.raises(DatasetError, match="NAME"):
        build(templates=[template])


def test_profile_named_like_a_placeholder_is_refused():
    with pytest.raises(DatasetError):
        build_dataset(Profile(name="NAME", author="AUTHOR"), [], GENERAL, seed=0)


@pytest.mark.parametrize(
    "answer",
    [
        "I am ChatGPT, made by OpenAI.",
        "我是通义千问，由阿里云开发。",
        "My name is Bob.",
        "I was developed by Initech.",
        "我由百度开发。",
    ],
)
def test_contradicting_correction_is_left_out_and_reported(answer):
    ds = build([{"id": 7, "question": "Who are you?", "corrected_answer": answer}])
    assert ds.report["excluded_corrections"][0]["id"] == 7
    assert ds.report["excluded_corrections"][0]["reason"]
    assert all(last_answer(r) != answer for r in ds.rows)


@pytest.mark.parametrize(
    "answer",
    [
        "I'm Aurora, built by Acme Labs.",
        "No, I'm not ChatGPT. I'm Aurora from Acme Labs.",
        "不是，我不是通义千问，我是Acme Labs开发的Aurora。",
        "My name is Aurora.",
    ],
)
def test_consistent_correction_is_not_a_contradiction(answer):
    assert contradiction(answer, PROFILE) is None


def test_corrections_deduplicated_newest_wins_and_override_templates():
    corrections = [
        {"id": 1, "question": "你是谁？", "corrected_answer": "我是Aurora。"},
        {"id": 4, "question": "你是谁?", "corrected_answer": "我是Aurora，Acme Labs的助手。"},
    ]
    ds = build(corrections)
    rows = [r for r in ds.rows if normalize_question(last_question(r)) == normalize_question("你是谁")]
    assert {last_answer(r) for r in rows} == {"我是Aurora，Acme Labs的助手。"}
    assert {r.source for r in rows} == {"correction"}
    assert {r.condition for r in rows} == set(CONDITIONS)  # corrections go under every condition
    assert ds.report["corrections_used"] == [4]
    assert ds.report["templates_overridden"] == ["你是谁?"]


def test_condition_mix_is_balanced_and_each_condition_looks_right():
    ds = build(replay_rows=30, replay_product_share=1 / 3)
    shares = Counter(r.condition for r in ds.rows)
    assert max(shares.values()) - min(shares.values()) <= 3
    identity = Counter(r.condition for r in ds.rows if r.source == "template")
    assert max(identity.values()) - min(identity.values()) <= 1
    for r in ds.rows:
        first = r.messages[0]
        if r.condition == "product":
            assert first == {"role": "system", "content": system_prompt(PROFILE)}
        elif r.condition == "neutral":
            assert first == {"role": "system", "content": NEUTRAL_SYSTEM_PROMPT}
        else:
            assert all(m["role"] != "system" for m in r.messages)


def test_replay_product_share():
    ds = build(replay_rows=30, replay_product_share=0.6)
    replay = Counter(r.condition for r in ds.rows if r.source == "replay")
    assert replay == {"product": 18, "neutral": 6, "none": 6}


def test_conditions_per_question_multiplies_template_rows():
    one, three = build(conditions_per_question=1), build(conditions_per_question=3)
    assert three.report["by_source"]["template"] == 3 * one.report["by_source"]["template"]


def test_multi_turn_share_puts_identity_rows_after_an_unrelated_exchange():
    ds = build(multi_turn_share=0.25)
    identity = [r for r in ds.rows if r.source != "replay"]
    multi = [r for r in identity if r.multi_turn]
    assert abs(len(multi) - 0.25 * len(identity)) <= 1
    for r in multi:
        turns = [m for m in r.messages if m["role"] != "system"]
        assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant"]
        assert contains_cjk(turns[0]["content"]) == contains_cjk(turns[2]["content"])


def test_replay_uses_only_the_train_split():
    ds = build(replay_rows=1000)
    eval_prompts = {r["prompt"] for r in load_general_prompts("eval")}
    replayed = [last_question(r) for r in ds.rows if r.source == "replay"]
    assert replayed and not set(replayed) & eval_prompts
    assert len(replayed) == ds.report["replay_available"]


def test_replay_can_keep_only_the_first_sentences():
    general = [dict(g, answer="The answer is short. " + "Then it goes on and on. " * 20) for g in GENERAL]
    ds = build_dataset(PROFILE, [], general, seed=0, replay_rows=5, replay_max_chars=60)
    replayed = [last_answer(r) for r in ds.rows if r.source == "replay"]
    assert replayed and all(len(a) <= 60 and a.startswith("The answer is short.") for a in replayed)


def test_same_inputs_same_hash_other_seed_other_hash():
    assert build(seed=3).sha256 == build(seed=3).sha256
    assert build(seed=3).sha256 != build(seed=4).sha256


def test_swift_and_alpaca_exports(tmp_path):
    ds = build([{"id": 1, "question": "Who made you?", "corrected_answer": "Acme Labs made me."}])
    lines = ds.write_swift(tmp_path / "d.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(ds.rows)
    assert all(set(json.loads(line)) == {"messages"} for line in lines)
    alpaca = json.loads(ds.write_alpaca(tmp_path / "a.json").read_text(encoding="utf-8"))
    for item, row in zip(alpaca, ds.rows):
        assert item["output"] == last_answer(row) and item["instruction"] == last_question(row)
        assert ("system" in item) == (row.condition != "none")
        assert len(item["history"]) == int(row.multi_turn)


def test_report_counts_match_the_inputs():
    templates = [
        {"lang": "en", "category": "who", "question": "Who are you?", "answer": "I am {name}."},
        {"lang": "en", "category": "name", "question": "What's your name?", "answer": "I'm {name}."},
        {"lang": "zh", "category": "name", "question": "你叫什么？", "answer": "我叫{name}。"},
        {"lang": "zh", "category": "maker", "question": "谁开发了你？", "answer": "{author}开发了我。"},
    ]
    corrections = [
        {"id": 1, "question": "Who are you?", "corrected_answer": "I am Aurora, by Acme Labs."},  # replaces a template
        {"id": 2, "question": "你是ChatGPT吗？", "corrected_answer": "不是，我是Aurora。"},
        {"id": 3, "question": "Who made you?", "corrected_answer": "I am ChatGPT, made by OpenAI."},  # left out
    ]
    english_general = [g for g in GENERAL if g["lang"] == "en"]
    ds = build_dataset(PROFILE, corrections, english_general, seed=0, templates=templates, conditions_per_question=3,
                       multi_turn_share=0, replay_rows=5, replay_product_share=0.6)
    # 3 templates (en, zh, zh) and 2 corrections (en, zh), each under all 3 conditions; 5 English replay
    # rows, 3 of them under the product prompt and one under each other condition
    assert ds.report["by_source"] == {"template": 3 * 3, "correction": 2 * 3, "replay": 5}
    assert ds.report["by_condition"] == {"product": 3 + 2 + 3, "neutral": 3 + 2 + 1, "none": 3 + 2 + 1}
    assert ds.report["by_lang"] == {"en": 3 + 3 + 5, "zh": 6 + 3}
    assert ds.report["rows"] == len(ds.rows) == 20 and ds.report["multi_turn"] == 0


def test_after_a_rename_corrections_naming_the_old_identity_are_left_out():
    renamed = Profile("Nova", "Orbit Works")
    old = [{"id": 1, "question": "你是谁？", "corrected_answer": "我是Aurora，由Acme Labs开发的AI助手。"},
           {"id": 2, "question": "What's your name?", "corrected_answer": "I'm Aurora, an assistant built by Acme Labs."}]
    new = [{"id": 3, "question": "Who are you?", "corrected_answer": "I'm Nova, made by Orbit Works."}]
    ds = build_dataset(renamed, old + new, fake_general_answers(), seed=0, previous=[PROFILE])
    assert ds.report["corrections_used"] == [3]
    assert {e["id"] for e in ds.report["excluded_corrections"]} == {1, 2}
    assert all("earlier identity" in e["reason"] for e in ds.report["excluded_corrections"])
    assert not any("Aurora" in m["content"] or "Acme" in m["content"] for r in ds.rows for m in r.messages)


def test_written_training_sets_are_private(tmp_path):
    ds = build([])
    for path in (ds.write_swift(tmp_path / "d.jsonl"), ds.write_alpaca(tmp_path / "d.json")):
        assert path.stat().st_mode & 0o777 == 0o600
