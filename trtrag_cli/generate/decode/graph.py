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
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError

MODEL_TYPES = ("llama", "mistral", "qwen2")
LENGTH_STEP = 256          # cache lengths are rounded up to this, so a few graphs serve every request
CHECK_EVERY = 8            # decode steps between host checks for end of sequence and stop strings


def _rounded(length: int) -> int:
    """length rounded up to a multiple of LENGTH_STEP."""
    return -(-length // LENGTH_STEP) * LENGTH_STEP


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
        self._graphs: dict = {}  # (batch, attention span, sampling) -> captured CUDA graph
        self.tokens = self.positions = self._counts = self._scratch = None
        self._lock = threading.Lock()   # one request at a time owns the cache (serve streams on threads)
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
        torch = self.torch
        length = min(self.context, _rounded(length))
        if self._cache is not None:
            have_batch, _, have_length, _ = self._cache[0][0].shape
            if have_batch >= batch and have_length >= length:
                return
            batch, length = max(batch, have_batch), max(length, have_length)
        self._cache = self._graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        shape = (batch, self.n_kv, length, self.head_dim)
        self._cache = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                        torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in self.layers]
        self._graphs = {}
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._counts = torch.zeros(batch * self.n_kv, dtype=torch.int32, device=self.device)  # decode_kernels
        self._scratch = torch.zeros(1, dtype=torch.long, device=self.device)                  # and its argmax

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

    def _sample(self, logits, temperature: float, top_k: int, top_p: float):
        """Next tokens [batch] from logits [batch, vocab], on the device and without host syncs."""
        torch = self.torch
        if temperature <= 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            ordered, order = torch.sort(logits, dim=-1, descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs > top_p      # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        noise = -torch.log(-torch.log(torch.rand_like(logits).clamp_(1e-20, 1.0)))
        return (logits + noise).argmax(-1)

    def _advance(self, batch: int, span: int, sampling: tuple) -> None:
        """Decode one token for every row: sample from the step's logits, write it back, move on."""
        logits = self._step(batch, span, greedy=sampling[0] <= 0 and self.fused_greedy)
        if logits is None:            # the kernels took the greedy token themselves
            return
        chosen = self._sample(logits, *sampling)
        self.tokens[:batch].copy_(chosen)
        self.positions[:batch].add_(1)

    def _graph(self, batch: int, span: int, sampling: tuple):
        """The step for this batch size, attention span and sampling, captured once (until the cache grows)."""
        torch = self.torch
        key = (batch, span, sampling)
        if key not in self._graphs:
            # The warm-up run must leave no trace: not in the tokens, positions or the random stream
            # (a seeded request then samples the same whether or not its graphs were captured first).
            saved = self.tokens.clone(), self.positions.clone(), torch.cuda.get_rng_state(self.device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):   # warm-up run outside capture, as CUDA graphs require
                self._advance(batch, span, sampling)
            torch.cuda.current_stream().wait_stream(stream)
            self.tokens.copy_(saved[0])
            self.positions.copy_(saved[1])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._advance(batch, span, sampling)
            torch.cuda.set_rng_state(saved[2], self.device)
            self._graphs[key] = graph
        return self._graphs[key]

    def close(self) -> None:
        """Free the K/V cache, the captured graphs and the packed matrices now (the compiled layer functions
        hold a reference back to this object, so without this they would wait for the garbage collector)."""
        self._cache = self._graphs = self._rope = None
        self.step_matrices = []       # the packed copies, if any
        self.tokens = self.positions = self._counts = self._scratch = None
        self._prefill = self._decode = None
        self.layers = []

    # ------------------------------------------------------------------------------------ loop

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: tuple = (0.0, 0, 1.0),
                 stop_ids: set[int] | frozenset = frozenset(), should_stop=None, on_tokens=None,
                 seed: int | None = None) -> list[list[int]]:
        """New token ids for each prompt (ending before any end id), decoding all rows together.

        should_stop(row, ids) -> bool ends a row early (stop strings); on_tokens(ids_so_far) is called with
        the first row's ids whenever new ones are known (streaming, first token included). A seed is set
        under the lock, so concurrent requests cannot reseed each other's sampling.
        """
        torch = self.torch
        batch = len(prompts)
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.context:
            raise TrtragError(f"prompt ({longest} tokens) plus {max_new_tokens} new tokens exceed the model's "
                              f"{self.context}", "lower answer.sampling.max_new_tokens or answer.generator.context")
        # On the model's own GPU: CUDA graphs and Triton launch on the current device, which may be another.
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with self._lock, on_device, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)   # seeds the CUDA generators too
            self._ensure_cache(batch, longest + max_new_tokens)
            first = torch.stack([self.prefill(ids, row) for row, ids in enumerate(prompts)])
            self.tokens[:batch].copy_(self._sample(first, *sampling))
            self.positions[:batch].copy_(torch.tensor([len(p) for p in prompts], device=self.device))
            produced = [self.tokens[:batch].clone()]
            if on_tokens:
                on_tokens(produced[0][:1].tolist())
            capacity = self._cache[0][0].shape[2]
            out: list[list[int]] = [[] for _ in prompts]
            done = [False] * batch
            for step in range(1, max_new_tokens + 1):
                if step % CHECK_EVERY == 0 or step == max_new_tokens:
                    block = torch.stack(produced, 1).tolist()
                    produced = []
                    for row in range(batch):
                        if not done[row]:
                            for token in block[row]:
                                if token in stop_ids or len(out[row]) >= max_new_tokens:
                                    done[row] = True
                                    break
                                out[row].append(token)
                            done[row] = done[row] or bool(should_stop and should_stop(row, out[row]))
                    if on_tokens:
                        on_tokens(out[0])
                    if all(done) or step == max_new_tokens:
                        break
                # The token decoded now sits at position longest + step - 1 at most.
                span = min(capacity, _rounded(longest + step))
                if self.graphs:
                    self._graph(batch, span, sampling).replay()
                else:
                    self._advance(batch, span, sampling)
                produced.append(self.tokens[:batch].clone())
        return out
