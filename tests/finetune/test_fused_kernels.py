"""finetune/fused_kernels.py: Liger's kernels go into a model for one training and come out again after.

Liger needs a GPU and Triton, so the patch here is one written the way Liger's is (methods bound on each
norm and MLP instance, attributes set on them, a function of the modeling module replaced); what is
checked is that it is undone exactly, on a tiny random Llama computed for real. On a GPU the same code
runs Liger's patch (bench/gpu_inprocess_retrain.py --compare fused_kernels).
"""

from __future__ import annotations

import sys
from types import MethodType

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.fused_kernels import _apply, batch_folded, compile_for_every_step_size, fused_kernels, patched, token_counts


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12).unsqueeze(0)).logits


def liger_like_patch(model):
    """What Liger's apply_liger_kernel_to_llama(model=...) does to a model, with other arithmetic."""
    modeling = sys.modules[type(model).__module__]

    def patch():
        modeling.apply_rotary_pos_emb = lambda q, k, cos, sin, *a, **kw: (q, k)  # no rotation at all
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.offset = 1.0
                module.forward = MethodType(lambda self, x: x * (self.offset + self.weight), module)
            if type(module).__name__ == "LlamaMLP":
                module.forward = MethodType(lambda self, x: self.down_proj(self.up_proj(x)), module)
    return patch


def test_a_patch_is_in_while_inside_and_undone_exactly_after(tiny_llama):
    modeling = sys.modules[type(tiny_llama).__module__]
    rope, before = modeling.apply_rotary_pos_emb, logits(tiny_llama)
    objects = [modeling, *tiny_llama.modules()]
    dicts = [dict(vars(obj)) for obj in objects]
    with patched(objects, liger_like_patch(tiny_llama)):
        assert not torch.allclose(logits(tiny_llama), before), "the patched operators compute"
        tiny_llama.train()  # the trainer's own change, not the patch's: it stays
    assert tiny_llama.training and tiny_llama.model.norm.training
    assert torch.equal(logits(tiny_llama.eval()), before)
    assert modeling.apply_rotary_pos_emb is rope
    assert [dict(vars(obj)) for obj in objects] == dicts


def test_a_patch_that_fails_half_way_leaves_nothing_behind(tiny_llama):
    modeling = sys.modules[type(tiny_llama).__module__]
    before = logits(tiny_llama)
    objects = [modeling, *tiny_llama.modules()]
    dicts = [dict(vars(obj)) for obj in objects]
    half_patch = liger_like_patch(tiny_llama)

    def fails_half_way():
        half_patch()
        raise RuntimeError("this transformers has no LlamaMLP.act_fn")

    with pytest.raises(RuntimeError, match="act_fn"):
        with patched(objects, fails_half_way):
            pass
    assert [dict(vars(obj)) for obj in objects] == dicts
    assert torch.equal(logits(tiny_llama), before)


def test_on_a_cpu_the_training_runs_on_transformers_own_operators(tiny_llama):
    before = logits(tiny_llama)
    with fused_kernels(tiny_llama) as fused:
        assert fused is False
        assert torch.equal(logits(tiny_llama), before)


def test_the_folded_rope_rotates_every_token_as_the_batched_one_and_passes_one_sequence(tiny_llama):
    """batch_folded: Liger's RoPE kernel compiles once per batch size, so it is called with the batch folded
    into one sequence. Here the folded function is transformers' own RoPE: on a packed batch (every row with
    its own positions) the values and the gradients are the batched call's, and it saw a batch of 1."""
    modeling = sys.modules[type(tiny_llama).__module__]
    rotary = modeling.LlamaRotaryEmbedding(tiny_llama.config)
    batch, length, heads, kv_heads, dim = 3, 5, 4, 2, 8
    torch.manual_seed(1)
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0, 0, 1, 2, 3]])  # packed rows restart at 0
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    seen = []

    def rope(q, k, cos, sin, *args, **kwargs):
        seen.append((q.shape[0], cos.shape[0]))
        return modeling.apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs)

    def inputs():  # laid out as the attention projections make them: [b, s, heads, d] seen as [b, heads, s, d]
        torch.manual_seed(2)
        q = torch.randn(batch, length, heads, dim).transpose(1, 2).requires_grad_()
        k = torch.randn(batch, length, kv_heads, dim).transpose(1, 2).requires_grad_()
        return q, k

    (q0, k0), (q1, k1) = inputs(), inputs()
    expected = modeling.apply_rotary_pos_emb(q0, k0, cos, sin)
    got = batch_folded(rope)(q1, k1, cos, sin)
    assert seen == [(1, 1)]
    for want, have in zip(expected, got):
        assert have.shape == want.shape and torch.allclose(have, want, atol=1e-6)
    weights = [torch.randn_like(t) for t in expected]
    sum((t * w).sum() for t, w in zip(expected, weights)).backward()
    sum((t * w).sum() for t, w in zip(got, weights)).backward()
    assert torch.allclose(q1.grad, q0.grad, atol=1e-6) and torch.allclose(k1.grad, k0.grad, atol=1e-6)
    assert not torch.allclose(got[0], q1), "it rotated"


def test_the_patch_folds_ligers_rope_and_is_undone_after(tiny_llama):
    modeling = sys.modules[type(tiny_llama).__module__]
    rope = modeling.apply_rotary_pos_emb

    def ligers_rope(q, k, cos, sin, *args, **kwargs):
        return q, k

    def liger_apply(model, rope, **kinds):
        modeling.apply_rotary_pos_emb = ligers_rope

    with patched([modeling], lambda: _apply(liger_apply, tiny_llama, modeling)):
        assert modeling.apply_rotary_pos_emb.folds is ligers_rope
    assert modeling.apply_rotary_pos_emb is rope


def test_the_step_sizes_meet_every_compile_class_of_the_kernels_integer_arguments():
    """Triton compiles again for an integer argument that is 1, a multiple of 16, or anything else; Liger's
    RMSNorm backward takes tokens and ceil(tokens / multiprocessors), the folded RoPE tokens."""
    for sm_count in (132, 108, 80, 20):
        classes = {(tokens % 16 == 0, min(-(-tokens // sm_count), 3) if -(-tokens // sm_count) % 16 else 16)
                   for tokens in token_counts(sm_count)}
        assert classes == {(a, b) for a in (True, False) for b in (1, 2, 16)}


def test_compiling_ahead_runs_a_layer_forward_and_backward_once_and_keeps_no_gradient(tiny_llama, monkeypatch):
    from peft import LoraConfig, get_peft_model

    calls = []
    layer = tiny_llama.model.layers[0]
    monkeypatch.setattr(layer, "forward", lambda *a, _f=layer.forward, **kw: calls.append(a[0].shape) or _f(*a, **kw))
    lora = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    try:
        base = lora.get_base_model()
        compile_for_every_step_size(base, bf16=False, sm_count=20)
        assert [shape[1] for shape in calls] == token_counts(20)
        assert all(p.grad is None for p in lora.parameters())
        compile_for_every_step_size(base, bf16=False, sm_count=20)
        assert len(calls) == len(token_counts(20)), "once per model and precision"
    finally:
        lora.unload()


# ---------------------------------------------------------------- compiled layers (the GPU recipe's)
# On a GPU they compile with Inductor; here with torch.compile's aot_eager backend (the same graphs
# and autograd, run by eager kernels) or a backend that counts the compiles, on a tiny random Llama.


def three_layers() -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2)


def tiny_lora_llama(base=None):
    """A tiny random Llama (or ``base``) with a random LoRA adapter on every linear layer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(base or LlamaForCausalLM(three_layers()),
                          LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))


def packed_step(model, length: int = 24) -> tuple[float, list[torch.Tensor]]:
    """One forward and backward of two packed sequences (positions restart inside each; no cache, as
    ms-swift's trainer asks, so that each row sees only itself); the loss and the LoRA weights' gradients."""
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, 64, (2, length), generator=generator)
    positions = torch.cat([torch.arange(length // 3), torch.arange(length - length // 3)]).expand(2, -1)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_compiled_layers_train_as_the_eager_ones_did_and_are_eager_again_after():
    from finetune.fused_kernels import compiled_layers

    model = tiny_lora_llama().train()
    base = model.get_base_model()
    eager_loss, eager_grads = packed_step(model)
    with compiled_layers(base, backend="aot_eager") as compiled:
        assert compiled and base.config.use_cache is False
        assert [layer._compiled_call_impl is not None for layer in base.model.layers] == [False, True, True]
        loss, grads = packed_step(model)
    assert loss == pytest.approx(eager_loss, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, eager_grads))
    assert [layer._compiled_call_impl for layer in base.model.layers] == [None, None, None]
    assert base.config.use_cache is True
    with compiled_layers(base, enabled=False) as compiled:
        assert not compiled and base.model.layers[1]._compiled_call_impl is None


def test_one_compile_serves_every_training_of_the_serving_weights_whatever_adapters_they_hold(tmp_path):
    """The serving weights' adapters change between trainings: none at the warm-up, a candidate left after
    an evaluation, then a live adapter, then another. The layers compile once for all of them (a compile of
    a 7B layer takes ~75 s on an H200's host: a recompile would land in the middle of a retrain)."""
    from peft import LoraConfig

    from bot.engines.weights import LIVE, AdapterWeights, Candidate
    from finetune.fused_kernels import compiled_layers

    LlamaForCausalLM(three_layers()).save_pretrained(tmp_path / "base")
    for adapter in ("adapter-a", "adapter-b"):
        tiny_lora_llama(LlamaForCausalLM.from_pretrained(tmp_path / "base")).save_pretrained(tmp_path / adapter)
    weights = AdapterWeights(LlamaForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "base"))
    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    def train() -> list[str]:
        weights.lend()
        trained = weights.add_training_adapter(LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
        trained.train()
        with compiled_layers(trained.get_base_model(), backend=counting_backend):
            for length in (24, 32, 40):  # a packed step's length varies
                packed_step(trained, length)
        adapters = list(trained.peft_config)
        weights.take_back()
        return adapters

    torch._dynamo.reset()
    assert train() == ["spare", "training-lora"]  # the warm-up: nothing loaded yet
    weights.use(Candidate(str(tmp_path / "adapter-a")))  # its evaluation
    weights.use(LIVE)
    assert train()[1:] == ["training-lora"]
    weights.follow((1, str(tmp_path / "adapter-a")))
    train()
    weights.follow((2, str(tmp_path / "adapter-b")))
    train()
    assert len(compiles) == 1
