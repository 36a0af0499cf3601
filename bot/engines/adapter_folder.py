"""Is this folder a LoRA adapter for this base model? Answered from file headers, before anything loads it.

    >>> check_adapter_folder("data/adapters/v3", model)  # model: a ResolvedModel, the base's folder, or None
    >>> check_adapter_folder("/tmp/empty", model)
    AdapterFolderError: /tmp/empty has no adapter_config.json: it is not a LoRA adapter folder

peft (and ms-swift, which uses it) saves a LoRA as ``adapter_config.json`` (``peft_type`` "LORA", ``r``,
``target_modules``) and ``adapter_model.safetensors``, whose tensors are named after the base model's
modules: ``base_model.model.<module>.lora_A.weight`` is [r, in] and ``...lora_B.weight`` is [out, r]
(an embedding's ``lora_embedding_A`` is [r, rows], ``lora_embedding_B`` [columns, r]). The base's own
safetensors headers give each module's weight shape, [out, in], so a LoRA made for another model is
found without reading a single tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bot.errors import UserError
from bot.models import ResolvedModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


class AdapterFolderError(UserError):
    """The folder is not a LoRA adapter this base model can load; the message says why, in one line."""


def check_adapter_folder(path: str | Path, model: ResolvedModel | str | Path | None = None) -> None:
    """Raise AdapterFolderError unless ``path`` holds a LoRA that fits ``model`` (None: check the folder alone)."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFolderError(f"adapter folder {folder} does not exist")
    config = _lora_config(folder)
    lora = _lora_shapes(folder, config)
    if model is None:
        return
    base = Path(model.path if isinstance(model, ResolvedModel) else model)
    base_shapes = _base_weight_shapes(base)
    if base_shapes is None:
        return  # no safetensors in the base folder (.bin only): peft checks the shapes when it loads
    name = model.name if isinstance(model, ResolvedModel) else base.name
    _check_targets(folder, config["target_modules"], base_shapes, name)
    for module, parts in lora.items():
        _check_fit(folder, module, parts, base_shapes.get(module), name)


def _lora_config(folder: Path) -> dict:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise AdapterFolderError(f"{folder} has no {CONFIG_FILE}: it is not a LoRA adapter folder")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise AdapterFolderError(f"{file} is not valid JSON") from None
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if kind != "LORA":
        found = f"peft_type is {kind!r}" if kind else "it has no peft_type"
        raise AdapterFolderError(f"{file} is not a LoRA config ({found}; a LoRA's is 'LORA')")
    rank, targets = config.get("r"), config.get("target_modules")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterFolderError(f"{file} has no valid rank r (found {rank!r})")
    if not targets or not (isinstance(targets, str) or all(isinstance(t, str) for t in targets)):
        raise AdapterFolderError(f"{file} names no target_modules")
    return config


def _lora_shapes(folder: Path, config: dict) -> dict[str, dict[str, list[int]]]:
    """{module: {"lora_A": shape, "lora_B": shape}} from the weights file, rank checked against the config."""
    shapes = _header_shapes(folder / WEIGHTS_FILE, missing=f"{folder} has no {WEIGHTS_FILE} (the adapter weights)")
    lora: dict[str, dict[str, list[int]]] = {}
    for key, shape in shapes.items():
        parts = key.removeprefix("base_model.model.").split(".")
        at = next((i for i, part in enumerate(parts) if part in LORA_PARTS), None)
        if at is None or parts[-1] == "bias":
            continue  # not a LoRA matrix (a LoRA bias, or modules_to_save): peft checks those itself
        lora.setdefault(".".join(parts[:at]), {})[parts[at]] = shape
    if not lora:
        raise AdapterFolderError(f"{folder / WEIGHTS_FILE} holds no LoRA weights (no lora_A / lora_B tensors)")
    for module, parts in lora.items():
        if sorted(parts) not in (["lora_A", "lora_B"], ["lora_embedding_A", "lora_embedding_B"]) or any(
                len(shape) != 2 for shape in parts.values()):
            raise AdapterFolderError(f"{folder / WEIGHTS_FILE}: {module} needs one 2-D lora_A and one 2-D lora_B")
        a, b = _a_and_b(parts)
        expected = _configured_rank(module, config)
        if b[1] != a[0] or (expected is not None and a[0] != expected):
            raise AdapterFolderError(
                f"{folder / WEIGHTS_FILE}: {module} has lora_A {a} and lora_B {b}, "
                f"which do not fit rank r={expected if expected is not None else a[0]} from {CONFIG_FILE}")
    return lora


def _a_and_b(parts: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    return (parts["lora_A"], parts["lora_B"]) if "lora_A" in parts else (parts["lora_embedding_A"],
                                                                         parts["lora_embedding_B"])


def _configured_rank(module: str, config: dict) -> int | None:
    """The rank adapter_config.json gives this module: its rank_pattern entry, else r."""
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        try:
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                return rank
        except re.error:
            return None  # a pattern we cannot read: only check lora_A against lora_B
    return config["r"]


def _base_weight_shapes(base: Path) -> dict[str, list[int]] | None:
    """{module path: weight shape} of the base model, from its safetensors headers (None if it has none)."""
    files = sorted(base.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for file in files:
        for key, shape in _header_shapes(file, missing=f"{file} is missing").items():
            if key.endswith(".weight"):
                shapes[key.removesuffix(".weight")] = shape
    if "lm_head" not in shapes and "model.embed_tokens" in shapes:
        shapes["lm_head"] = shapes["model.embed_tokens"]  # tied embeddings: one matrix saved for both
    return shapes


def _header_shapes(file: Path, *, missing: str) -> dict[str, list[int]]:
    if not file.is_file():
        raise AdapterFolderError(missing)
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:  # reads the header only: no tensor, no torch
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise AdapterFolderError(f"{file} is corrupt ({e})") from None


def _check_targets(folder: Path, targets: str | list[str], base_shapes: dict, model_name: str) -> None:
    """Every target module must name modules of the base (peft matches a name on the path's last parts)."""
    modules = list(base_shapes)
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, m) for m in modules):
            return
        missing = [targets]
    else:
        missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if missing:
        raise AdapterFolderError(f"{folder / CONFIG_FILE} targets {', '.join(missing)}, "
                                 f"which {model_name} does not have: this adapter is for another model")


def _check_fit(folder: Path, module: str, parts: dict[str, list[int]], base: list[int] | None, model_name: str):
    if base is None or len(base) != 2:
        raise AdapterFolderError(f"{folder} has LoRA weights for {module}, which {model_name} does not have: "
                                 "this adapter is for another model")
    a, b = _a_and_b(parts)
    # a Linear's weight is [out, in]; an Embedding's is [rows, columns], and its LoRA maps rows -> columns
    inputs, outputs = (base[1], base[0]) if "lora_A" in parts else (base[0], base[1])
    if a[1] != inputs or b[0] != outputs:
        raise AdapterFolderError(
            f"{folder} was made for another model: its {module} LoRA is lora_A {a} x lora_B {b} "
            f"(in {a[1]}, out {b[0]}), but {model_name}'s {module} is {inputs} in, {outputs} out")
