"""Reading and writing question/answer pairs in the formats people already have.

    >>> read_pairs("identity.json", Profile("Aurora", "Acme Labs"))
    [('Who are you?', 'I am Aurora, an AI assistant developed by Acme Labs.'), ...]

Accepted, as JSON Lines or a JSON array:
- ``{"question": ..., "answer": ...}`` (``corrected_answer`` also works): selfcog's own export;
- ``{"query": ..., "response": ...}``: ms-swift's self-cognition set (``{{NAME}}``/``{{AUTHOR}}``);
- ``{"instruction": ..., "input": ..., "output": ...}``: LLaMA-Factory's identity.json (``{{name}}``/``{{author}}``);
- ``{"messages": [...]}`` (ms-swift / OpenAI) and ``{"conversations": [{"from", "value"}]}`` (ShareGPT):
  the last user turn and the assistant turn after it.
Placeholders are filled from the current profile, since those templates exist to be filled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from store import Profile

_PLACEHOLDERS = {
    "name": re.compile(r"\{\{\s*NAME\s*\}\}|\{\{\s*name\s*\}\}|\{name\}"),
    "author": re.compile(r"\{\{\s*AUTHOR\s*\}\}|\{\{\s*author\s*\}\}|\{author\}"),
}


class PairsFileError(ValueError):
    """The file cannot be read as question/answer pairs; the message names the file and the line."""


def fill_placeholders(text: str, profile: Profile) -> str:
    text = _PLACEHOLDERS["name"].sub(profile.name, text)
    return _PLACEHOLDERS["author"].sub(profile.author, text)


def _pair(record: object) -> tuple[str, str] | None:
    if not isinstance(record, dict):
        return None
    for q_key, a_key in (("question", "answer"), ("question", "corrected_answer"), ("query", "response")):
        if isinstance(record.get(q_key), str) and isinstance(record.get(a_key), str):
            return record[q_key], record[a_key]
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        extra = record.get("input") or ""
        return (record["instruction"] + ("\n" + extra if extra else "")), record["output"]
    turns = record.get("messages") or record.get("conversations")
    if isinstance(turns, list):
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
        flat = [(roles.get(t.get("role") or t.get("from")), t.get("content") or t.get("value"))
                for t in turns if isinstance(t, dict)]
        for i in range(len(flat) - 1, 0, -1):
            if flat[i][0] == "assistant" and flat[i - 1][0] == "user":
                return flat[i - 1][1], flat[i][1]
    return None


def read_pairs(path: str | Path, profile: Profile) -> list[tuple[str, str]]:
    """All (question, answer) pairs in a file, placeholders filled. Raises PairsFileError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PairsFileError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PairsFileError(f"{path} is not UTF-8 text (is it a binary file?)") from None
    stripped = text.lstrip()
    if not stripped:
        raise PairsFileError(f"{path} is empty")
    records: list[tuple[int, object]] = []
    if stripped.startswith("["):
        try:
            records = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise PairsFileError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise PairsFileError(f"{path} line {number} is not JSON ({e.msg}); expected one JSON object per line") from None
    pairs = []
    for number, record in records:
        pair = _pair(record)
        if pair is None:
            raise PairsFileError(f"{path} record {number} has no question/answer (expected question+answer, "
                                 "query+response, instruction+output, or messages)")
        question, answer = (fill_placeholders(s.strip(), profile) for s in pair)
        if question and answer:
            pairs.append((question, answer))
    if not pairs:
        raise PairsFileError(f"{path} holds no question/answer pairs")
    return pairs


def write_pairs(rows: list[dict], path: str | Path | None = None) -> str:
    """Corrections as JSON Lines (question, wrong_answer, answer, status); read_pairs reads it back."""
    lines = "".join(json.dumps({"question": r["question"], "answer": r["corrected_answer"],
                                "wrong_answer": r.get("wrong_answer"), "status": r.get("status"),
                                "channel": r.get("channel")}, ensure_ascii=False) + "\n" for r in rows)
    if path is not None:
        Path(path).write_text(lines, encoding="utf-8")
    return lines
