"""The model steps the engine's scheduler drives: prefill new prompts, decode one token for every running reply.

    >>> dec = make_decoder(model, capacity=8, max_len=2048)
    >>> logits = dec.prefill(slots=[0, 1], prompts=[ids0, ids1])  # [2, vocab]: after each prompt's last token
    >>> logits = dec.decode(tokens=[t0, t1], positions=[p0, p1])  # [2, vocab]; row i is slot i

Each reply in flight owns one row ("slot") of a preallocated KV cache; the scheduler keeps the busy
slots packed at 0..n-1 (``move`` fills a hole when a reply ends), so a decode step is one batched
forward over rows 0..n-1 and no cache is copied per step.

``LlamaDecoder`` runs Llama-family models (Llama, SmolLM2, Qwen2/2.5, Mistral) with its own short
forward pass that reads the transformers model's weights in place: peft's merge/unmerge of the live
adapter is seen at the next step, with no copy (an evaluation whose matrix products run in bf16 on an
fp32 CPU engine reads bf16 copies instead, cast again after each merge: ``compute_in``). It skips what
``model.generate`` spends per token (logits processors, cache objects, mask building, logits for every
prompt position), and on CUDA it replays the decode step as CUDA graphs, one per batch-size bucket (a 7B
decode step is ~1,000 small kernels: launching them one by one costs more than running them). Any other architecture gets
``HFDecoder``: transformers' own forward, one reply at a time, correct but slower.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LLAMA_FAMILY = ("llama", "qwen2", "mistral")


def make_decoder(model, *, capacity: int, max_len: int, cuda_graphs: bool = True, kv_budget: int | None = None):
    """The fastest decoder that supports ``model`` (a transformers causal LM, adapters not yet applied).

    kv_budget: bytes the KV cache may take on a CPU, where it grows as replies need it (see LlamaDecoder.fits)."""
    if has_fast_decoder(model.config, max_len):
        return LlamaDecoder(model, capacity=capacity, max_len=max_len, cuda_graphs=cuda_graphs, kv_budget=kv_budget)
    log.info("%s has no fast decoder here: using transformers' forward, one reply at a time", model.config.model_type)
    return HFDecoder(model, capacity=capacity, max_len=max_len)


def kv_bytes_per_position(config, dtype: torch.dtype) -> int:
    """What one cached position of one reply takes: a key and a value per layer and KV head."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize


def has_fast_decoder(config, max_len: int) -> bool:
    """Whether LlamaDecoder runs this model (a Llama-family architecture it reproduces exactly)."""
    plain = (config.model_type in LLAMA_FAMILY and not getattr(config, "use_sliding_window", False)
             and getattr(config, "hidden_act", "silu") == "silu" and not getattr(config, "mlp_bias", False)
             # RoPE tables are computed once for every position: only position-independent scalings
             and (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default") in (
                 "default", "linear", "llama3", "yarn"))
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        plain = plain and config.sliding_window >= max_len
    return plain


class LlamaDecoder:
    """Llama-family forward with a slot KV cache; see the module docstring."""

    def __init__(self, model, *, capacity: int, max_len: int, cuda_graphs: bool = True, kv_budget: int | None = None):
        config = model.config
        inner = model.model
        self.capacity, self.max_len, self.kv_budget = capacity, max_len, kv_budget
        self.device = next(model.parameters()).device
        # padded prompt tokens per prefill forward: bounds its activations
        self.prefill_tokens = 8192 if self.device.type == "cuda" else 512
        self.dtype = inner.embed_tokens.weight.dtype
        self.matmul_dtype = self.dtype  # what the matrix products compute in: see compute_in
        self._copies: dict[int, torch.Tensor] = {}  # weights cast to matmul_dtype when it is not the model's
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self.embed = inner.embed_tokens
        self.final_norm = inner.norm
        self.lm_head = model.lm_head
        # The nn.Linear objects themselves: peft later wraps them (as `base_layer`) but keeps the same
        # objects and merges into their .weight in place, so these references stay valid.
        self.layers = [(layer.input_layernorm, layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.self_attn.o_proj, layer.post_attention_layernorm, layer.mlp.gate_proj, layer.mlp.up_proj,
                        layer.mlp.down_proj) for layer in inner.layers]
        # RoPE tables from the model's own rotary module (so scaled variants match), one row per position.
        with torch.no_grad():
            positions = torch.arange(max_len, device=self.device)[None]
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        # The cache is zeroed (a masked position must hold finite numbers: 0 x NaN is NaN) and, on a CPU,
        # grows in rows and length as replies need it (within kv_budget: see fits); CUDA graphs need it
        # whole and fixed from the start.
        self.graphs = _DecodeGraphs(self) if cuda_graphs and self.device.type == "cuda" else None
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows = self.allocated = 0
        self.bytes_per_position = kv_bytes_per_position(config, self.dtype)
        if self.graphs is not None:
            self._reserve(max_len, capacity)
        else:
            self.trim()
        if self.graphs is not None:
            self.graphs.capture_all()  # ~1 s for a 7B model; otherwise the first replies of each size pay it

    # --- the two steps --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run prompts into cache rows ``slots``; return the logits (float32) after each one's last token.

        They go through in forwards of at most ``prefill_tokens`` padded tokens, in the order given (the
        engine sorts a batch's by system prompt, history and length, so each forward is little padded).
        Prompts that start alike (the same system prompt: an evaluation asks 260 questions under four,
        and 61% of its prompt tokens are such a shared start) have that start computed once, into one
        slot, and copied to the others, in the later forwards too."""
        self._reserve(max(map(len, prompts)), max(slots) + 1)
        logits, done = [], []  # (slot, prompt) of the prompts already in the cache: a start to copy from
        for chunk in _forwards(prompts, self.prefill_tokens):
            chunk_slots, chunk_prompts = [slots[i] for i in chunk], [prompts[i] for i in chunk]
            logits.append(self._prefill_sharing(chunk_slots, chunk_prompts, done))
            done += zip(chunk_slots, chunk_prompts)
        return torch.cat(logits)

    def _prefill_sharing(self, slots: list[int], prompts: list[list[int]], done: list[tuple[int, list[int]]]):
        """One forward's prompts: their common start copied from the prompt of ``done`` that has most of it,
        the rest of that start computed once into the first slot and copied, then each prompt's own rest."""
        shared = shared_prefix_len(prompts)  # one prompt alone: all but its last token
        start = 0
        if done:
            source, have = max(((slot, common_prefix_len(p, prompts[0][:shared])) for slot, p in done),
                               key=lambda found: found[1])
            if have >= MIN_SHARED_PREFIX:
                rows = torch.tensor(slots, device=self.device)
                for cache in (*self.k, *self.v):
                    cache[rows, :, :have] = cache[source, :, :have]
                start = have
        if len(prompts) > 1 and shared - start >= MIN_SHARED_PREFIX:
            self._prefill(slots[:1], [prompts[0][start:shared]], start=start)
            others = torch.tensor(slots[1:], device=self.device)
            for cache in (*self.k, *self.v):
                cache[others, :, start:shared] = cache[slots[0], :, start:shared]
            start = shared
        return self._prefill(slots, [p[start:] for p in prompts], start=start)

    def _prefill(self, slots: list[int], prompts: list[list[int]], start: int) -> torch.Tensor:
        """Prompts (or their rests) at positions ``start``.. of their rows; positions before ``start`` are in
        the cache already. Right-padded to the longest: causal attention keeps a prompt's tokens from seeing
        the padding after them, and the padding's cache entries lie past the prompt's end, where a decode
        step overwrites them before anything reads them."""
        b, n = len(prompts), max(map(len, prompts))
        self._reserve(start + n, max(slots) + 1)
        ids = torch.tensor([p + [0] * (n - len(p)) for p in prompts], device=self.device)
        rows = torch.tensor(slots, device=self.device)
        x = self.embed(ids)  # [b, n, hidden]
        cos, sin = self.cos[start:start + n], self.sin[start:start + n]
        groups = self.n_heads // self.n_kv
        # token i (at position start + i) sees positions 0..start + i
        mask = None if start == 0 else torch.ones(n, start + n, dtype=torch.bool, device=self.device).tril(start)
        for i, (norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, down) in enumerate(self.layers):
            h = _rms_norm(x, norm1.weight, self.eps)
            q = self._linear(h, q_proj).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
            k = self._linear(h, k_proj).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
            v = self._linear(h, v_proj).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            self.k[i][rows, :, start:start + n] = k
            self.v[i][rows, :, start:start + n] = v
            if start:
                k, v = self.k[i][rows, :, :start + n], self.v[i][rows, :, :start + n]
            a = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                               attn_mask=mask, is_causal=mask is None)
            x = x + self._linear(a.transpose(1, 2).reshape(b, n, -1), o_proj)
            h = _rms_norm(x, norm2.weight, self.eps)
            x = x + self._linear(F.silu(self._linear(h, gate)) * self._linear(h, up), down)
        last = x[torch.arange(b, device=self.device), torch.tensor([len(p) - 1 for p in prompts], device=self.device)]
        return self._linear(_rms_norm(last, self.final_norm.weight, self.eps), self.lm_head).float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of rows 0..n-1 (token i sits at position i of slot i); return logits [n, vocab]."""
        n = len(tokens)
        if self.graphs is not None:
            return self.graphs.run(tokens, positions)
        self._reserve(max(positions) + 1, n)
        tokens_t = torch.tensor(tokens, device=self.device)
        positions_t = torch.tensor(positions, device=self.device)
        return self._decode(tokens_t, positions_t, kv_len=max(positions) + 1,
                            spans=attention_spans(positions))[:n].float()

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
                spans: list[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """The decode forward on tensors (what the CUDA graphs capture): rows = len(tokens).

        spans: (first row, end row, cache length) of row groups that each attend over only as much of the
        cache as their longest row needs (see attention_spans); None: every row over ``kv_len``."""
        n = tokens.shape[0]
        rows = torch.arange(n, device=self.device)
        groups = self.n_heads // self.n_kv
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [n, 1, head_dim]
        # row r sees cache positions 0..positions[r]; the rest of its row is stale or unwritten.
        mask = (torch.arange(kv_len, device=self.device)[None] <= positions[:, None])[:, None, None]  # [n,1,1,kv]
        x = self.embed(tokens)  # [n, hidden]
        for i, (norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, down) in enumerate(self.layers):
            h = _rms_norm(x, norm1.weight, self.eps)
            q = _rope(self._linear(h, q_proj).view(n, self.n_heads, self.head_dim), cos, sin)
            k = _rope(self._linear(h, k_proj).view(n, self.n_kv, self.head_dim), cos, sin)
            v = self._linear(h, v_proj).view(n, self.n_kv, self.head_dim)
            self.k[i][rows, :, positions] = k
            self.v[i][rows, :, positions] = v
            # Grouped-query attention without copying K/V: the query heads that share a KV head are
            # laid out as that head's "query positions" (a decode step has one position per row).
            q = q.view(n, self.n_kv, groups, self.head_dim)
            if spans is None:
                a = F.scaled_dot_product_attention(q, self.k[i][:n, :, :kv_len], self.v[i][:n, :, :kv_len],
                                                   attn_mask=mask)
            else:
                a = torch.cat([F.scaled_dot_product_attention(q[r0:r1], self.k[i][r0:r1, :, :length],
                                                              self.v[i][r0:r1, :, :length],
                                                              attn_mask=mask[r0:r1, ..., :length])
                               for r0, r1, length in spans])
            x = x + self._linear(a.reshape(n, -1), o_proj)
            h = _rms_norm(x, norm2.weight, self.eps)
            x = x + self._linear(F.silu(self._linear(h, gate)) * self._linear(h, up), down)
        return self._linear(_rms_norm(x, self.final_norm.weight, self.eps), self.lm_head)

    # --- the precision of the matrix products --------------------------------------------------
    def compute_in(self, dtype: torch.dtype) -> None:
        """Compute the matrix products of the next steps in ``dtype``, as autocast would: their inputs cast to
        it, their outputs back; norms, attention, the residual stream and the cache stay in the model's dtype.
        Call between steps. In another dtype than the model's, the products read copies of the weights, cast
        at the first step after each change of the weights (a bf16 evaluation on a CPU engine serving fp32:
        LocalEngine.eval_precision)."""
        if dtype == self.matmul_dtype:
            return
        if self.graphs is not None:
            raise ValueError("a decoder replaying CUDA graphs computes in the model's dtype only")
        self.matmul_dtype = dtype
        self._copies = {}

    def _linear(self, x: torch.Tensor, module) -> torch.Tensor:
        if self.matmul_dtype == x.dtype:
            return F.linear(x, module.weight, module.bias)
        weight = self._cast(module.weight)
        bias = None if module.bias is None else self._cast(module.bias)
        return F.linear(x.to(self.matmul_dtype), weight, bias).to(x.dtype)

    def _cast(self, weight: torch.Tensor) -> torch.Tensor:
        copy = self._copies.get(id(weight))
        if copy is None:  # a tied weight (SmolLM2's embedding is its lm_head) is cast once
            copy = self._copies[id(weight)] = weight.to(self.matmul_dtype)
        return copy

    # --- cache bookkeeping ----------------------------------------------------------------------
    # On a CPU the cache grows in steps of ROW_STEP rows and LENGTH_STEP positions, so that `fits` knows
    # what a step will allocate and no more is ever taken than the budget.
    ROW_STEP, LENGTH_STEP = 16, 128

    def _grown(self, length: int, rows: int) -> tuple[int, int]:
        """The (length, rows) the cache has after growing to hold ``rows`` replies of ``length`` positions."""
        step_up = lambda n, step, most: min(most, -(-n // step) * step)  # noqa: E731
        return (max(self.allocated, step_up(length, self.LENGTH_STEP, self.max_len)),
                max(self.rows, step_up(rows, self.ROW_STEP, self.capacity)))

    def fits(self, rows: int, length: int) -> bool:
        """Whether ``rows`` replies of up to ``length`` positions each fit the KV budget (always, without one).

        The engine asks before it admits a reply, with each reply's longest possible length (prompt +
        max_new_tokens), so a reply once admitted never needs memory the budget lacks: on a CPU an
        evaluation decodes 256 short answers together, and a few long chats at once take the same bytes."""
        if self.kv_budget is None:
            return True
        length, rows = self._grown(min(length, self.max_len), rows)
        return rows * length * self.bytes_per_position <= self.kv_budget

    def reserve(self, rows: int, length: int) -> None:
        """Make room at once for ``rows`` replies of up to ``length`` positions (what the engine just admitted,
        within ``fits``): growing as they prefill and decode instead copied the whole cache 17 times in a
        260-answer evaluation, 5-6 s of its ~48 on a CPU."""
        self._reserve(min(length, self.max_len), rows)

    def trim(self) -> bool:
        """Give back what the cache grew to (nothing is running): a CPU starts again at 16 rows x 128.
        Returns whether there was anything to give back."""
        first = (min(self.max_len, self.LENGTH_STEP), min(self.capacity, self.ROW_STEP))
        if self.graphs is None and (self.allocated, self.rows) != first:
            self.k, self.v, self.rows, self.allocated = [], [], 0, 0
            self._reserve(*first)
            return True
        return False

    def _reserve(self, length: int, rows: int) -> None:
        """Make the cache hold at least ``rows`` slots of ``length`` positions (growing in steps, see above)."""
        if length > self.max_len:
            raise ValueError(f"a reply needs {length} positions; the cache holds {self.max_len}")
        if rows > self.capacity:
            raise ValueError(f"{rows} replies at once; the cache holds {self.capacity}")
        if length <= self.allocated and rows <= self.rows:
            return
        new_length, new_rows = self._grown(length, rows)
        shape = (new_rows, self.n_kv, new_length, self.head_dim)
        for cache in (self.k, self.v):
            for i in range(len(self.layers)):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if cache[i:]:
                    grown[:self.rows, :, :self.allocated] = cache[i]
                    cache[i] = grown
                else:
                    cache.append(grown)
        self.allocated, self.rows = new_length, new_rows

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a reply's cache row (its first ``length`` positions) from slot src to slot dst."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def release(self, slot: int) -> None:
        """Slot no longer used (nothing to free: rows are preallocated)."""

    def weights_changed(self) -> None:
        """Called after the weights changed (merge/unmerge): copies in another dtype are cast again, and
        CUDA graphs re-check their pointers."""
        self._copies = {}
        if self.graphs is not None:
            self.graphs.check_weights()


# Rows per attention call in a CPU decode step (see attention_spans); None: one call for all rows.
ATTENTION_ROWS: int | None = 16


def attention_spans(positions: list[int]) -> list[tuple[int, int, int]] | None:
    """Rows 0..n-1 cut into runs of ATTENTION_ROWS, each with the cache length its longest row attends to.

    A decode step's attention reads every row's cache up to the longest row's position: in an evaluation
    (260 answers, 256 at once) that is three times the positions the rows have, and on a CPU reading them
    is what attention costs. Runs of 16 consecutive rows (neighbours were admitted together, so their
    prompts are alike) read 0.54 of it, for 8 calls a layer instead of one."""
    if ATTENTION_ROWS is None or len(positions) <= ATTENTION_ROWS:
        return None
    return [(r0, min(r0 + ATTENTION_ROWS, len(positions)), max(positions[r0:r0 + ATTENTION_ROWS]) + 1)
            for r0 in range(0, len(positions), ATTENTION_ROWS)]


# A shared start shorter than this is computed with the rest: copying cache rows costs more than it saves.
MIN_SHARED_PREFIX = 8


def shared_prefix_len(prompts: list[list[int]]) -> int:
    """How many first tokens all prompts share, leaving each at least its last token (whose logits are wanted)."""
    shared = min(map(len, prompts)) - 1
    for p in prompts[1:]:
        shared = common_prefix_len(prompts[0][:shared], p)
    return max(shared, 0)


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _forwards(prompts: list[list[int]], most_tokens: int) -> list[list[int]]:
    """The prompts' positions cut into consecutive runs of at most ``most_tokens`` padded tokens (one at least).

    A run also ends where the next prompt would cut its shared start short (another system prompt or
    history follows), and a prompt that starts like the one after it, not like the run, begins a new run."""
    runs: list[list[int]] = []
    longest = shared = 0  # the run's longest prompt and the start all its prompts share (0 for a run of one)
    for i, p in enumerate(prompts):
        if runs:
            first, size = prompts[runs[-1][0]], len(runs[-1])
            common = common_prefix_len(first, p)
            if shared >= MIN_SHARED_PREFIX:
                alike = common + MIN_SHARED_PREFIX > shared
            else:
                alike = (common >= MIN_SHARED_PREFIX or i + 1 == len(prompts)
                         or common_prefix_len(p, prompts[i + 1]) < MIN_SHARED_PREFIX)
            if alike and max(longest, len(p)) * (size + 1) <= most_tokens:
                runs[-1].append(i)
                longest = max(longest, len(p))
                shared = min(common, len(p) - 1, len(first) - 1 if size == 1 else shared)
                continue
        runs.append([i])
        longest, shared = len(p), 0
    return runs


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # as transformers' LlamaRMSNorm: in float32, then back
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _DecodeGraphs:
    """CUDA graphs of LlamaDecoder._decode, one per batch size bucket (1, 2, 4, ... capacity).

    Rows past the real batch are padding: they decode token 0 at position 0 of their own (free) slot,
    which a later prefill overwrites. Attention spans the whole cache length (a graph has fixed shapes);
    masked positions add nothing. All are captured when the decoder starts, and again if the weights move in memory.
    """

    def __init__(self, decoder: LlamaDecoder):
        self.decoder = decoder
        self.buckets = sorted({min(2 ** i, decoder.capacity) for i in range(decoder.capacity.bit_length() + 1)})
        self.graphs: dict[int, tuple] = {}  # bucket -> (graph, tokens, positions, logits)
        self.pool = None
        self.weight_ptrs = self._weight_ptrs()

    def _weight_ptrs(self) -> list[int]:
        d = self.decoder
        mods = [m for layer in d.layers for m in layer] + [d.embed, d.final_norm, d.lm_head]
        return [m.weight.data_ptr() for m in mods]

    def check_weights(self) -> None:
        # Graphs hold raw addresses: if a weight was replaced instead of updated in place, recapture.
        ptrs = self._weight_ptrs()
        if ptrs != self.weight_ptrs:
            log.info("weights moved in memory: recapturing the decode CUDA graphs")
            self.graphs.clear()
            self.pool = None
            self.weight_ptrs = ptrs
            self.capture_all()

    def capture_all(self) -> None:
        for bucket in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            if bucket not in self.graphs:
                self.graphs[bucket] = self._capture(bucket)

    def run(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        n = len(tokens)
        bucket = next(b for b in self.buckets if b >= n)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, tokens_t, positions_t, logits = self.graphs[bucket]
        pad = bucket - n
        tokens_t.copy_(torch.tensor(tokens + [0] * pad), non_blocking=True)
        positions_t.copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        graph.replay()
        return logits[:n].float()

    def _capture(self, bucket: int) -> tuple:
        d = self.decoder
        tokens = torch.zeros(bucket, dtype=torch.long, device=d.device)
        positions = torch.zeros(bucket, dtype=torch.long, device=d.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and allocator outside the graph
                d._decode(tokens, positions, d.max_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            logits = d._decode(tokens, positions, d.max_len)
        self.pool = graph.pool()
        return graph, tokens, positions, logits


class HFDecoder:
    """Any transformers causal LM: its own forward and DynamicCache, one reply per forward."""

    def __init__(self, model, *, capacity: int, max_len: int):
        self.model, self.capacity, self.max_len = model, capacity, max_len
        self.prefill_tokens = 0  # one prompt per forward anyway
        self.device = next(model.parameters()).device
        self.matmul_dtype = next(model.parameters()).dtype
        self.caches: dict[int, object] = {}

    @torch.inference_mode()
    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        from transformers import DynamicCache

        rows = []
        for slot, ids in zip(slots, prompts):
            cache = DynamicCache(config=self.model.config)
            out = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            self.caches[slot] = cache
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        rows = []
        for slot, (token, position) in enumerate(zip(tokens, positions)):
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=self.caches[slot],
                             use_cache=True, position_ids=torch.tensor([[position]], device=self.device),
                             cache_position=torch.tensor([position], device=self.device))
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    def reserve(self, rows: int, length: int) -> None:
        pass  # a cache per reply, made at its prefill

    def fits(self, rows: int, length: int) -> bool:
        return True  # a cache per reply, as long as the reply: capacity bounds the memory (see the engine)

    def trim(self) -> bool:
        return False

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches[dst] = self.caches.pop(src)

    def release(self, slot: int) -> None:
        self.caches.pop(slot, None)

    def compute_in(self, dtype: torch.dtype) -> None:
        if dtype != self.matmul_dtype:
            raise ValueError("transformers' forward computes in the model's dtype only")

    def weights_changed(self) -> None:
        pass
