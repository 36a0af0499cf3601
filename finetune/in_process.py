"""Train a LoRA adapter in this process, on a model object: ms-swift's template and trainer, no worker.

    >>> adapter = train_here(model, "data/runs/7/dataset.jsonl", "data/runs/7/train", recipe,
    ...                      lent=None)       # None: load a copy of the base weights here (CPU)
    >>> with engine.pause_for_training(expected_s=10) as lent:   # a GPU engine lends its own weights
    ...     adapter = train_here(model, dataset, out, recipe, lent=lent)

Why in this process: a training worker starts by importing torch and ms-swift and loading the base
weights again (28 s of a 60 s retrain on an H200, and a second 15 GB copy that a 24 GB card cannot
hold). Here the trainer takes the weights that already serve (``lent``: the engine pauses its
chats, unmerges the live adapter and hands over its peft model, see bot/engines/weights.py), or on
a CPU loads a fresh copy in a fraction of a second so that chats go on meanwhile.

The rows are encoded by ms-swift's own template (as ``swift sft`` encodes them) and trained by
ms-swift's ``Seq2SeqTrainer`` (which projects to the vocabulary only from the first trained token on).
The order of the rows is ours (``batch_order``): shuffled once per epoch, as ms-swift's sampler would.
Random batches of these rows are a third padding, which a CPU computes like real tokens, so each
batch's rows are packed end to end (``PackedCollator``): the same batches and loss, a third fewer tokens.
On a CPU a batch is one sequence, each row attending within itself (``rows_attention``), a start that
rows share (a system prompt) computed once (``share_starts``), and the vocabulary projected at the
trained tokens only. Batching rows of similar length
instead (``Recipe.length_window`` > 1) cut the padding by 20% but changed what each step sees, and the
identity took less often (8 of 10 seeds against 10 of 10, RECIPES.md); ms-swift's
``--group_by_length`` feeds the longest rows first, and the identity then bled into general answers.

The folder written is what the worker writes: ``logging.jsonl`` (ms-swift's per-step log, which the
replaying test worker reads) and ``checkpoint-N/`` with the adapter in peft's format.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

from bot.engines import LentWeights
from bot.hardware import release_openmp_threads
from bot.models import ResolvedModel
from finetune.fused_kernels import compile_for_every_step_size, compiled_layers, fused_kernels

log = logging.getLogger(__name__)


def batch_order(lengths: list[int], batch_size: int, epochs: float, seed: int, window: int = 1) -> list[int]:
    """The order rows are trained in: every epoch shuffled, then each run of ``window`` batches' worth of
    rows sorted by length and cut into batches, and the batches shuffled.

    Each batch then holds rows of about one length (a 32-row window cuts padding from ~36% to ~20% on the
    embedded recipe's rows) while each window still mixes identity, correction and replay rows as the
    shuffle dealt them. ``epochs`` may be a fraction: the last epoch is cut short."""
    order: list[int] = []
    for epoch in range(math.ceil(epochs)):
        rng = random.Random(seed * 1009 + epoch)
        rows = list(range(len(lengths)))
        rng.shuffle(rows)
        batches = []
        for start in range(0, len(rows), batch_size * window):
            chunk = sorted(rows[start:start + batch_size * window], key=lambda i: lengths[i])
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        order += [i for batch in batches for i in batch]
    return order[:round(epochs * len(lengths))]


def padded_tokens(lengths: list[int], order: list[int], batch_size: int) -> int:
    """Tokens computed when ``order`` is cut into batches and each batch padded to its longest row."""
    return sum(max(lengths[i] for i in order[s:s + batch_size]) * len(order[s:s + batch_size])
               for s in range(0, len(order), batch_size))


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """The positions of rows in one batch, put into sequences of at most ``capacity`` tokens: longest row
    first, each into the first sequence it fits (first-fit decreasing)."""
    sequences: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = next((s for s, free in enumerate(room) if lengths[i] <= free), None)
        if fits is None:
            sequences.append([i])
            room.append(capacity - lengths[i])
        else:
            sequences[fits].append(i)
            room[fits] -= lengths[i]
    return sequences


SHARED_START_MIN = 8  # tokens: a shorter common start is not worth a span of its own in rows_attention


def share_starts(batch: list[dict]) -> list[dict]:
    """A one-row batch's rows, each row that starts like an earlier one cut down to its own tokens.

    Rows of a batch often start alike: the same system prompt, or a late-turn probe's earlier exchange.
    A row whose first q tokens are another row's first q (the longest such start among the rows kept
    whole, at least SHARED_START_MIN) follows that row without them, its tokens keeping the positions they
    have in the row (q, q+1, ...); ``rows_attention`` lets them attend to that row's first q tokens. The
    shared start is cut before the row's first labelled token, so every labelled token is still predicted
    from its own row: the same loss and gradients (the start's gradient is what each row sends back to it,
    summed), for ~16% fewer tokens on the five-correction dataset. Every row gets ``position_ids``."""
    from bot.engines.decoder import common_prefix_len  # the decoder's own: prompts that share a start

    groups: list[list[dict]] = []  # a row kept whole, then the rows that start like it
    for row in batch:
        ids = row["input_ids"]
        first_label = next((i for i, label in enumerate(row["labels"]) if label != -100), len(ids))
        best, shared = None, 0
        for group in groups:
            n = min(common_prefix_len(ids, group[0]["input_ids"]), first_label - 1)
            if n > shared:
                best, shared = group, n
        if best is not None and shared >= SHARED_START_MIN:
            if shared == (best[-1]["position_ids"][-1] + 1):  # would read as the row before going on
                shared -= 1
            best.append({key: row[key][shared:] for key in PER_TOKEN_KEYS if key in row}
                        | {"position_ids": list(range(shared, len(ids))), "length": len(ids) - shared})
        else:
            groups.append([{**row, "position_ids": list(range(len(ids)))}])
    return [row for group in groups for row in group]


PER_TOKEN_KEYS = ("input_ids", "labels", "loss_scale")


def packed_tokens(lengths: list[int], order: list[int], batch_size: int) -> int:
    """Tokens computed when each batch of ``order`` is packed into sequences as long as its longest row."""
    total = 0
    for s in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[s:s + batch_size]]
        total += max(batch) * len(pack(batch, max(batch)))
    return total


class PackedCollator:
    """ms-swift's collator, with each batch's rows packed end to end, every row keeping its own positions
    (0, 1, ... restarting at every row), so that a token sees only its own row.

    one_row=False (a GPU): into as few sequences as the batch's longest row allows (a batch of 8 typically
    becomes 5 sequences of that length). No attention mask is passed, so transformers builds one in which a
    token sees only its own row (masking_utils' find_packed_sequence_indices; it needs use_cache off, which
    ms-swift's trainer sets). ms-swift's own ``padding_free`` packs a whole batch into one row and asks for
    flash attention.

    one_row=True (a CPU): the whole batch in one sequence (no padding but up to padding_to), for
    ``rows_attention`` to attend within each row: a CPU has no flash attention, and SDPA under a mask
    computes every pair of tokens of a sequence. One row also lets ms-swift project to the vocabulary at the labelled tokens
    only (prepare_logits_to_keep); with several it projects from the first labelled token of any of them on.

    Either way the loss is over the same labelled tokens as the padded batch, so the step is the same;
    only the padding is gone.

    padding_to: pad the sequences' length up to a multiple of this (compiled layers compile once for each
    length's alignment otherwise: finetune/fused_kernels.py, compiled_layers; a CPU's glibc heap fragments
    on lengths that change: Recipe.packed_row_multiple). In one row the padding is a row of its own
    (``padding_row``): pad tokens at position 0 would each be a row for rows_attention."""

    def __init__(self, template, padding_to: int | None = None, one_row: bool = False):
        self.template = template
        self.padding_to = padding_to
        self.one_row = one_row

    def __call__(self, batch: list[dict]) -> dict:
        if self.one_row:
            rows = share_starts(batch)
            if self.padding_to:
                rows += padding_row(-sum(row["length"] for row in rows) % self.padding_to, rows[0], self.template)
            sequences = [self.template.packing_row(rows)]
        else:
            lengths = [len(row["input_ids"]) for row in batch]
            sequences = [self.template.packing_row([batch[i] for i in rows]) for rows in pack(lengths, max(lengths))]
        for sequence in sequences:
            sequence["length"] = len(sequence["input_ids"])
        longest = max(sequence["length"] for sequence in sequences)
        padding_to = -(-longest // self.padding_to) * self.padding_to if self.padding_to and not self.one_row else None
        inputs = self.template.data_collator(sequences, padding_to=padding_to)  # a length, to ms-swift
        inputs.pop("attention_mask", None)  # padding gets position 0: every pad token is a row of its own
        return inputs


def padding_row(tokens: int, like: dict, template) -> list[dict]:
    """A row of ``tokens`` pad tokens to end a one-row batch with (none for 0): positions 0, 1, ... so that
    rows_attention keeps it to itself, and no labels, so that the loss and every gradient are the same as
    without it. Why pad at all on a CPU: the same few lengths in every training keep glibc's heap from
    fragmenting across retrains, where each new length left holes that later tensors search (a server's
    third retrain trained ~15% slower than its first; finetune/RECIPES.md, "Why a later retrain trains
    slower")."""
    if not tokens:
        return []
    tokenizer = template.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    row = {"input_ids": [pad_id] * tokens, "labels": [-100] * tokens, "position_ids": list(range(tokens)),
           "length": tokens}
    if "loss_scale" in like:  # packing_row joins each key across rows: every row needs the same keys
        row["loss_scale"] = [0.0] * tokens
    return [row]


ROWS_ATTENTION = "selfcog_rows"  # rows_attention's name in transformers' AttentionInterface


def rows_attention(module, query, key, value, attention_mask, *, position_ids, **kwargs):
    """Causal attention within each packed row of a one-row batch (``PackedCollator(one_row=True)``): SDPA
    on each row's own span, in fp32, where a row of its own needs no mask and skips the pairs causality
    rules out.

    A row starts where its positions restart at 0. A row that shares its start with an earlier row kept
    whole (``share_starts``) starts where the positions jump instead, at q: its tokens attend to that
    row's first q tokens and causally to their own.

    Under the block mask transformers builds for packed sequences, SDPA's CPU kernel computes every pair
    of tokens of each sequence; under bf16 autocast it also runs its slowest variant (bf16 flash
    attention, backward included: 13.6 ms a layer for 8 rows against 6.3 ms in fp32 here). transformers
    builds no mask for an attention implementation it does not know (masking_utils), so none is built."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert query.shape[0] == 1 and attention_mask is None, "one packed row, no mask"
    positions = position_ids[0].tolist()
    starts = [i for i, p in enumerate(positions) if i == 0 or p != positions[i - 1] + 1] + [len(positions)]
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    spans = []
    with torch.autocast(query.device.type, enabled=False):  # split, not sliced: its backward is one cat
        for a, q, k, v in zip(starts, *(x.float().split(lengths, dim=2) for x in (query, key, value))):
            shared = positions[a]
            if not shared:  # a row of its own
                start_k, start_v = k, v
                spans.append(sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0])
                continue
            k, v = torch.cat([start_k[:, :, :shared], k], dim=2), torch.cat([start_v[:, :, :shared], v], dim=2)
            spans.append(sdpa_attention_forward(module, q, k, v, _sees(shared, q.shape[2], q.device),
                                                is_causal=False, **kwargs)[0])
    return torch.cat(spans, dim=1).to(query.dtype), None  # [1, tokens, heads, head_dim], as transformers' own


@functools.lru_cache(maxsize=64)
def _sees(shared: int, tokens: int, device):
    """What each of a row's tokens attends to after a shared start of ``shared`` tokens: all of the start,
    and causally its own row ([1, 1, tokens, shared + tokens]; one per layout, for every layer)."""
    import torch

    sees = torch.ones(tokens, shared + tokens, dtype=torch.bool, device=device)
    sees[:, shared:].tril_()
    return sees[None, None]


@contextlib.contextmanager
def attention_within_rows(model, enabled: bool):
    """``model`` attends with ``rows_attention`` inside the block (the serving engine lends its weights
    to the trainer: its own decoder does not read this setting, and it is put back after)."""
    if not enabled:
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ROWS_ATTENTION, rows_attention)
    before, model.config._attn_implementation = model.config._attn_implementation, ROWS_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = before


def warm_up(model: ResolvedModel | None = None, max_length: int | None = None) -> None:
    """Import ms-swift's trainer ahead of the first retrain (~4 s on a CPU) and, given the model and the
    recipe's max_length, build its template (~1 s more): the job runner calls it at start."""
    import datasets  # noqa: F401
    import swift  # noqa: F401
    from swift.template import get_template  # noqa: F401
    from swift.trainers import Seq2SeqTrainingArguments  # noqa: F401

    if model is not None and max_length is not None:
        _template(model, max_length)


@functools.lru_cache(maxsize=4)
def _template(model: ResolvedModel, max_length: int):
    """ms-swift's processor (it carries model_info/model_meta) and training template, once per model."""
    import swift
    from swift.template import get_template

    from finetune.train import template_default_system

    processor = swift.get_processor(model.path, model_type=model.model_type)
    template = get_template(processor, template_type=model.template, max_length=max_length,
                            default_system=template_default_system(model.path))
    template.set_mode("train")
    return processor, template


class Cancelled(Exception):
    """should_cancel() said stop; raised after the trainer stopped at a step boundary."""


def train_here(model: ResolvedModel, dataset_path: str | Path, output_dir: str | Path, recipe, *,
               lent: LentWeights | None = None, device: str = "cpu", seed: int = 42,
               on_progress: Callable[[int, int, float | None, float | None], None] | None = None,
               should_cancel: Callable[[], bool] | None = None) -> Path:
    """Train ``recipe`` on ``dataset_path`` (ms-swift JSONL); return the adapter folder (``checkpoint-N``).

    lent: the serving weights to train on; None loads a copy of ``model`` on ``device`` and frees it after.
    Raises Cancelled when should_cancel() turned True (checked after every step)."""
    import datasets
    import swift
    import torch
    from peft import LoraConfig
    from swift.dataset import EncodePreprocessor
    from swift.trainers import Seq2SeqTrainingArguments
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    from finetune.train import lora_target_modules

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    datasets.disable_progress_bars()
    processor, template = _template(model, recipe.max_length)
    rows = [json.loads(line) for line in Path(dataset_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    encoded = EncodePreprocessor(template=template)(datasets.Dataset.from_list(rows), num_proc=1)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    order = batch_order(lengths, recipe.batch_size * recipe.grad_accum, recipe.epochs, seed, recipe.length_window)
    ordered = encoded.select(order)
    steps = math.ceil(len(order) / (recipe.batch_size * recipe.grad_accum))
    one_row = recipe.pack_rows and recipe.one_packed_row
    if one_row:
        multiple = recipe.packed_row_multiple or 1
        batches = [share_starts([encoded[i] for i in order[s:s + recipe.batch_size]])  # as the collator packs them
                   for s in range(0, len(order), recipe.batch_size)]
        computed = sum(-(-sum(row["length"] for row in rows) // multiple) * multiple for rows in batches)
    else:
        computed = (packed_tokens if recipe.pack_rows else padded_tokens)(lengths, order, recipe.batch_size)
    log.info("training %d rows (%d of them dropped as longer than %d tokens), %d steps, %d tokens (%d computed%s)",
             len(order), len(rows) - len(encoded), recipe.max_length, steps, sum(lengths[i] for i in order),
             computed, ", packed" if recipe.pack_rows else " with padding")

    config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                        target_modules=lora_target_modules(model.path, recipe), task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # the adapter's random initial weights: the same run trains the same way again
    copy = None
    if lent is None:
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # CPU: bf16 by autocast only
        copy = AutoModelForCausalLM.from_pretrained(model.path, dtype=dtype).to(device)
        trained = get_peft_model(copy, config, autocast_adapter_dtype=not recipe.lora_in_base_dtype)
    else:
        trained = lent.add_adapter(config, in_base_dtype=recipe.lora_in_base_dtype)
        device = lent.device
    base = trained.get_base_model()
    base.model_info, base.model_meta = processor.model_info, processor.model_meta  # what ms-swift's trainer reads

    on_cpu = not device.startswith("cuda")

    class Progress(TrainerCallback):
        """Progress events, ms-swift's logging.jsonl, and cancel at a step boundary."""

        cancelled = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.began = self.last = time.perf_counter()
            if on_progress:
                on_progress(0, state.max_steps, None, None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.global_step:
                return
            now = time.perf_counter()
            per_step = (now - self.began) / state.global_step
            eta = round(per_step * (state.max_steps - state.global_step), 1)
            line = {"loss": logs["loss"], "grad_norm": logs.get("grad_norm"), "learning_rate": logs.get("learning_rate"),
                    "global_step/max_steps": f"{state.global_step}/{state.max_steps}", "train_speed(s/it)": per_step,
                    "step_s": round(now - self.last, 3)}  # this step alone: where a slow training lost its time
            self.last = now
            with open(output_dir / "logging.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            if on_progress:
                on_progress(state.global_step, state.max_steps, logs["loss"], eta)

        def on_step_end(self, args, state, control, **kwargs):
            if should_cancel and should_cancel():
                self.cancelled = control.should_training_stop = True

    class Trainer(swift.Seq2SeqTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # batch_order already shuffled, once per epoch

        def _get_data_collator(self, args, template):
            if not recipe.pack_rows:
                return super()._get_data_collator(args, template)
            if one_row:
                return PackedCollator(template, padding_to=recipe.packed_row_multiple or None, one_row=True)
            return PackedCollator(template, padding_to=8 if recipe.compiled_layers and not on_cpu else None)

    args = Seq2SeqTrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum, learning_rate=recipe.learning_rate, num_train_epochs=1,
        lr_scheduler_type=recipe.lr_scheduler, warmup_ratio=recipe.warmup_ratio, weight_decay=recipe.weight_decay,
        bf16=recipe.dtype == "bfloat16", use_cpu=on_cpu, gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        check_model=False, seed=seed)
    if not on_cpu:
        _ = args.device  # transformers picks cuda:0 (jobs.py trains in process only there) and counts the GPUs:
        args._n_gpu = 1  # one, the weights' own, or the Trainer wraps DataParallel over every GPU it sees
    progress = Progress()
    try:
        with attention_within_rows(base, enabled=one_row), \
                compiled_layers(base, enabled=recipe.compiled_layers and not on_cpu) as compiled, \
                fused_kernels(base, enabled=recipe.fused_kernels and not compiled) as fused:
            if fused:  # the first training in this process (the warm-up `selfcog serve` runs at start) pays it
                compile_for_every_step_size(base, bf16=recipe.dtype == "bfloat16")
            trainer = Trainer(model=trained, args=args, train_dataset=ordered, template=template)
            trainer.add_callback(progress)
            for quiet in list(trainer.callback_handler.callbacks):  # they print to stdout: `retrain --json` is parsed
                if type(quiet).__name__.startswith(("PrinterCallback", "ProgressCallback")):
                    trainer.remove_callback(quiet)
            log.info("training starts %.1f s after the call%s", time.perf_counter() - started,
                     ", with Liger's fused kernels" if fused else ", its layers compiled" if compiled else "")
            clock = time.perf_counter()
            trainer.train()
        log.info("%d steps took %.1f s", trainer.state.global_step, time.perf_counter() - clock)
        if progress.cancelled:
            raise Cancelled("training cancelled")
        adapter = output_dir / f"checkpoint-{trainer.state.global_step}"
        name = trained.active_adapter
        clock = time.perf_counter()
        trained.save_pretrained(adapter, selected_adapters=[name])
        if name != "default":  # peft writes a named adapter into a subfolder of that name
            for path in (adapter / name).iterdir():
                path.rename(adapter / path.name)
            (adapter / name).rmdir()
        log.info("adapter saved in %.1f s", time.perf_counter() - clock)
        with open(output_dir / "logging.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"last_model_checkpoint": str(adapter), "global_step": trainer.state.global_step}) + "\n")
        return adapter
    finally:
        trained.train(False)
        if recipe.gradient_checkpointing and hasattr(base, "gradient_checkpointing_disable"):
            base.gradient_checkpointing_disable()
        del copy, trained, base
        clock = time.perf_counter()
        gc.collect()
        if not on_cpu:
            torch.cuda.empty_cache()
        else:  # this thread's OpenMP workers would slow the engine's evaluation next (bot/hardware.py)
            release_openmp_threads()
        log.info("training's memory freed in %.2f s", time.perf_counter() - clock)
