"""bot/corrections_io.py: the file formats `selfcog corrections import` reads."""

import json

import pytest

from bot.corrections_io import Pair, PairsFileError, read_pairs, write_pairs
from store import Profile

AURORA = Profile("Aurora", "Acme Labs")


def qa(pairs: list[Pair]) -> list[tuple[str, str]]:
    return [(p.question, p.answer) for p in pairs]


def test_own_jsonl_roundtrip(tmp_path):
    path = tmp_path / "c.jsonl"
    write_pairs([{"question": "Who are you?", "corrected_answer": "I am Aurora.", "status": "approved"}], path)
    assert read_pairs(path, AURORA) == [Pair("Who are you?", "I am Aurora.", 1)]


def test_ms_swift_self_cognition_placeholders_are_filled(tmp_path):
    path = tmp_path / "self_cognition.jsonl"
    path.write_text(json.dumps({"query": "你是谁", "response": "我是{{NAME}}，由{{AUTHOR}}开发。", "tag": "zh"},
                               ensure_ascii=False) + "\n")
    assert qa(read_pairs(path, AURORA)) == [("你是谁", "我是Aurora，由Acme Labs开发。")]


def test_llama_factory_identity_json(tmp_path):
    path = tmp_path / "identity.json"
    path.write_text(json.dumps([{"instruction": "hi", "input": "",
                                 "output": "Hello! I am {{name}}, an AI assistant developed by {{author}}."}]))
    assert qa(read_pairs(path, AURORA)) == [("hi", "Hello! I am Aurora, an AI assistant developed by Acme Labs.")]


def test_messages_and_sharegpt(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                                 {"role": "assistant", "content": "a1"}]}) + "\n"
        + json.dumps({"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}) + "\n")
    assert qa(read_pairs(path, AURORA)) == [("q1", "a1"), ("q2", "a2")]


def test_openai_content_parts_are_joined(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "Who are you?"}]},
                                             {"role": "assistant", "content": "Aurora."}]}) + "\n")
    assert qa(read_pairs(path, AURORA)) == [("Who are you?", "Aurora.")]


def test_records_in_a_json_array_are_named_by_their_line(tmp_path):
    path = tmp_path / "identity.json"
    path.write_text('[\n  {"question": "q1", "answer": "a1"},\n  {"question": "q2",\n   "answer": "a2"},\n  7\n]\n')
    with pytest.raises(PairsFileError, match=r"line 5 is a JSON int, not an object"):
        read_pairs(path, AURORA)
    path.write_text('[\n  {"question": "q1", "answer": "a1"},\n  {"question": "q2",\n   "answer": "a2"}\n]\n')
    assert [p.line for p in read_pairs(path, AURORA)] == [2, 3]


@pytest.mark.parametrize("content", [[{"type": "image_url", "image_url": {"url": "x"}}], 42, None, []])
def test_messages_whose_content_is_not_text_name_their_line(tmp_path, content):
    path = tmp_path / "m.jsonl"
    good = {"question": "q", "answer": "a"}
    bad = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "a"}]}
    if content is None:
        del bad["messages"][0]["content"]
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(PairsFileError, match="line 2 has a question or answer whose content is not text"):
        read_pairs(path, AURORA)


def test_a_lone_surrogate_escape_is_refused_with_its_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "q\\ud800", "answer": "a"}\n'
                    '{"question": "emoji", "answer": "\\ud83d\\ude00"}\n')
    with pytest.raises(PairsFileError, match=r"line 2 holds a lone surrogate"):
        read_pairs(path, AURORA)


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"), (b"\xff\xd8\xff\xe0binary", "not UTF-8"), (b"{not json\n", "line 1 is not JSON"),
    (b"[1, 2", "not valid JSON"), (b'{"foo": "bar"}\n', "no question/answer"),
])
def test_unreadable_files(tmp_path, content, problem):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(PairsFileError, match=problem):
        read_pairs(path, AURORA)
    with pytest.raises(PairsFileError, match="cannot read"):
        read_pairs(tmp_path / "missing.jsonl", AURORA)
