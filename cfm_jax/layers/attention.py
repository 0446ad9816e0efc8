"""Mixer `attention`: causal multi-head softmax attention with grouped-query heads, RoPE, KV cache."""

from __future__ import annotations

import sys

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from cfm_jax import policy
from cfm_jax.errors import UserError, one_line
from cfm_jax.kernels import cblas
from cfm_jax.kernels import flash_attention as flash_kernel
from cfm_jax.kernels.cblas import matmul
from cfm_jax.layers.common import linear, make_aux, normal_init, output_init, rope
from cfm_jax.registry import LayerContext, SlotConfig, register

FP32_BYTES = 4


@dataclass(frozen=True)
class AttentionConfig(SlotConfig):
    n_heads: int = 4  # query heads; head_dim = d_model // n_heads (must be even for RoPE)
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = n_heads, 1 = multi-query
    rope_theta: float = 10000.0  # RoPE base period
    # Sequences longer than this are attended in query blocks of this size, so memory grows as
    # L * chunk instead of L^2 (long-context evaluation); 0 = never chunk.
    query_chunk: int = 1024
    # Shorter sequences attend in query blocks of this size, each reading only its causal key prefix
    # (the masked upper triangle is skipped); 0 = one masked square.
    causal_block: int = 128
    # "flash": the C++ flash-attention kernel (cfm_jax/kernels/flash_attention.py; CPU, one device,
    # float32, MKL); "xla": the paths above; "auto": flash where the matmul backend picks MKL.
    kernel: str = "auto"

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def validate(self, d_model: int) -> None:
        if self.n_heads < 1 or d_model % self.n_heads:
            raise UserError(
                f"model.mixer.n_heads={self.n_heads} must be >= 1 and divide model.d_model={d_model}"
            )
        if (d_model // self.n_heads) % 2:
            raise UserError(f"head_dim = d_model/n_heads = {d_model // self.n_heads} must be even (RoPE)")
        if self.n_kv_heads < 0 or self.n_heads % self.kv_heads():
            raise UserError(
                f"model.mixer.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} (0 = n_heads)"
            )
        if self.query_chunk < 0:
            raise UserError(f"model.mixer.query_chunk={self.query_chunk} must be >= 0 (0 = never chunk)")
        check_causal_block(self.causal_block)
        check_kernel(self.kernel)
        if self.rope_theta <= 0:
            raise UserError(f"model.mixer.rope_theta={self.rope_theta} must be > 0")


MAX_CAUSAL_BLOCKS = 64  # beyond this many blocks (unrolled) a sequence takes the one masked square


def check_causal_block(block: int) -> None:
    if block < 0:
        raise UserError(f"model.mixer.causal_block={block} must be >= 0 (0 = one masked square)")


KERNELS = ("auto", "flash", "xla")


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise UserError(f"model.mixer.kernel={kernel!r} is not an attention kernel; allowed: {', '.join(KERNELS)}")


def pick_kernel(kernel: str, q: jax.Array, k: jax.Array, v: jax.Array) -> str:
    """"flash" or "xla" for causal attention over these operands, traced now. auto: flash where MKL
    can run (CPU backend, one device, float32, MKL installed, not CFM_JAX_MATMUL=xla), the products are
    large enough and the kernel builds: at 8 x 512 tokens, 4 heads of 128, its forward + backward took
    44-45 ms, XLA's block-causal path 89 ms (measured). Unlike the projections, this does not wait for
    MKL to be measured faster than XLA's dot (`cblas.backend`): the gain is the kernel's own (no score
    matrix, causal tiles skipped), and where MKL's sgemm ran at half XLA's dot (an AMD Zen 5) the kernel
    still took 1 x 4096 tokens in 0.35x the time of XLA's chunked path. flash where it cannot run is a
    one-line error."""
    check_kernel(kernel)
    if kernel == "xla":
        return "xla"
    why = f"{cblas.ENV}=xla" if cblas.mode() == "xla" else cblas.mkl_unavailable(q, k, v) or flash_kernel.available()
    if kernel == "flash":
        if why:
            raise UserError(f"model.mixer.kernel=flash cannot run: {why} (use auto or xla)")
        return "flash"
    b, s, h, d = q.shape
    flops = 2 * b * h * s * s * (d + v.shape[3]) // 2  # scores and PV over the causal half
    return "xla" if why or flops < cblas.MIN_FLOPS else "flash"


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain causal softmax attention, the obviously-right version of `_attend`.

    q: (batch, seq, heads, head_dim); k, v: (batch, seq, kv_heads, head_dim); query head h reads kv
    head h // (heads // kv_heads). Returns (batch, seq, heads, head_dim).
    """
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    causal = jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


_said: set[str] = set()


def _say_once(message: str) -> None:
    """One line on stderr per distinct message (which attention path a fallback chose)."""
    if message not in _said:
        _said.add(message)
        print(f"note: {message}", file=sys.stderr)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, query_chunk: int = 0, scale: float | None = None,
            causal_block: int = 0, kernel: str = "auto") -> jax.Array:
    """Fast path. Shapes as the reference. Off the CPU (cfm_jax.policy): `jax.nn.dot_product_attention`
    (cuDNN's fused attention on a GPU for 16-bit inputs, else XLA's; sequences longer than query_chunk
    chunked when XLA's would hold the whole score matrix). On the CPU: the flash kernel where `pick_kernel(kernel)` says so (memory
    linear in the length at any length). Otherwise sequences longer than query_chunk (> 0) go through
    `chunked_attention` (bounded memory), others longer than causal_block (> 0) through
    `block_causal_attention` (less work), the rest through XLA's fused attention (one masked square;
    it needs v as wide as q and k). scale: None = 1/sqrt(head_dim)."""
    s = q.shape[1]
    if not policy.on_cpu() and kernel != "flash":  # accelerators: the fused attention, no CPU layouts
        impl = policy.attention_implementation(q.dtype)
        if impl is None and 0 < query_chunk < s:
            return chunked_attention(q, k, v, query_chunk, scale)  # XLA's would hold (s, s) scores
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation=impl)
        except Exception as e:  # noqa: BLE001 - cuDNN refuses some shapes/versions: XLA's, which always runs
            _say_once(f"cuDNN attention is not available here ({one_line(e, 200)}); "
                      "attention runs XLA's fused path")
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if pick_kernel(kernel, q, k, v) == "flash":
        return flash_kernel.flash_attention(q, k, v, scale)
    if 0 < query_chunk < s:
        return chunked_attention(q, k, v, query_chunk, scale)
    if 0 < causal_block < s <= causal_block * MAX_CAUSAL_BLOCKS:
        return block_causal_attention(q, k, v, causal_block, scale)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _heads_major(q: jax.Array, k: jax.Array, v: jax.Array):
    """(batch, seq, heads, d) q and (batch, seq, kv_heads, d) k, v -> q (n, groups, seq, d), k (n, seq, d),
    v (n, seq, dv) with n = batch * kv_heads: every score and PV product (and their gradients) is
    then a plain batched matmul with one leading batch axis. XLA's fused attention batches over
    (batch, heads) axes between the sequence axes instead; its products ran 1.4x slower in forward +
    backward here (8 x 512 tokens, 4 heads of 128, measured)."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(b * kv, h // kv, s, d)
    k = k.transpose(0, 2, 1, 3).reshape(b * kv, s, d)
    v = v.transpose(0, 2, 1, 3).reshape(b * kv, s, v.shape[3])
    return q, k, v


def _batch_major(out: jax.Array, batch: int) -> jax.Array:
    """(n, groups, seq, dv) -> (batch, seq, heads, dv), undoing `_heads_major`."""
    n, groups, s, dv = out.shape
    return out.reshape(batch, n // batch, groups, s, dv).transpose(0, 3, 1, 2, 4).reshape(batch, s, -1, dv)


def _attend_rows(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Softmax attention of query rows q (n, rows, d) over k (n, keys, d), v (n, keys, dv) where mask
    (rows, keys) is True -> (n, rows, dv)."""
    scores = matmul(q, k, transpose_b=True, preferred_element_type=jnp.float32) * scale  # fp32 logits, as
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)  # XLA's fused attention for bf16
    return matmul(probs.astype(v.dtype), v)


def block_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int, scale: float | None = None) -> jax.Array:
    """Causal attention in query blocks: block i (queries [i*block, (i+1)*block)) reads only keys
    [0, (i+1)*block), so the fully masked key blocks above the diagonal are never computed: about
    half the score and PV work for many blocks (forward + backward ~2x faster than the one masked
    square on XLA:CPU at 512 and 1024 tokens, 8 heads of 64, measured). The blocks are unrolled
    (each has its own static key length); a kv head's query group is stacked along the rows.
    Shapes as the reference (v's head_dim may differ)."""
    b, s, _, d = q.shape
    scale = d**-0.5 if scale is None else scale
    q, k, v = _heads_major(q, k, v)
    n, groups = q.shape[:2]
    outs = []
    for start in range(0, s, block):
        end = min(start + block, s)
        mask = jnp.tile(jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None], (groups, 1))  # (rows, keys)
        rows = q[:, :, start:end].reshape(n, groups * (end - start), d)
        outs.append(_attend_rows(rows, k[:, :end], v[:, :end], mask, scale).reshape(n, groups, end - start, -1))
    return _batch_major(jnp.concatenate(outs, axis=2), b)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int, scale: float | None = None) -> jax.Array:
    """Causal attention one block of `chunk` queries at a time (lax.map), so the score tensor is
    (batch * heads, chunk, seq) instead of (batch * heads, seq, seq). Each block is rematerialized in
    the backward pass (jax.checkpoint), so training memory also stays O(seq * chunk), not O(seq^2):
    without it autodiff keeps every block's probabilities. Head-major as `block_causal_attention`.
    Shapes as the reference (v's head_dim may differ)."""
    b, s, _, d = q.shape
    scale = d**-0.5 if scale is None else scale
    q, k, v = _heads_major(q, k, v)
    n, groups = q.shape[:2]
    n_blocks = -(-s // chunk)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, n_blocks * chunk - s), (0, 0))).reshape(n, groups, n_blocks, chunk, d)
    q_blocks = q.transpose(2, 0, 1, 3, 4).reshape(n_blocks, n, groups * chunk, d)
    key_pos = jnp.arange(s)

    @jax.checkpoint
    def block(args):
        rows, start = args  # (n, groups * chunk, d), ()
        mask = jnp.tile(key_pos[None, :] <= start + jnp.arange(chunk)[:, None], (groups, 1))  # (rows, s)
        return _attend_rows(rows, k, v, mask, scale)

    out = jax.lax.map(block, (q_blocks, jnp.arange(n_blocks) * chunk))  # (n_blocks, n, groups * chunk, dv)
    out = out.reshape(n_blocks, n, groups, chunk, -1).transpose(1, 2, 0, 3, 4).reshape(n, groups, n_blocks * chunk, -1)
    return _batch_major(out[:, :, :s], b)


@register("mixer", "attention", AttentionConfig)
class Attention(nnx.Module):
    def __init__(self, cfg: AttentionConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg, d = cfg, ctx.d_model
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads(), d // cfg.n_heads
        init = normal_init(ctx.init_std)
        self.q_proj = linear(d, self.n_heads * self.head_dim, init, rngs)
        self.k_proj = linear(d, self.n_kv * self.head_dim, init, rngs)
        self.v_proj = linear(d, self.n_kv * self.head_dim, init, rngs)
        self.o_proj = linear(self.n_heads * self.head_dim, d, output_init(ctx), rngs)

    def _qkv(self, x: jax.Array, positions: jax.Array):
        """x: (batch, seq, d_model) -> q (b, s, H, hd), k, v (b, s, K, hd) with RoPE applied."""
        b, s, d = x.shape
        # One matmul against the three kernels side by side (faster than three on a CPU); same result.
        w = jnp.concatenate([self.q_proj.kernel[...], self.k_proj.kernel[...], self.v_proj.kernel[...]], axis=1)
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q, k, v = jnp.split(matmul(x.reshape(b * s, d), w), [nq, nq + nk], axis=1)
        q = q.reshape(b, s, self.n_heads, self.head_dim)
        k, v = (t.reshape(b, s, self.n_kv, self.head_dim) for t in (k, v))
        theta = self.cfg.rope_theta
        return rope(q, positions, theta), rope(k, positions, theta), v

    def __call__(self, x: jax.Array):
        """x: (batch, seq, d_model) -> (y: (batch, seq, d_model), aux)."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x, jnp.arange(s))
        y = _attend(q, k, v, self.cfg.query_chunk, causal_block=self.cfg.causal_block, kernel=self.cfg.kernel).reshape(b, s, self.n_heads * self.head_dim)
        return self.o_proj(y), make_aux()

    # --- decoding ---

    def init_state(self, batch: int, max_len: int) -> dict:
        """KV cache for `max_len` tokens: k, v (batch, kv_heads, max_len, head_dim), pos ().

        Head-major, so each head's keys are contiguous: the decode step's per-head dot products over
        the cache ran 7-14x faster on XLA:CPU than with (batch, max_len, kv_heads, head_dim)."""
        shape = (batch, self.n_kv, max_len, self.head_dim)
        return {"k": jnp.zeros(shape), "v": jnp.zeros(shape), "pos": jnp.zeros((), jnp.int32)}

    def step(self, x: jax.Array, state: dict):
        """One token. x: (batch, d_model) -> (y: (batch, d_model), new state). pos must be < max_len."""
        b, pos = x.shape[0], state["pos"]
        q, k, v = self._qkv(x[:, None, :], pos[None])
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # (b, K, 1, hd)
        groups = self.n_heads // self.n_kv
        q = q.reshape(b, self.n_kv, groups, self.head_dim) / jnp.sqrt(self.head_dim).astype(q.dtype)
        # Attend over the cached tokens (< pos) and the new one separately, then write the new one:
        # reading the cache after the write made XLA:CPU fuse the two into a far slower loop.
        cached = jnp.where(jnp.arange(state["k"].shape[2]) < pos, jnp.einsum("bkgd,bksd->bkgs", q, state["k"]), -jnp.inf)
        probs = jax.nn.softmax(jnp.concatenate([cached, jnp.einsum("bkgd,bksd->bkgs", q, k)], axis=-1), axis=-1)
        out = jnp.einsum("bkgs,bksd->bkgd", probs[..., :-1], state["v"]) + probs[..., -1:] * v
        k_cache = jax.lax.dynamic_update_slice(state["k"], k.astype(state["k"].dtype), (0, 0, pos, 0))
        v_cache = jax.lax.dynamic_update_slice(state["v"], v.astype(state["v"].dtype), (0, 0, pos, 0))
        out = out.reshape(b, self.n_heads * self.head_dim)
        return self.o_proj(out), {"k": k_cache, "v": v_cache, "pos": pos + 1}

    # --- accounting ---

    def state_bytes(self, context_len: int) -> int:
        """KV cache bytes per sequence (fp32) after `context_len` tokens."""
        return 2 * self.n_kv * self.head_dim * context_len * FP32_BYTES

    def flops_per_token(self, context_len: int) -> int:
        """Forward FLOPs (2 per multiply-add) for one token attending to `context_len` tokens."""
        d, hd = self.n_heads * self.head_dim, self.head_dim
        projections = 2 * self.q_proj.in_features * (self.n_heads + 2 * self.n_kv) * hd + 2 * d * self.o_proj.out_features
        return projections + 2 * 2 * self.n_heads * hd * context_len
