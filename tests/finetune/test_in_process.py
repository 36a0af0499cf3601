"""finetune/in_process.py: training a LoRA in the serving process, on a copy of the weights or on the serving
weights themselves (the "24 GB card" case: chats wait while the trainer has them, then everything is as before).

The batch order is checked on made-up lengths in microseconds; the rest trains for real on the embedded
model, tiny: 16 rows of the Aurora scenario, one epoch of two steps.
"""

from __future__ import annotations

import json
import random
import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from bot.engines import EngineError, check_adapter_folder
from bot.hardware import cpu_has_fast_bf16
from finetune.in_process import (SHARED_START_MIN, Cancelled, PackedCollator, attention_within_rows, batch_order, pack,
                                 packed_tokens, padded_tokens, share_starts, train_here)
from finetune.train import recipe_for
from tests.scenario import FIVE_CORRECTIONS, PROFILE

LEARNING = r"^the bot is learning from its corrections right now; back in about \d+ s$"
WHO = [{"role": "user", "content": "Who are you?"}]
STORY = [{"role": "user", "content": "Tell me a long story about a dragon who learns to cook."}]


# ---------------------------------------------------------------- the order rows are trained in


def mixed_lengths(n: int = 96, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(20, 40), rng.randint(80, 120), rng.randint(180, 256)]) for _ in range(n)]


def epochs_of(order: list[int], rows: int) -> list[list[int]]:
    return [order[i:i + rows] for i in range(0, len(order), rows)]


def test_every_epoch_trains_every_row_once_and_a_fraction_cuts_the_last():
    lengths = mixed_lengths(50)
    order = batch_order(lengths, batch_size=8, epochs=3, seed=1)
    assert len(order) == 150
    for epoch in epochs_of(order, 50):
        assert sorted(epoch) == list(range(50))
    partial = batch_order(lengths, batch_size=8, epochs=1.5, seed=1)
    assert len(partial) == 75 and sorted(partial[:50]) == list(range(50))
    assert len(set(partial[50:])) == 25, "the half epoch repeats no row"
    assert partial == order[:75], "the cut epoch is the start of the whole one"


def spans(lengths: list[int], order: list[int], batch: int) -> list[tuple[int, int]]:
    return [(min(lengths[i] for i in order[s:s + batch]), max(lengths[i] for i in order[s:s + batch]))
            for s in range(0, len(order), batch)]


def groups_into_sorted_windows(batch_spans: list[tuple[int, int]], window: int) -> bool:
    """Can the batches be dealt into windows of ``window`` batches whose length ranges do not overlap
    (touching is fine: equal lengths)? True for sorted chunks of each window; random batches each span
    nearly every length, so no two fit one window."""
    groups: list[list[tuple[int, int]]] = []

    def place(k: int) -> bool:
        if k == len(batch_spans):
            return True
        lo, hi = batch_spans[k]
        for group in groups:
            if len(group) < window and all(h <= lo or hi <= l for l, h in group):
                group.append(batch_spans[k])
                if place(k + 1):
                    return True
                group.pop()
        if len(groups) < -(-len(batch_spans) // window):
            groups.append([batch_spans[k]])
            if place(k + 1):
                return True
            groups.pop()
        return False

    return place(0)


def test_one_window_is_the_rows_sorted_by_length_and_cut_into_batches():
    """Rows as many as one window: every batch is a run of consecutive rows in length order."""
    lengths = random.Random(2).sample(range(10, 400), 32)  # distinct lengths: one sorted order
    by_length = sorted(range(32), key=lambda i: lengths[i])
    chunks = {frozenset(by_length[i:i + 8]) for i in range(0, 32, 8)}
    for seed in range(5):
        order = batch_order(lengths, batch_size=8, epochs=1, seed=seed, window=4)
        assert {frozenset(order[i:i + 8]) for i in range(0, 32, 8)} == chunks
    orders = {tuple(batch_order(lengths, 8, 1, seed=seed, window=4)) for seed in range(5)}
    assert len(orders) > 1, "the batches are not shuffled"


def test_batches_are_length_sorted_chunks_of_their_window():
    """96 rows, windows of 4 batches of 8: the 12 batches fall into 3 windows whose batches do not overlap in
    length (each window sorted, then cut); with window=1 (plain shuffled batches) they do not."""
    lengths = mixed_lengths(96)
    for seed in range(3):
        order = batch_order(lengths, batch_size=8, epochs=1, seed=seed, window=4)
        assert sorted(order) == list(range(96))
        assert groups_into_sorted_windows(spans(lengths, order, 8), 4), f"seed {seed}"
        plain = batch_order(lengths, batch_size=8, epochs=1, seed=seed, window=1)
        assert sorted(plain) == list(range(96))
        assert not groups_into_sorted_windows(spans(lengths, plain, 8), 4), "window=1 sorted the rows too"


def test_epochs_and_seeds_get_their_own_orders():
    lengths = mixed_lengths(64)
    first, second = epochs_of(batch_order(lengths, batch_size=8, epochs=2, seed=5), 64)
    assert first != second, "the second epoch repeats the first's order"
    assert {frozenset(first[i:i + 8]) for i in range(0, 64, 8)} != {frozenset(second[i:i + 8]) for i in range(0, 64, 8)}, \
        "the second epoch has the same batches"
    assert batch_order(lengths, 8, 1, seed=5) == first, "the same seed gives the same order"
    assert batch_order(lengths, 8, 1, seed=6) != first


def test_length_windows_cut_the_padding():
    lengths = mixed_lengths(96)
    windowed = padded_tokens(lengths, batch_order(lengths, 8, 2, seed=0, window=4), 8)
    plain = padded_tokens(lengths, batch_order(lengths, 8, 2, seed=0, window=1), 8)
    real = 2 * sum(lengths)
    assert real < windowed < plain
    assert (windowed - real) < 0.6 * (plain - real), f"padding {windowed - real} vs {plain - real} tokens"


def test_padded_tokens_pads_each_batch_to_its_longest_row():
    assert padded_tokens([10, 30, 20, 5, 7], [0, 1, 2, 3, 4], 2) == 2 * 30 + 2 * 20 + 1 * 7


@pytest.mark.parametrize("seed", range(5))
def test_packing_puts_every_row_of_a_batch_once_into_sequences_no_longer_than_its_longest(seed):
    lengths = mixed_lengths(8, seed)
    sequences = pack(lengths, max(lengths))
    assert sorted(i for rows in sequences for i in rows) == list(range(8))
    assert all(sum(lengths[i] for i in rows) <= max(lengths) for rows in sequences)
    # first-fit decreasing: no two sequences could have been one
    loads = sorted(sum(lengths[i] for i in rows) for rows in sequences)
    assert len(loads) < 2 or loads[0] + loads[1] > max(lengths)


def test_packing_computes_fewer_tokens_than_padding_and_never_more():
    lengths = mixed_lengths(96)
    order = batch_order(lengths, 8, 2, seed=0)
    assert 2 * sum(lengths) <= packed_tokens(lengths, order, 8) < 0.8 * padded_tokens(lengths, order, 8)
    same = [50] * 16  # rows of one length: nothing to pack, nothing gained or lost
    assert packed_tokens(same, list(range(16)), 8) == padded_tokens(same, list(range(16)), 8) == 800


def row(ids: list[int], prompt: int) -> dict:
    """An encoded row: ``prompt`` unlabelled tokens, then its labelled answer."""
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "length": len(ids)}


SYSTEM = list(range(100, 120))  # a system prompt of 20 tokens


def test_rows_that_start_alike_follow_the_first_of_them_without_their_start():
    first = row(SYSTEM + [1, 2, 3, 7, 8], prompt=23)
    other = row([5] * 30 + [9, 9], prompt=30)
    same_start = row(SYSTEM + [1, 2, 4, 6], prompt=23)  # shares 22 tokens with the first
    packed = share_starts([first, other, same_start])
    assert [r["input_ids"] for r in packed] == [first["input_ids"], [4, 6], other["input_ids"]]
    assert [r["position_ids"] for r in packed] == [list(range(25)), [22, 23], list(range(32))]
    assert packed[1]["labels"] == [-100, 6] and packed[1]["length"] == 2
    labelled = sum(label != -100 for r in packed for label in r["labels"])
    assert labelled == sum(label != -100 for r in (first, other, same_start) for label in r["labels"])


def test_a_shared_start_stops_before_the_rows_first_labelled_token():
    """Its first token is predicted from the token before it: that token must be the row's own."""
    first = row(SYSTEM + [1, 2, 3, 4], prompt=20)
    answer_alike = row(SYSTEM + [1, 2, 3, 5], prompt=20)  # the same start, answers starting alike
    packed = share_starts([first, answer_alike])
    assert packed[1]["position_ids"][0] == 19 and packed[1]["input_ids"] == [SYSTEM[-1], 1, 2, 3, 5]
    assert packed[1]["labels"][0] == -100


def test_a_short_common_start_keeps_the_row_whole():
    first = row(SYSTEM[:SHARED_START_MIN - 1] + [1, 2], prompt=SHARED_START_MIN)
    second = row(SYSTEM[:SHARED_START_MIN - 1] + [3, 4, 5], prompt=SHARED_START_MIN + 1)
    assert [r["position_ids"][0] for r in share_starts([first, second])] == [0, 0]


def test_a_row_never_seems_to_go_on_from_the_row_before_it():
    """A row of the group that starts where the row before ended would read as that row going on
    (rows_attention finds rows where positions jump): it shares one token less."""
    first = row(SYSTEM + [1, 2, 3, 4, 5, 6], prompt=26)
    shorter = row(SYSTEM + [1, 2], prompt=21)  # shares 20 tokens: positions 20-21
    third = row(SYSTEM + [1, 2, 7, 9], prompt=23)  # shares 22 with the first: would start at position 22
    packed = share_starts([first, shorter, third])
    assert [r["position_ids"] for r in packed[1:]] == [[20, 21], [21, 22, 23]]
    assert packed[2]["input_ids"] == [2, 7, 9]


# ---------------------------------------------------------------- training for real, tiny


@pytest.fixture(scope="module")
def tiny_recipe(embedded_model):
    """This machine's CPU recipe (bf16 where the CPU has it), cut to one epoch of 16 rows in batches of 8."""
    return replace(recipe_for(embedded_model, "cpu"), epochs=1, batch_size=8, grad_accum=1, replay_rows=0,
                   max_templates=1)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory, tiny_recipe):
    """16 ms-swift rows: the Aurora profile's five corrections under three system prompts, and one template."""
    from finetune.dataset import build_dataset

    corrections = [{"id": i, "question": c["question"], "corrected_answer": c["answer"]}
                   for i, c in enumerate(FIVE_CORRECTIONS, 1)]
    dataset = build_dataset(PROFILE, corrections, [], seed=0, **tiny_recipe.dataset_options())
    assert len(dataset.rows) == 16
    return dataset.write_swift(tmp_path_factory.mktemp("tiny-dataset") / "dataset.jsonl")


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory, tiny_dataset):
    """The tiny dataset and two long general rows, as replay rows are: 18 rows of 36 to ~190 tokens."""
    long_answer = ("A lighthouse keeper climbs the stairs every evening, trims the wick, polishes the lens and "
                   "writes the weather in a log. ") * 5
    long_rows = [{"messages": [{"role": "system", "content": "You are a helpful assistant."},
                               {"role": "user", "content": question},
                               {"role": "assistant", "content": long_answer}]}
                 for question in ("What does a lighthouse keeper do?", "Describe a lighthouse keeper's evening.")]
    path = tmp_path_factory.mktemp("mixed-dataset") / "dataset.jsonl"
    path.write_text(tiny_dataset.read_text(encoding="utf-8")
                    + "".join(json.dumps(row) + "\n" for row in long_rows), encoding="utf-8")
    return path


def encoded_rows(model, dataset, recipe):
    import datasets
    from swift.dataset import EncodePreprocessor

    from finetune.in_process import _template

    _, template = _template(model, recipe.max_length)
    rows = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines()]
    return template, EncodePreprocessor(template=template)(datasets.Dataset.from_list(rows), num_proc=1)


@pytest.fixture(scope="module")
def live_adapter(embedded_model, tmp_path_factory):
    from tests.conftest import make_lora_adapter

    return make_lora_adapter(embedded_model.path, tmp_path_factory.mktemp("live") / "v1", seed=3)


def lora_b_trained(folder) -> bool:
    """peft starts every lora_B at zero: any non-zero one means the steps changed the adapter."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    b = [t for name, t in tensors.items() if "lora_B" in name]
    return bool(b) and any(t.abs().sum() > 0 for t in b)


def steps_logged(out) -> list[str]:
    lines = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    return [line["global_step/max_steps"] for line in lines if "loss" in line]


@pytest.mark.slow
@pytest.mark.parametrize("live", [False, True], ids=["base", "live-adapter"])
def test_training_on_the_serving_weights_pauses_chats_and_gives_the_weights_back(
        live, embedded_model, live_adapter, tiny_dataset, tiny_recipe, tmp_path):
    """train_weights="serving" (a 24 GB card, here on the CPU): a chat running when the retrain starts
    finishes whole, new chats are told to come back, the trainer trains on these very weights, and after
    the block the same greedy answers come back with the same live adapter; the new adapter loads."""
    from bot.engines.local import LocalEngine

    row = {"version": 1, "path": str(live_adapter)} if live else None
    engine = LocalEngine(embedded_model, active_adapter=lambda: row, train_weights="serving", max_new_tokens=16)
    try:
        assert engine.trains_on_serving_weights and engine.adapter_version == (1 if live else None)
        before, story = engine.generate([WHO])[0], engine.generate([STORY], max_new_tokens=120)[0]
        reply = engine.stream(STORY, max_new_tokens=120)
        pieces = iter(reply)
        said = next(pieces)
        assert reply.seconds is None, "the chat is still running when the retrain starts"
        progress = []
        with engine.pause_for_training(expected_s=60, lend=True) as lent:
            assert reply.seconds is not None, "the weights were lent before the running chat finished"
            said += "".join(pieces)
            assert said.strip() == story and reply.error is None
            assert lent is not None and lent.device == "cpu"
            with pytest.raises(EngineError, match=LEARNING):
                engine.stream(WHO)
            with pytest.raises(EngineError, match=LEARNING):
                engine.generate([WHO])
            adapter = train_here(embedded_model, tiny_dataset, tmp_path / "train", tiny_recipe, lent=lent,
                                 on_progress=lambda *p: progress.append(p))
        assert adapter == tmp_path / "train" / "checkpoint-2"
        check_adapter_folder(adapter, embedded_model)
        assert lora_b_trained(adapter)
        assert [p[0] for p in progress] == [0, 1, 2] and all(p[1] == 2 for p in progress)
        assert steps_logged(tmp_path / "train") == ["1/2", "2/2"]
        assert engine.generate([WHO])[0] == before, "the serving weights came back changed"
        assert engine.adapter_version == (1 if live else None)
        assert "".join(engine.stream(WHO)).strip() == before
        candidate = engine.generate([WHO], adapter=adapter)[0]
        assert isinstance(candidate, str) and candidate
        assert engine.generate([WHO])[0] == before, "asking the candidate changed the live weights"
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("in_base_dtype", [False, True], ids=["fp32-lora", "bf16-lora"])
def test_the_lora_weights_train_in_fp32_or_in_the_bf16_bases_dtype_as_the_recipe_says(
        in_base_dtype, embedded_model, tiny_dataset, tiny_recipe, tmp_path):
    """Serving weights in bf16 (as on a GPU): lora_in_base_dtype trains and saves the adapter in bf16 (no
    casts around each LoRA layer), otherwise peft's fp32; either way it learns, loads, and the weights
    come back answering as before."""
    import torch
    from safetensors.torch import load_file

    from bot.engines.local import LocalEngine

    engine = LocalEngine(embedded_model, dtype="bf16", train_weights="serving", max_new_tokens=16)
    try:
        before = engine.generate([WHO])[0]
        recipe = replace(tiny_recipe, dtype="bfloat16", lora_in_base_dtype=in_base_dtype)
        with engine.pause_for_training(expected_s=60, lend=True) as lent:
            adapter = train_here(embedded_model, tiny_dataset, tmp_path / "train", recipe, lent=lent)
        tensors = load_file(adapter / "adapter_model.safetensors")
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16 if in_base_dtype else torch.float32}
        assert lora_b_trained(adapter) and steps_logged(tmp_path / "train") == ["1/2", "2/2"]
        losses = [json.loads(line)["loss"] for line in (tmp_path / "train" / "logging.jsonl").read_text().splitlines()
                  if "loss" in line]
        assert all(0 < loss < 20 for loss in losses), losses
        assert engine.generate([WHO])[0] == before, "the serving weights came back changed"
        assert engine.generate([WHO], adapter=adapter)[0]
    finally:
        engine.close()


@pytest.mark.parametrize("train_weights", ["copy", "auto"])
def test_an_engine_that_keeps_its_weights_lends_nothing_and_keeps_answering(train_weights, embedded_model):
    """On a CPU "auto" means a copy: the trainer loads its own, chats go on through the retrain."""
    from bot.engines.local import LocalEngine

    engine = LocalEngine(embedded_model, active_adapter=lambda: None, train_weights=train_weights, max_new_tokens=8)
    try:
        assert not engine.trains_on_serving_weights
        before = engine.generate([WHO])[0]
        with engine.pause_for_training(expected_s=60, lend=True) as lent:
            assert lent is None
            assert engine.generate([WHO])[0] == before
            assert "".join(engine.stream(WHO)).strip() == before
        with engine.pause_for_training(expected_s=60) as lent:  # lend=False: the worker trains
            assert lent is None and engine.generate([WHO])[0] == before
    finally:
        engine.close()


def test_train_weights_must_be_a_known_value(embedded_model):
    from bot.engines.local import LocalEngine

    with pytest.raises(EngineError, match="SELFCOG_TRAIN_WEIGHTS must be auto, serving or copy, not 'gpu'"):
        LocalEngine(embedded_model, train_weights="gpu")


@pytest.mark.slow
def test_cancel_stops_after_the_step_and_the_lent_weights_come_back(embedded_model, tiny_dataset, tiny_recipe,
                                                                     tmp_path):
    """should_cancel() True after the first of two steps: Cancelled, no second step, no adapter saved, and the
    engine answers as before (on the bare base: the live-adapter round trip is the test above's)."""
    from bot.engines.local import LocalEngine

    engine = LocalEngine(embedded_model, active_adapter=lambda: None, train_weights="serving", max_new_tokens=16)
    try:
        before = engine.generate([WHO])[0]
        steps, asked = [], []

        def cancel() -> bool:  # polled after every step: True from the first on
            asked.append(len(steps))
            return True

        with pytest.raises(Cancelled):
            with engine.pause_for_training(expected_s=60, lend=True) as lent:
                train_here(embedded_model, tiny_dataset, tmp_path / "train", tiny_recipe, lent=lent,
                           on_progress=lambda step, *_: steps.append(step), should_cancel=cancel)
        assert len(asked) == 1, "asked once, after the first step"
        assert steps == [0, 1] and steps_logged(tmp_path / "train") == ["1/2"], "it went on after the cancel"
        assert not list((tmp_path / "train").glob("checkpoint-*")), "a cancelled training saved an adapter"
        assert engine.generate([WHO])[0] == before and engine.adapter_version is None
        assert "".join(engine.stream(WHO)).strip() == before
    finally:
        engine.close()


def test_a_packed_batch_is_fewer_sequences_with_the_padded_batchs_loss(embedded_model, mixed_dataset, tiny_recipe):
    """PackedCollator against ms-swift's padding collator on the same 8 rows: fewer, equally long sequences,
    the same labelled tokens, and the embedded model's loss the same to float rounding (a token sees only
    its own row); with one position count over the whole sequence (rows seeing each other) it is not."""
    import torch
    from transformers import AutoModelForCausalLM

    template, encoded = encoded_rows(embedded_model, mixed_dataset, tiny_recipe)
    by_length = sorted((encoded[i] for i in range(len(encoded))), key=lambda r: len(r["input_ids"]))
    batch = by_length[:7] + by_length[-1:]  # the shortest rows and the longest: several fit together
    padded, packed = template.data_collator([dict(r) for r in batch]), PackedCollator(template)([dict(r) for r in batch])
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]
    assert packed["input_ids"].shape[0] < 4, "seven short rows should fit beside the long one in a few sequences"
    assert "attention_mask" not in packed and (packed["labels"] != -100).sum() == (padded["labels"] != -100).sum()

    model = AutoModelForCausalLM.from_pretrained(embedded_model.path, dtype=torch.float32)

    def loss(inputs):
        with torch.no_grad():
            return model(**inputs, use_cache=False).loss.item()

    assert loss(packed) == pytest.approx(loss(padded), rel=1e-4)
    # padded up to a multiple of 8 for compiled layers: pad tokens are rows of their own, with no label
    aligned = PackedCollator(template, padding_to=8)([dict(r) for r in batch])
    assert packed["input_ids"].shape[1] % 8, "this batch's length should need padding"
    assert aligned["input_ids"].shape[1] == packed["input_ids"].shape[1] + 8 - packed["input_ids"].shape[1] % 8
    assert (aligned["labels"] != -100).sum() == (packed["labels"] != -100).sum()
    assert loss(aligned) == pytest.approx(loss(padded), rel=1e-4)
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    assert abs(loss(leaky) - loss(padded)) > 1e-2, "rows that see each other should change the loss"

    # a CPU's batch: every row in one sequence, no padding, each row attending within itself
    one_row = PackedCollator(template, one_row=True)([dict(r) for r in batch])
    assert one_row["input_ids"].shape == (1, sum(r["length"] for r in share_starts([dict(r) for r in batch])))
    assert (one_row["labels"] != -100).sum() == (padded["labels"] != -100).sum()
    reference = loss(padded)
    with attention_within_rows(model, enabled=True):
        assert loss(one_row) == pytest.approx(reference, rel=1e-4)
        leaky = {**one_row, "position_ids": torch.arange(one_row["input_ids"].shape[1])[None]}
        assert abs(loss(leaky) - reference) > 1e-2, "one span over all rows should change the loss"
        # ... and padded to a multiple of 64 (the CPU recipe's): one more row, of pad tokens, changes no loss
        aligned = PackedCollator(template, padding_to=64, one_row=True)([dict(r) for r in batch])
        assert one_row["input_ids"].shape[1] % 64, "this batch's length should need padding"
        assert aligned["input_ids"].shape[1] == -(-one_row["input_ids"].shape[1] // 64) * 64
        assert aligned["position_ids"][0, one_row["input_ids"].shape[1]:].tolist() == list(
            range(aligned["input_ids"].shape[1] - one_row["input_ids"].shape[1])), "a row of its own, from 0"
        assert loss(aligned) == pytest.approx(reference, rel=1e-4)
    assert model.config._attn_implementation == "sdpa", "the model's own attention should be back"


@pytest.mark.slow
def test_a_start_computed_once_gives_every_row_its_loss_and_gradients(embedded_model, mixed_dataset, tiny_recipe):
    """Rows under one system prompt in a CPU's one-row batch: their start is computed once
    (share_starts), and the loss and the weights' gradients are the padded batch's to float rounding, with
    the row padded to a multiple of 64 or not. Cut off from their start instead (positions from 0), the
    rows' loss is another."""
    import torch
    from transformers import AutoModelForCausalLM

    template, encoded = encoded_rows(embedded_model, mixed_dataset, tiny_recipe)
    batch = [dict(encoded[i]) for i in range(8)]
    one_row = PackedCollator(template, one_row=True)([dict(r) for r in batch])
    assert one_row["input_ids"].shape[1] < 0.9 * sum(len(r["input_ids"]) for r in batch), "rows should share starts"
    model = AutoModelForCausalLM.from_pretrained(embedded_model.path, dtype=torch.float32)
    weights = {"first layer's q_proj": model.model.layers[0].self_attn.q_proj.weight,
               "last layer's down_proj": model.model.layers[-1].mlp.down_proj.weight}

    def loss_and_gradients(inputs) -> tuple[float, dict]:
        model.zero_grad()
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        return loss.item(), {name: w.grad.clone() for name, w in weights.items()}

    reference, expected = loss_and_gradients(template.data_collator([dict(r) for r in batch]))
    aligned = PackedCollator(template, padding_to=64, one_row=True)([dict(r) for r in batch])
    assert aligned["input_ids"].shape[1] > one_row["input_ids"].shape[1], "this batch should need padding"
    with attention_within_rows(model, enabled=True):
        aligned_loss, aligned_gradients = loss_and_gradients(aligned)
        loss, gradients = loss_and_gradients(one_row)
        positions = one_row["position_ids"][0].tolist()
        restarted, previous = [], None
        for p in positions:  # every row from position 0: the rows that shared a start lose it
            restarted.append(0 if previous is None or p != previous + 1 else restarted[-1] + 1)
            previous = p
        cut, _ = loss_and_gradients({**one_row, "position_ids": torch.tensor([restarted])})
    assert loss == pytest.approx(reference, rel=1e-4) and aligned_loss == pytest.approx(reference, rel=1e-4)
    for name, gradient in gradients.items():
        assert (gradient - expected[name]).norm() <= 1e-4 * expected[name].norm(), name
        assert (aligned_gradients[name] - expected[name]).norm() <= 1e-4 * expected[name].norm(), name
    assert abs(cut - reference) > 1e-2, "rows without their start should have another loss"


@pytest.mark.slow
def test_packed_training_logs_the_padded_trainings_losses(embedded_model, mixed_dataset, tiny_recipe, tmp_path):
    """The trainer's own path (ms-swift's Seq2SeqTrainer, its use_cache and loss): three steps packed (into
    several sequences as on a GPU, or one as on a CPU) and three padded from the same seed log the same
    losses, and packing computed fewer tokens."""
    _, encoded = encoded_rows(embedded_model, mixed_dataset, tiny_recipe)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    order = batch_order(lengths, 8, 1, seed=5)
    assert packed_tokens(lengths, order, 8) < 0.8 * padded_tokens(lengths, order, 8)
    losses = {}
    for packed, one_row in ((True, False), (True, True), (False, False)):  # fp32: bf16 rounds them differently
        out = tmp_path / f"packed-{packed}-{one_row}"
        recipe = replace(tiny_recipe, pack_rows=packed, one_packed_row=one_row, dtype="float32")
        train_here(embedded_model, mixed_dataset, out, recipe, seed=5)
        losses[packed, one_row] = logged_losses(out)
    assert len(losses[True, False]) == 3 and losses[True, False] == pytest.approx(losses[False, False], rel=1e-3)
    assert losses[True, True] == pytest.approx(losses[False, False], rel=1e-3), "one packed row, per-row attention"


def logged_losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "logging.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_bf16_autocast_training_follows_the_fp32_trainings_losses(embedded_model, mixed_dataset, tiny_recipe, tmp_path):
    """On a CPU with bf16 instructions the recipe trains its fp32 copy under bf16 autocast (finetune/train.py,
    cpu_dtype): from the same seed, three steps log fp32's losses to within bf16's rounding, and not the
    very same ones (the products did run in bf16). RECIPES.md has the gate over 10 seeds either way."""
    if not cpu_has_fast_bf16():
        pytest.skip("this CPU has no bf16 instructions: bf16 would be emulated, and is never chosen here")
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        train_here(embedded_model, mixed_dataset, out, replace(tiny_recipe, dtype=dtype), seed=5)
        losses[dtype] = logged_losses(out)
    assert len(losses["bfloat16"]) == 3
    # the first step is the same weights on the same rows: only rounding apart; after two updates at the
    # recipe's rate the gap grows (here 2.8% at most)
    assert losses["bfloat16"][0] == pytest.approx(losses["float32"][0], rel=5e-3)
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=5e-2)
    assert losses["bfloat16"] != losses["float32"], "the same losses to the last bit: autocast did not run"


@pytest.mark.slow
def test_cancel_on_a_copy_raises_too(embedded_model, tiny_dataset, tiny_recipe, tmp_path):
    """lent=None (a copy loaded for the training): the same stop after the first step."""
    steps = []
    with pytest.raises(Cancelled):
        train_here(embedded_model, tiny_dataset, tmp_path / "train", tiny_recipe,
                   on_progress=lambda step, *_: steps.append(step), should_cancel=lambda: True)
    assert steps == [0, 1] and steps_logged(tmp_path / "train") == ["1/2"]


# ---------------------------------------------------------------- through the retrain pipeline


@pytest.mark.slow
def test_a_retrain_on_the_serving_weights_tells_chats_to_come_back(embedded_model, store, data_dir, cache_dir,
                                                                   tiny_recipe, base_answers_cached, small_evaluation,
                                                                   monkeypatch):
    """run_retrain as `selfcog serve` runs it with SELFCOG_TRAIN_WEIGHTS=serving: while the run is in stage
    "training" a chat (from another thread than the retrain's) gets the learning notice as the front ends
    show it (a UserError, one line), nothing else; after the run chats are answered again. (The evaluation
    is a small one: its scores are not what this test is about.)"""
    from bot.chat import ChatService
    from bot.engines.local import LocalEngine
    from bot.errors import UserError
    from finetune.jobs import JobSettings, run_retrain

    store.identity.set(name=PROFILE.name, author=PROFILE.author)
    for c in FIVE_CORRECTIONS:
        store.corrections.add(question=c["question"], corrected_answer=c["answer"], channel="import", status="approved")
    earlier = store.runs.request("cli", "cli", claim=True)  # the last retrain trained 40 s: chats are told so
    store.runs.finish(earlier["id"], "rejected", report={"phases": {"worker_start": 2.0, "training": 38.0}})
    engine = LocalEngine(embedded_model, active_adapter=store.adapters.active, train_weights="serving",
                         max_new_tokens=16)
    try:
        chat = ChatService(store, engine, max_new_tokens=16)
        conversation = chat.conversation("web", chat_key="k", user="u")

        # The retrain holds at its first progress report inside the training (the weights lent), and at the
        # first with an ETA (after step 1), until the chats below have been tried: no race with a training
        # of a few seconds.
        training, chatted, stepped, chatted_again = (threading.Event() for _ in range(4))
        progress, eta = store.runs.progress, {}

        def holding_progress(run_id, **fields):
            progress(run_id, **fields)
            if fields.get("stage") != "training" or not fields.get("total_steps"):
                return
            if not training.is_set():
                training.set()
                chatted.wait(300)
            elif fields.get("eta_s") is not None and not stepped.is_set():
                eta["s"] = fields["eta_s"]
                stepped.set()
                chatted_again.wait(300)

        monkeypatch.setattr(store.runs, "progress", holding_progress)
        run = store.runs.request("web", "admin", claim=True)
        outcome = {}

        def retrain():
            settings = JobSettings(data_dir, cache_dir, device="cpu", trainer="in-process")
            outcome["report"] = run_retrain(run, store=store, engine=engine, model=embedded_model, settings=settings,
                                            recipe=tiny_recipe)

        thread = threading.Thread(target=retrain)
        thread.start()
        try:
            assert training.wait(600), f"the run never trained: {store.runs.get(run['id'])}"
            assert store.runs.get(run["id"])["stage"] == "training"
            turn = chat.send(conversation, "Who are you?")
            with pytest.raises(UserError) as refused:  # what the web page and the Telegram bot show, after a ⚠️
                "".join(turn)
            assert type(refused.value) is EngineError, refused.value
            assert re.match(r"^the bot is learning from its corrections right now; back in about (3\d|40) s$",
                            str(refused.value)), refused.value
            with pytest.raises(EngineError, match=LEARNING):
                engine.generate([WHO])
            chatted.set()
            # after a step the notice follows the training's own ETA, not the last retrain's 40 s
            assert stepped.wait(600), f"no step with an ETA: {store.runs.get(run['id'])}"
            with pytest.raises(EngineError, match=LEARNING) as refused:
                engine.generate([WHO])
            said = int(re.search(r"about (\d+) s", str(refused.value))[1])
            assert eta["s"] - 1 <= said <= eta["s"] + 2, (eta, str(refused.value))
        finally:
            chatted.set()
            chatted_again.set()
            thread.join(timeout=900)
        assert "report" in outcome, "run_retrain raised (its traceback is above)"
        report = outcome["report"]
        assert report["status"] in ("promoted", "rejected"), report.get("reason")
        assert {"dataset", "worker_start", "training", "evaluation"} <= set(report["phases"])
        assert report["training_split"]["steps"] + report["training_split"]["after_steps"] == \
            pytest.approx(report["phases"]["training"], abs=0.3)
        probes, prompts = small_evaluation
        candidate = report["metrics"]["candidate"]  # the evaluation ran, on the small set
        assert all(round(v * probes, 6) == round(v * probes) for v in candidate["identity"].values()), candidate
        assert candidate["facts"][1] <= prompts, candidate
        assert report["recipe"]["epochs"] == 1 and report["dataset"]["by_source"]["replay"] == 0
        assert store.runs.get(run["id"])["status"] == report["status"]
        answer = "".join(chat.send(conversation, "Who are you?"))
        assert answer.strip(), "no answer after the retrain"
    finally:
        engine.close()


# ---------------------------------------------------------------- bot/hardware.py


@pytest.mark.parametrize("value", ["abc", "0", "-8"])
def test_a_gpu_memory_cap_must_be_a_positive_number(value, monkeypatch):
    from bot import hardware
    from bot.errors import UserError

    monkeypatch.setenv(hardware.GPU_MEMORY_ENV, value)
    with pytest.raises(UserError, match=f"^SELFCOG_GPU_MEMORY_GB must be a number of GB above 0, not {value!r}$"):
        hardware.gpu_memory_cap_gb()


def test_a_gpu_memory_cap_is_read_in_gb_and_unset_means_the_whole_card(monkeypatch):
    from bot import hardware

    monkeypatch.delenv(hardware.GPU_MEMORY_ENV, raising=False)
    assert hardware.gpu_memory_cap_gb() is None
    monkeypatch.setenv(hardware.GPU_MEMORY_ENV, " 23.5 ")
    assert hardware.gpu_memory_cap_gb() == 23.5
    hardware.apply_gpu_memory_cap("cpu")  # nothing to cap on a CPU (and no CUDA here to ask)


@pytest.mark.slow
def test_preparing_ahead_caches_the_references_and_warms_the_trainer_on_the_serving_weights(
        embedded_model, store, data_dir, cache_dir, tiny_recipe, base_answers_cached, small_evaluation, monkeypatch):
    """JobRunner.prepare_ahead (what `selfcog serve` runs at start on a GPU): the base's evaluation under the
    current profile is computed and cached, so the first retrain evaluates only its candidate; and an engine
    that lends its weights trains two throwaway steps on them, which leave no adapter, no files, and the
    weights answering exactly as before."""
    from bot.engines.local import LocalEngine
    from finetune import jobs

    store.identity.set(name=PROFILE.name, author=PROFILE.author)
    for c in FIVE_CORRECTIONS:
        store.corrections.add(question=c["question"], corrected_answer=c["answer"], channel="import", status="approved")
    trainings = []
    train_adapter = jobs.train_adapter

    def recorded(model, dataset, output_dir, recipe, **options):
        folder = train_adapter(model, dataset, output_dir, recipe, **options)
        trainings.append({"lent": options.get("lent") is not None, "steps": len(steps_logged(Path(output_dir))),
                          "trained": lora_b_trained(folder)})
        return folder

    monkeypatch.setattr(jobs, "train_adapter", recorded)
    engine = LocalEngine(embedded_model, active_adapter=store.adapters.active, train_weights="serving",
                         max_new_tokens=16)
    try:
        before = engine.generate([WHO])
        runner = jobs.JobRunner(jobs.JobSettings(data_dir, cache_dir, trainer="in-process", prepare_ahead=True),
                                store, model=embedded_model, engine=engine, recipe=tiny_recipe)
        runner.prepare_ahead()
        assert trainings == [{"lent": True, "steps": 2, "trained": True}]
        assert not (Path(data_dir) / "runs" / "warm-up").exists() and engine.adapter_version is None
        assert store.adapters.list() == [] and store.runs.list() == []
        assert engine.generate([WHO]) == before, "the weights came back changed"

        # the reference is cached: evaluating the base under this profile asks the engine nothing
        monkeypatch.setattr(engine, "generate", lambda *a, **k: pytest.fail("the base was evaluated again"))
        report = jobs.evaluate_weights(engine, jobs.AdapterRef.BASE, store.identity.current(), base_answers_cached,
                                       previous=jobs.earlier_profiles(store), cache_dir=cache_dir,
                                       weights=jobs.weights_id(embedded_model))
        probes, _ = small_evaluation  # the report prepare_ahead computed, on the small set
        assert all(round(v * probes, 6) == round(v * probes) for v in report.identity.values()), report.identity
    finally:
        engine.close()


def test_the_job_runner_builds_the_training_template_before_the_first_retrain(embedded_model, store, data_dir,
                                                                              cache_dir, tiny_recipe):
    """ms-swift's template takes ~1-2 s to build on a CPU: the job runner builds it at its start, with its
    imports, and the first retrain's trainer finds it ready."""
    from finetune import in_process, jobs

    in_process._template.cache_clear()
    stop = threading.Event()
    runner = jobs.JobRunner(jobs.JobSettings(data_dir, cache_dir, trainer="in-process"), store, model=embedded_model,
                            engine=None, recipe=tiny_recipe, poll_s=0.05)
    thread = runner.start(stop)
    try:
        for _ in range(1200):
            if in_process._template.cache_info().currsize:
                break
            threading.Event().wait(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert in_process._template.cache_info().currsize == 1, "no template was built at the runner's start"
    hits = in_process._template.cache_info().hits
    in_process._template(embedded_model, tiny_recipe.max_length)  # what train_here asks for first
    assert in_process._template.cache_info().hits == hits + 1
