"""Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE) in a model for one training, then taken out again.

    >>> with fused_kernels(base_model) as fused:   # fused: whether the kernels are in (a GPU with liger-kernel)
    ...     trainer.train()

Why: a GPU training step on a 7B model is bound by the host launching its kernels, not by the GPU
(bench/RESULTS.md, gpu_train_profile: ~7,000 launches a step before these kernels, ~4,000 with them). transformers computes an RMSNorm in ~8 operators, RoPE in ~10
and the MLP's SwiGLU in 3, forward and backward, in each of 28 layers; Liger does each in one kernel.

Why only for the training: Liger patches the model in place (each norm's and MLP's ``forward``, and the
modeling module's ``apply_rotary_pos_emb`` and layer classes, which every later model of that family in
the process would pick up). The serving weights are lent to the trainer and go back to serving after,
so every attribute the patch changed is put back as it was when the training ends.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from typing import Callable, Iterator

log = logging.getLogger(__name__)

_ABSENT = object()


@contextlib.contextmanager
def patched(objects: list[object], patch: Callable[[], object]) -> Iterator[None]:
    """Run ``patch()`` (which may set attributes on any of ``objects``); undo exactly what it changed on
    leaving (or at once, if it raised), whatever happened meanwhile to the attributes it did not touch."""
    before = [dict(vars(obj)) for obj in objects]

    def changes() -> list[tuple[object, str, object]]:
        return [(obj, key, old.get(key, _ABSENT)) for obj, old in zip(objects, before)
                for key in vars(obj).keys() | old.keys() if vars(obj).get(key, _ABSENT) is not old.get(key, _ABSENT)]

    def undo(changed) -> None:
        for obj, key, old in changed:
            if old is _ABSENT:
                vars(obj).pop(key, None)
            else:
                vars(obj)[key] = old

    try:
        patch()
    except BaseException:
        undo(changes())
        raise
    changed = changes()
    try:
        yield
    finally:
        undo(changed)


@functools.cache
def _liger_apply() -> Callable | None:
    """liger-kernel's patcher for a model instance, or None where it is missing (`pip install selfcog[gpu]`)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as e:  # not installed, or no Triton (a CPU-only torch)
        log.info("no fused training kernels (%s): transformers' own operators", e)
        return None
    return _apply_liger_kernel_to_instance


def batch_folded(rope: Callable) -> Callable:
    """``rope`` (an ``apply_rotary_pos_emb(q, k, cos, sin, ...)``) called with the batch folded into one
    sequence: q [b, heads, s, d] is passed as [1, heads, b * s, d], cos and sin [b, s, d] as [1, b * s, d].

    Why: Liger's RoPE kernel takes the batch size as a Triton compile-time constant, and a packed batch
    holds a different number of sequences almost every step, so each new count compiled the kernel again,
    forward and backward, in the middle of a retrain. Folded, the batch is always 1. The same numbers:
    RoPE rotates each token by its own position's angle, and the fold keeps every token next to its own
    cos and sin (views, no copy where q and k are laid out as the attention projections make them)."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        batch, _, length, _ = q.shape
        if batch == 1 or cos.dim() != 3:
            return rope(q, k, cos, sin, *args, **kwargs)

        def fold(x):  # [b, heads, s, d] -> [1, heads, b * s, d]
            return x.transpose(1, 2).reshape(1, batch * length, x.shape[1], x.shape[3]).transpose(1, 2)

        def unfold(x):  # and back
            return x.transpose(1, 2).reshape(batch, length, x.shape[1], x.shape[3]).transpose(1, 2)

        cos, sin = (t.expand(batch, -1, -1).reshape(1, batch * length, t.shape[-1]) for t in (cos, sin))
        q, k = rope(fold(q), fold(k), cos, sin, *args, **kwargs)
        return unfold(q), unfold(k)

    apply_rotary_pos_emb.folds = rope
    return apply_rotary_pos_emb


def _apply(apply: Callable, model, modeling) -> None:
    """Liger's patch, then its RoPE with the batch folded (``batch_folded``)."""
    original_rope = getattr(modeling, "apply_rotary_pos_emb", None)
    apply(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    ligers_rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if ligers_rope is not None and ligers_rope is not original_rope:
        modeling.apply_rotary_pos_emb = batch_folded(ligers_rope)


def token_counts(sm_count: int) -> list[int]:
    """Step sizes (tokens) that meet every compile of the fused kernels once.

    Triton compiles a kernel again for each new class of its integer arguments (1, a multiple of 16,
    anything else). Liger's RMSNorm backward takes the step's token count and that count over the GPU's
    multiprocessors, its RoPE (folded) the token count, and a packed step's count varies: without these,
    a retrain met a new class at some step and waited there for the compile (13 compiles in all on an H200,
    ~0.3 s each: bench/RESULTS.md, gpu_inprocess_retrain_second_start). These counts give each class."""
    counts = [16, 17]  # one row per multiprocessor
    for per_program in (2, 16):  # ceil(tokens / multiprocessors): some other number, a multiple of 16
        most = per_program * sm_count
        multiple = most - most % 16
        counts += [multiple, multiple - 1] if multiple > 17 else []  # a GPU of a few multiprocessors has fewer
    return counts


_compiled: set[tuple] = set()


def compile_for_every_step_size(model, *, bf16: bool, sm_count: int | None = None) -> None:
    """Once per model and precision in a process: the first decoder layer of ``model`` (a transformers
    causal LM with the fused kernels in, on a GPU) forward and backward on one dummy sequence of each of
    ``token_counts``, so that no step of a retrain waits for a kernel to compile. One layer, not the
    model: the kernels are the same in every layer, and a 24 GB card has no room for a 2,000-token step
    without gradient checkpointing. Nothing is kept; a model it cannot drive is left to compile as it goes."""
    import torch

    key = (getattr(model.config, "_name_or_path", ""), model.config.hidden_size, bf16)
    if key in _compiled:
        return
    clock = time.perf_counter()
    try:
        inner = model.model  # LlamaModel, Qwen2Model, ...: embed_tokens, rotary_emb, layers
        sm_count = sm_count or torch.cuda.get_device_properties(model.device).multi_processor_count
        for tokens in token_counts(sm_count):
            ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=model.device)
            positions = torch.arange(tokens, device=model.device)[None]
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                hidden = inner.embed_tokens(ids).detach().requires_grad_()  # so the norms' backward runs too
                out = inner.layers[0](hidden, position_embeddings=inner.rotary_emb(hidden, positions),
                                      position_ids=positions)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    except Exception:
        log.warning("could not compile the fused kernels ahead; a step may wait for a compile", exc_info=True)
    finally:
        model.zero_grad(set_to_none=True)
    _compiled.add(key)
    log.info("fused kernels compiled for every step size in %.1f s", time.perf_counter() - clock)


@contextlib.contextmanager
def fused_kernels(model, enabled: bool = True) -> Iterator[bool]:
    """Liger's RMSNorm, SwiGLU and RoPE kernels in ``model`` (a transformers PreTrainedModel on a GPU) while
    inside; yields whether they are in. The loss stays transformers' (ms-swift's trainer computes it)."""
    apply = _liger_apply() if enabled and model.device.type == "cuda" else None
    if apply is None:
        yield False
        return
    modeling = sys.modules[type(model).__module__]
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(patched([modeling, *model.modules()], lambda: _apply(apply, model, modeling)))
        except Exception:  # a liger-kernel that does not know this transformers: train without, as before
            log.warning("liger-kernel failed to patch %s: transformers' own operators", type(model).__name__,
                        exc_info=True)
            yield False
            return
        yield True


@contextlib.contextmanager
def compiled_layers(model, enabled: bool = True, backend: str | Callable = "inductor") -> Iterator[bool]:
    """The decoder layers of ``model`` (a transformers causal LM, LoRA layers in it) run through
    torch.compile while inside; yields whether they are. Eager again on leaving: serving never runs them.

    Why: a GPU training step on a 7B model is bound by the host launching ~4,000 kernels (see the top of
    this module); Inductor fuses a layer's norms, RoPE, SwiGLU and LoRA's small products, forward and
    backward, into far fewer. Regional: the layers share their code, so one compile (dynamic shapes: a
    packed step's token count varies) serves them all, and every later training in the process. Two
    things would compile it again for each layer or step, so they are kept out: the first layer (its
    input, the frozen embeddings' output, needs no gradient: another graph) stays eager, and no KV cache
    is built in training (a cache's update guards on the layer's index). And the serving weights' other
    adapters (the live one, switched off) differ from one training to the next: see _guard_filter.
    A layer torch.compile cannot compile runs eagerly (suppress_errors), as it would without this."""
    import torch._dynamo

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not enabled or layers is None or len(layers) < 2:
        yield False
        return
    with torch._dynamo.config.patch(suppress_errors=True), \
            patched([model.config, *layers[1:]], lambda: _compile(model, layers[1:], backend)):
        yield True


def _compile(model, layers, backend: str | Callable) -> None:
    model.config.use_cache = False
    for layer in layers:  # sets layer._compiled_call_impl, which patched() takes out again
        layer.compile(backend=backend, dynamic=True, options={"guard_filter_fn": _guard_filter})


def _guard_filter(guards) -> list[bool]:
    """Every guard torch.compile would check before reusing a compiled layer, but those on the set of
    adapters a LoRA layer holds. Which adapters are loaded beside the one training (the live adapter, a new
    name after each promotion, switched off) does not change what the layer computes; which one is active
    is still checked (peft's active_adapters), and so is each of the training adapter's modules. Their
    number and the training adapter's place among them are checked too (not filterable): the serving
    weights keep them alike (bot/engines/weights.py, add_training_adapter)."""
    return [not (guard.guard_type == "DICT_KEYS_MATCH"
                 and guard.name.endswith(("._modules['lora_A']._modules", ".lora_variant"))) for guard in guards]
