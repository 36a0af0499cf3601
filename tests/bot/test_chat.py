"""bot/chat.py: the one service both front ends use, on the real embedded model."""

from __future__ import annotations

import logging
import sqlite3
import threading

import pytest

from bot.chat import MAX_MESSAGE_CHARS, ChatInputError, ChatService, SaveFailed, clean_text
from bot.engines import Sampling
from store import Store


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


def test_chat_replies_sample_as_configured_and_ask_stays_greedy(store, engine):
    seen = []
    original = engine.stream
    engine.stream = lambda messages, **kw: (seen.append(kw["sampling"]), original(messages, **kw))[1]
    hot = Sampling(temperature=0.7, top_p=0.9, repetition_penalty=1.15, seed=3)
    chat = ChatService(store, engine, max_new_tokens=8, sampling=hot)
    try:
        chat.send(chat.conversation("web", chat_key="k", user="u"), "Tell me a story.").run()
        assert chat.answer(["2+2?"]) == chat.answer(["2+2?"])  # generate(): greedy, no sampling to pass
    finally:
        del engine.stream
    assert seen == [hot]


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
    ("", "empty"), ("   \n ", "empty"), (b"\xff\xfe\x00\x01", "binary"), ("\x00\x00 \x00", "empty"),
    ("\x01\x02\x03\x04 abc", "binary"),
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


def test_clean_text_drops_nul_and_replaces_lone_surrogates():
    assert clean_text("abc\x00def") == "abcdef"
    assert clean_text("half an emoji \ud83d!") == "half an emoji \ufffd!"
    assert clean_text("a whole one \ud83d\ude00") == "a whole one \U0001f600"  # a pair is joined, not replaced
    assert clean_text("", what="description", empty_ok=True) == ""


# --- writes that survive a locked database ----------------------------------------------------------

class _Signal(logging.Handler):
    """Sets an event when bot.chat logs that it is waiting for the lock."""

    def __init__(self, event: threading.Event):
        super().__init__(logging.WARNING)
        self.event = event

    def emit(self, record):
        if "database is locked" in record.getMessage():
            self.event.set()


@pytest.fixture
def blocker(store):
    """Another process's connection holding the write lock (BEGIN IMMEDIATE) until released."""
    conn = sqlite3.connect(store.path, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    yield conn
    if conn.in_transaction:
        conn.rollback()
    conn.close()


def impatient_chat(store, save_within_s):
    """A service whose store gives up on the lock after 50 ms, so each retry is quick."""
    return ChatService(Store(store.path, busy_timeout_s=0.05), engine=None, save_within_s=save_within_s)


def test_a_message_sent_during_a_lock_is_saved_once_the_lock_is_released(store, blocker):
    chat = impatient_chat(store, save_within_s=60)
    conversation = store.conversations.latest("web", "k")  # None: the conversation is started while locked
    waiting = threading.Event()
    signal = _Signal(waiting)
    logging.getLogger("bot.chat").addHandler(signal)
    release = threading.Thread(target=lambda: (waiting.wait(60), blocker.rollback()))
    release.start()
    try:
        conversation = chat.conversation("web", chat_key="k", user="u")
        turn = chat.send(conversation, "Hello while locked")
    finally:
        logging.getLogger("bot.chat").removeHandler(signal)
        release.join()
    assert waiting.is_set(), "the first try met the lock"
    assert [(m["id"], m["text"]) for m in store.conversations.messages(conversation)] == \
        [(turn.user_message_id, "Hello while locked")]


def test_writes_that_stay_locked_fail_clearly_and_save_nothing(store):
    conversation = store.conversations.start("web", "k")
    question = store.conversations.add_message(conversation, "user", "Who are you?")
    answer = store.conversations.add_message(conversation, "assistant", "I am SmolLM.")
    chat = impatient_chat(store, save_within_s=0.2)
    blocker = sqlite3.connect(store.path)
    blocker.execute("BEGIN IMMEDIATE")
    for write in (lambda: chat.send(conversation, "Hello"),
                  lambda: chat.correct(answer, "I am Aurora.", channel="web", submitter="u"),
                  lambda: chat.rate(answer, 1, channel="web", user="u"),
                  lambda: chat.conversation("web", chat_key="other", user="v")):
        with pytest.raises(SaveFailed, match="Couldn't save — try again"):
            write()
    blocker.rollback()
    assert [m["id"] for m in store.conversations.messages(conversation)] == [question, answer]
    assert store.corrections.count() == 0 and store.conversations.ratings(answer) == {"up": 0, "down": 0}
    chat.correct(answer, "I am Aurora.", channel="web", submitter="u")  # the same call works once it is free
    assert store.corrections.count() == 1


def test_looking_for_a_conversation_writes_nothing_until_the_user_sends(store):
    chat = ChatService(store, engine=None)
    assert chat.conversation("web", chat_key="page-load", user="visitor", create=False) is None
    assert store.db["users"].count == 0 and store.db["conversations"].count == 0
    conversation = chat.conversation("web", chat_key="page-load", user="visitor")
    chat.send(conversation, "Hi")
    assert chat.conversation("web", chat_key="page-load", user="visitor", create=False) == conversation
    assert store.db["users"].count == 1 and store.db["conversations"].count == 1


def test_a_correction_with_a_lone_surrogate_is_stored_cleaned(store):
    chat = ChatService(store, engine=None)
    conversation = chat.conversation("web", chat_key="k", user="u")
    store.conversations.add_message(conversation, "user", "Who are you?")
    answer = store.conversations.add_message(conversation, "assistant", "I am SmolLM.")
    correction_id, _ = chat.correct(answer, "I am Aurora \ud83d\x00", channel="web")
    assert store.corrections.get(correction_id)["corrected_answer"] == "I am Aurora \ufffd"
