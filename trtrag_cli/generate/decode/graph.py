"""Our own generation loop for Llama-family models: fused weights, a static K/V cache, CUDA-graph decode.

Why: on an H200 with the Llama-2-13B shape, transformers' `generate` with its static cache decoded
99.6 tok/s at batch 1, and a CUDA graph of its own forward 87.3, where reading the weights once per
token allows about 185. The gap is many small kernels and the per-token host work of `generate`.
Here a decode step is
  - one matmul for Q, K and V together and one for gate and up (the module weights become views into
    the fused tensors, so no memory is doubled);
  - K and V written in place into a cache of [batch, kv heads, length, head dim] per layer; every row
    keeps its own position, so prompts of different lengths share a batch without padding;
  - sampling on the device (greedy, or temperature, top-k and top-p with Gumbel noise), so the step
    never waits on the host;
  - captured once per batch size and cache length in a CUDA graph and replayed; the host checks for
    end of sequence and stop strings every few tokens.
The prompt (prefill) runs outside graphs: its matmuls are large, and attention uses SDPA's causal kernels.
With `compile`, each layer function is compiled once for all layers (RMSNorm, RoPE and SiLU x up become
single kernels): on the H200 that took TTFT(1024) from 56 to 44 ms and batch-1 decode from 97 to 128
tok/s. With `kernels` (and triton, which torch's CUDA wheels bring), a one-row step runs through
decode_kernels instead: five Triton kernels a layer, norms and RoPE folded in, the residual stream in
float32, attention reading only the positions so far, and for greedy decoding no other kernels (the token's
embedding and the argmax are read and taken inside them): 150-155 tok/s on H200 cards, 110 on an H100
(docs/benchmarks.md, "Generation: Llama-2-13B shape"). Batches of two or more rows use the torch layer
functions. On the CPU the same code runs without graphs; tests compare it with transformers token for token.

Requests come and go through decode/scheduler.py (continuous batching): one thread owns the cache, active
requests sit in rows [0, n), sampling settings are per row (temperature, top-k, top-p and seed tensors), and
the sampling noise is a hash of (seed, position, token), so a request samples the same tokens whatever
else shares its steps.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.gpu import graph_capture

MODEL_TYPES = ("llama", "mistral", "qwen2")
LENGTH_STEP = 256          # cache lengths are rounded up to this, so a few graphs serve every request
_HASH_MASK = 0xFFFFFFFF


def _rounded(length: int) -> int:
    """length rounded up to a multiple of LENGTH_STEP."""
    return -(-length // LENGTH_STEP) * LENGTH_STEP


def gumbel_noise(torch, seeds, positions, vocab: int):
    """Gumbel noise [rows, vocab] from a hash of (seed, position, token id): no generator state, so it is the
    same inside a CUDA graph, in any batch and in any order of requests. Every product stays below 2**63."""
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.long)
    h = ((seeds * 0x27D4EB2F + positions * 0x165667B1) & _HASH_MASK)[:, None] ^ ((ids * 0x61C88647) & _HASH_MASK)
    for shift, factor in ((16, 0x7FEB352D), (15, 0x2C1B3C6D), (12, 0x297A2D39)):
        h = ((h ^ (h >> shift)) * factor) & _HASH_MASK
    h = h ^ (h >> 15)
    uniform = ((h >> 8).float() + 0.5) / float(1 << 24)     # in (0, 1), exact in float32
    return -torch.log(-torch.log(uniform))


def supports(model) -> str | None:
    """None when the decoder can run `model`, else why not (the caller falls back to `generate`)."""
    cfg = model.config
    if cfg.model_type not in MODEL_TYPES:
        return f"model type {cfg.model_type} (the fast decoder knows {', '.join(MODEL_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) \
            and cfg.sliding_window < cfg.max_position_embeddings:
        return "sliding-window attention"
    layer = model.model.layers[0]
    if any(getattr(m, "bias", None) is not None for m in (layer.self_attn.o_proj, layer.mlp.down_proj)):
        return "output projection biases"
    return None


@dataclass
class _Layer:
    in_norm: object
    qkv: object
    qkv_bias: object
    o: object
    post_norm: object
    gate_up: object
    down: object


def _fuse(torch, modules: list, name: str = "weight"):
    """Concatenate the modules' weights (or biases) along dim 0 and make each module's a view of it."""
    tensors = [getattr(m, name) for m in modules]
    if any(t is None for t in tensors):
        return None
    fused = torch.cat([t.detach() for t in tensors], 0)
    start = 0
    for module, tensor in zip(modules, tensors):
        setattr(module, name, torch.nn.Parameter(fused[start:start + tensor.shape[0]], requires_grad=False))
        start += tensor.shape[0]
    return fused


def _decode_kernels(decoder):
    """decode_kernels when the decoder can use them (a CUDA GPU, triton, contiguous weights), else None."""
    if decoder.device.type != "cuda" or decoder.head_dim & (decoder.head_dim - 1):
        return None
    try:
        from trtrag_cli.generate.decode import kernels as decode_kernels
    except ImportError:   # torch without triton: the torch layer functions run the step
        return None
    matrices = [m for layer in decoder.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    if not all(m.is_contiguous() for m in matrices + [decoder.head]):
        return None
    return decode_kernels


class GraphDecoder:
    """Prefill and decode for a loaded Llama-family `...ForCausalLM`, sharing its weights."""

    def __init__(self, model, graphs: bool | None = None, compile: bool = False, kernels: bool = True,
                 deterministic: bool = False):
        torch = deps.require("torch", "the fast decoder")
        reason = supports(model)
        if reason:
            raise TrtragError(f"the fast decoder cannot run this model: {reason}",
                              "set answer.generator.decode: transformers")
        self.torch = torch
        self.model = model
        cfg = model.config
        base = model.model
        self.device = base.embed_tokens.weight.device
        self.dtype = base.embed_tokens.weight.dtype
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        attn = base.layers[0].self_attn
        self.scale = float(getattr(attn, "scaling", 1.0 / math.sqrt(self.head_dim)))
        self.eps = float(base.norm.variance_epsilon)
        self.context = int(cfg.max_position_embeddings)
        with torch.no_grad():
            self.layers = [_Layer(
                in_norm=layer.input_layernorm.weight,
                qkv=_fuse(torch, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                qkv_bias=_fuse(torch, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                               "bias"),
                o=layer.self_attn.o_proj.weight,
                post_norm=layer.post_attention_layernorm.weight,
                gate_up=_fuse(torch, [layer.mlp.gate_proj, layer.mlp.up_proj]),
                down=layer.mlp.down_proj.weight) for layer in base.layers]
        self.embed = base.embed_tokens.weight
        self.final_norm = base.norm.weight
        self.head = model.lm_head.weight
        self._rope = None        # cos, sin: [context, head_dim], the model's own rotary embedding
        self._cache = None       # per layer (k, v): [batch, kv heads, length, head dim]
        self._graphs: dict = {}  # (batch, attention span, greedy) -> captured CUDA graph
        self.tokens = self.positions = self._counts = self._scratch = None
        # per row sampling settings: temperature (0 greedy), index of the top-k-th value (vocab - 1: off),
        # top-p (1.0: off), seed of the row's noise
        self.temperature = self.top_k_index = self.top_p = self.seeds = None
        self.scheduler = None    # decode/scheduler.Scheduler, made on first use: it owns the cache from then on
        self._scheduler_lock = threading.Lock()
        self.max_batch = 16
        self._prefill, self._decode = self._prefill_layer, self._decode_layer
        if compile:  # fuses RMSNorm, RoPE and SiLU x up into single kernels; one compilation serves every layer
            self._prefill = torch.compile(self._prefill_layer, fullgraph=True)
            self._decode = torch.compile(self._decode_layer, fullgraph=True)
        self.compiled = compile
        self.kernels = _decode_kernels(self) if kernels else None
        # the one-row step's matrices per layer (qkv, o, gate_up, down), then the head: the weights themselves,
        # or with pack_weights their decode_kernels.Packed copies
        self.step_matrices = self._step_matrices()
        self.packed_note = ""    # why pack_weights packed nothing
        self.fused_greedy = True   # greedy one-row steps take their token in the head kernel (False: argmax after)
        self.deterministic = deterministic   # the kernels add into the residual in a fixed order (no K splits)

    # ------------------------------------------------------------------------------------ pieces

    def _rope_tables(self):
        if self._rope is None:
            torch = self.torch
            positions = torch.arange(self.context, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.model.model.rotary_emb(probe, positions)
            self._rope = (cos[0].contiguous(), sin[0].contiguous())
        return self._rope

    def _norm(self, x, weight):
        """RMSNorm as transformers' Llama computes it: in float32, scaled in the model's dtype."""
        torch = self.torch
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _rotate(self, x, cos, sin):
        half = x.shape[-1] // 2
        rotated = self.torch.cat((-x[..., half:], x[..., :half]), -1)
        return x * cos + rotated * sin

    def _mlp(self, h, post_norm, gate_up, down):
        F = self.torch.nn.functional
        gate, up = F.linear(self._norm(h, post_norm), gate_up).chunk(2, -1)
        return self._linear_add(h, F.silu(gate) * up, down)

    def _linear_add(self, residual, x, weight):
        """residual + x @ weight.T, the add riding on the matmul. (Splitting the narrow decode matmuls
        along K into a batched matmul was tried on the H200: 124 tok/s against 128, so not kept.)"""
        return self.torch.addmm(residual, x, weight.t())

    def _split_heads(self, qkv, shape):
        q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                             self.n_kv * self.head_dim], -1)
        return (q.view(*shape, self.n_heads, self.head_dim), k.view(*shape, self.n_kv, self.head_dim),
                v.view(*shape, self.n_kv, self.head_dim))

    def _attend(self, q, k, v, **kwargs):
        return self.torch.nn.functional.scaled_dot_product_attention(
            q, k, v, scale=self.scale, enable_gqa=self.n_kv != self.n_heads, **kwargs)

    # ------------------------------------------------------------------------------------ cache

    def _ensure_cache(self, batch: int, length: int) -> None:
        """Room for `batch` rows of `length` positions (rounded up); growing keeps every row's contents, so
        requests in flight carry on (their graphs are captured again)."""
        torch = self.torch
        length = min(self.context, _rounded(length))
        old = None
        if self._cache is not None:
            have_batch, _, have_length, _ = self._cache[0][0].shape
            if have_batch >= batch and have_length >= length:
                return
            batch, length = max(batch, have_batch), max(length, have_length)
            old = (self._cache, self.tokens, self.positions, self.temperature, self.top_k_index, self.top_p,
                   self.seeds)
        self._graphs = {}   # captured over the old buffers; the old cache stays until the new one is filled
        shape = (batch, self.n_kv, length, self.head_dim)
        cache = []
        for index in range(len(self.layers)):
            pair = (torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device))
            if old is not None:
                for new, kept in zip(pair, old[0][index]):
                    new[:kept.shape[0], :, :kept.shape[2]].copy_(kept)
            cache.append(pair)
        self._cache = cache
        self._graphs = {}
        vocab = self.head.shape[0]
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.temperature = torch.zeros(batch, dtype=torch.float32, device=self.device)
        self.top_k_index = torch.full((batch,), vocab - 1, dtype=torch.long, device=self.device)
        self.top_p = torch.ones(batch, dtype=torch.float32, device=self.device)
        self.seeds = torch.zeros(batch, dtype=torch.long, device=self.device)
        if old is not None:
            for new, kept in zip((self.tokens, self.positions, self.temperature, self.top_k_index, self.top_p,
                                  self.seeds), old[1:]):
                new[:kept.shape[0]].copy_(kept)
            old = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._counts = torch.zeros(batch * self.n_kv, dtype=torch.int32, device=self.device)  # decode_kernels
        self._scratch = torch.zeros(1, dtype=torch.long, device=self.device)                  # and its argmax

    def capacity(self) -> tuple[int, int]:
        """Rows and positions the cache holds now (0, 0 before the first request)."""
        if self._cache is None:
            return 0, 0
        return self._cache[0][0].shape[0], self._cache[0][0].shape[2]

    def start_row(self, row: int, ids: list[int], sampling: tuple = (0.0, 0, 1.0), seed: int = 0) -> None:
        """Prefill `ids` into cache row `row` with its sampling settings; its first token is in tokens[row]
        and positions[row] is the prompt's length, ready to join the decode steps."""
        torch = self.torch
        temperature, top_k, top_p = sampling
        vocab = self.head.shape[0]
        self.temperature[row] = float(temperature)
        self.top_k_index[row] = (top_k if 0 < top_k < vocab else vocab) - 1
        self.top_p[row] = float(top_p)
        self.seeds[row] = int(seed) & 0x7FFFFFFF
        logits = self.prefill(ids, row)[None]
        at = torch.full((1,), len(ids), dtype=torch.long, device=self.device)
        self.tokens[row:row + 1].copy_(self._sample(logits, row, temperature <= 0, at))
        self.positions[row] = len(ids)

    def span(self, reach: int) -> int:
        """The attention span a step uses when the furthest row's token sits at position reach - 1."""
        return min(self._cache[0][0].shape[2], _rounded(reach))

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row `src` (its first `length` cache positions, token, position and sampling) into row `dst`."""
        length = self.span(length)
        for k_cache, v_cache in self._cache:
            k_cache[dst, :, :length].copy_(k_cache[src, :, :length])
            v_cache[dst, :, :length].copy_(v_cache[src, :, :length])
        for tensor in (self.tokens, self.positions, self.temperature, self.top_k_index, self.top_p, self.seeds):
            tensor[dst] = tensor[src]

    # ------------------------------------------------------------------------------------ forward

    def _prefill_layer(self, h, cos, sin, k_row, v_row, in_norm, qkv, qkv_bias, o, post_norm, gate_up, down,
                       last: bool = False):
        """One layer over a whole prompt h [n, hidden], writing its K and V into one cache row
        (k_row, v_row: [kv heads, length, head dim] views, so that one compiled graph serves every row).
        last: the model's last layer, whose output only the last position's logits read: after K and V,
        attention, the output projection and the MLP run for that one position ([1, hidden] out)."""
        F = self.torch.nn.functional
        n = h.shape[0]
        q, k, v = self._split_heads(F.linear(self._norm(h, in_norm), qkv, qkv_bias), (n,))
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        k_row[:, :n] = k.transpose(0, 1)
        v_row[:, :n] = v.transpose(0, 1)
        if last:     # the last position sees every position: no causal mask
            h, q = h[-1:], q[-1:]
        out = self._attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                           is_causal=not last)
        h = self._linear_add(h, out[0].transpose(0, 1).reshape(h.shape[0], -1), o)
        return self._mlp(h, post_norm, gate_up, down)

    def _decode_layer(self, h, cos, sin, rows, positions, visible, k_cache, v_cache, in_norm, qkv, qkv_bias,
                      o, post_norm, gate_up, down):
        """One layer for one new token per row: h [batch, hidden]; attention over the first
        visible.shape[-1] cache positions."""
        F = self.torch.nn.functional
        batch, span = h.shape[0], visible.shape[-1]
        q, k, v = self._split_heads(F.linear(self._norm(h, in_norm), qkv, qkv_bias), (batch,))
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        k_cache[rows, :, positions] = k
        v_cache[rows, :, positions] = v
        out = self._attend(q[:, :, None], k_cache[:batch, :, :span], v_cache[:batch, :, :span], attn_mask=visible)
        h = self._linear_add(h, out.reshape(batch, -1), o)
        return self._mlp(h, post_norm, gate_up, down)

    def _weights(self, layer: _Layer) -> tuple:
        return (layer.in_norm, layer.qkv, layer.qkv_bias, layer.o, layer.post_norm, layer.gate_up, layer.down)

    def prefill(self, ids: list[int], row: int):
        """Run one prompt into cache row `row`; returns the last position's logits [vocab]."""
        torch = self.torch
        F = torch.nn.functional
        n = len(ids)
        cos, sin = (t[:n, None, :] for t in self._rope_tables())
        h = F.embedding(torch.tensor(ids, device=self.device), self.embed)
        final = len(self.layers) - 1
        for index, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, self._cache)):
            h = self._prefill(h, cos, sin, k_cache[row], v_cache[row], *self._weights(layer), last=index == final)
        return F.linear(self._norm(h, self.final_norm), self.head)[0]

    def _step(self, batch: int, span: int, greedy: bool = False):
        """One decode step for rows [0, batch): logits [batch, vocab] for tokens at their positions,
        attending to the first `span` cache positions (all positions so far fit in it). greedy: the caller
        takes the argmax; where the kernels run the step, they take it themselves (the token written, the
        position moved on) and None is returned."""
        if self.kernels is not None and batch == 1:
            return self._kernel_step(greedy)
        torch = self.torch
        F = torch.nn.functional
        tokens, positions = self.tokens[:batch], self.positions[:batch]
        cos_t, sin_t = self._rope_tables()
        cos, sin = cos_t[positions][:, None, :], sin_t[positions][:, None, :]
        visible = (torch.arange(span, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        rows = torch.arange(batch, device=self.device)
        h = F.embedding(tokens, self.embed)
        for layer, (k_cache, v_cache) in zip(self.layers, self._cache):
            h = self._decode(h, cos, sin, rows, positions, visible, k_cache, v_cache, *self._weights(layer))
        return F.linear(self._norm(h, self.final_norm), self.head)

    def _kernel_step(self, greedy: bool = False):
        """_step for one row through decode_kernels (its attention reads the positions so far, whatever the
        span). The residual stream is kept in float32 (the output and down projections add into it) where
        transformers rounds it to the model's dtype after each add. The first Q/K/V kernel reads the token's
        embedding itself; greedy: the head kernel writes the next token and moves the position on (no argmax
        or bookkeeping kernels after it), and None is returned."""
        torch, kernels = self.torch, self.kernels
        positions = self.positions[:1]
        cos, sin = self._rope_tables()
        h = torch.empty(self.embed.shape[1], dtype=torch.float32, device=self.device)
        *matrices, head = self.step_matrices
        for index, (layer, (qkv_w, o_w, gate_up_w, down_w), (k_cache, v_cache)) in enumerate(
                zip(self.layers, matrices, self._cache)):
            first = index == 0
            qkv = kernels.matvec(self.embed if first else h, qkv_w, gain=layer.in_norm, eps=self.eps,
                                 bias=layer.qkv_bias, token=self.tokens[:1] if first else None,
                                 copy_into=h if first else None)
            attended = kernels.fused_attention(qkv[None], cos, sin, positions, k_cache, v_cache, self._counts,
                                               self.scale, self.n_heads)
            kernels.matvec(attended[0], o_w, out=h, ordered=self.deterministic)
            gated = kernels.matvec(h, gate_up_w, gain=layer.post_norm, eps=self.eps, swiglu=True)
            kernels.matvec(gated, down_w, out=h, ordered=self.deterministic)
        if greedy:
            kernels.matvec(h, head, gain=self.final_norm, eps=self.eps,
                           greedy=(self.tokens, self.positions, self._scratch))
            return None
        return kernels.matvec(h, head, gain=self.final_norm, eps=self.eps)[None]

    def _step_matrices(self, pack=None) -> list:
        """step_matrices' layout, each matrix as pack(matrix, **its matvec use) makes it (or as it is)."""
        use = pack or (lambda matrix, **_: matrix)
        return [(use(layer.qkv), use(layer.o, accumulate=True), use(layer.gate_up, swiglu=True),
                 use(layer.down, accumulate=True)) for layer in self.layers] + [use(self.head)]

    def step_matrix_list(self, matrices: list | None = None) -> list:
        """step_matrices (or a list laid out as it is) flat: every layer's four, then the head (none once
        closed)."""
        *layers, head = (self.step_matrices if matrices is None else matrices) or [None]
        return [matrix for group in layers for matrix in group] + ([head] if head is not None else [])

    def pack_weights(self, headroom: float = 0.1) -> int:
        """Step through 12-bit copies of the bf16 matrices (decode_kernels.Packed: lossless, 1.5 bytes a weight
        read where 2 were), kept beside the weights, which the prompt's layers still use. Only where the GPU
        has room for them and `headroom` of its memory besides (the K/V cache grows later); otherwise the step
        reads the weights as before. Returns how many matrices were packed; `packed_note` says why none were."""
        torch = self.torch
        needed = sum(m.numel() for m in self.step_matrix_list()) * 3 // 2
        self.packed_note = ""
        if self.kernels is None or self.dtype != torch.bfloat16:
            self.packed_note = "packing needs the decode kernels and bf16 weights"
            return 0
        free, total = torch.cuda.mem_get_info(self.device) if self.device.type == "cuda" else (needed, 0)
        if free < needed + headroom * total:
            self.packed_note = (f"the GPU has {free / 2**30:.1f} GiB free; packed matrices need "
                                f"{needed / 2**30:.1f} GiB and {headroom:.0%} of its memory is kept for the cache")
            return 0
        with torch.no_grad():
            self.step_matrices = self._step_matrices(self.kernels.pack)
        self._graphs = {}
        return self.packed_count()

    def packed_count(self) -> int:
        """How many of the step's matrices are packed copies."""
        return sum(not isinstance(m, self.torch.Tensor) for m in self.step_matrix_list())

    def _sample(self, logits, start: int, greedy: bool, at):
        """Next tokens for rows [start, start + len(logits)) from logits [rows, vocab], each row with its own
        temperature, top-k, top-p and seed (greedy rows take the argmax); `at` [rows] is the position each new
        token will sit at. On the device, without host syncs. greedy: every row is greedy (argmax only)."""
        torch = self.torch
        if greedy:
            return logits.argmax(-1)
        rows = slice(start, start + logits.shape[0])
        temperature = self.temperature[rows]
        scaled = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]
        ordered, order = torch.sort(scaled, dim=-1, descending=True)
        kth = ordered.gather(1, self.top_k_index[rows, None])
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
        probs = ordered.softmax(-1)
        top_p = self.top_p[rows, None]
        drop = (probs.cumsum(-1) - probs > top_p) & (top_p < 1.0)   # keep the smallest prefix reaching top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        filtered = torch.full_like(scaled, float("-inf")).scatter(-1, order, ordered)
        sampled = (filtered + gumbel_noise(torch, self.seeds[rows], at, scaled.shape[-1])).argmax(-1)
        return torch.where(temperature > 0, sampled, logits.argmax(-1))

    def _advance(self, batch: int, span: int, greedy) -> None:
        """Decode one token for rows [0, batch): sample from the step's logits, write it back, move on.
        greedy: every row is greedy (a (temperature, top_k, top_p) tuple is read as its temperature <= 0)."""
        greedy = _all_greedy(greedy)
        logits = self._step(batch, span, greedy=greedy and self.fused_greedy)
        if logits is None:            # the kernels took the greedy token themselves
            return
        positions = self.positions[:batch]
        chosen = self._sample(logits, 0, greedy, positions + 1)
        self.tokens[:batch].copy_(chosen)
        positions.add_(1)

    def _graph(self, batch: int, span: int, greedy):
        """The step for this batch size, attention span and greedy-or-not, captured once (until the cache grows);
        the sampling settings are per row tensors, read by every replay."""
        torch = self.torch
        greedy = _all_greedy(greedy)
        key = (batch, span, greedy)
        if key not in self._graphs:
            # The warm-up run must leave no trace in the tokens or positions.
            saved = self.tokens.clone(), self.positions.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):   # warm-up run outside capture, as CUDA graphs require
                self._advance(batch, span, greedy)
            torch.cuda.current_stream().wait_stream(stream)
            self.tokens.copy_(saved[0])
            self.positions.copy_(saved[1])
            graph = torch.cuda.CUDAGraph()
            with graph_capture(torch, graph):
                self._advance(batch, span, greedy)
            self._graphs[key] = graph
        return self._graphs[key]

    def step(self, batch: int, span: int, greedy: bool) -> None:
        """One decode step for rows [0, batch), replayed from a CUDA graph where graphs are on."""
        if self.graphs:
            self._graph(batch, span, greedy).replay()
        else:
            self._advance(batch, span, greedy)

    def close(self) -> None:
        """Free the K/V cache, the captured graphs and the packed matrices now (the compiled layer functions
        hold a reference back to this object, so without this they would wait for the garbage collector)."""
        if self.scheduler is not None:
            self.scheduler.close()
        self._cache = self._graphs = self._rope = None
        self.step_matrices = []       # the packed copies, if any
        self.tokens = self.positions = self._counts = self._scratch = None
        self.temperature = self.top_k_index = self.top_p = self.seeds = None
        self._prefill = self._decode = None
        self.layers = []

    # ------------------------------------------------------------------------------------ loop

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: tuple = (0.0, 0, 1.0),
                 stop_ids: set[int] | frozenset = frozenset(), should_stop=None, on_tokens=None,
                 seed: int | None = None) -> list[list[int]]:
        """New token ids for each prompt (ending before any end id), through the scheduler: the prompts join
        whatever else is being decoded, each in its own row.

        should_stop(row, ids) -> bool ends a row early (stop strings); on_tokens(ids_so_far) is called with
        the first row's ids whenever new ones are known (streaming, first token included). Each row's
        sampling noise comes from `seed` (a random one when None) and its positions only.
        """
        from trtrag_cli.generate.decode.scheduler import Request

        requests = [Request(ids, max_new_tokens, tuple(sampling), frozenset(stop_ids),
                            None if should_stop is None else (lambda out, row=row: should_stop(row, out)), seed,
                            stream=on_tokens is not None and row == 0)
                    for row, ids in enumerate(prompts)]
        scheduler = self.start_scheduler()
        for request in requests:
            scheduler.submit(request)
        if on_tokens is not None:
            for ids in requests[0].updates():
                on_tokens(ids)
        return [request.result() for request in requests]

    def start_scheduler(self, max_batch: int | None = None):
        """The decode/scheduler.Scheduler that owns this decoder's cache (made on first use)."""
        # Under a lock: two requests arriving together must not make two schedulers, whose threads would
        # then capture CUDA graphs into the same memory pool at once (seen on an H100 under 32 clients).
        with self._scheduler_lock:
            if self.scheduler is None:
                from trtrag_cli.generate.decode.scheduler import Scheduler

                self.scheduler = Scheduler(self, max_batch or self.max_batch)
            return self.scheduler


def _all_greedy(greedy) -> bool:
    """greedy as a bool; the benchmarks' (temperature, top_k, top_p) tuples are read by their temperature."""
    return greedy[0] <= 0 if isinstance(greedy, tuple) else bool(greedy)
