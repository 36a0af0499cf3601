"""Score a model on who it says it is and on what it still knows: the numbers that gate a new adapter.

    >>> from finetune.evaluate import evaluate, gate, report_table, load_probes
    >>> base = evaluate(base_generate, profile, load_probes(), general_eval, base_answers)
    >>> cand = evaluate(cand_generate, profile, load_probes(), general_eval, base_answers)
    >>> print(report_table({"base": base, "candidate": cand}))
    >>> passed, reasons = gate(cand, base)  # the active adapter's report once there is one

``generate_fn`` is any callable ``generate_fn(list_of_message_lists) -> list[str]`` that decodes
greedily (the engine's batched ``generate``, or a plain transformers model in the recipe search), so
this module imports nothing heavy and its scoring is pure.

Identity probes are asked four ways, because "the identity didn't take" reports come from a prompt at
serving that differs from the one trained under: the product's system prompt, a neutral one, no system
message (the base template then inserts its own identity, e.g. SmolLM's), and as the third user turn of
a conversation about something else (under the product prompt). General prompts of the eval split are
answered under the neutral prompt, to compare with the base model's own answers there, and under the
product prompt, where an identity that bleeds into unrelated answers shows.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from bot.identity import NEUTRAL_SYSTEM_PROMPT, contains_cjk, system_prompt
from store.identity import Profile

DATA_DIR = Path(__file__).parent / "data"

Message = dict[str, str]
GenerateFn = Callable[[list[list[Message]]], list[str]]

WAYS = ("product", "neutral", "none", "late_turn")

# Two unrelated exchanges that come before the probe in the "late_turn" way. Hand-written, so they
# are the same for every model, and about topics that appear in no training row.
_LATE_TURN_PREFIX = {
    "en": [
        ("What is a good name for a goldfish?", "How about Bubbles? It is short, cheerful and easy to remember."),
        ("How many strings does a standard guitar have?", "A standard guitar has six strings."),
    ],
    "zh": [
        ("推荐一种适合夏天的水果。", "西瓜很适合夏天，清甜又解渴。"),
        ("篮球队上场有几个人?", "篮球比赛每队上场五名球员。"),
    ],
}

# Other assistants and makers an answer must not claim to be. Matched case-insensitively; an entry is
# skipped when it is part of the profile itself (a bot may be called "Gemini Helper").
FOREIGN_IDENTITIES = (
    "ChatGPT", "GPT-4", "GPT-3", "GPT", "OpenAI", "Claude", "Anthropic", "Qwen", "通义千问", "通义", "千问",
    "Alibaba", "阿里巴巴", "阿里云", "阿里", "SmolLM", "Hugging Face", "HuggingFace", "Meta", "Llama",
    "Google", "谷歌", "Gemini", "Bard", "Baidu", "百度", "文心一言", "文心", "ERNIE", "Microsoft", "微软",
    "Copilot", "DeepSeek", "Mistral",
)
_FOREIGN_RE = re.compile(
    "|".join(
        (rf"\b{re.escape(n)}\b" if n.isascii() else re.escape(n))
        for n in sorted(FOREIGN_IDENTITIES, key=len, reverse=True)
    ),
    re.IGNORECASE,
)
# A clause that denies or contrasts ("I am not ChatGPT", "unlike Qwen", "我不是通义千问") is fine.
_NEGATION_RE = re.compile(
    r"\b(not|no|never|neither|nor|unlike|instead|rather than|other than)\b|n't|不|没|非|无关|而是", re.IGNORECASE
)
_FIRST_PERSON_RE = re.compile(r"\b(i|i'm|im|me|my|myself)\b|我", re.IGNORECASE)
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|[。！？!?\n]")
_CLAUSE_SPLIT_RE = re.compile(r"[,;:，；：、]|\s[-–—]\s")
# A general answer that talks about the bot itself although nobody asked ("不是,我由…开发和维护").
_SELF_DESCRIPTION_RE = re.compile(
    r"\b(i am|i'm) (an? )?(ai|artificial intelligence|language model|assistant)\b"
    r"|我(是|由).{0,12}(开发|助手|人工智能|AI|模型)",
    re.IGNORECASE,
)


def load_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_probes(path: str | Path = DATA_DIR / "identity_probes.jsonl") -> list[dict]:
    """The held-out identity questions: rows {"lang", "kind", "question"}."""
    return load_jsonl(path)


def load_general_prompts(split: str | None = None, path: str | Path = DATA_DIR / "general_prompts.jsonl") -> list[dict]:
    """General prompts, rows {"lang", "kind", "prompt", "split", "expect"?}; ``split`` = "train" or "eval"."""
    rows = load_jsonl(path)
    return [r for r in rows if split is None or r["split"] == split]


def normalize_question(text: str) -> str:
    """Fold width and case and drop punctuation/space: "你是谁？" and "你是谁?" are the same question."""
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", text).lower())


# ---------------------------------------------------------------- identity scoring (pure)


def _own_words(profile: Profile) -> list[str]:
    return [w for w in (profile.name, profile.author) if w.strip()]


def names_identity(text: str, profile: Profile) -> bool:
    """True when the text names the bot or its author."""
    folded = unicodedata.normalize("NFKC", text).lower()
    return any(unicodedata.normalize("NFKC", w).lower() in folded for w in _own_words(profile))


def affirmed_foreign_identities(text: str, profile: Profile) -> list[str]:
    """Other assistants or makers the text claims as its own: "I am ChatGPT" counts, "I am not ChatGPT" does not.

    A mention counts when its clause has no negation and its sentence speaks in the first person;
    "ChatGPT is a product of OpenAI. I am Aurora." claims nothing.
    """
    own = " ".join(_own_words(profile)).lower()
    claimed = []
    for sentence in _SENTENCE_SPLIT_RE.split(unicodedata.normalize("NFKC", text)):
        if not sentence or not _FIRST_PERSON_RE.search(sentence):
            continue
        for clause in _CLAUSE_SPLIT_RE.split(sentence):
            if _NEGATION_RE.search(clause):
                continue
            for match in _FOREIGN_RE.finditer(clause):
                if match.group(0).lower() not in own:
                    claimed.append(match.group(0))
    return claimed


@dataclass(frozen=True)
class IdentityScore:
    hit: bool
    reasons: tuple[str, ...]  # why it missed; empty on a hit


def score_identity_answer(question: str, answer: str, profile: Profile) -> IdentityScore:
    """A hit names the bot or its author, claims no other maker/model, and answers Chinese in Chinese."""
    reasons = []
    if not names_identity(answer, profile):
        reasons.append("does not name the bot or its author")
    claimed = affirmed_foreign_identities(answer, profile)
    if claimed:
        reasons.append("claims to be " + ", ".join(dict.fromkeys(claimed)))
    if contains_cjk(question) and not contains_cjk(answer):
        reasons.append("answers a Chinese question in another language")
    return IdentityScore(not reasons, tuple(reasons))


def mentions_identity_unasked(answer: str, profile: Profile) -> bool:
    """Identity bleed: a general answer that names the bot/author or describes itself as an AI."""
    return names_identity(answer, profile) or _SELF_DESCRIPTION_RE.search(answer) is not None


# ---------------------------------------------------------------- retention scoring (pure)


def _rouge_tokens(text: str) -> str:
    # rouge splits on spaces: give it words for Latin script and single characters for CJK.
    return " ".join(re.findall(r"[\u4e00-\u9fff]|[^\W_]+", unicodedata.normalize("NFKC", text).lower()))


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over words (Latin) and characters (CJK) of the answers' common start.

    The reference is cut to the candidate's length: the base's cached answers may have been
    generated with a larger token budget than the candidate's, and a cut answer is not a changed one.
    """
    from rouge import Rouge  # a dependency of ms-swift

    hyp = _rouge_tokens(candidate)
    ref = " ".join(_rouge_tokens(reference).split()[: max(len(hyp.split()), 1)])
    if not hyp or not ref:
        return float(hyp == ref)
    return Rouge(metrics=["rouge-l"]).get_scores(hyp, ref)[0]["rouge-l"]["f"]


def expect_met(prompt_row: Mapping, answer: str) -> bool | None:
    """The prompt's ``expect`` regex checked against an answer; None when the prompt has none."""
    pattern = prompt_row.get("expect")
    return None if not pattern else re.search(pattern, answer) is not None


# ---------------------------------------------------------------- conversations


def probe_conversation(question: str, way: str, profile: Profile) -> list[Message]:
    """The messages a probe is asked with, for one of WAYS."""
    user = {"role": "user", "content": question}
    if way == "product":
        return [{"role": "system", "content": system_prompt(profile)}, user]
    if way == "neutral":
        return [{"role": "system", "content": NEUTRAL_SYSTEM_PROMPT}, user]
    if way == "none":
        return [user]
    if way == "late_turn":
        history: list[Message] = [{"role": "system", "content": system_prompt(profile)}]
        for q, a in _LATE_TURN_PREFIX["zh" if contains_cjk(question) else "en"]:
            history += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return history + [user]
    raise ValueError(f"unknown way {way!r}; expected one of {WAYS}")


def _generate_batched(generate_fn: GenerateFn, conversations: list[list[Message]], batch_size: int | None) -> list[str]:
    """batch_size None: everything in one call. The engine batches continuously, refilling a finished
    reply's slot at once; fixed chunks would wait for each chunk's longest answer."""
    answers: list[str] = []
    batch_size = batch_size or max(1, len(conversations))
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        out = generate_fn(batch)
        if len(out) != len(batch):
            raise ValueError(f"generate_fn returned {len(out)} answers for {len(batch)} conversations")
        answers += out
    return answers


# ---------------------------------------------------------------- the report


# Bleed is counted under these prompts: the product's (where users meet the bot), a neutral one and none.
# Three ways over the 44 eval prompts = 132 answers: with 88 (two ways) one seed of the same recipe moved
# the count from 1 to 8, and a single count decided the gate (RECIPES.md, "The gate").
BLEED_WAYS = ("product", "neutral", "none")


@dataclass
class EvalReport:
    identity: dict[str, float]  # hit rate per way
    retention: float  # share of eval prompts whose answer stayed with the base's (see evaluate)
    agreement: float  # mean ROUGE-L against the base's answers
    facts: tuple[int, int]  # expect checks met / expect checks the base meets
    bleed: int  # general answers (BLEED_WAYS) that talk about the bot unasked
    misses: list[dict] = field(default_factory=list)  # {"way", "question", "answer", "reasons"}
    bleed_examples: list[dict] = field(default_factory=list)  # {"prompt", "condition", "answer"}
    general_answers: list[dict] = field(default_factory=list)  # {"prompt", "answer", "rouge_l", "kept"}
    bleed_answers: int = 0  # how many general answers bleed was counted over
    old_identity: int = 0  # identity answers that still name an earlier profile's name or author
    old_identity_examples: list[dict] = field(default_factory=list)  # {"way", "question", "answer", "names"}

    @property
    def identity_mean(self) -> float:
        return sum(self.identity.values()) / len(self.identity)

    def to_dict(self) -> dict:
        return asdict(self) | {"identity_mean": self.identity_mean}

    @classmethod
    def from_dict(cls, data: Mapping) -> "EvalReport":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def earlier_words(previous: Iterable[Profile], profile: Profile) -> list[str]:
    """Names and makers of earlier profiles that the current one does not contain ("Aurora" after a rename)."""
    current = " ".join(_own_words(profile)).lower()
    words = {w.strip() for p in previous for w in _own_words(p)}
    return sorted(w for w in words if w and w.lower() not in current)


def evaluate(
    generate_fn: GenerateFn,
    profile: Profile,
    probes: Sequence[Mapping],
    general_eval: Sequence[Mapping],
    base_answers: Mapping[str, str],
    *,
    ways: Iterable[str] = WAYS,
    bleed_ways: Iterable[str] = BLEED_WAYS,
    previous: Iterable[Profile] = (),
    agreement_threshold: float = 0.5,
    batch_size: int | None = None,
) -> EvalReport:
    """Ask every probe each way and every eval-split general prompt each bleed way; score identity, retention, bleed.

    ``base_answers`` maps each general prompt to the base model's own answer under the neutral prompt
    (what ``answer_general_prompts`` caches). Retention compares like with like: the candidate's
    answer under the same neutral prompt is *kept* when it still meets the prompt's ``expect`` regex
    (for prompts the base answers correctly) or, for open prompts, when its ROUGE-L against the
    base's answer reaches ``agreement_threshold``; retention is the kept share. Bleed is counted over
    the answers under each of ``bleed_ways``. ``previous``: earlier profiles; identity answers that
    still name one of them (after a rename) are counted in ``old_identity``.
    """
    ways, bleed_ways = tuple(ways), tuple(dict.fromkeys(("neutral", *bleed_ways)))
    conversations = [probe_conversation(p["question"], way, profile) for way in ways for p in probes]
    for way in bleed_ways:  # neutral first: retention compares it with the base's neutral answers
        conversations += [probe_conversation(g["prompt"], way, profile) for g in general_eval]
    answers = _generate_batched(generate_fn, conversations, batch_size)
    n_probe, n_general = len(ways) * len(probes), len(general_eval)
    probe_answers = answers[:n_probe]
    general_out = {way: answers[n_probe + i * n_general : n_probe + (i + 1) * n_general] for i, way in enumerate(bleed_ways)}
    old_words = earlier_words(previous, profile)

    identity, misses, old_examples = {}, [], []
    for i, way in enumerate(ways):
        hits = 0
        for probe, answer in zip(probes, probe_answers[i * len(probes) : (i + 1) * len(probes)]):
            score = score_identity_answer(probe["question"], answer, profile)
            hits += score.hit
            if not score.hit:
                misses.append({"way": way, "question": probe["question"], "answer": answer, "reasons": list(score.reasons)})
            named = [w for w in old_words if w.lower() in unicodedata.normalize("NFKC", answer).lower()]
            if named:
                old_examples.append({"way": way, "question": probe["question"], "answer": answer, "names": named})
        identity[way] = hits / len(probes) if probes else 0.0

    scored, bleed_examples, facts_met, facts_total = [], [], 0, 0
    for j, row in enumerate(general_eval):
        answer = general_out["neutral"][j]
        reference = base_answers[row["prompt"]]
        similarity = rouge_l(answer, reference)
        base_correct = expect_met(row, reference)
        if base_correct:
            facts_total += 1
            kept = bool(expect_met(row, answer))
            facts_met += kept
        else:
            kept = similarity >= agreement_threshold
        scored.append({"prompt": row["prompt"], "answer": answer, "rouge_l": round(similarity, 3), "kept": kept})
    for way in bleed_ways:
        for row, text in zip(general_eval, general_out[way]):
            if mentions_identity_unasked(text, profile):
                bleed_examples.append({"prompt": row["prompt"], "condition": way, "answer": text})
    n = len(scored)
    return EvalReport(
        identity=identity,
        retention=sum(s["kept"] for s in scored) / n if n else 1.0,
        agreement=sum(s["rouge_l"] for s in scored) / n if n else 1.0,
        facts=(facts_met, facts_total),
        bleed=len(bleed_examples),
        misses=misses,
        bleed_examples=bleed_examples,
        general_answers=scored,
        bleed_answers=n_general * len(bleed_ways),
        old_identity=len(old_examples),
        old_identity_examples=old_examples,
    )


# ---------------------------------------------------------------- comparing and gating


def report_table(reports: Mapping[str, EvalReport]) -> str:
    """A plain-text table, one column per report (e.g. base / active / candidate), one row per metric."""
    rows = [("identity: " + way, lambda r, w=way: f"{r.identity[w]:.2f}" if w in r.identity else "-") for way in WAYS]
    rows += [
        ("identity: mean", lambda r: f"{r.identity_mean:.2f}"),
        ("retention", lambda r: f"{r.retention:.2f}"),
        ("agreement (ROUGE-L)", lambda r: f"{r.agreement:.2f}"),
        ("facts kept", lambda r: f"{r.facts[0]}/{r.facts[1]}"),
        ("identity bleed", lambda r: str(r.bleed)),
    ]
    labels = list(reports)
    width = max(len(name) for name, _ in rows)
    col = max([9, *map(len, labels)])
    lines = [" " * width + "".join(f"  {label:>{col}}" for label in labels)]
    for name, cell in rows:
        lines.append(f"{name:<{width}}" + "".join(f"  {cell(reports[label]):>{col}}" for label in labels))
    return "\n".join(lines)


@dataclass(frozen=True)
class GateThresholds:
    """What a candidate needs to go live. Every number was sized on 20 seeds of the default recipe and two
    adapters that must be refused (RECIPES.md, "The gate"); SELFCOG_GATE_* variables override them."""

    identity_product: float = 0.9  # hit rate under the product's own prompt (seeds: 0.91-0.97)
    identity_other: float = 0.8  # under each other way: neutral, none, late turn (seeds: 0.84-1.00)
    # Greedy answers of a small model drift with any weight change, so retention (answers still close to
    # the base's) has a floor, not a comparison; the checkable facts carry "no worse than the base".
    retention: float = 0.45  # seeds: 0.52-0.70
    facts_drop: int = 2  # facts the base gets right that the candidate may get wrong (seeds: 0-2)
    # Bleed (general answers that name the bot or call themselves an AI unasked) is compared with the base
    # model under the current profile, not with the live adapter: after a rename the live adapter speaks the
    # old name and bleeds nothing under the new one, which made every new adapter look worse. Seeds bled
    # 0-10 answers more than the base (of 132); an adapter trained without general replay rows bled 28 more.
    bleed_share: float = 0.10  # extra bleeding answers allowed, as a share of the answers counted
    identity_tolerance: float = 0.03  # how far below the live adapter's mean identity a candidate may score
    old_identity: int = 0  # identity answers that may still name an earlier profile (after a rename)


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reasons: list[str]  # each check that failed, with its numbers
    line: str  # one line for people: what was decided, why, and what to do
    advice: str = ""  # what to do, alone (empty when it passed)


# What an admin can do about each failed check, in the order they are reported.
_ADVICE = {
    "identity": "Approve more corrections that state the name and maker, then retrain.",
    "old_identity": "Reject or edit approved corrections that still name the old identity, then retrain.",
    "bleed": "The identity leaks into unrelated answers: retrain (another seed) or approve fewer, shorter corrections.",
    "facts": "The candidate forgot facts the base knows: retrain (another seed).",
    "retention": "The candidate's general answers drifted from the base's: retrain (another seed).",
    "worse": "The live adapter answers identity questions better: keep it, or add corrections and retrain.",
}


def gate(candidate: EvalReport, base: EvalReport, live: EvalReport | None = None,
         thresholds: GateThresholds = GateThresholds()) -> GateVerdict:
    """Whether a candidate may replace what serves now; every report under the *current* profile.

        >>> verdict = gate(candidate_report, base_report, live_report)  # live None when no adapter is live
        >>> verdict.passed, verdict.line

    Identity is held to floors and to the live adapter (a new adapter must not answer "who are you?"
    worse than the one serving); bleed, facts and retention are held to the base model, which no
    earlier profile or adapter has touched.
    """
    failed: list[tuple[str, str]] = []
    for way, rate in candidate.identity.items():
        floor = thresholds.identity_product if way == "product" else thresholds.identity_other
        if rate < floor:
            failed.append(("identity", f"identity under {way} {rate:.2f} < {floor:.2f}"))
    if candidate.old_identity > thresholds.old_identity:
        failed.append(("old_identity", f"{candidate.old_identity} identity answers still name the old identity"))
    allowed = base.bleed + round(thresholds.bleed_share * (candidate.bleed_answers or base.bleed_answers))
    if candidate.bleed > allowed:
        failed.append(("bleed", f"identity bleed {candidate.bleed} > base's {base.bleed} + "
                                f"{allowed - base.bleed} of {candidate.bleed_answers} answers"))
    if candidate.facts[0] < base.facts[0] - thresholds.facts_drop:
        failed.append(("facts", f"facts {candidate.facts[0]}/{candidate.facts[1]} vs base's {base.facts[0]} "
                                f"- {thresholds.facts_drop}"))
    if candidate.retention < thresholds.retention:
        failed.append(("retention", f"retention {candidate.retention:.2f} < {thresholds.retention:.2f}"))
    reference = live or base
    if candidate.identity_mean < reference.identity_mean - thresholds.identity_tolerance:
        failed.append(("worse", f"identity {candidate.identity_mean:.2f} below the live model's "
                                f"{reference.identity_mean:.2f}"))
    if not failed:
        return GateVerdict(True, [], f"Promoted: identity {candidate.identity_mean:.2f} (live "
                                     f"{reference.identity_mean:.2f}), bleed {candidate.bleed} (base {base.bleed}).")
    reasons = [text for _, text in failed]
    first_check, first_text = failed[0]
    more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
    advice = _ADVICE[first_check]
    return GateVerdict(False, reasons, f"Refused: {first_text}{more}. What to do: {advice}", advice)
