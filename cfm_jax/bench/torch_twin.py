"""A plain PyTorch (eager) twin of the dense transformer, for `cfm-jax bench`'s speed comparison.

Same architecture and sizes as `ModelConfig(d_model=d, n_layers=L)` with the default attention and
SwiGLU FFN: pre-RMSNorm blocks, RoPE multi-head attention (4 heads), SwiGLU width 8/3 d rounded up to
a multiple of 8, untied embedding and head, AdamW with global-norm clipping at 1.0. It exists only
to time one training step next to ours; torch is optional (`pip install torch`), and the comparison
is reported as skipped without it.
"""

from __future__ import annotations

import statistics
import time

import numpy as np


def _model(d: int, layers: int, vocab: int, heads: int, d_ff: int):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
            self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
            self.gate_up, self.down = nn.Linear(d, 2 * d_ff, bias=False), nn.Linear(d_ff, d, bias=False)

        def forward(self, x, cos, sin):
            b, s, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, heads, d // heads).transpose(1, 3).unbind(2)

            def rope(t):  # (b, h, s, hd), rotate-half convention
                t1, t2 = t.chunk(2, dim=-1)
                return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

            y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
            x = x + self.o(y.transpose(1, 2).reshape(b, s, d))
            g, u = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
            return x + self.down(F.silu(g) * u)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab, bias=False)
            self.blocks, self.norm = nn.ModuleList(Block() for _ in range(layers)), nn.RMSNorm(d, eps=1e-6)

        def forward(self, tokens):
            s, hd = tokens.shape[1], d // heads
            freqs = 10000.0 ** (-torch.arange(0, hd // 2, dtype=torch.float32) * 2 / hd)
            angles = torch.arange(s, dtype=torch.float32)[:, None] * freqs[None]
            cos, sin = angles.cos(), angles.sin()
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x, cos, sin)
            return self.head(self.norm(x))

    return LM()


def _median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sublayer_seconds(d: int, seq: int, batch: int, reps: int, heads: int = 4) -> dict:
    """Forward + backward seconds of one block's attention and SwiGLU FFN sublayers (without their
    norms), as in `_model`, on (batch, seq, d) inputs: where a step-time gap to PyTorch comes from."""
    import torch
    from torch.nn import functional as F

    torch.manual_seed(0)
    d_ff, hd = -(-(8 * d // 3) // 8) * 8, d // heads
    block = _model(d, 1, 16, heads, d_ff).blocks[0]
    x = torch.randn(batch, seq, d, requires_grad=True)
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(0, hd // 2) * 2 / hd)[None]
    cos, sin = angles.cos(), angles.sin()

    def rope(t):
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    def attention(x):
        q, k, v = block.qkv(x).view(batch, seq, 3, heads, hd).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        return block.o(y.transpose(1, 2).reshape(batch, seq, d))

    def ffn(x):
        g, u = block.gate_up(x).chunk(2, dim=-1)
        return block.down(F.silu(g) * u)

    def fwd_bwd(fn):
        block.zero_grad(set_to_none=True)
        x.grad = None
        (fn(x) ** 2).mean().backward()

    return {name: _median_seconds(lambda fn=fn: fwd_bwd(fn), reps) for name, fn in (("attention", attention), ("ffn", ffn))}


def matmul_flops(n: int, reps: int) -> float:
    """fp32 FLOP/s of PyTorch's n x n matmul (median of reps after one warm-up)."""
    import torch

    a = torch.randn(n, n)
    return 2 * n**3 / _median_seconds(lambda: a @ a, reps)


def gather_ffn_seconds(up, down, x, active, threshold: float, reps: int) -> dict | None:
    """PyTorch's batch-1 ReLU FFN, dense and with only the `active` neurons' rows gathered (the active
    set handed over for free), in seconds; None without torch. up: (d, f), down: (f, d), x: (d,)."""
    try:
        import torch
    except ImportError:
        return None
    up_rows = torch.from_numpy(np.ascontiguousarray(np.asarray(up).T))
    up, down, x = (torch.from_numpy(np.array(a)) for a in (up, down, x))
    idx = torch.from_numpy(np.asarray(active, np.int64))
    fat_relu = torch.nn.functional.threshold  # v if v > threshold else 0.0

    def gather():
        return fat_relu(up_rows.index_select(0, idx) @ x, threshold, 0.0) @ down.index_select(0, idx)

    with torch.no_grad():
        expected = fat_relu(x @ up, threshold, 0.0) @ down
        if not torch.allclose(gather(), expected, rtol=1e-4, atol=1e-5):
            raise RuntimeError("PyTorch gather FFN differs from its dense FATReLU FFN: the timing would mislead")
        dense = _median_seconds(lambda: torch.relu(x @ up) @ down, reps)
        gather_s = _median_seconds(gather, reps)
    return {"dense_s": dense, "gather_s": gather_s}


def eager_train_step(d: int, layers: int, seq: int, batch: int, vocab: int, heads: int = 4):
    """(step, info): one eager AdamW training step of the twin as a no-argument callable (already run
    twice, so warm), and {torch_version, threads, params}; None without torch."""
    try:
        import torch
        from torch.nn import functional as F
    except ImportError:
        return None
    torch.manual_seed(0)
    d_ff = -(-(8 * d // 3) // 8) * 8
    model = _model(d, layers, vocab, heads, d_ff)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    step()
    return step, {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
                  "params": sum(p.numel() for p in model.parameters())}


def einsum_seconds(matmuls: dict, reps: int) -> float:
    """Seconds of a list of matmuls {(lhs shape, rhs shape, dtype, dot_general dims): count} (see
    `cfm_jax.bench.matmuls`), each run alone through torch.einsum (median of reps) times its count."""
    import torch

    from cfm_jax.bench.matmuls import einsum_spec

    total = 0.0
    for m, count in sorted(matmuls.items()):
        lhs, rhs = torch.randn(m[0], dtype=getattr(torch, m[2])), torch.randn(m[1], dtype=getattr(torch, m[2]))
        spec = einsum_spec(m)
        total += count * _median_seconds(lambda: torch.einsum(spec, lhs, rhs), reps)
    return total
