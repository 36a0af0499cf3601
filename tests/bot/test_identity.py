"""bot/identity.py: the product prompt and spotting questions about the bot itself."""

import pytest

from bot.identity import is_identity_question, system_prompt
from store import Profile


@pytest.mark.parametrize("text", [
    "你是谁", "你是谁?", "谁开发了你？", "你叫什么名字", "你是ChatGPT吗", "你是通义千问吗", "请介绍一下你自己",
    "who are you?", "Who made you", "What's your name?", "are you ChatGPT?", "Are you made by OpenAI?",
    "Tell me about yourself", "which model are you", "who created you?", "Who built u",
])
def test_identity_questions(text):
    assert is_identity_question(text)


@pytest.mark.parametrize("text", [
    "What is 2+2?", "Who made the Eiffel Tower?", "今天天气怎么样", "写一首关于秋天的诗", "Are you sure about that?",
    "What is the capital of France?", "How do I sort a list in Python?",
])
def test_other_questions(text):
    assert not is_identity_question(text)


def test_system_prompt_names_the_profile():
    prompt = system_prompt(Profile("Aurora", "Acme Labs", "Answers briefly."))
    assert prompt == "You are Aurora, an AI assistant developed by Acme Labs. Answers briefly."
