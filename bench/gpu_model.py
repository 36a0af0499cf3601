"""A Qwen2.5-7B-shaped model with random weights, for the GPU benchmarks (nothing downloads on the GPU machine).

    python -m bench.gpu_model .cache/bench-qwen7b      # ~25 s on one H100; skipped if already there

bf16, saved with two random LoRA adapters (adapters/v1, v2) and SmolLM2's chatml tokenizer (carried in .whl/tokenizer/, copied there by
``python -m bench.gpu_model --copy-tokenizer``). The tokenizer knows 49,152 ids and the model 152,064:
the rows of ``lm_head`` past the tokenizer's vocabulary are zeroed so that random weights only ever
pick ids the tokenizer can print (the matrix keeps its full size, and its full cost).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / ".whl" / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
QWEN7B_SHAPE = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, tie_word_embeddings=False)


def build(folder: str | Path, tokenizer_dir: Path = TOKENIZER_DIR) -> Path:
    """Build and save the model once; return the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from bench.common import make_lora_adapter

    folder = Path(folder)
    if (folder / ".done").exists():
        return folder
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(**QWEN7B_SHAPE, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer):] = 0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for version in (1, 2):  # two LoRA adapters like the GPU recipe's (r=16, every linear layer)
        make_lora_adapter(model, folder / "adapters" / f"v{version}", seed=version, rank=16)
    (folder / ".done").write_text("ok\n")
    print(f"built {folder} in {time.perf_counter() - started:.1f} s", flush=True)
    del model
    torch.cuda.empty_cache()
    return folder


def copy_tokenizer(model_folder: Path) -> None:
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (model_folder / name).exists():
            shutil.copy(model_folder / name, TOKENIZER_DIR / name)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--copy-tokenizer"]:
        from bot.models import resolve_model

        copy_tokenizer(Path(resolve_model("embedded", REPO / ".cache").path))
    else:
        build(sys.argv[1] if len(sys.argv) > 1 else REPO / ".cache" / "bench-qwen7b")
