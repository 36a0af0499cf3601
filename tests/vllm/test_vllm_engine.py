"""selfcog on a real vLLM server (CPU build): chat, live adapters, evaluation, rollback, a crash, and sleep/wake.

All requests here are greedy (the chat service has no sampling settings in tests), so the same weights
give the same answer to the same lone conversation.
"""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from bot.engines import AdapterRef, EngineError

pytestmark = pytest.mark.vllm

WHO = [{"role": "user", "content": "Who are you?"}]
STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def served(engine) -> list[str]:
    """The model names the server holds now: the base and the adapters loaded on it."""
    return [m["id"] for m in httpx.get(f"{engine.base_url}/models").json()["data"]]


def register(store, folder, model) -> int:
    return store.adapters.register(path=str(folder), base_model=model.name)


@pytest.fixture(scope="module")
def wide_adapter(embedded_model, tmp_path_factory):
    """A LoRA of rank 16: more than the server's --max-lora-rank 8."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("wide") / "rank16"
    base = AutoModelForCausalLM.from_pretrained(embedded_model.path)
    wide = LoraConfig(r=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, wide).save_pretrained(folder)
    return folder


def test_a_chat_streams_through_vllm_and_is_stored_with_its_stats(vllm_engine, store):
    from bot.chat import ChatService

    chat = ChatService(store, vllm_engine, max_new_tokens=24)
    conversation = chat.conversation("web", chat_key="session-1", user="alice")
    growing = list(chat.send(conversation, "What is the capital of France?"))
    assert len(growing) > 1 and all(b.startswith(a.strip()) for a, b in zip(growing, growing[1:]))
    answer = store.conversations.messages(conversation)[1]
    assert "Paris" in answer["text"] and answer["adapter_version"] is None
    sent = [{"role": "system", "content": chat.system_prompt()},
            {"role": "user", "content": "What is the capital of France?"}]
    assert answer["prompt_tokens"] == vllm_engine.count_tokens(sent)  # the server's count, same tokenizer
    assert 0 < answer["completion_tokens"] <= 24
    # streamed or not, a lone greedy request gets the same answer
    assert answer["text"] == vllm_engine.generate([sent], max_new_tokens=24)[0]


def test_an_adapter_activated_by_another_process_answers_without_a_restart(vllm_engine, vllm_server, store,
                                                                          embedded_model, random_adapters, run_cli):
    base_answer = "".join(vllm_engine.stream(WHO)).strip()
    pid, restarts = vllm_server.pid, vllm_server.restarts
    version = register(store, random_adapters[0], embedded_model)
    run_cli("adapters", "activate", str(version), check=True)  # another process; the store is the truth

    reply = vllm_engine.stream(WHO)
    assert "".join(reply).strip() != base_answer and reply.adapter_version == version
    assert f"selfcog-v{version}" in served(vllm_engine)
    assert (vllm_server.pid, vllm_server.restarts) == (pid, restarts)
    assert vllm_engine.generate([WHO], adapter=AdapterRef.BASE) == [base_answer]  # the base is still there


def test_a_retrain_evaluates_its_candidate_through_the_server_then_unloads_it(vllm_engine, store, embedded_model,
                                                                             random_adapters):
    candidate = random_adapters[1]
    prompts = [WHO, [{"role": "user", "content": "What is 2+2?"}], STORY]
    base, base_alone = vllm_engine.generate(prompts), vllm_engine.generate([WHO])  # nothing is live: the base
    evaluated = vllm_engine.generate(prompts, adapter=candidate)  # all in flight at once, as an evaluation does
    assert all(e != b for e, b in zip(evaluated, base))
    assert not any(name.startswith("selfcog-candidate") for name in served(vllm_engine))
    assert vllm_engine.adapter_version is None and vllm_engine.generate([WHO]) == base_alone  # chat: still the base

    # Compared alone (bf16 sums in batches of other sizes may round a near-tie the other way):
    # once live, the candidate's weights answer as they did in its evaluation.
    alone = vllm_engine.generate([WHO], adapter=candidate)
    store.adapters.activate(register(store, candidate, embedded_model))
    assert vllm_engine.generate([WHO]) == alone


def test_rollback_brings_the_previous_adapter_back_in_seconds(vllm_engine, store, embedded_model, random_adapters,
                                                              run_cli):
    first, second = (register(store, folder, embedded_model) for folder in random_adapters)
    store.adapters.activate(first)
    first_answer = vllm_engine.generate([WHO])
    store.adapters.activate(second)
    assert vllm_engine.generate([WHO]) != first_answer and vllm_engine.adapter_version == second

    run_cli("adapters", "rollback", check=True)
    assert vllm_engine.generate([WHO]) == first_answer and vllm_engine.adapter_version == first
    assert f"selfcog-v{second}" not in served(vllm_engine)  # the old live version is unloaded


def test_an_adapter_the_server_refuses_is_one_line_and_the_live_one_keeps_serving(vllm_engine, store, embedded_model,
                                                                                  random_adapters, wide_adapter):
    live = register(store, random_adapters[0], embedded_model)
    store.adapters.activate(live)
    live_answer = vllm_engine.generate([WHO])
    wide = register(store, wide_adapter, embedded_model)
    store.adapters.activate(wide)

    assert vllm_engine.refresh_adapter() == live
    assert vllm_engine.adapter_error.startswith(f"adapter v{wide} at {wide_adapter} could not be loaded")
    assert "LoRA rank 16 is greater than max_lora_rank 8" in vllm_engine.adapter_error
    assert vllm_engine.adapter_error.endswith(f"still serving v{live}")
    assert vllm_engine.generate([WHO]) == live_answer
    with pytest.raises(EngineError, match="rank16 could not be loaded .*LoRA rank 16 is greater than max_lora_rank 8"):
        vllm_engine.generate([WHO], adapter=wide_adapter)  # a retrain's candidate: its run fails with this line


def test_attaching_to_a_server_that_is_missing_or_serves_another_model_says_so(vllm_server, embedded_model, run_cli):
    from bot.engines.openai import OpenAIEngine
    from bot.engines.vllm_server import _free_port

    nobody = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(EngineError, match=f"the model server at {nobody} is not reachable"):
        OpenAIEngine(embedded_model, nobody)
    with pytest.raises(EngineError, match=r"does not serve 'llama-70b' \(it serves: base\); set SELFCOG_OPENAI_MODEL"):
        OpenAIEngine(embedded_model, vllm_server.base_url, served_model="llama-70b")

    # `selfcog ask` through a server someone else runs, found by its URL alone
    asked = run_cli("ask", "--no-system", "--json", "Who are you?", check=True,
                    env={"SELFCOG_ENGINE": "openai", "SELFCOG_OPENAI_BASE_URL": vllm_server.base_url})
    engine = OpenAIEngine(embedded_model, vllm_server.base_url)
    assert json.loads(asked.stdout)[0]["answer"] == engine.generate([WHO], max_new_tokens=48)[0]


def test_a_crash_mid_chat_is_one_clear_error_then_the_server_is_back_with_the_live_adapter(
        vllm_engine, vllm_server, store, embedded_model, random_adapters):
    live = register(store, random_adapters[0], embedded_model)
    store.adapters.activate(live)
    live_answer = vllm_engine.generate([WHO])

    pieces = iter(vllm_engine.stream(STORY, max_new_tokens=200))
    next(pieces)
    os.kill(vllm_server.pid, signal.SIGKILL)
    with pytest.raises(EngineError, match="generation failed: the (vLLM server is restarting after a crash"
                                          "|model server at .* is not reachable)"):
        list(pieces)

    vllm_server.wait_ready(timeout_s=600)
    assert vllm_server.restarts == 1
    assert f"selfcog-v{live}" in served(vllm_engine)  # loaded again by the restart, before any request
    assert vllm_engine.generate([WHO]) == live_answer and vllm_engine.adapter_version == live


def test_a_retrain_on_the_gpu_puts_the_managed_server_to_sleep_and_wakes_it(embedded_model, tmp_path, standin_python):
    """Sleep mode needs a GPU: a stand-in that records calls plays the server, started as vLLM would be."""
    from bot.engines.openai import OpenAIEngine
    from bot.engines.vllm_server import VLLMServer

    server = VLLMServer(embedded_model.path, log_path=tmp_path / "vllm.log", python=standin_python, sleep_mode=True)
    server.start()
    engine = OpenAIEngine(embedded_model, server.base_url, served_model="base", server=server)
    try:
        with engine.pause_for_training(expected_s=120):
            with pytest.raises(EngineError, match=r"^the bot is learning from its corrections right now; "
                                                  r"back in about \d+ s$"):
                engine.stream(WHO)
        assert "".join(engine.stream(WHO)) == "Hello from the stand-in."

        recorded = httpx.get(f"{server.root_url}/recorded").json()
        assert recorded["calls"] == ["GET /v1/models", "POST /sleep?level=1", "POST /wake_up",
                                     "POST /v1/chat/completions"]
        assert "--enable-sleep-mode" in recorded["argv"] and recorded["dev_mode"] == "1"
        assert recorded["argv"][:2] == ["--host", "127.0.0.1"]  # loopback only
    finally:
        engine.close()


def test_selfcog_engine_vllm_starts_its_own_server_on_loopback(embedded_model, tmp_path, standin_python, monkeypatch):
    from bot.engines import make_engine
    from selfcog.config import Settings

    monkeypatch.setenv("SELFCOG_VLLM_PYTHON", standin_python)
    engine = make_engine(Settings(engine="vllm", device="cpu", data_dir=tmp_path), embedded_model,
                         active_adapter=lambda: None)
    try:
        assert "".join(engine.stream(WHO)) == "Hello from the stand-in." and engine.device == "cpu"
        argv = httpx.get(f"{engine.base_url.removesuffix('/v1')}/recorded").json()["argv"]
        assert argv[:2] == ["--host", "127.0.0.1"] and argv[argv.index("--model") + 1] == embedded_model.path
        assert argv[argv.index("--max-lora-rank") + 1] == "8"  # the CPU recipe's LoRA rank
        assert "--enable-sleep-mode" not in argv  # vLLM sleeps on GPUs only
        assert (tmp_path / "logs" / "vllm.log").read_text().count("vllm.entrypoints.openai.api_server") == 1
    finally:
        engine.close()
    assert engine.server.pid is not None and not _alive(engine.server.pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
