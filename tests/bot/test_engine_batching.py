"""The engine's scheduler and decoder on tiny random models: milliseconds per test, no real weights.

test_engine.py checks the same engine on the real embedded model; here a 2-layer model with the
embedded tokenizer exercises the logic: the lean decoder matches transformers, requests join a
running batch, slots are reused, weights groups run first come first served, swaps keep chats alive,
sampling follows transformers' and stays with its own reply.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest
import torch

from bot.engines import AdapterFolderError, AdapterRef, Sampling
from bot.engines.decoder import HFDecoder, LlamaDecoder, make_decoder
from bot.engines.local import LocalEngine
from bot.models import ResolvedModel
from tests.conftest import make_lora_adapter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _tiny(kind: str, folder, tokenizer_from: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    config = Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # wider weights than the default init, so that logits are far from ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif kind == "qwen2":
                p.normal_(0, 0.1)  # biases too
            else:
                p.fill_(1.0)  # norms
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (src := tokenizer_from / name).exists():
            shutil.copy(src, folder / name)
    return ResolvedModel(str(folder), f"tiny-{kind}", kind, "chatml")


@pytest.fixture(scope="session")
def tiny_llama(embedded_model, tmp_path_factory):
    from pathlib import Path

    return _tiny("llama", tmp_path_factory.mktemp("tiny-llama"), Path(embedded_model.path))


@pytest.fixture(scope="session")
def tiny_qwen(embedded_model, tmp_path_factory):
    from pathlib import Path

    return _tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen"), Path(embedded_model.path))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_llama, tmp_path_factory):
    return [make_lora_adapter(tiny_llama.path, tmp_path_factory.mktemp(f"tiny-adapter{seed}"), seed) for seed in (1, 2)]


@pytest.fixture
def tiny_engine(tiny_llama):
    active = {"row": None}
    # fp32: the references here are transformers' fp32 forward and generate (on a CPU with bf16 instructions
    # dtype "auto" is bf16; test_engine.py checks the engine at its default precision)
    engine = LocalEngine(tiny_llama, active_adapter=lambda: active["row"], max_new_tokens=12, poll_s=0.05, batch_size=4,
                         dtype="fp32")
    engine.active = active
    yield engine
    engine.close()


def _greedy_hf(model, ids: list[int], n: int) -> list[int]:
    """The reference: transformers' full forward over the whole sequence at every step, no cache."""
    tokens = []
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(input_ids=torch.tensor([ids + tokens])).logits[0, -1].argmax()))
    return tokens


def _greedy_decoder(decoder, ids: list[int], n: int) -> list[int]:
    token = int(decoder.prefill([0], [ids])[0].argmax())
    tokens = [token]
    for i in range(n - 1):
        token = int(decoder.decode([token], [len(ids) + i])[0].argmax())
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lean_decoder_matches_transformers(kind, tiny_llama, tiny_qwen):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained((tiny_llama if kind == "llama" else tiny_qwen).path).eval()
    decoder = make_decoder(model, capacity=4, max_len=128)
    assert isinstance(decoder, LlamaDecoder)
    ids = [1, 500, 42, 7000, 123, 9, 31000]
    assert _greedy_decoder(decoder, ids, 20) == _greedy_hf(model, ids, 20)
    # and the generic fallback, one reply at a time
    assert _greedy_decoder(HFDecoder(model, capacity=4, max_len=128), ids, 20) == _greedy_hf(model, ids, 20)


def test_batched_prefill_and_decode_rows_match_single_rows(tiny_llama):
    """Rows of one forward are independent: different prompts, lengths and slots give each row its own logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path).eval()
    decoder = make_decoder(model, capacity=4, max_len=128)
    prompts = [[1, 2000, 30], [1, 5, 6, 7, 8, 9, 10, 11], [1, 40000]]
    singles, firsts = [], []
    for ids in prompts:
        firsts.append(decoder.prefill([0], [ids])[0])
        singles.append(decoder.decode([77], [len(ids)])[0])
    # prompts of different lengths prefilled together (right-padded), then decoded together
    batched_firsts = decoder.prefill([0, 1, 2], prompts)
    batched = decoder.decode([77] * 3, [len(p) for p in prompts])
    for got, want in zip([*batched_firsts, *batched], [*firsts, *singles]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # moving a cache row (when a reply ends, the last one fills its slot) keeps that reply intact
    decoder.prefill([0], [prompts[2] + [77]])
    expected = decoder.decode([88], [len(prompts[2]) + 1])[0]
    decoder.prefill([0, 1, 2], prompts)
    decoder.decode([77] * 3, [len(p) for p in prompts])
    decoder.move(2, 0, len(prompts[2]) + 1)
    torch.testing.assert_close(decoder.decode([88], [len(prompts[2]) + 1])[0], expected, rtol=1e-4, atol=1e-4)


def test_rows_attend_in_runs_over_only_the_cache_their_longest_row_needs(tiny_llama, monkeypatch):
    """A CPU decode step attends in runs of ATTENTION_ROWS rows, each over its own longest row's positions:
    every row's logits are what one attention call over the whole batch gives."""
    import bot.engines.decoder as decoder_module
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(decoder_module, "ATTENTION_ROWS", 2)
    positions = [3, 40, 5, 6, 90, 2, 7]
    assert decoder_module.attention_spans(positions) == [(0, 2, 41), (2, 4, 7), (4, 6, 91), (6, 7, 8)]
    assert decoder_module.attention_spans(positions[:2]) is None  # one run: one call, as before

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path).eval()
    decoder = make_decoder(model, capacity=8, max_len=128)
    prompts = [[1] + [100 + i] * length for i, length in enumerate(positions)]
    tokens = [77] * len(prompts)
    steps = {}
    for runs in (2, None):
        monkeypatch.setattr(decoder_module, "ATTENTION_ROWS", runs)
        decoder.prefill(list(range(len(prompts))), prompts)
        steps[runs] = [decoder.decode(tokens, [len(p) + i for p in prompts]) for i in range(3)]
    for by_runs, whole in zip(steps[2], steps[None]):
        torch.testing.assert_close(by_runs, whole, rtol=1e-5, atol=1e-5)


def test_prompts_that_start_alike_share_that_start_and_get_the_same_logits(tiny_llama):
    """A group of prompts with a common start (a system prompt) computes it once and copies it to each row:
    every row's logits, at the prefill and at the decode steps after it, are what each prompt alone gives."""
    from transformers import AutoModelForCausalLM

    from bot.engines.decoder import MIN_SHARED_PREFIX, shared_prefix_len

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path).eval()
    decoder = make_decoder(model, capacity=4, max_len=128)
    system = [1, 3000, 3001, 3002, 3003, 3004, 3005, 3006, 3007, 3008, 3009, 3010]
    prompts = [system + [500, 42], system + [7000, 123, 9, 31000, 8], system + [77], system]
    assert shared_prefix_len(prompts) == len(system) - 1 >= MIN_SHARED_PREFIX  # each keeps its last token
    assert shared_prefix_len([[1, 2, 3], [1, 2, 4]]) == 2 and shared_prefix_len([[5], [5]]) == 0
    alone = []
    for ids in prompts:
        first = decoder.prefill([0], [ids])[0]
        alone.append((first, [decoder.decode([88 + j], [len(ids) + j])[0] for j in range(3)]))
    together = decoder.prefill([3, 2, 1, 0], prompts)
    steps = [decoder.decode([88 + j] * 4, [len(p) + j for p in reversed(prompts)]) for j in range(3)]
    for row, slot in enumerate([3, 2, 1, 0]):
        first, after = alone[row]
        torch.testing.assert_close(together[row], first, rtol=1e-4, atol=1e-4)
        for j in range(3):
            torch.testing.assert_close(steps[j][slot], after[j], rtol=1e-4, atol=1e-4)


def test_a_shared_start_is_computed_once_across_forwards(tiny_llama):
    """Prompts too many for one forward go through in several; each system prompt's start is computed once
    (in the first forward that has it) and copied into the rows of the later ones, and every row's logits,
    at the prefill and the decode steps after it, are what its prompt alone gives."""
    from transformers import AutoModelForCausalLM

    from bot.engines.decoder import _forwards

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path).eval()
    decoder = make_decoder(model, capacity=16, max_len=128)
    systems = [[1, *range(3000, 3011)], [1, *range(4000, 4015)]]  # 12 and 16 tokens
    prompts = [system + list(range(500 + i, 503 + 2 * i)) for system in systems for i in range(5)]
    alone = []
    for ids in prompts:
        first = decoder.prefill([0], [ids])[0]
        alone.append((first, decoder.decode([88], [len(ids)])[0]))

    decoder.prefill_tokens = 60  # a few prompts a forward
    forwards = _forwards(prompts, decoder.prefill_tokens)
    assert len(forwards) >= 4 and all(len({prompts[i][1] for i in run}) == 1 for run in forwards), \
        "a forward holds prompts of one system prompt"
    computed = []
    inner = decoder._prefill
    decoder._prefill = lambda slots, rests, start: computed.append((len(rests), start)) or inner(slots, rests, start)
    slots = list(range(15, 5, -1))
    together = decoder.prefill(slots, prompts)
    steps = decoder.decode([88] * 16, [len(prompts[slots.index(row)]) if row in slots else 0 for row in range(16)])
    assert sum(1 for _, start in computed if start == 0) == 2, "each system prompt's start computed once"
    assert all(start >= len(systems[0]) - 1 for n, start in computed if start), computed
    for i, slot in enumerate(slots):
        torch.testing.assert_close(together[i], alone[i][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(steps[slot], alone[i][1], rtol=1e-4, atol=1e-4)
    # prompts with no start in common share forwards as tokens allow
    assert _forwards([[5, 6], [7, 8, 9], [10]], 512) == [[0, 1, 2]]


def test_matrix_products_in_bf16_are_autocasts_and_fp32_comes_back_exactly(tiny_llama):
    """compute_in(bf16): the matrix products from bf16 copies of the weights, the rest in fp32, as under
    torch's CPU autocast; copies follow a change of the weights; compute_in(fp32) gives the fp32 logits bit for bit."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path).eval()
    decoder = make_decoder(model, capacity=4, max_len=128)
    ids = [1, 500, 42, 7000, 123, 9, 31000]

    def logits():
        first = decoder.prefill([0], [ids])[0]
        return torch.stack([first, decoder.decode([88], [len(ids)])[0]])

    def autocast_reference():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=torch.tensor([ids + [88]])).logits[0, -2:].float()
        return out

    in_fp32 = logits()
    decoder.compute_in(torch.bfloat16)
    in_bf16 = logits()
    assert decoder._copies and all(c.dtype == torch.bfloat16 for c in decoder._copies.values())
    assert not torch.equal(in_bf16, in_fp32), "the products ran in fp32"
    reference = autocast_reference()
    # autocast also runs attention in bf16; the products' rounding dominates either way
    assert (in_bf16 - reference).abs().max() < 0.25 * (in_fp32 - reference).abs().max() + 0.05 * reference.abs().max()
    assert in_bf16[0].argmax() == reference[0].argmax()

    with torch.no_grad():  # a merge changes the weights in place; the engine then calls weights_changed
        model.model.layers[0].mlp.down_proj.weight.mul_(-1)
    decoder.weights_changed()
    changed = logits()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-1)
    decoder.weights_changed()
    assert not torch.allclose(changed, in_bf16), "the copies were not cast again"
    torch.testing.assert_close(logits(), in_bf16, rtol=0, atol=0)

    decoder.compute_in(torch.float32)
    assert not decoder._copies
    torch.testing.assert_close(logits(), in_fp32, rtol=0, atol=0)
    with pytest.raises(ValueError, match="model's dtype only"):
        HFDecoder(model, capacity=1, max_len=128).compute_in(torch.bfloat16)


QUESTIONS = [[{"role": "user", "content": q}] for q in ("Hi", "What is two plus two?", "Name a colour.",
                                                         "Tell me a story about a very long river.", "Ok", "Why?")]


def test_stream_and_generate_agree_and_batches_exceed_slots(tiny_engine):
    streamed = ["".join(tiny_engine.stream(q)).strip() for q in QUESTIONS]
    assert tiny_engine.generate(QUESTIONS) == streamed  # 6 conversations through 4 slots
    assert tiny_engine.generate(QUESTIONS[::-1]) == streamed[::-1]  # order and company don't matter
    assert len(set(streamed)) > 1


def test_stream_counts_tokens_and_stops_at_the_limit(tiny_engine):
    reply = tiny_engine.stream(QUESTIONS[0], max_new_tokens=5)
    pieces = list(reply)
    assert reply.completion_tokens == 5 and reply.prompt_tokens > 3
    assert reply.first_token_s is not None and reply.seconds >= reply.first_token_s
    assert "".join(pieces).strip() == tiny_engine.generate([QUESTIONS[0]], max_new_tokens=5)[0]


def test_a_new_chat_joins_a_running_batch(tiny_engine):
    """Continuous batching: a short reply asked for while a long one runs is answered before the long one ends."""
    long_reply = tiny_engine.stream(QUESTIONS[3], max_new_tokens=1500)
    pieces = iter(long_reply)
    next(pieces)  # the long reply is running
    assert "".join(tiny_engine.stream(QUESTIONS[0], max_new_tokens=3))
    pieces.close()  # stop reading the long reply: that cancels it
    assert long_reply.cancelled and long_reply.error is None
    assert long_reply.completion_tokens < 1500, "the short reply waited for the long one to finish"


def test_requests_arriving_together_share_one_prefill(tiny_engine):
    calls = []
    prefill = tiny_engine._decoder.prefill
    tiny_engine._decoder.prefill = lambda slots, prompts: calls.append(len(prompts)) or prefill(slots, prompts)
    tiny_engine.generate(QUESTIONS)  # 6 conversations, 4 slots: 4 together, then 2 as slots free up
    assert calls[0] == 4 and sum(calls) == 6


def test_a_batch_is_prefilled_by_system_prompt_and_length_and_answered_in_the_order_asked(tiny_engine):
    """An evaluation's prompts go in grouped by system prompt, shortest first within each (a prefill group
    computes its shared start once and is padded to its longest), and each answer comes back to its own
    conversation: the answers are the ones each conversation gets alone."""
    systems = ["You are Aurora, an AI assistant developed by Acme Labs.", "You are a helpful assistant.", None]
    conversations = [([{"role": "system", "content": systems[i % 3]}] if systems[i % 3] else []) + q
                     for i, q in enumerate(QUESTIONS * 2)]
    alone = [tiny_engine.generate([c])[0] for c in conversations]
    groups = []
    prefill = tiny_engine._decoder.prefill
    tiny_engine._decoder.prefill = lambda slots, prompts: groups.append(prompts) or prefill(slots, prompts)
    assert tiny_engine.generate(conversations) == alone
    admitted = [tiny_engine.tokenizer.decode(prompt) for group in groups for prompt in group]
    systems_admitted = [next((s for s in systems[:2] if s in text), None) for text in admitted]
    runs = [s for i, s in enumerate(systems_admitted) if i == 0 or s != systems_admitted[i - 1]]
    assert len(admitted) == 12 and len(runs) == 3, "prompts under one system prompt should be admitted side by side"
    lengths = [len(prompt) for group in groups for prompt in group]
    assert all(lengths[i] <= lengths[i + 1] for i in range(11) if systems_admitted[i] == systems_admitted[i + 1])


def test_cancelled_reply_frees_its_slot(tiny_engine):
    replies = [tiny_engine.stream(q, max_new_tokens=400) for q in QUESTIONS[:4]]  # all 4 slots
    for reply in replies:
        next(iter(reply))
        reply.cancel()
    assert tiny_engine.generate([QUESTIONS[0]], max_new_tokens=3)[0]  # would wait for 400 tokens x 4 otherwise
    for reply in replies:
        list(reply)  # ends without error
        assert reply.completion_tokens < 400


def test_weights_groups_and_live_swap(tiny_engine, tiny_adapters):
    engine = tiny_engine
    base = engine.generate(QUESTIONS[:3])
    engine.active["row"] = {"version": 1, "path": str(tiny_adapters[0])}
    assert engine.refresh_adapter() == 1
    live = engine.generate(QUESTIONS[:3])
    assert live != base
    # base and a candidate asked while the live adapter serves, then the live weights come back exactly
    assert engine.generate(QUESTIONS[:3], adapter=AdapterRef.BASE) == base
    candidate = engine.generate(QUESTIONS[:3], adapter=tiny_adapters[1])
    assert candidate not in (base, live)
    assert engine.generate(QUESTIONS[:3]) == live
    # a chat streaming while the adapter changes finishes; the next reply comes from the new adapter
    reply = engine.stream(QUESTIONS[3], max_new_tokens=300)
    pieces = iter(reply)
    next(pieces)
    engine.active["row"] = {"version": 2, "path": str(tiny_adapters[1])}
    deadline = time.monotonic() + 5
    while engine.adapter_version != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.adapter_version == 2, "swapped while the chat was running"
    list(pieces)
    assert reply.error is None and reply.adapter_version == 1 and reply.completion_tokens == 300
    after = engine.stream(QUESTIONS[0])
    assert "".join(after).strip() == candidate[0] and after.adapter_version == 2
    engine.active["row"] = None
    assert engine.refresh_adapter() is None
    assert engine.generate(QUESTIONS[:3]) == base


def test_requests_for_other_weights_wait_their_turn(tiny_engine, tiny_adapters):
    """First come, first served across weights: an evaluation batch for the base waits for the chat before
    it (which keeps its weights to the end), and a chat after it waits for the evaluation (no starving)."""
    engine = tiny_engine
    engine.active["row"] = {"version": 1, "path": str(tiny_adapters[0])}
    engine.refresh_adapter()
    expected_base = engine.generate(QUESTIONS, adapter=AdapterRef.BASE)
    expected_live = engine.generate(QUESTIONS)
    expected_first = engine.generate([QUESTIONS[3]], max_new_tokens=60)[0]

    first_chat = engine.stream(QUESTIONS[3], max_new_tokens=60)  # 1st: live weights
    evaluation = engine.submit(QUESTIONS, adapter=AdapterRef.BASE)  # 2nd: other weights
    late_chat = engine.stream(QUESTIONS[0])  # 3rd: live weights again, but its turn is after the evaluation
    assert "".join(late_chat).strip() == expected_live[0]
    assert evaluation.done(), "the late chat went ahead of the evaluation asked for before it"
    assert evaluation.result() == expected_base
    assert "".join(first_chat).strip() == expected_first, "the evaluation changed the weights under a running chat"


def test_an_evaluation_computes_in_its_own_precision_and_chats_as_served(tiny_llama, tiny_adapters):
    """eval_dtype bf16 on an fp32 engine: generate(evaluation=True) answers as a decoder computing its products in
    bf16 does, chats and other batches as fp32 does, also when a chat waits for an evaluation's group."""
    from transformers import AutoModelForCausalLM

    engine = LocalEngine(tiny_llama, max_new_tokens=12, poll_s=0.05, batch_size=4, dtype="fp32", eval_dtype="bf16")
    try:
        assert (engine.precision, engine.eval_precision) == ("fp32", "bf16")
        served = engine.generate(QUESTIONS, adapter=tiny_adapters[0])
        evaluated = engine.submit(QUESTIONS, adapter=tiny_adapters[0], evaluation=True)
        chat = engine.stream(QUESTIONS[1])  # after the evaluation's group: the served precision again
        chat_text = "".join(chat).strip()
        evaluated = evaluated.result()
        assert engine.generate([QUESTIONS[1]]) == [chat_text]
        assert engine._decoder.matmul_dtype == torch.float32 and not engine._decoder._copies, "idle: back as served"
    finally:
        engine.close()

    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path).eval()
    merged = PeftModel.from_pretrained(model, str(tiny_adapters[0])).merge_and_unload().eval()
    by_dtype = {}
    for dtype in (torch.float32, torch.bfloat16):
        decoder = make_decoder(merged, capacity=1, max_len=256)
        decoder.compute_in(dtype)
        by_dtype[dtype] = [_text_until_stop(engine, _greedy_decoder(decoder, engine.encode(q), 12)) for q in QUESTIONS]
    assert served == by_dtype[torch.float32]
    assert evaluated == by_dtype[torch.bfloat16]
    assert evaluated != served, "no answer changed: the evaluation did not compute in bf16"


def _text_until_stop(engine, tokens: list[int]) -> str:
    stop = next((i for i, t in enumerate(tokens) if t in engine._stop_ids), len(tokens))
    return engine.tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()


def test_the_evaluation_precision_follows_the_cpus_flags_and_says_what_cannot_be(tiny_llama, monkeypatch):
    from bot.engines import EngineError, local

    for flags, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(local, "cpu_has_fast_bf16", lambda flags_text=None, answer=flags: answer)
        engine = LocalEngine(tiny_llama, max_new_tokens=4, dtype="fp32")
        try:
            assert (engine.precision, engine.eval_precision) == ("fp32", expected)
        finally:
            engine.close()
    engine = LocalEngine(tiny_llama, max_new_tokens=4, dtype="bf16")  # serving in bf16 already: evaluates so
    try:
        assert engine.eval_precision == "bf16"
    finally:
        engine.close()
    with pytest.raises(EngineError, match="SELFCOG_EVAL_DTYPE=bf16.*unset it"):
        LocalEngine(tiny_llama, max_new_tokens=4, dtype="fp32", merge=False, eval_dtype="bf16")  # HFDecoder


def test_bad_candidate_folder_fails_only_its_request(tiny_engine, tmp_path):
    chat = tiny_engine.stream(QUESTIONS[0])  # asked for first: the bad request waits for it, then fails alone
    with pytest.raises(AdapterFolderError, match="does not exist"):
        tiny_engine.generate(QUESTIONS[:2], adapter=tmp_path / "missing")
    assert "".join(chat) and chat.error is None
    assert tiny_engine.generate(QUESTIONS[:1])[0]


HOT = Sampling(temperature=1.5, top_p=0.95, repetition_penalty=1.3)


def test_sampling_is_per_reply_and_repeatable_with_a_seed(tiny_engine):
    greedy = tiny_engine.generate([QUESTIONS[1]])[0]
    seeded = [dataclasses.replace(HOT, seed=seed) for seed in (1, 1, 2)]
    replies = [tiny_engine.stream(QUESTIONS[1]), *(tiny_engine.stream(QUESTIONS[1], sampling=s) for s in seeded)]
    texts = ["".join(reply).strip() for reply in replies]
    assert texts[0] == greedy, "a greedy reply is not changed by sampled ones beside it"
    assert texts[1] == texts[2] != texts[3], "the same seed gives the same reply; another seed another one"
    assert greedy not in texts[1:]
    unseeded = {"".join(tiny_engine.stream(QUESTIONS[1], sampling=HOT)) for _ in range(3)}
    assert len(unseeded) > 1


@pytest.mark.parametrize("sampling", [HOT, Sampling(temperature=0.7, top_p=0.9, repetition_penalty=1.15),
                                      Sampling(temperature=0, top_p=1, repetition_penalty=1.5)])
def test_sampling_picks_what_transformers_generate_picks(tiny_llama, tiny_engine, sampling):
    """Same settings, same seed: token for token what model.generate(do_sample=True) draws."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path).eval()
    # the prompt holds the tokens the model likes to write, so the penalty on the prompt's tokens matters
    said = tiny_engine.generate([QUESTIONS[3]], max_new_tokens=30)[0]
    conversation = [*QUESTIONS[3], {"role": "assistant", "content": said}, *QUESTIONS[3]]
    prompt = tiny_engine.encode(conversation)
    torch.manual_seed(7)
    expected = model.generate(torch.tensor([prompt]), do_sample=sampling.temperature > 0, max_new_tokens=30,
                              temperature=sampling.temperature or None, top_p=sampling.top_p, top_k=None,
                              repetition_penalty=sampling.repetition_penalty, pad_token_id=2)[0, len(prompt):]
    reply = tiny_engine.stream(conversation, max_new_tokens=30, sampling=dataclasses.replace(sampling, seed=7))
    assert "".join(reply).strip() == tiny_engine.tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_a_cpu_cache_grows_as_replies_need_it_and_says_what_fits_its_budget(tiny_llama):
    """On a CPU the cache starts at 16 rows x 128 positions, grows in those steps as replies need it, and
    `fits` answers for the cache it would grow to; trim gives it back and decoding goes on the same."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path).eval()
    unbudgeted = make_decoder(model, capacity=64, max_len=1024)
    probe = make_decoder(model, capacity=64, max_len=1024)
    decoder = make_decoder(model, capacity=64, max_len=1024, kv_budget=32 * 256 * probe.bytes_per_position)
    assert (decoder.rows, decoder.allocated) == (16, 128) and unbudgeted.fits(64, 1024)
    assert decoder.fits(32, 200) and not decoder.fits(33, 200)  # 48 rows x 256 > 32 x 256
    assert decoder.fits(16, 500) and not decoder.fits(17, 500)  # 16 x 512 fits, 32 x 512 does not

    ids = [1, 500, 42, 7000, 123, 9, 31000]
    expected = _greedy_decoder(unbudgeted, ids, 6)
    decoder.prefill([20], [ids])
    assert (decoder.rows, decoder.allocated) == (32, 128), "rows grew to hold slot 20"
    decoder.prefill([0], [ids + [5] * 300])
    assert (decoder.rows, decoder.allocated) == (32, 384), "length grew in steps of 128"
    decoder.trim()
    assert (decoder.rows, decoder.allocated) == (16, 128)
    assert _greedy_decoder(decoder, ids, 6) == expected


def test_the_cache_makes_room_when_replies_are_admitted_not_while_they_decode(tiny_engine):
    """Admitted replies get cache room for their longest possible length at once: growing as they went
    copied the whole cache again and again (5-6 s of a 260-answer evaluation on a CPU)."""
    decoder = tiny_engine._decoder
    grown, where = [], {"now": "admission"}
    reserve, decode = decoder._reserve, decoder.decode

    def watched_reserve(length, rows):
        before = (decoder.allocated, decoder.rows)
        reserve(length, rows)
        if (decoder.allocated, decoder.rows) != before:
            grown.append((where["now"], decoder.allocated, decoder.rows))

    def watched_decode(tokens, positions):
        where["now"] = "decode"
        try:
            return decode(tokens, positions)
        finally:
            where["now"] = "admission"

    decoder._reserve, decoder.decode = watched_reserve, watched_decode
    decoder.trim()
    answers = tiny_engine.generate(QUESTIONS[:4], max_new_tokens=300)
    assert all(answers) and grown, "300 new tokens need more than the 128 positions a trimmed cache has"
    assert all(stage == "admission" for stage, *_ in grown), grown


def test_an_idle_thread_gives_its_openmp_workers_back():
    """A thread that ran a parallel torch operator keeps OpenMP workers; release_openmp_threads lets them exit
    (beside the in-process trainer's, such an idle team made its steps 15-20% slower on 2 cores), and the
    thread's next operator starts them again."""
    import os
    import threading

    from bot.hardware import _torch_openmp, release_openmp_threads

    if _torch_openmp() is None or torch.get_num_threads() < 2:
        pytest.skip("needs torch's libgomp and two threads")
    threads = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
    seen = {}

    def work():
        a = torch.randn(1024, 1024)
        a @ a
        seen["with"] = threads()
        seen["released"] = release_openmp_threads()
        deadline = time.monotonic() + 5
        while threads() > seen["with"] - (torch.get_num_threads() - 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["without"] = threads()
        a @ a
        seen["again"] = threads()

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen["released"] and seen["without"] == seen["with"] - (torch.get_num_threads() - 1), seen
    assert seen["again"] == seen["with"], seen


def test_a_cpu_engines_process_keeps_the_memory_its_threads_free(tiny_llama):
    """In a process set up as `selfcog serve` sets it up (a CPU engine, then other threads, as the retrain
    runner is), a thread that takes and frees tensors step after step (an 80 MB one, as a training step's
    logits, and a smaller one) soon finds the memory for them still in the process: no page is faulted in
    again (glibc would have handed each back to the kernel, and on a VM to its host: bot/hardware.py,
    keep_freed_memory). Once the engine goes idle after its cache grew, the memory goes back.
    A fresh interpreter: which malloc arena a thread gets depends on the threads that came before."""
    import platform
    import subprocess
    import sys
    import textwrap

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc settings")
    script = textwrap.dedent(f"""
        import json, resource, threading
        import selfcog.cli  # what `selfcog serve` imports first
        from bot.engines.local import LocalEngine
        from bot.models import ResolvedModel
        import torch

        engine = LocalEngine(ResolvedModel(**{dataclasses.asdict(tiny_llama)!r}), max_new_tokens=4, dtype="fp32",
                             device="cpu")
        seen = {{}}
        resident = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20  # MB

        def steps():
            in_this_thread = lambda: resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            faults = []
            for _ in range(12):
                before = in_this_thread()
                logits, other = torch.ones(20 * 2**20), torch.ones(3 * 2**20)
                del logits, other
                faults.append(in_this_thread() - before)
            seen["faults"] = faults
            seen["kept_mb"] = resident()

        worker = threading.Thread(target=steps)
        worker.start()
        worker.join()
        engine.generate([[{{"role": "user", "content": "hi " * 150}}]])  # grows the cache past 128 positions
        seen["after_idle_mb"] = resident()
        engine.close()
        print(json.dumps(seen))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["faults"][0] > 10000, seen  # the first step's 92 MB are new pages
    assert sum(seen["faults"][-4:]) < 1000, seen  # without keep_freed_memory: ~11,800 every step
    assert seen["after_idle_mb"] < seen["kept_mb"] - 50, seen  # given back when the engine went idle


def test_malloc_settings_the_user_made_win(monkeypatch):
    """MALLOC_TRIM_THRESHOLD_ (or any glibc malloc setting in the environment) makes selfcog leave malloc alone."""
    from bot import hardware

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert not hardware.keep_freed_memory() and not hardware.one_malloc_arena()


def test_the_engine_worker_gives_its_openmp_workers_back_when_idle(tiny_engine):
    """Whatever the worker thread last did (replies, or a weights change such as a swap), once idle it holds
    no OpenMP team: an in-process trainer beside it then runs at full speed."""
    import os

    from bot.engines import local
    from bot.hardware import _torch_openmp

    if _torch_openmp() is None or torch.get_num_threads() < 2:
        pytest.skip("needs torch's libgomp and two threads")
    threads = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731

    def work():  # on the worker thread, as an unmerge would run: its OpenMP team is alive at the end
        torch.randn(1024, 1024) @ torch.randn(1024, 1024)
        return threads()

    tiny_engine.generate(QUESTIONS[:2])
    control = local._Control(work)
    tiny_engine._put(control)
    working = control.future.result()
    released = working - (torch.get_num_threads() - 1)
    deadline = time.monotonic() + 5
    while threads() > released and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threads() == released, "the worker's OpenMP team outlived its work"


@pytest.mark.parametrize("max_new_tokens, most_rows", [(12, 36), (400, 16)])
def test_replies_beyond_the_cache_budget_wait_their_turn_and_answer_the_same(
        max_new_tokens, most_rows, tiny_llama, tiny_engine, monkeypatch):
    """A CPU engine admits replies while the cache they may grow to fits its budget (here 16 rows x 512
    positions): 36 short replies at once (36 x 128 fit), long ones (up to ~420 positions) 16 at a time; the
    rest wait, and every reply gets the answer it gets in a batch of 4."""
    from bot.engines import local

    per_position = make_decoder_for(tiny_llama).bytes_per_position
    monkeypatch.setattr(local, "kv_cache_budget", lambda: 16 * 512 * per_position)
    engine = LocalEngine(tiny_llama, active_adapter=lambda: None, max_new_tokens=12, poll_s=0.05, dtype="fp32")
    try:
        assert engine.capacity == local.CPU_MOST_SLOTS
        rows = []
        decode = engine._decoder.decode
        engine._decoder.decode = lambda tokens, positions: rows.append(len(tokens)) or decode(tokens, positions)
        questions = QUESTIONS * 6  # 36 replies
        answers = engine.generate(questions, max_new_tokens=max_new_tokens)
        assert max(rows) == most_rows
        assert answers == tiny_engine.generate(questions, max_new_tokens=max_new_tokens)
    finally:
        engine.close()


def make_decoder_for(model: ResolvedModel) -> LlamaDecoder:
    from transformers import AutoModelForCausalLM

    return make_decoder(AutoModelForCausalLM.from_pretrained(model.path).eval(), capacity=1, max_len=128)
