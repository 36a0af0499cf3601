"""bot/chat.py: the one service both front ends use, on the real embedded model."""

from __future__ import annotations

import pytest

from bot.chat import MAX_MESSAGE_CHARS, ChatInputError, ChatService, clean_text


@pytest.fixture
def chat(store, engine):
    engine.follow.source = store.adapters.active
    return ChatService(store, engine, max_new_tokens=24)


def test_reply_streams_and_is_recorded_with_its_stats(chat, store):
    conversation = chat.conversation("web", chat_key="session-1", user="alice")
    turn = chat.send(conversation, "What is the capital of France?")
    growing = list(turn)
    assert len(growing) > 1 and all(b.startswith(a.strip()) for a, b in zip(growing, growing[1:]))
    messages = store.conversations.messages(conversation)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    answer = messages[1]
    assert answer["id"] == turn.message_id and answer["text"] == turn.text and "Paris" in answer["text"]
    assert answer["latency_ms"] > 0 and answer["completion_tokens"] > 0 and answer["prompt_tokens"] > 10
    assert answer["adapter_version"] is None


def test_multi_turn_history_reaches_the_model(chat, engine, store):
    conversation = chat.conversation("telegram", chat_key="chat-7", user=7)
    chat.send(conversation, "My name is Zorblax.").run()
    seen = []
    original = engine.stream
    engine.stream = lambda messages, **kw: (seen.append(messages), original(messages, **kw))[1]
    try:
        chat.send(conversation, "What is my name?").run()
    finally:
        del engine.stream
    roles = [m["role"] for m in seen[0]]
    assert roles == ["system", "user", "assistant", "user"]
    assert seen[0][0]["content"] == chat.system_prompt() and "Zorblax" in seen[0][1]["content"]


def test_identity_questions_are_flagged(chat, store):
    conversation = chat.conversation("web", chat_key="s", user="u")
    assert chat.send(conversation, "你是谁?").identity_question
    assert not chat.send(conversation, "What is 2 + 2?").identity_question
    flags = [m["identity_question"] for m in store.conversations.messages(conversation) if m["role"] == "user"]
    assert flags == [1, 0]


def test_same_chat_key_continues_and_new_starts_over(chat):
    first = chat.conversation("web", chat_key="k", user="u")
    assert chat.conversation("web", chat_key="k", user="u") == first
    assert chat.conversation("web", chat_key="k", user="u", new=True) != first


def test_correction_keeps_question_wrong_answer_and_fix(chat, store):
    conversation = chat.conversation("web", chat_key="s", user="u")
    turn = chat.send(conversation, "Who made you?")
    turn.run()
    correction_id, created = chat.correct(turn.message_id, "Acme Labs made me.", channel="web", submitter="u")
    row = store.corrections.get(correction_id)
    assert created and row["status"] == "pending" and row["message_id"] == turn.message_id
    assert (row["question"], row["wrong_answer"], row["corrected_answer"]) == ("Who made you?", turn.text, "Acme Labs made me.")
    assert chat.correct(turn.message_id, "Acme Labs made me.", channel="web") == (correction_id, False)
    with pytest.raises(ChatInputError, match="Only the bot's answers"):
        chat.correct(turn.user_message_id, "x", channel="web")
    with pytest.raises(ChatInputError, match="no longer exists"):
        chat.correct(123456, "x", channel="web")


def test_feedback_one_rating_per_person(chat, store):
    conversation = chat.conversation("web", chat_key="s", user="u")
    turn = chat.send(conversation, "Hi")
    turn.run()
    chat.rate(turn.message_id, 1, channel="web", user="u")
    assert chat.rate(turn.message_id, -1, channel="web", user="u") == {"up": 0, "down": 1}
    assert chat.rate(turn.message_id, 1, channel="web", user="v") == {"up": 1, "down": 1}
    with pytest.raises(ChatInputError, match="only the bot's answers"):
        chat.rate(turn.user_message_id, 1, channel="web", user="u")


@pytest.mark.parametrize("bad, problem", [
    ("", "empty"), ("   \n ", "empty"), (b"\xff\xfe\x00\x01", "binary"), ("abc\x00def", "binary"),
    ("x" * (MAX_MESSAGE_CHARS + 1), "limit is"), (None, "not text"),
])
def test_bad_messages_get_a_clear_reason_and_store_nothing(chat, store, bad, problem):
    conversation = chat.conversation("web", chat_key="s", user="u")
    with pytest.raises(ChatInputError, match=problem):
        chat.send(conversation, bad)
    assert store.conversations.messages(conversation) == []


def test_a_100kb_message_is_refused_before_the_model_sees_it(chat, store):
    conversation = chat.conversation("web", chat_key="s", user="u")
    with pytest.raises(ChatInputError) as error:
        chat.send(conversation, "lorem ipsum " * 9000)
    assert "107,999 characters" in str(error.value) and "shorten" in str(error.value)


def test_clean_text_strips_control_characters():
    assert clean_text("hello\x07 world\r\n") == "hello world"
