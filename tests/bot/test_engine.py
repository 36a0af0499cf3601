"""bot/engines on the real embedded model: streaming, batching, live adapter swaps, chat sampling,
and telling an adapter folder that fits this model from one that does not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest

from bot.engines import AdapterFolderError, AdapterRef, Sampling, check_adapter_folder, make_engine
from bot.errors import UserError
from bot.identity import system_prompt
from store import Store
from store.identity import DEFAULT_PROFILE
from tests.conftest import make_lora_adapter

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


def test_another_store_s_v1_is_other_weights_and_is_loaded_as_such(engine, store, random_adapters, tmp_path):
    """Version numbers are per store: a "v1" seen before (another data directory, a store started afresh)
    must not stand in for this store's v1. (It did: the chat then spoke with the old adapter's weights.)"""
    engine.follow.source = store.adapters.active
    first = store.adapters.register(path=str(random_adapters[0]), base_model="test")
    store.adapters.activate(first)
    assert engine.refresh_adapter() == first
    first_answer = engine.generate([QUESTION], max_new_tokens=12)[0]
    engine.follow.source = lambda: None
    engine.refresh_adapter()  # back to the base, as between two tests or two data directories

    other = Store(tmp_path / "other.db")
    engine.follow.source = other.adapters.active
    again = other.adapters.register(path=str(random_adapters[1]), base_model="test")
    other.adapters.activate(again)
    assert again == first == 1 and engine.refresh_adapter() == 1
    expected = engine.generate([QUESTION], adapter=random_adapters[1], max_new_tokens=12)[0]
    assert engine.generate([QUESTION], max_new_tokens=12)[0] == expected != first_answer
    other.close()


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
    assert "not a LoRA config" in engine.adapter_error
    store.adapters.activate(good)  # rolled back: nothing is wrong any more
    assert engine.refresh_adapter() == good and engine.adapter_error is None


# --- chat sampling ----------------------------------------------------------------------------------

CHAT = Sampling(temperature=0.7, top_p=0.9, repetition_penalty=1.15)  # the chat's defaults (selfcog/config.py)


def _most_repeated_6gram(text: str) -> int:
    words = text.split()
    return max(Counter(tuple(words[i:i + 6]) for i in range(len(words) - 5)).values(), default=0)


def test_chat_sampling_does_not_loop_where_greedy_does(engine):
    """The base model asked "Who are you?" under the product prompt: greedy runs to the cap repeating itself."""
    who = [{"role": "system", "content": system_prompt(DEFAULT_PROFILE)}, {"role": "user", "content": "Who are you?"}]
    seeded = [Sampling(CHAT.temperature, CHAT.top_p, CHAT.repetition_penalty, seed=seed) for seed in (0, 0, 1)]
    replies = [engine.stream(who, max_new_tokens=256), *(engine.stream(who, max_new_tokens=256, sampling=s)
                                                          for s in seeded)]
    greedy, *sampled = ["".join(reply) for reply in replies]
    assert _most_repeated_6gram(greedy) >= 3, "greedy no longer loops here: this test would prove nothing"
    assert all(_most_repeated_6gram(text) < 3 for text in sampled), sampled
    assert sampled[0] == sampled[1] != sampled[2], "the same seed gives the same reply"


# --- is this folder a LoRA for this model? ------------------------------------------------------------

def _copy(adapter, folder, **config_changes):
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def test_a_lora_for_this_model_is_accepted(random_adapters, embedded_model):
    assert check_adapter_folder(random_adapters[0], embedded_model) is None
    assert check_adapter_folder(random_adapters[0]) is None  # the folder alone


def test_folders_that_are_not_a_lora_are_refused_in_one_line(random_adapters, tmp_path, embedded_model):
    empty_config = tmp_path / "empty-config"
    empty_config.mkdir()
    (empty_config / "adapter_config.json").write_text("{}")
    shutil.copy(random_adapters[0] / "adapter_model.safetensors", empty_config)
    corrupt = _copy(random_adapters[0], tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    no_weights = _copy(random_adapters[0], tmp_path / "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path: "has no adapter_config.json",
        empty_config: "not a LoRA config",
        corrupt: "is corrupt",
        no_weights: "has no adapter_model.safetensors",
        _copy(random_adapters[0], tmp_path / "other-targets", target_modules=["wq", "wv"]): "targets wq, wv",
        _copy(random_adapters[0], tmp_path / "other-rank", r=8): "rank r=8",
    }
    for folder, reason in cases.items():
        with pytest.raises(AdapterFolderError, match=reason) as refused:
            check_adapter_folder(folder, embedded_model)
        assert "\n" not in str(refused.value)


def test_a_lora_made_for_another_shape_is_refused_naming_it(tmp_path, embedded_model):
    from transformers import AutoModelForCausalLM, LlamaConfig

    narrow = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152)
    AutoModelForCausalLM.from_config(narrow).save_pretrained(tmp_path / "narrow")
    adapter = make_lora_adapter(str(tmp_path / "narrow"), tmp_path / "for-narrow", seed=1)
    check_adapter_folder(adapter, tmp_path / "narrow")  # fits the model it was made for
    with pytest.raises(AdapterFolderError, match=r"model.layers.0.self_attn.q_proj .* \[4, 64\] .* 576 in"):
        check_adapter_folder(adapter, embedded_model)


# --- picking a backend ----------------------------------------------------------------------------------

def test_make_engine_picks_the_configured_backend(embedded_model):
    from selfcog.config import Settings

    with pytest.raises(UserError, match="unknown engine 'nope': choose one of local, vllm, openai"):
        make_engine(Settings(engine="nope"), embedded_model)
    engine = make_engine(Settings(device="cpu", max_new_tokens=8), embedded_model, active_adapter=lambda: None)
    try:
        assert (engine.device, engine.adapter_version, engine.adapter_error) == ("cpu", None, None)
        assert engine.capacity >= 1 and engine.max_new_tokens == 8
        assert not engine.trains_on_serving_weights, "auto on a CPU: training takes a copy"
    finally:
        engine.close()
    engine = make_engine(Settings(device="cpu", dtype="bf16", max_new_tokens=8, train_weights="serving"),
                         embedded_model, active_adapter=lambda: None)
    try:
        assert engine.trains_on_serving_weights and engine.precision == "bf16"  # SELFCOG_DTYPE reaches it
    finally:
        engine.close()


def test_serve_passes_the_trainer_setting_to_the_retrain_runner():
    from selfcog.config import Settings
    from selfcog.serve import job_settings

    assert job_settings(Settings.from_env({})).trainer == "auto"
    assert job_settings(Settings.from_env({"SELFCOG_TRAINER": "worker"})).trainer == "worker"


def test_auto_precision_on_a_cpu_is_fp32_and_bf16_only_where_switched_on_and_the_flags_offer_it(embedded_model,
                                                                                                  monkeypatch):
    """dtype "auto" on a CPU: fp32 (bf16 serving is off: its replay rows cost a seed its facts); switched on,
    bf16 with AVX512-BF16/AMX, fp32 without (torch would emulate bf16)."""
    import torch

    from bot.engines import local

    monkeypatch.setattr(local, "cpu_has_fast_bf16", lambda flags=None: True)
    engine = local.LocalEngine(embedded_model, active_adapter=lambda: None, device="cpu", max_new_tokens=4)
    try:
        assert (engine.precision, engine._weights.model.dtype) == ("fp32", torch.float32)
    finally:
        engine.close()
    monkeypatch.setattr(local, "BF16_ON_CPUS_THAT_HAVE_IT", True)
    for fast, expected in ((True, ("bf16", torch.bfloat16)), (False, ("fp32", torch.float32))):
        monkeypatch.setattr(local, "cpu_has_fast_bf16", lambda flags=None, fast=fast: fast)
        engine = local.LocalEngine(embedded_model, active_adapter=lambda: None, device="cpu", max_new_tokens=4)
        try:
            assert (engine.precision, engine._weights.model.dtype) == expected
            assert engine.generate([[{"role": "user", "content": "Hi"}]])[0]
        finally:
            engine.close()


def test_bf16_weights_are_bit_for_bit_the_same_after_many_swaps(embedded_model, random_adapters):
    """In bf16, W + delta - delta is not W: unmerging by subtraction moved the weights a rounding step per swap
    (after five candidates a greedy answer of the base had changed). The weights as loaded come back exactly."""
    import torch

    from bot.engines.local import LocalEngine

    live = {"version": 1, "path": str(random_adapters[0])}
    engine = LocalEngine(embedded_model, active_adapter=lambda: live, device="cpu", dtype="bf16", max_new_tokens=8)
    try:
        assert engine.adapter_version == 1

        def weights():
            return {name: p.detach().clone() for name, p in engine.base.named_parameters() if "lora_" not in name}

        merged, answer = weights(), engine.generate([QUESTION])[0]
        base = engine.generate([QUESTION], adapter=AdapterRef.BASE)[0]
        for _ in range(5):
            engine.generate([QUESTION], adapter=random_adapters[1])  # unmerge live, merge the candidate, and back
            engine.generate([QUESTION], adapter=AdapterRef.BASE)
        assert engine.generate([QUESTION])[0] == answer  # LIVE in place again (an idle engine puts it back anyway)
        after = weights()
        assert all(torch.equal(merged[name], after[name]) for name in merged), "the live weights drifted"
        assert engine.generate([QUESTION], adapter=AdapterRef.BASE)[0] == base
    finally:
        engine.close()


@pytest.mark.parametrize("free_gib, slots", [(124, 256), (64, 146), (8, 18)])
def test_a_gpu_decodes_as_many_replies_together_as_a_quarter_of_its_free_memory_holds(free_gib, slots, monkeypatch):
    """A 7B model's 2,048-token cache slot is 112 MiB: an H200 after the weights (124 GiB free) takes the
    most, 256; an H100 146; a 24 GB card 18, leaving three quarters of the memory to train on the weights."""
    from types import SimpleNamespace

    import torch

    from bot.engines import local

    qwen7b = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=28, num_key_value_heads=4, hidden_size=3584,
                                                    num_attention_heads=28, head_dim=128), dtype=torch.bfloat16)
    monkeypatch.setattr(local, "gpu_free_bytes", lambda device: free_gib * 2**30)
    assert local._default_batch_size(qwen7b, "cuda", 2048) == slots
