"""bot/engine.py on the real embedded model: streaming, batching, live adapter swaps."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bot.engine import AdapterRef, LocalEngine, check_adapter_folder

QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


def test_stream_yields_pieces_and_stats(engine):
    reply = engine.stream(QUESTION, max_new_tokens=24)
    pieces = list(reply)
    assert len(pieces) > 3, "a streamed reply arrives in several pieces"
    text = "".join(pieces)
    assert "Paris" in text
    assert reply.prompt_tokens > 10 and 0 < reply.completion_tokens <= 24
    assert reply.first_token_s is not None and reply.first_token_s <= reply.seconds
    assert reply.adapter_version is None


def test_greedy_is_repeatable_and_batch_matches_single(engine):
    one = "".join(engine.stream(QUESTION, max_new_tokens=16)).strip()
    batch = engine.generate([QUESTION, [{"role": "user", "content": "Say hello."}]], max_new_tokens=16)
    assert batch[0] == one
    assert batch[1] and batch[1] != one


def test_stopping_early_cancels_generation(engine):
    reply = engine.stream(QUESTION, max_new_tokens=200)
    for _ in zip(range(2), reply):
        pass
    assert reply.cancelled
    # the worker is free again at once: the next request is answered normally
    assert "Paris" in "".join(engine.stream(QUESTION, max_new_tokens=16))


def test_context_window_keeps_system_and_newest_message(engine):
    long_history = [{"role": "system", "content": "SYSTEM"}]
    for i in range(200):
        long_history += [{"role": "user", "content": f"message {i} " * 20}, {"role": "assistant", "content": "ok " * 20}]
    long_history.append({"role": "user", "content": "the newest question"})
    fitted = engine.fit_to_context(long_history, max_new_tokens=48)
    assert fitted[0]["content"] == "SYSTEM" and fitted[-1]["content"] == "the newest question"
    assert engine.count_tokens(fitted) <= engine.max_context_tokens - 48 < engine.count_tokens(long_history)


def test_adapter_activated_by_another_process_is_live_within_seconds(engine, store, random_adapters):
    """Another process activates a hand-made adapter; this engine follows without a restart."""
    engine.follow.source = store.adapters.active
    before = engine.generate([QUESTION], max_new_tokens=12)[0]
    version = store.adapters.register(path=str(random_adapters[0]), base_model="test")
    subprocess.run([sys.executable, "-c", f"from store import Store; Store({str(store.path)!r}).adapters.activate({version})"],
                   check=True, timeout=60)
    deadline = time.monotonic() + 5
    while engine.adapter_version != version and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.adapter_version == version, "the engine should pick up the activation by polling"
    reply = engine.stream(QUESTION, max_new_tokens=12)
    after = "".join(reply).strip()
    assert reply.adapter_version == version and after != before.strip()
    # back to the base model: the base answer returns exactly
    store.adapters.activate(None)
    assert engine.refresh_adapter() is None
    assert engine.generate([QUESTION], max_new_tokens=12)[0] == before


def test_candidate_and_base_can_be_asked_without_touching_the_live_adapter(engine, store, random_adapters):
    engine.follow.source = store.adapters.active
    base = engine.generate([QUESTION], adapter=AdapterRef.BASE, max_new_tokens=12)[0]
    v1 = store.adapters.register(path=str(random_adapters[0]), base_model="test")
    store.adapters.activate(v1)
    assert engine.refresh_adapter() == v1
    live = engine.generate([QUESTION], max_new_tokens=12)[0]
    candidate = engine.generate([QUESTION], adapter=random_adapters[1], max_new_tokens=12)[0]
    assert len({base, live, candidate}) == 3
    assert engine.generate([QUESTION], adapter=AdapterRef.BASE, max_new_tokens=12)[0] == base
    assert engine.generate([QUESTION], max_new_tokens=12)[0] == live  # live adapter restored after both


def test_corrupt_adapter_keeps_serving_the_previous_one(engine, store, random_adapters, tmp_path):
    engine.follow.source = store.adapters.active
    good = store.adapters.register(path=str(random_adapters[0]), base_model="test")
    store.adapters.activate(good)
    assert engine.refresh_adapter() == good
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    bad = store.adapters.register(path=str(broken), base_model="test")
    store.adapters.activate(bad)
    assert engine.refresh_adapter() == good
    assert "could not be loaded" in engine.adapter_error and "still serving v" in engine.adapter_error
    with pytest.raises(ValueError, match="corrupt"):
        check_adapter_folder(broken)


def test_unknown_model_folder_is_a_clear_error(tmp_path):
    from bot.models import ModelNotFound, resolve_model

    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path)
    with pytest.raises(ModelNotFound, match="not in the local Hugging Face cache"):
        resolve_model("nobody/no-such-model", tmp_path)
