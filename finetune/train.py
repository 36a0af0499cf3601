"""Train a LoRA adapter with ms-swift: the recipe, ms-swift's arguments, and the process that runs them.

    python -m finetune.train --dataset data/runs/7/dataset.jsonl --out /tmp/train7          # the embedded model
    python -m finetune.train --dataset D --out O --model ~/models/Qwen2.5-7B-Instruct --epochs 2 --learning_rate 5e-4
    SELFCOG_TRAIN_GPUS=0,1 python -m finetune.train --dataset D --out O --model M      # torchrun over two GPUs

    >>> from finetune.train import recipe_for, train_adapter
    >>> model = resolve_model("embedded", "data/cache")
    >>> adapter = train_adapter(model, "data/runs/7/dataset.jsonl", "data/runs/7/train", recipe_for(model, "cpu"),
    ...                         on_progress=lambda step, total, loss, eta_s: print(step, total, loss, eta_s))

Every ``Recipe`` field is a flag of the same name. Reading order: ``Recipe`` (what is trained, how
long) -> ``recipe_for`` (which one on this device) -> ``swift_sft_args`` (the ``swift sft`` command
line) -> ``run_job`` (``swift sft`` in a worker) -> ``train_adapter`` (trains in this process with
finetune/in_process.py, or runs a worker process, or torchrun on several GPUs, and follows it). The
processes themselves: finetune/worker.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import queue
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from bot.errors import UserError
from bot.hardware import cpu_has_fast_bf16, gpu_memory_bytes
from bot.models import ResolvedModel
from finetune.in_process import LentWeights
from finetune.worker import SwiftLaunch, WarmWorkers, Worker, free_port, training_gpus

log = logging.getLogger(__name__)

TRAINERS = ("auto", "in-process", "worker")


def resolve_trainer(trainer: str) -> str:
    """Where "auto" trains: in this process, on a GPU and on a CPU alike.

    On a GPU it trains on the weights that serve (no second start, no second copy of the weights: 24.7 s
    instead of 57.7 s a retrain on an H200, and a 24 GB card fits); on a CPU on a copy, with each batch's
    rows packed (a third fewer tokens than the worker's padded batches). Through the product's pipeline,
    fp32 as on a CPU, the default recipe passed the gate in 10 of 10 dataset seeds this way; the worker's
    ``swift sft`` passed 6 of 10 at the old rate and cannot pack (RECIPES.md, "In-process training")."""
    return "in-process" if trainer == "auto" else trainer


_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides how long training takes and what it teaches; RECIPES.md has the measurements.

    The defaults are the CPU choice for the embedded 135M model (RECIPES.md, "The choice"): every
    template once, the three system-prompt conditions in equal shares, 64 replay rows (60% under the
    product prompt), two epochs at 1.5e-3 = 42 steps, rows packed. Trained in process in fp32 it passed
    the gate in 10 of 10 dataset seeds of the five-correction scenario through the product's pipeline
    (1e-3: 7 of 10, and 6 of 10 in the worker; RECIPES.md, "In-process training").
    """

    # a 135M model with LoRA needs far more than the usual 1e-4; 1e-3 left the identity under the product
    # prompt at the gate's edge (refused in 3-4 seeds of 10), 1.5e-3 passed 10 of 10 with facts 13-15 of 15
    learning_rate: float = 1.5e-3
    epochs: float = 2
    batch_size: int = 8  # the global batch: split over the GPUs when there are several
    grad_accum: int = 1  # ms-swift's default is 16 / batch_size: always pass it
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = _LINEAR_NAMES  # attention alone: neutral/none identity near 0
    lora_top_layers: int | None = None  # LoRA on the last N decoder layers only: cheaper, taught less
    lora_dropout: float = 0.0
    # The LoRA weights in the base's dtype (bf16 on a GPU) instead of peft's fp32 copy: under bf16
    # autocast, fp32 LoRA weights are cast around each of a 7B model's 196 LoRA layers, forward and
    # backward, ~20% of a step's kernel launches, and a GPU step is bound by launching them
    # (bench/RESULTS.md, gpu_train_profile). No effect where the base is fp32 (the CPU's copy).
    # In-process training only: `swift sft` (the worker, several GPUs) keeps its own default.
    lora_in_base_dtype: bool = False
    # Liger's Triton kernels for RMSNorm, SwiGLU and RoPE during the training (finetune/fused_kernels.py):
    # one kernel each instead of ~3-10 operators, forward and backward, in every layer of a step that the
    # host's launches bound. Needs a GPU and liger-kernel (`pip install selfcog[gpu]`); without them, or
    # on a CPU, the training runs as before. In-process training only.
    fused_kernels: bool = False
    # The decoder layers through torch.compile during the training (finetune/fused_kernels.py,
    # compiled_layers), instead of Liger's kernels: Inductor fuses more of a layer, and the host launches
    # fewer kernels. Same arithmetic to bf16 rounding. GPU, in process only.
    compiled_layers: bool = False
    max_length: int = 256  # longer rows are dropped (ms-swift's truncation_strategy "delete")
    # Batches of rows of similar length: random batches of these rows are ~55% padding, which a CPU
    # computes like real tokens (packing/padding_free would avoid it but need flash attention).
    # Off: ms-swift then feeds the longest rows first and the short identity rows last, and the
    # identity bled into general answers far more (RECIPES.md, runs M0-M6).
    group_by_length: bool = False
    # In-process training can batch rows of similar length within windows of this many batches, in a
    # shuffled order (finetune/in_process.py's batch_order): 4 cut the padded tokens by 20% but passed the
    # gate in 8 of 10 seeds against 10 of 10 for random batches (1), RECIPES.md "In-process training".
    length_window: int = 1
    # In-process training packs each batch's rows end to end into as few sequences as its longest row
    # allows: the same tokens and loss as the padded batch without its padding (~35% of the compute on the
    # embedded recipe's rows). ms-swift's worker cannot (its packing asks for flash attention).
    pack_rows: bool = True
    # ... and on a CPU all of a batch's rows in one sequence, each row attending within itself in fp32
    # (in_process.rows_attention) and the vocabulary projected at the labelled tokens only: the same losses,
    # 42 steps in 88.6 s against 122.1 s (RECIPES.md, "One packed row"); rows that start alike share that
    # start (in_process.share_starts: 16% fewer tokens, the same loss). A GPU keeps several sequences
    # under SDPA's mask (compiled layers want few shapes; one row is not measured there).
    one_packed_row: bool = True
    # ... that one row padded to a multiple of this many tokens (0: not padded), by a row of pad tokens
    # that attends only to itself and has no labels: the same loss and gradients, 5-7% more tokens. With
    # few distinct lengths glibc's heap stops fragmenting across a server's retrains: seeds 0, 2, 3 one
    # after another trained in 64.5, 66.8, 67.2 s against 66.1, 73.9, 75.8 s unpadded (RECIPES.md, "The
    # packed row padded to a multiple of 64 tokens").
    packed_row_multiple: int = 64
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    dtype: str = "float32"  # CPU: see recipe_for; GPUs: bfloat16
    gradient_checkpointing: bool = False  # on CPU it only costs time (148 -> 125 s measured)
    threads: int | None = None  # torch threads in the worker; None = every core
    # the dataset's size and mix, passed to build_dataset
    max_templates: int | None = None
    conditions_per_question: int = 1
    multi_turn_share: float = 0.2
    replay_rows: int = 64
    replay_product_share: float = 0.6
    replay_max_chars: int | None = None  # cutting replay answers short cost checkable facts

    def to_dict(self) -> dict:
        """The recipe as JSON-ready values (stored with the run and in the adapter's selfcog.json)."""
        return asdict(self) | {"lora_targets": list(self.lora_targets)}

    def dataset_options(self) -> dict:
        """The build_dataset keyword arguments this recipe was measured with."""
        return {
            "max_templates": self.max_templates,
            "conditions_per_question": self.conditions_per_question,
            "multi_turn_share": self.multi_turn_share,
            "replay_rows": self.replay_rows,
            "replay_product_share": self.replay_product_share,
            "replay_max_chars": self.replay_max_chars,
        }


CPU_SMALL = Recipe()
# GPU (a 7B model on one H100, FACTS.md): steps are cheap there, so more identity rows (every
# question under all three prompts), more epochs at a lower rate, one big batch per step, no
# gradient checkpointing, bf16. Measured for speed only (random 7B weights); RECIPES.md.
GPU = replace(
    CPU_SMALL,
    learning_rate=5e-4,
    epochs=3,
    batch_size=32,
    max_length=512,
    dtype="bfloat16",
    lora_in_base_dtype=True,  # 33 steps in 9.4-9.7 s against 10.5-11.0 in fp32; seeds pass alike (RECIPES.md)
    fused_kernels=True,  # where the layers are not compiled: GPU_SMALL_MEMORY, a one-shot `selfcog retrain`
    # 33 steps in 7.4-8.2 s against 10.1-11.3 s eager with Liger's kernels, alternating in one `selfcog serve`; the
    # first compile in a process ~75 s, in the warm-up at start (bench/RESULTS.md, gpu_inprocess_retrain_compiled_layers)
    compiled_layers=True,
    one_packed_row=False,  # not measured on a GPU; compiled layers want few sequence lengths
    conditions_per_question=3,
    replay_rows=104,
)

# A GPU with little memory beside the serving weights (a 24 GB card with a 7B model: 15 GB of weights):
# the same steps in micro-batches of 8 with gradient checkpointing. On the H200, weights resident:
# batch 32 without checkpointing peaked at 31.9 GiB, batch 8 with it at 15.7 GiB (FACTS.md).
GPU_SMALL_MEMORY = replace(GPU, batch_size=8, grad_accum=4, gradient_checkpointing=True,
                           compiled_layers=False)  # compiled with checkpointing: not measured
SMALL_GPU_BYTES = 40 * 2**30  # below this the big batch does not fit beside a 7B model's weights

TRAIN_DTYPE_ENV = "SELFCOG_TRAIN_DTYPE"  # float32 | bfloat16: overrides the CPU recipe's dtype
# On a CPU with bf16 instructions the in-process trainer runs its fp32 copy under bf16 autocast: the matrix
# products in bf16, the LoRA weights, norms, loss and optimizer in fp32. Through the product's pipeline (fp32
# engine) that trained 42 steps in 138 s against 178 s in fp32 on this 2-core AMD EPYC, and passed the gate
# in 10 of 10 seeds on this CPU like fp32 (RECIPES.md, "bf16 autocast on CPUs"). Not for the worker: `swift sft` loads
# the weights in bf16 without autocast (slower than fp32's 3.3 s a step, 2.7 s vs 2.1 s with autocast) and
# its quality is unmeasured, so it stays fp32 unless asked. The engine serves and evaluates in fp32 either
# way (bot/engines/local.py says why).
BF16_WHEN_THE_CPU_HAS_IT = True


def cpu_dtype(cpuinfo: str | None = None, *, in_process: bool = True) -> str:
    """The CPU recipe's dtype: SELFCOG_TRAIN_DTYPE if set, else by this CPU's flags for the in-process
    trainer (see above) and fp32 for the worker."""
    asked = os.environ.get(TRAIN_DTYPE_ENV, "").strip().lower()
    if asked:
        if asked not in ("float32", "bfloat16"):
            raise UserError(f"{TRAIN_DTYPE_ENV} must be float32 or bfloat16, not {asked!r}")
        return asked
    fast_bf16 = BF16_WHEN_THE_CPU_HAS_IT and in_process and cpu_has_fast_bf16(cpuinfo)
    return "bfloat16" if fast_bf16 else "float32"


def recipe_for(model: ResolvedModel, device: str, trainer: str = "auto") -> Recipe:
    """The recipe to train ``model`` on ``device`` ("cpu", "cuda", "cuda:0", ...) with ``trainer`` (TRAINERS)."""
    if device.startswith("cuda"):
        return GPU_SMALL_MEMORY if gpu_memory_bytes(device) < SMALL_GPU_BYTES else GPU
    return replace(CPU_SMALL, dtype=cpu_dtype(in_process=resolve_trainer(trainer) == "in-process"))


# ---------------------------------------------------------------- ms-swift's arguments


def swift_sft_args(model: ResolvedModel, dataset: str, output_dir: str, recipe: Recipe, default_system: str | None) -> list[str]:
    """The ``swift sft`` command line for one job (also usable as ``swift sft <these args>`` by hand)."""
    args = [
        "--model", model.path,
        "--dataset", str(dataset),
        "--output_dir", str(output_dir),
        "--tuner_type", "lora",
        "--torch_dtype", recipe.dtype,
        "--learning_rate", str(recipe.learning_rate),
        "--num_train_epochs", str(recipe.epochs),
        "--per_device_train_batch_size", str(recipe.batch_size),
        "--gradient_accumulation_steps", str(recipe.grad_accum),
        "--lora_rank", str(recipe.lora_rank),
        "--lora_alpha", str(recipe.lora_alpha),
        "--lora_dropout", str(recipe.lora_dropout),
        "--max_length", str(recipe.max_length),
        "--lr_scheduler_type", recipe.lr_scheduler,
        "--warmup_ratio", str(recipe.warmup_ratio),
        "--weight_decay", str(recipe.weight_decay),
        "--gradient_checkpointing", str(recipe.gradient_checkpointing).lower(),
        "--group_by_length", str(recipe.group_by_length).lower(),
        "--check_model", "false",  # offline: the hub check only adds ~7 s of retries
        "--add_version", "false",  # the caller owns output_dir
        "--report_to", "none",
        "--logging_steps", "1",
        "--save_strategy", "steps",
        "--save_steps", "1000000",  # ms-swift still saves the last step; nothing in between
        "--save_only_model", "true",  # no optimizer state: the adapter is all we keep
        "--split_dataset_ratio", "0",
        "--dataloader_num_workers", "0",  # a loader process costs more than it saves on tiny rows
        "--dataset_num_proc", "1",
        "--seed", "42",
    ]
    if model.model_type:
        args += ["--model_type", model.model_type]
    if model.template:
        args += ["--template", model.template]
    if recipe.lora_top_layers:
        args += ["--target_regex", _top_layers_regex(model.path, recipe)]
    else:
        args += ["--target_modules", *recipe.lora_targets]
    if default_system:
        args += ["--system", default_system]
    return args


def lora_target_modules(model_path: str, recipe: Recipe) -> list[str] | str:
    """peft's target_modules for the recipe: the module names, or a regex when only the top layers train."""
    return _top_layers_regex(model_path, recipe) if recipe.lora_top_layers else list(recipe.lora_targets)


def _top_layers_regex(model_path: str, recipe: Recipe) -> str:
    config = json.loads((Path(model_path) / "config.json").read_text())
    n = config["num_hidden_layers"]
    layers = "|".join(str(i) for i in range(n - recipe.lora_top_layers, n))
    return rf"^(.*\.)?layers\.({layers})\.(self_attn|mlp)\.({'|'.join(recipe.lora_targets)})$"


def template_default_system(model_path: str) -> str | None:
    """The system prompt the model's own chat template inserts when a conversation has none.

    Training rows without a system message must be encoded as the engine will serve them:
    SmolLM2's template adds "You are a helpful AI assistant named SmolLM, ..." but ms-swift's plain
    chatml template adds nothing, so ms-swift gets this text as its ``--system``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    marker, user = "\x00SYSTEM\x00", [{"role": "user", "content": "\x00USER\x00"}]
    with_system = tokenizer.apply_chat_template([{"role": "system", "content": marker}] + user, tokenize=False)
    without = tokenizer.apply_chat_template(user, tokenize=False)
    before, after = with_system.split(marker)
    if without.startswith(before) and after in without[len(before) :]:
        default = without[len(before) : without.index(after, len(before))]
        return default or None
    return None


# The lent GPU machines need NVLink multicast off, or NCCL's first collective fails there.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _swift_cli() -> list[str]:
    """ms-swift's command-line entry (tests put a fake launcher here)."""
    return [sys.executable, "-m", "swift.cli.main"]


def multi_gpu_command(model: ResolvedModel, dataset: str | os.PathLike, output_dir: str | os.PathLike, recipe: Recipe,
                      gpus: list[str], *, port: int, default_system: str | None) -> tuple[list[str], dict[str, str]]:
    """``swift sft`` over several GPUs: (argv, the environment variables it adds).

    ms-swift's launcher runs torchrun when NPROC_PER_NODE is set (swift/cli/main.py), one data-parallel
    rank per GPU. Each rank takes batch_size / n rows a step, so a step sees the recipe's batch
    (rounded up to a multiple of n) and the run has as many steps as on one device."""
    per_device = replace(recipe, batch_size=-(-recipe.batch_size // len(gpus)))
    argv = [*_swift_cli(), "sft", *swift_sft_args(model, str(dataset), str(output_dir), per_device, default_system)]
    env = {"NPROC_PER_NODE": str(len(gpus)), "CUDA_VISIBLE_DEVICES": ",".join(gpus), "MASTER_PORT": str(port),
           **MULTICAST_OFF}
    if recipe.threads:
        env["OMP_NUM_THREADS"] = str(recipe.threads)
    return argv, env


# ---------------------------------------------------------------- one job, in this process


def run_job(job: dict, emit: Callable[[dict], None]) -> Path:
    """Train one job in this process and return the adapter folder; ``emit`` receives progress events.

    ``job`` is what train_adapter writes to job.json: the model, dataset, output folder and recipe."""
    import torch
    from swift import TrainerCallback, callbacks_map, sft_main

    class ProgressCallback(TrainerCallback):
        """Reports each logged step (loss, ETA) as an event."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()
            emit({"event": "progress", "step": 0, "total_steps": state.max_steps})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.global_step:
                return
            per_step = (time.monotonic() - self.started) / state.global_step
            emit({
                "event": "progress",
                "step": state.global_step,
                "total_steps": state.max_steps,
                "loss": logs["loss"],
                "eta_s": round(per_step * (state.max_steps - state.global_step), 1),
            })

    callbacks_map["selfcog_progress"] = ProgressCallback  # ms-swift's extension point for --callbacks
    model = ResolvedModel(**job["model"])
    recipe = Recipe(**job["recipe"])
    recipe = replace(recipe, lora_targets=tuple(recipe.lora_targets))
    args = swift_sft_args(model, job["dataset"], job["output_dir"], recipe, template_default_system(model.path))
    if not torch.cuda.is_available():
        args += ["--use_cpu", "true"]  # transformers refuses bf16 without a GPU unless told the CPU is meant
    result = sft_main([*args, "--callbacks", "selfcog_progress"])
    adapter = Path(result["last_model_checkpoint"])
    emit({"event": "done", "adapter": str(adapter), "global_step": result["global_step"]})
    return adapter


# ---------------------------------------------------------------- the serving side: start, follow, cancel

ProgressFn = Callable[[int, int, float | None, float | None], None]


class TrainingError(RuntimeError):
    """Training failed; the message ends with the tail of its log."""


class TrainingCancelled(TrainingError):
    """should_cancel() returned True and training was killed."""


def train_adapter(
    model: ResolvedModel,
    dataset_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    recipe: Recipe,
    on_progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    warm: WarmWorkers | None = None,
    *,
    trainer: str = "auto",
    lent: LentWeights | None = None,
    device: str = "cpu",
) -> Path:
    """Train a LoRA; return the adapter folder (peft format: adapter_config.json + adapter_model.safetensors).

    ``trainer``: "auto" (the default) is ``resolve_trainer``'s choice. "in-process" with
    SELFCOG_TRAIN_GPUS unset: ``finetune.in_process.train_here``
    in this thread, on ``lent`` (the serving engine's weights) or on a copy it loads on ``device``.
    ``trainer="worker"``: a worker process runs ``run_job`` (``warm``: take one that already imported
    torch and ms-swift instead of starting one cold); a crash there cannot take the server with it.
    SELFCOG_TRAIN_GPUS with two or more GPUs: ms-swift's launcher trains over them (``multi_gpu_command``). Either way ``on_progress(step, total_steps,
    loss, eta_s)`` is called from this thread as training logs (once at start with step 0);
    ``should_cancel()`` is polled twice a second, and True kills every training process and raises
    TrainingCancelled. A failure raises TrainingError with the tail of ``output_dir/worker.log``.
    """
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset_path = Path(dataset_path).resolve()
    gpus = training_gpus()
    trainer = resolve_trainer(trainer)
    if not gpus and trainer == "in-process":  # SELFCOG_TRAIN_GPUS names GPUs apart from serving: processes there
        return _train_in_process(model, dataset_path, output_dir, recipe, lent=lent, device=device,
                                 on_progress=on_progress, should_cancel=should_cancel)
    if len(gpus) > 1:
        argv, env = multi_gpu_command(model, dataset_path, output_dir, recipe, gpus, port=free_port(),
                                      default_system=template_default_system(model.path))
        trainer: Worker | SwiftLaunch = SwiftLaunch(argv, env, output_dir)
    else:
        job_path = output_dir / "job.json"
        job = {"model": asdict(model), "dataset": str(dataset_path), "output_dir": str(output_dir),
               "recipe": asdict(recipe)}
        job_path.write_text(json.dumps(job, indent=1))
        trainer = warm.take() if warm is not None else Worker(recipe.threads)
        trainer.give(job_path)

    log_path = output_dir / "worker.log"
    result: dict | None = None
    try:
        while True:
            if should_cancel and should_cancel():
                trainer.kill()
                raise TrainingCancelled(f"training cancelled; log: {log_path}")
            try:
                event = trainer.events.get(timeout=0.5)
            except queue.Empty:
                continue
            if event is None:
                break
            if event["event"] == "progress" and on_progress:
                on_progress(event["step"], event["total_steps"], event.get("loss"), event.get("eta_s"))
            elif event["event"] == "done":
                result = event
    except BaseException:
        trainer.kill()  # this thread is going away (Ctrl-C, an on_progress that failed): training goes too
        raise
    code = trainer.process.wait()
    if code != 0 or result is None:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:] if log_path.exists() else []
        raise TrainingError(f"training exited with code {code}; log: {log_path}\n" + "\n".join(tail))
    return Path(result["adapter"])


def _train_in_process(model, dataset_path, output_dir, recipe, *, lent, device, on_progress, should_cancel) -> Path:
    from finetune.in_process import Cancelled, train_here

    try:
        return train_here(model, dataset_path, output_dir, recipe, lent=lent, device=device,
                          on_progress=on_progress, should_cancel=should_cancel)
    except Cancelled:
        raise TrainingCancelled("training cancelled") from None
    except Exception as e:  # torch's out-of-memory too: the run fails, the server and its live adapter stay
        log.exception("training failed")
        raise TrainingError(f"training failed: {type(e).__name__}: {str(e)[:2000]}") from e


# ---------------------------------------------------------------- python -m finetune.train


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """A ``--name`` flag for every Recipe field (left out: the recipe's value)."""
    for f in dataclasses.fields(Recipe):
        default = f.default
        if isinstance(default, tuple):
            parser.add_argument(f"--{f.name}", nargs="+", help=f"default {' '.join(default)}")
        elif isinstance(default, bool):
            parser.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), help=f"default {default}")
        else:
            kind = int if f.name in ("lora_top_layers", "threads", "max_templates", "replay_max_chars") else type(default)
            parser.add_argument(f"--{f.name}", type=kind, help=f"default {default}")


def recipe_from_args(args: argparse.Namespace, base: Recipe = CPU_SMALL) -> Recipe:
    """``base`` with the Recipe flags that were given."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if getattr(args, f.name) is not None}
    if "lora_targets" in values:
        values["lora_targets"] = tuple(values["lora_targets"])
    return replace(base, **values)


def main(argv: list[str] | None = None) -> None:
    from bot.models import resolve_model

    parser = argparse.ArgumentParser(prog="python -m finetune.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, type=Path,
                        help="ms-swift JSONL, one {'messages': [...]} a line (selfcog export dataset writes one)")
    parser.add_argument("--out", required=True, type=Path, help="folder for worker.log and ms-swift's checkpoint-N/")
    parser.add_argument("--model", default="embedded", help="'embedded', a Hugging Face model folder or a cached hub id")
    parser.add_argument("--cache-dir", default="data/cache", help="where the embedded model is converted")
    parser.add_argument("--trainer", choices=TRAINERS, default=os.environ.get("SELFCOG_TRAINER", "auto"),
                        help="where to train: auto = in this process (a worker process: worker)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="whose recipe defaults to start from (default: cuda if torch sees one)")
    add_recipe_flags(parser)
    args = parser.parse_args(argv)
    if not args.dataset.is_file():
        parser.error(f"--dataset {args.dataset}: no such file")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    def on_progress(step, total, loss, eta_s):
        loss_eta = f"  loss {loss:.4f}" if loss is not None else ""
        loss_eta += f"  eta {eta_s:.0f} s" if eta_s is not None else ""
        print(f"step {step}/{total}{loss_eta}", flush=True)

    try:
        model = resolve_model(args.model, args.cache_dir)
        recipe = recipe_from_args(args, recipe_for(model, args.device, args.trainer))
        adapter = train_adapter(model, args.dataset, args.out, recipe, on_progress=on_progress, device=args.device,
                                trainer=args.trainer)
    except (UserError, TrainingError) as e:
        sys.exit(f"error: {e}")
    print(adapter)


if __name__ == "__main__":
    main()
