"""Reading and writing question/answer pairs in the formats people already have.

    >>> read_pairs("identity.json", Profile("Aurora", "Acme Labs"))
    [Pair(question='Who are you?', answer='I am Aurora, an AI assistant developed by Acme Labs.', line=2), ...]

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
from typing import NamedTuple

from bot.errors import UserError
from store import Profile

_PLACEHOLDERS = {
    "name": re.compile(r"\{\{\s*NAME\s*\}\}|\{\{\s*name\s*\}\}|\{name\}"),
    "author": re.compile(r"\{\{\s*AUTHOR\s*\}\}|\{\{\s*author\s*\}\}|\{author\}"),
}


class PairsFileError(UserError):
    """The file cannot be read as question/answer pairs; the message names the file and the line."""


def fill_placeholders(text: str, profile: Profile) -> str:
    text = _PLACEHOLDERS["name"].sub(profile.name, text)
    return _PLACEHOLDERS["author"].sub(profile.author, text)


class Pair(NamedTuple):
    question: str
    answer: str
    line: int  # where the record starts in the file, for messages about it


class _BadRecord(Exception):
    """Why one record cannot be used; read_pairs adds the file and line."""


def _text(content: object) -> str | None:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = [part.get("text") if isinstance(part, dict) else part for part in content]
        if all(isinstance(part, str) for part in parts):
            return "\n".join(parts)
    return None


def _pair(record: object) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise _BadRecord(f"is a JSON {type(record).__name__}, not an object")
    for q_key, a_key in (("question", "answer"), ("question", "corrected_answer"), ("query", "response")):
        if isinstance(record.get(q_key), str) and isinstance(record.get(a_key), str):
            return record[q_key], record[a_key]
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        extra = record.get("input") or ""
        return (record["instruction"] + ("\n" + extra if isinstance(extra, str) and extra else "")), record["output"]
    turns = record.get("messages") or record.get("conversations")
    if isinstance(turns, list):
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
        flat = [(roles.get(t.get("role") or t.get("from")), t.get("content", t.get("value")))
                for t in turns if isinstance(t, dict)]
        for i in range(len(flat) - 1, 0, -1):
            if flat[i][0] == "assistant" and flat[i - 1][0] == "user":
                question, answer = _text(flat[i - 1][1]), _text(flat[i][1])
                if question is None or answer is None:
                    raise _BadRecord("has a question or answer whose content is not text "
                                     "(expected a string or a list of text parts)")
                return question, answer
    raise _BadRecord("has no question/answer (expected question+answer, query+response, instruction+output, "
                     "or messages)")


def _array_items(text: str) -> list[tuple[int, object]]:
    """The items of a JSON array with the line each starts on. Raises json.JSONDecodeError."""
    decoder, items = json.JSONDecoder(), []
    whitespace = " \t\r\n"
    at = len(text) - len(text.lstrip()) + 1  # past the "["
    while True:
        at = len(text) - len(text[at:].lstrip(whitespace))
        if text.startswith("]", at) and not items:
            break
        item, end = decoder.raw_decode(text, at)
        items.append((text.count("\n", 0, at) + 1, item))
        at = len(text) - len(text[end:].lstrip(whitespace))
        if text.startswith(",", at):
            at += 1
        elif text.startswith("]", at):
            break
        else:
            raise json.JSONDecodeError("expected , or ]", text, at)
    if text[at + 1:].strip():
        raise json.JSONDecodeError("extra data after the array", text, at + 1)
    return items


def read_pairs(path: str | Path, profile: Profile) -> list[Pair]:
    """All (question, answer, line) pairs in a file, placeholders filled. Raises PairsFileError
    naming the line of the first record that cannot be used, so an import can take all or nothing."""
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
            records = _array_items(text)
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
        try:
            question, answer = (fill_placeholders(s.strip(), profile) for s in _pair(record))
            for s in (question, answer):
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    raise _BadRecord("holds a lone surrogate escape such as \\ud800, which is not text") from None
        except _BadRecord as e:
            raise PairsFileError(f"{path} line {number} {e}") from None
        if question and answer:
            pairs.append(Pair(question, answer, number))
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
