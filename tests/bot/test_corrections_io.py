"""bot/corrections_io.py: the file formats `selfcog corrections import` reads."""

import json

import pytest

from bot.corrections_io import PairsFileError, read_pairs, write_pairs
from store import Profile

AURORA = Profile("Aurora", "Acme Labs")


def test_own_jsonl_roundtrip(tmp_path):
    path = tmp_path / "c.jsonl"
    write_pairs([{"question": "Who are you?", "corrected_answer": "I am Aurora.", "status": "approved"}], path)
    assert read_pairs(path, AURORA) == [("Who are you?", "I am Aurora.")]


def test_ms_swift_self_cognition_placeholders_are_filled(tmp_path):
    path = tmp_path / "self_cognition.jsonl"
    path.write_text(json.dumps({"query": "你是谁", "response": "我是{{NAME}}，由{{AUTHOR}}开发。", "tag": "zh"},
                               ensure_ascii=False) + "\n")
    assert read_pairs(path, AURORA) == [("你是谁", "我是Aurora，由Acme Labs开发。")]


def test_llama_factory_identity_json(tmp_path):
    path = tmp_path / "identity.json"
    path.write_text(json.dumps([{"instruction": "hi", "input": "",
                                 "output": "Hello! I am {{name}}, an AI assistant developed by {{author}}."}]))
    assert read_pairs(path, AURORA) == [("hi", "Hello! I am Aurora, an AI assistant developed by Acme Labs.")]


def test_messages_and_sharegpt(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                                 {"role": "assistant", "content": "a1"}]}) + "\n"
        + json.dumps({"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}) + "\n")
    assert read_pairs(path, AURORA) == [("q1", "a1"), ("q2", "a2")]


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
