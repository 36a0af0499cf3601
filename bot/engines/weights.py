"""The adapter weights of one loaded model: what its base weights compute now, and changing that.

    >>> weights = AdapterWeights(model, base_path, on_change=decoder.weights_changed)
    >>> weights.follow((3, "data/adapters/v3"))      # the store's active adapter: v3 is now LIVE
    >>> weights.use(BASE)                             # the bare base (evaluation's reference answers)
    >>> weights.use(Candidate("data/runs/7/adapter"))  # an adapter not yet live (evaluation)
    >>> weights.use(LIVE)                             # back to v3, exactly

The weights can compute LIVE (the live adapter, or the bare base when none is live), BASE, or a
Candidate folder. For speed, the LoRA in use is merged into the base weights (its delta added in place),
so the decoder runs the plain model; changing what is in use is unmerge, switch, merge.

Invariants, true between calls (only the engine's worker thread calls in, between decode steps):

1. ``serving`` is what a forward pass computes now: LIVE, BASE or a Candidate.
2. ``live`` is the (version, path) the store last made active and that loaded, or None for the bare
   base; it is loaded in peft under a name of its own (``v<version>-<n>``: another data directory, or a
   store started afresh, can call other weights "v1"). A folder that would not load is ``failed`` and not retried
   until the store names another one; ``error`` says why and what serves instead.
3. peft holds the live adapter and at most one Candidate, the last one used (dropped when LIVE comes back);
   with nothing live and no Candidate it keeps one adapter, switched off (peft cannot hold zero).
4. ``merged`` is True exactly when the active peft adapter's delta is in the base weights, which is when
   serving is a Candidate, or LIVE with a live adapter (unless merge=False: peft's slower unmerged forward).
5. Every call reaches its goal, or raises with the weights as they were: a bad folder never breaks serving.
6. BASE is LIVE when nothing is live: asking for it changes nothing.
7. Unmerging half-precision weights copies back the weights as loaded (kept in host memory), so any
   number of swaps leaves them bit for bit as they were (W + delta - delta rounds in bf16).

A trainer in this process can borrow the weights (``lend`` -> ``add_training_adapter`` -> ``take_back``,
on the engine's worker thread while nothing decodes): nothing merged, a fresh trainable adapter the only
one on, and afterwards that adapter gone and LIVE merged again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bot.engines import AdapterRef
from bot.engines.adapter_folder import check_adapter_folder

log = logging.getLogger(__name__)

LIVE = AdapterRef.ACTIVE
BASE = AdapterRef.BASE


@dataclass(frozen=True)
class Candidate:
    """An adapter folder asked for by name (evaluation), not the live one."""

    path: str


Weights = str | Candidate  # LIVE, BASE or a Candidate


def weights_for(adapter) -> Weights:
    """What ``generate(adapter=...)`` asks for: AdapterRef.ACTIVE, AdapterRef.BASE or a folder."""
    return adapter if adapter in (LIVE, BASE) else Candidate(str(adapter))


class AdapterWeights:
    """The LoRA state of one loaded model; see the module docstring for what always holds."""

    def __init__(self, model, base_path: str, *, merge: bool = True, on_change: Callable[[], None] = lambda: None):
        self.model = model  # the transformers model; peft wraps it once the first adapter loads
        self.base_path = base_path  # its folder: adapters are checked against its shapes before loading
        self.merge = merge
        self.on_change = on_change  # told after the weights changed (CUDA graphs re-check their pointers)
        self.serving: Weights = LIVE
        self.live: tuple[int, str] | None = None
        self.failed: tuple[int, str] | None = None
        self.error: str | None = None
        self._peft = None
        self._merged = False
        self._live_adapter: str | None = None  # the live adapter's name in peft
        self._loads = 0  # every load gets a fresh name: peft cannot reload under a used one
        self._training: str | None = None  # the adapter a trainer is training, while the weights are lent
        # Half-precision weights are unmerged by copying back what was loaded (see _unmerge): host memory
        # for the LoRA layers' base weights (15 GB for a 7B model) buys weights that never drift.
        self._exact_unmerge = getattr(model, "dtype", None) in (torch.bfloat16, torch.float16)
        self._pristine: dict[str, torch.Tensor] = {}

    def computes(self, wanted: Weights) -> bool:
        """Do the weights in place answer as ``wanted`` would?"""
        return self._resolve(wanted) == self.serving

    def use(self, wanted: Weights) -> None:
        """Put ``wanted`` in place (between groups of requests: running replies would see the change)."""
        wanted = self._resolve(wanted)
        if wanted == self.serving:
            return
        name = None
        if isinstance(wanted, Candidate):
            name = self._load("candidate", wanted.path)
        self._unmerge()
        if wanted == LIVE:
            self._switch_to_live()
        elif wanted == BASE:
            self._peft.base_model.disable_adapter_layers()
        else:
            self._peft.base_model.enable_adapter_layers()
            self._peft.set_adapter(name)
            self._drop_adapters_except(name, *self._live_name())
            self._merge()
        self.serving = wanted
        self.on_change()

    def follow(self, wanted: tuple[int, str] | None) -> None:
        """Make the store's active adapter (version, path), or None, the live one. Call with LIVE in place:
        replies running now go on with the new weights."""
        if wanted is not None and wanted == self.failed:
            return  # it would fail again; error still says so
        if wanted == self.live:
            self.failed, self.error = None, None  # e.g. rolled back to what serves
            return
        started = time.perf_counter()
        try:
            name = self._load(f"v{wanted[0]}", wanted[1]) if wanted is not None else None
        except Exception as e:
            self.failed = wanted
            serving = f"v{self.live[0]}" if self.live else "the base model"
            self.error = f"adapter v{wanted[0]} at {wanted[1]} could not be loaded ({e}); still serving {serving}"
            log.error(self.error)
            return
        self._unmerge()
        self.live, self.failed, self.error = wanted, None, None
        self._live_adapter = name
        self._switch_to_live()
        self.serving = LIVE
        self.on_change()
        log.info("now serving %s (swap took %.2f s)", f"adapter v{wanted[0]}" if wanted else "the base model",
                 time.perf_counter() - started)

    # --- lent to a trainer in this process (LocalEngine.pause_for_training) -----------------------------
    def lend(self) -> None:
        """Before a trainer takes these weights: nothing merged, every adapter switched off (the bare base)."""
        self._unmerge()
        if self._peft is not None:
            self._peft.base_model.disable_adapter_layers()
        self._training = None

    def add_training_adapter(self, config, in_base_dtype: bool = False):
        """A fresh adapter, the only one switched on and trainable; returns the peft model to train.

        in_base_dtype: its weights in the base's dtype; else in fp32 (peft's default)."""
        from peft import get_peft_model

        # One name, and always the second of two adapters: compiled training layers (finetune/fused_kernels.py)
        # guard on the adapter's name and on its place among the layer's adapters, and either changing
        # compiled them again. Once peft wraps the model it holds the live adapter, or the last one used
        # (peft keeps one), when a training begins; before that, a spare one takes that place.
        name = "training-lora"
        if self._peft is None:
            device = getattr(self.model, "device", torch.device("cpu"))
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the seed is the trainer's
                self._peft = get_peft_model(self.model, config, adapter_name="spare",
                                            autocast_adapter_dtype=not in_base_dtype)
        self._peft.add_adapter(name, config, autocast_adapter_dtype=not in_base_dtype)
        self._peft.base_model.enable_adapter_layers()
        self._peft.set_adapter(name)  # also makes it the only trainable one
        self._training = name
        return self._peft

    def take_back(self) -> None:
        """After training: the training adapter gone, nothing trainable, LIVE in place (merged) again."""
        if self._peft is not None:
            self._peft.eval()
            for parameter in self._peft.parameters():
                parameter.requires_grad_(False)
            if self._training and len(self._peft.peft_config) > 1:
                self._peft.delete_adapter(self._training)
        self._training = None
        self._switch_to_live()
        self.serving = LIVE
        self.on_change()

    # --- peft, and its quirks -------------------------------------------------------------------------
    def _resolve(self, wanted: Weights) -> Weights:
        return LIVE if wanted == BASE and self.live is None else wanted

    def _live_name(self) -> list[str]:
        return [self._live_adapter] if self.live else []

    def _switch_to_live(self) -> None:
        """Unmerged weights -> the live adapter merged, or the bare base."""
        if self._peft is None:
            return  # no adapter was ever loaded: the base weights are untouched
        if self.live is not None:
            self._peft.base_model.enable_adapter_layers()
            self._peft.set_adapter(self._live_name()[0])
            self._drop_adapters_except(*self._live_name())
            self._merge()
        else:
            # peft cannot hold zero adapters: the last one used stays loaded, switched off.
            self._drop_adapters_except(self._peft.active_adapter)
            self._peft.base_model.disable_adapter_layers()

    def _load(self, label: str, path: str) -> str:
        """Load an adapter under a fresh name made from ``label``; returns the name."""
        check_adapter_folder(path, self.base_path)
        self._loads += 1
        name = f"{label}-{self._loads}"  # a clear error before peft touches the model
        # peft unmerges silently when it injects an adapter into a merged model: unmerge first, and put
        # the merged weights back if loading fails.
        was_merged = self._merged
        self._unmerge()
        try:
            self._load_unmerged(name, path)
        except Exception:
            if was_merged:
                self._merge()
            raise
        return name

    def _load_unmerged(self, name: str, path: str) -> None:
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
            self._peft.eval()
            self._peft.base_model.disable_adapter_layers()  # nothing changes until it is switched on
        else:
            try:
                self._peft.load_adapter(path, adapter_name=name, is_trainable=False)
            except Exception:
                # a half-loaded adapter stays registered; peft cannot delete its only adapter
                if name in self._peft.peft_config and len(self._peft.peft_config) > 1:
                    self._peft.delete_adapter(name)
                raise

    def _drop_adapters_except(self, *keep: str) -> None:
        for name in list(self._peft.peft_config):
            if name not in keep:
                self._peft.delete_adapter(name)

    def _merge(self) -> None:
        if self.merge and not self._merged:
            if self._exact_unmerge:
                self._keep_pristine()
            self._peft.merge_adapter()
            self._merged = True

    def _unmerge(self) -> None:
        if not self._merged:
            return
        if self._exact_unmerge:
            # In bf16, W + delta - delta is not W: each swap moved weights by a rounding step, and after five
            # candidates a greedy answer of the base had changed. The weights as loaded are copied back instead.
            for name, layer in self._lora_layers():
                layer.get_base_layer().weight.data.copy_(self._pristine[name], non_blocking=True)
                layer.merged_adapters.clear()
        else:
            self._peft.unmerge_adapter()
        self._merged = False

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [(name, module) for name, module in self._peft.named_modules() if isinstance(module, LoraLayer)]

    def _keep_pristine(self) -> None:
        """Copy (to host memory) the base weights of every LoRA layer not copied yet; unmerged, they are as loaded."""
        for name, layer in self._lora_layers():
            if name not in self._pristine:
                weight = layer.get_base_layer().weight.detach()
                copy = torch.empty(weight.shape, dtype=weight.dtype, device="cpu",
                                   pin_memory=weight.is_cuda)  # pinned: the copy back is a fast DMA
                self._pristine[name] = copy.copy_(weight)
