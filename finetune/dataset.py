"""Build the identity training set: templates + approved corrections + general replay, under a mix of system prompts.

    >>> from finetune.dataset import answer_general_prompts, build_dataset
    >>> general = answer_general_prompts(engine.generate, load_general_prompts())  # cache per base model
    >>> ds = build_dataset(Profile("Aurora", "Acme Labs"), corrections, general, seed=0)
    >>> ds.write_swift("data/runs/7/dataset.jsonl"); ds.sha256; ds.report["excluded_corrections"]

Pure and deterministic: the same profile, corrections, general answers and seed give the same rows
and the same hash. Why each part is there (measured: FACTS.md, finetune/RECIPES.md):

- rows are literal text: ms-swift's own ``{{NAME}}`` self-cognition placeholders leaked into answers
  (ms-swift #2534), so anything that still looks like a placeholder is refused;
- every row is written under one of three system-prompt conditions (the product's prompt, a neutral
  one, none at all so the base template inserts its own identity), because an identity trained under
  one prompt does not hold under another;
- some identity rows come after an unrelated exchange, so the identity holds late in a conversation;
- general replay rows (the base model's own answers) keep general answers as they were; without them
  the bot began answering general Chinese questions with its identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from bot.errors import UserError
from bot.identity import NEUTRAL_SYSTEM_PROMPT, contains_cjk, system_prompt
from finetune.evaluate import (GenerateFn, Message, earlier_words, affirmed_foreign_identities, load_jsonl,
                               normalize_question)
from finetune.train import Recipe
from store.identity import Profile

RECIPE = Recipe()  # the dataset's size and mix default to the recipe's: one place for those numbers

DATA_DIR = Path(__file__).parent / "data"

CONDITIONS = ("product", "neutral", "none")
SOURCES = ("template", "correction", "replay")

# Whatever still looks like a placeholder after filling: ours, ms-swift's, and the usual hand-written kinds.
_PLACEHOLDER_RE = re.compile(r"\{name\}|\{author\}|\{\{\s*\w+\s*\}\}|<NAME>|<AUTHOR>|\bNAME\b|\bAUTHOR\b")
# A correction that gives the bot another name or maker than the profile's, outside a denial.
_OTHER_NAME_RE = re.compile(
    r"\bmy name is ([\w.-]+)|\bcall me ([\w.-]+)|我叫([\w.-]+)|我的名字是([\w.-]+)", re.IGNORECASE
)
# Case-sensitive: a maker is a capitalized name ("made by Initech"), not "made by a small team".
_OTHER_MAKER_RE = re.compile(
    r"\b(?:developed|created|made|built|trained|maintained) by ((?:the )?[A-Z][\w&.-]*(?: [A-Z][\w&.-]*)*)"
    r"|由(.{1,16}?)(?:开发|训练|创建|制作|打造|维护)"
)
_NEGATED_RE = re.compile(r"\b(not|no|never)\b|n't|不|没|非", re.IGNORECASE)


class DatasetError(UserError, ValueError):
    """The rows cannot be trained on as they are; the message says which row and why."""


def load_templates(path: str | Path = DATA_DIR / "identity_templates.jsonl") -> list[dict]:
    """Identity question/answer templates, rows {"lang", "category", "question", "answer"} with {name}/{author}."""
    return load_jsonl(path)


# ---------------------------------------------------------------- general replay answers


def answer_general_prompts(generate_fn: GenerateFn, prompts: Sequence[Mapping]) -> list[dict]:
    """The base model's own answers to the general prompts (under the neutral prompt): replay rows and the retention reference.

        >>> general = answer_general_prompts(engine.generate, load_general_prompts())
        >>> general[0]
        {'lang': 'en', 'kind': 'fact', 'prompt': 'What is the capital of France?', 'split': 'eval', ..., 'answer': 'The capital of France is Paris.'}

    Slow (one generation per prompt) and independent of the profile: cache the result per base model.
    """
    conversations = [
        [{"role": "system", "content": NEUTRAL_SYSTEM_PROMPT}, {"role": "user", "content": p["prompt"]}] for p in prompts
    ]
    answers = generate_fn(conversations)  # one call: the engine batches them continuously
    return [dict(p) | {"answer": a.strip()} for p, a in zip(prompts, answers)]


# ---------------------------------------------------------------- corrections


def contradiction(answer: str, profile: Profile, previous: Iterable[Profile] = ()) -> str | None:
    """Why a corrected answer contradicts the profile (claims another assistant, name or maker), or None.

    ``previous``: earlier profiles. After a rename, a correction that still names the old name or maker
    ("I'm Aurora from Acme Labs") teaches the identity the admin replaced, so it is left out too."""
    folded = answer.lower()
    for word in earlier_words(previous, profile):
        if word.lower() in folded:
            return f"names the earlier identity {word!r} (now {profile.name!r} by {profile.author!r})"
    claimed = affirmed_foreign_identities(answer, profile)
    if claimed:
        return "claims to be " + ", ".join(dict.fromkeys(claimed))
    for clause in re.split(r"[,.;:!?，。；：！？\n]", answer):
        if _NEGATED_RE.search(clause):
            continue
        for m in _OTHER_NAME_RE.finditer(clause):
            other = next(g for g in m.groups() if g)
            if other.lower().strip(".") != profile.name.lower():
                return f"names itself {other!r}, not {profile.name!r}"
        for m in _OTHER_MAKER_RE.finditer(clause):
            other = next(g for g in m.groups() if g).strip()
            if profile.author.lower() not in other.lower() and other.lower() not in profile.author.lower():
                return f"says it was made by {other!r}, not {profile.author!r}"
    return None


def _approved_corrections(corrections: Iterable[Mapping], profile: Profile,
                          previous: Iterable[Profile] = ()) -> tuple[list[Mapping], list[dict]]:
    """Deduplicate by normalized question (the newest id wins) and leave out those that contradict the profile."""
    newest: dict[str, Mapping] = {}
    for c in sorted(corrections, key=lambda c: c["id"]):
        newest[normalize_question(c["question"])] = c
    kept, excluded = [], []
    for c in newest.values():
        reason = contradiction(c["corrected_answer"], profile, previous)
        if reason:
            excluded.append({"id": c["id"], "question": c["question"], "reason": reason})
        else:
            kept.append(c)
    return kept, excluded


# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    messages: tuple[Message, ...]
    source: str  # one of SOURCES
    condition: str  # one of CONDITIONS
    lang: str  # "zh" or "en"
    multi_turn: bool = False


_SENTENCE_END_RE = re.compile(r"(?<=[.!?。！？])\s+|(?<=[。！？])|\n\s*\n")


def first_sentences(text: str, max_chars: int) -> str:
    """The longest run of whole sentences from the start of text that fits in max_chars ("" if none does)."""
    kept = ""
    for match in _SENTENCE_END_RE.finditer(text + "\n\n"):
        candidate = text[: match.start()].rstrip()
        if len(candidate) > max_chars:
            break
        kept = candidate
    return kept


def _system_messages(condition: str, profile: Profile) -> list[Message]:
    if condition == "product":
        return [{"role": "system", "content": system_prompt(profile)}]
    if condition == "neutral":
        return [{"role": "system", "content": NEUTRAL_SYSTEM_PROMPT}]
    return []  # "none": the base template inserts its own default system prompt


def _balanced(n: int, options: Sequence, rng: random.Random) -> list:
    """n picks from options in equal shares (as equal as n allows), in a seeded random order."""
    picks = [options[i % len(options)] for i in range(n)]
    rng.shuffle(picks)
    return picks


def _spread_sample(templates: Sequence[Mapping], k: int, rng: random.Random) -> list[Mapping]:
    """k templates taken round-robin across (lang, category) groups, so every kind of question stays."""
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for t in templates:
        groups.setdefault((t["lang"], t["category"]), []).append(t)
    for members in groups.values():
        rng.shuffle(members)
    picked: list[Mapping] = []
    while len(picked) < min(k, len(templates)):
        for members in groups.values():
            if members and len(picked) < k:
                picked.append(members.pop())
    return picked


@dataclass
class Dataset:
    rows: list[Row]
    report: dict = field(default_factory=dict)

    def swift_jsonl(self) -> str:
        """ms-swift's format: one {"messages": [...]} per line."""
        return "".join(json.dumps({"messages": list(r.messages)}, ensure_ascii=False) + "\n" for r in self.rows)

    @property
    def sha256(self) -> str:
        """Stable across runs and machines: the hash of exactly what ms-swift reads."""
        return hashlib.sha256(self.swift_jsonl().encode("utf-8")).hexdigest()

    def write_swift(self, path: str | Path) -> Path:
        return _write_private(path, self.swift_jsonl())

    def alpaca(self) -> list[dict]:
        """LLaMA-Factory's alpaca format (instruction/input/output/system/history); no "system" key means none."""
        out = []
        for r in self.rows:
            turns = [m for m in r.messages if m["role"] != "system"]
            pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]
            item = {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1], "history": [list(p) for p in pairs[:-1]]}
            if r.messages[0]["role"] == "system":
                item["system"] = r.messages[0]["content"]
            out.append(item)
        return out

    def write_alpaca(self, path: str | Path) -> Path:
        return _write_private(path, json.dumps(self.alpaca(), ensure_ascii=False, indent=1))


def _write_private(path: str | Path, text: str) -> Path:
    """Write a training set readable by its owner only (0600): it holds what users wrote."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through os.open
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def build_dataset(
    profile: Profile,
    corrections: Iterable[Mapping],
    general_answers: Sequence[Mapping],
    *,
    seed: int,
    templates: Sequence[Mapping] | None = None,
    max_templates: int | None = RECIPE.max_templates,
    conditions_per_question: int = RECIPE.conditions_per_question,
    multi_turn_share: float = RECIPE.multi_turn_share,
    replay_rows: int = RECIPE.replay_rows,
    replay_product_share: float = RECIPE.replay_product_share,
    replay_max_chars: int | None = RECIPE.replay_max_chars,
    prefix_max_chars: int = 120,
    previous: Iterable[Profile] = (),
) -> Dataset:
    """The training rows for one profile; raises DatasetError if a placeholder survives.

        >>> ds = build_dataset(Profile("Aurora", "Acme Labs"), [{"id": 3, "question": "你是谁?", "corrected_answer": "我是Aurora。"}],
        ...                    general_answers, seed=0)
        >>> ds.report["by_source"], ds.report["excluded_corrections"]

    ``corrections``: approved corrections, dicts with ``id``, ``question``, ``corrected_answer``; they
    replace a template with the same question and are written under every condition.
    ``general_answers``: ``answer_general_prompts`` output; only the "train" split is used, so the
    "eval" split stays unseen for the retention check.
    ``max_templates``: use only this many templates, spread evenly over language and category
    (fewer rows train faster; RECIPES.md measures how few still teach the identity).
    ``conditions_per_question``: how many of the three conditions each template question is written
    under (1 = each question once, conditions in equal shares across questions).
    ``multi_turn_share``: share of identity rows that follow an unrelated exchange (a short replay pair).
    ``replay_rows``: how many general replay rows (base answers, "train" split) to mix in.
    ``replay_product_share``: share of replay rows under the product prompt (the rest split evenly
    between neutral and none): the product prompt names the bot, which is where a general answer
    starts to name it too.
    ``previous``: earlier profiles; corrections that name one of them are left out (see ``contradiction``).
    ``replay_max_chars``: keep only the first whole sentences of each replay answer, up to this many
    characters (answers whose first sentence is longer are not used). Fewer tokens, but the model
    then learns to stop early and loses checkable facts (RECIPES.md): off by default.
    """
    if not 1 <= conditions_per_question <= len(CONDITIONS):
        raise ValueError(f"conditions_per_question must be 1..{len(CONDITIONS)}")
    rng = random.Random(seed)
    templates = load_templates() if templates is None else templates
    if max_templates is not None:
        templates = _spread_sample(templates, max_templates, rng)
    approved, excluded = _approved_corrections(corrections, profile, previous)
    corrected_questions = {normalize_question(c["question"]) for c in approved}
    overridden = [t["question"] for t in templates if normalize_question(t["question"]) in corrected_questions]

    # (question, answer, source, lang, conditions)
    items: list[tuple[str, str, str, str, list[str]]] = []
    offsets = _balanced(len(templates), range(len(CONDITIONS)), rng)
    for t, offset in zip(templates, offsets):
        if normalize_question(t["question"]) in corrected_questions:
            continue
        answer = t["answer"].replace("{name}", profile.name).replace("{author}", profile.author)
        conditions = [CONDITIONS[(offset + j) % len(CONDITIONS)] for j in range(conditions_per_question)]
        items.append((t["question"], answer, "template", t["lang"], conditions))
    for c in sorted(approved, key=lambda c: c["id"]):
        lang = "zh" if contains_cjk(c["question"]) else "en"
        items.append((c["question"], c["corrected_answer"], "correction", lang, list(CONDITIONS)))

    # A trailing U+FFFD is a character cut in half where generation stopped: drop it. One inside the
    # answer is text the tokenizer could not decode: not something to teach.
    replay_pool = [dict(g, answer=g["answer"].rstrip("\ufffd").rstrip()) for g in general_answers if g.get("split") == "train"]
    replay_pool = [g for g in replay_pool if g["answer"] and "\ufffd" not in g["answer"]]
    if replay_max_chars is not None:
        shortened = [dict(g, answer=first_sentences(g["answer"], replay_max_chars)) for g in replay_pool]
        replay_pool = [g for g in shortened if g["answer"]]
    prefixes = {
        lang: [g for g in replay_pool if g["lang"] == lang and len(g["answer"]) <= prefix_max_chars] for lang in ("zh", "en")
    }
    identity_rows = [(q, a, src, lang, cond) for q, a, src, lang, conds in items for cond in conds]
    multi_turn = set(rng.sample(range(len(identity_rows)), round(multi_turn_share * len(identity_rows))))

    rows: list[Row] = []
    for i, (question, answer, source, lang, condition) in enumerate(identity_rows):
        messages = _system_messages(condition, profile)
        is_multi = i in multi_turn and bool(prefixes[lang])
        if is_multi:
            prefix = rng.choice(prefixes[lang])
            messages += [{"role": "user", "content": prefix["prompt"]}, {"role": "assistant", "content": prefix["answer"]}]
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append(Row(tuple(messages), source, condition, lang, is_multi))

    replay = rng.sample(replay_pool, min(replay_rows, len(replay_pool)))
    n_product = round(replay_product_share * len(replay))
    replay_conditions = ["product"] * n_product + _balanced(len(replay) - n_product, CONDITIONS[1:], rng)
    rng.shuffle(replay_conditions)
    for g, condition in zip(replay, replay_conditions):
        messages = _system_messages(condition, profile) + [
            {"role": "user", "content": g["prompt"]},
            {"role": "assistant", "content": g["answer"]},
        ]
        rows.append(Row(tuple(messages), "replay", condition, g["lang"]))

    rng.shuffle(rows)
    _refuse_placeholders(rows)
    report = {
        "rows": len(rows),
        "by_source": {s: sum(r.source == s for r in rows) for s in SOURCES},
        "by_condition": {c: sum(r.condition == c for r in rows) for c in CONDITIONS},
        "by_lang": {lang: sum(r.lang == lang for r in rows) for lang in ("en", "zh")},
        "multi_turn": sum(r.multi_turn for r in rows),
        "corrections_used": [c["id"] for c in sorted(approved, key=lambda c: c["id"])],
        "excluded_corrections": excluded,
        "templates_overridden": overridden,
        "replay_available": len(replay_pool),
    }
    return Dataset(rows, report)


def _refuse_placeholders(rows: Iterable[Row]) -> None:
    for row in rows:
        for m in row.messages:
            found = _PLACEHOLDER_RE.search(m["content"])
            if found:
                raise DatasetError(
                    f"placeholder {found.group(0)!r} left in a {row.source} row ({m['role']}: {m['content']!r}); "
                    "check the profile and the templates"
                )
