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

from finetune.fused_kernels import fused_kernels, patched


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
