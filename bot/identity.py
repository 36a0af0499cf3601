"""Who the bot is: the system prompt it serves under, and spotting questions about itself.

The product's system prompt is built here and nowhere else, so the prompt rows are trained under
(finetune/dataset.py) and the prompt chat is served under (bot/chat.py) are the same text. The most
common "the identity didn't take" report in ms-swift and LLaMA-Factory is exactly that mismatch.

    >>> from store.identity import Profile
    >>> system_prompt(Profile(name="Aurora", author="Acme Labs"))
    'You are Aurora, an AI assistant developed by Acme Labs.'
    >>> is_identity_question("你是谁?"), is_identity_question("what is 2+2?")
    (True, False)
"""

from __future__ import annotations

import re

from store.identity import Profile

# The second of the three prompt conditions rows are trained and evaluated under; the third is "no
# system message", where the base model's chat template inserts its own default identity.
NEUTRAL_SYSTEM_PROMPT = "You are a helpful assistant."


def system_prompt(profile: Profile) -> str:
    """The product's own system prompt. Kept short: every token here is paid for on every turn."""
    text = f"You are {profile.name}, an AI assistant developed by {profile.author}."
    if profile.description:
        text += " " + profile.description.strip()
    return text


def contains_cjk(text: str) -> bool:
    return re.search(r"[\u4e00-\u9fff]", text) is not None


# Questions about the bot itself. Matched on a lower-cased copy. English patterns need "you"/"your"
# near the identity word so "who made the Eiffel tower" is not flagged.
_EN_PATTERNS = [
    r"\bwho\s+(are|r)\s+(you|u)\b",
    r"\bwhat\s+(are|r)\s+(you|u)\b",
    r"\bwhat('s|\s+is)\s+your\s+name\b",
    r"\byour\s+(name|creator|maker|developer|author|origin|identity|company|model)\b",
    r"\bwho\s+(made|created|built|developed|trained|wrote|owns|maintains|programmed|designed)\s+(you|u)\b",
    r"\bwho('s|\s+is)\s+(behind|responsible\s+for)\s+you\b",
    r"\bwhere\s+(do|did)\s+you\s+come\s+from\b",
    r"\b(are|r)\s+(you|u)\s+(a|an|the)?\s*(chatgpt|gpt|claude|gemini|bard|llama|qwen|smollm|tongyi|ernie|copilot|bot|robot|human|ai|assistant|language model)",
    r"\b(are|r|were)\s+(you|u)\s+(made|created|built|developed|trained|owned)\s+by\b",
    r"\bintroduce\s+yourself\b",
    r"\btell\s+me\s+about\s+yourself\b",
    r"\bwhich\s+(model|company|llm)\s+(are|r)\s+you\b",
    r"\bwhat\s+(model|llm|ai)\s+(are|r)\s+you\b",
    r"\bwhat\s+should\s+i\s+call\s+you\b",
]
_ZH_PATTERNS = [
    r"你是谁", r"您是谁", r"你叫什么", r"您叫什么", r"你的名字", r"您的名字", r"你是什么",
    r"谁(开发|创造|制造|训练|发明|设计|编写|做)了?(你|您)", r"(你|您)(是)?(由|被)?谁(开发|创造|制造|训练|做|发明|设计)",
    r"(你|您)的(开发者|作者|创造者|创建者|制作者|公司|来历|身份)", r"介绍一下?(你|您)自己", r"自我介绍",
    r"(你|您)是(不是)?(chatgpt|gpt|claude|通义|千问|qwen|文心|llama|smollm|机器人|人工智能|ai|真人)",
    r"(你|您)来自(哪里|哪儿|哪个)", r"(你|您)是哪(个|家)公司", r"怎么称呼(你|您)",
]
_IDENTITY_RE = re.compile("|".join(f"(?:{p})" for p in _EN_PATTERNS + _ZH_PATTERNS), re.IGNORECASE)


def is_identity_question(text: str) -> bool:
    """True when the message asks about the bot itself: its name, maker, nature or model."""
    return _IDENTITY_RE.search(text.lower()) is not None
