"""`cfm-jax bench`: speed and memory of every variant, measured side by side in one run.

Suites (all by default):

    ceilings       fp32 / bf16 matmul FLOP/s and memory copy bandwidth of this device
    train          training step per variant (every ffn kind with attention, every mixer kind with the
                   dense FFN): tokens/s, MFU against the measured fp32 ceiling, compile time, memory
    compile        first-step compile time of an 8-layer dense transformer
    torch          the dense transformer's step vs a plain PyTorch eager twin (needs `pip install torch`)
    seqlen         training step time and memory per mixer at growing length, constant tokens/batch
    decode         batch-1 per-token decode latency per mixer against context length
    sparse_decode  neuron-sparse gather FFN vs dense FFN at batch 1 for several activation ratios
    sparse_loss    the predicted sparse-decode speedup of models fine-tuned at each ratio's FATReLU
                   threshold, with their validation loss beside a dense control's (over seeds)
    moe            MoE layer forward+backward (input and parameter gradients) vs a dense FFN of equal
                   active parameters
    seed_batch     the long-context grids' tiny MQAR training step: one seed per step vs jax.vmap over
                   several seeds in one step (does batching seeds in one process pay?)
    accel          the accelerator run: ceilings, train, seqlen, decode and moe in bfloat16 compute
                   (`model.dtype=bfloat16`), MFU against the bf16 matmul ceiling, the accelerator targets,
                   within a time budget (ACCEL_BUDGET_S: variants left when it runs out are marked skipped),
                   written to bench_<scale>_<device>.md

Times are medians of repeated calls after a warm-up (compile excluded, reported separately). Memory is
XLA's compiled-program estimate (arguments + outputs + temporaries), since the CPU backend has no
allocator statistics. FLOPs are analytic (2 per multiply-add; training = 3x forward).
"""

from __future__ import annotations

import functools
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfm_jax import registry
from cfm_jax.bench import matmuls as bench_matmuls
from cfm_jax.bench import predictor as bench_predictor
from cfm_jax.bench import seed_batch as bench_seed_batch
from cfm_jax.bench import sparse_at_loss as bench_sparse_at_loss
from cfm_jax.bench.timing import counting_faults, paired_rounds, timed
from cfm_jax.config import ModelConfig, TrainConfig
from cfm_jax.errors import UserError
from cfm_jax.kernels import active_rows, cblas
from cfm_jax.layers.model import LanguageModel, forward_flops_per_token
from cfm_jax.layers.precision import DTYPES, compute_view
from cfm_jax.registry import LayerContext
from cfm_jax.train import make_optimizer, make_train_step

SUITES = ("ceilings", "train", "compile", "torch", "seqlen", "decode", "sparse_decode", "sparse_loss", "moe",
          "seed_batch")
ACCEL_SUITES = ("ceilings", "train", "seqlen", "decode", "moe")
ACCEL_BUDGET_S = 420.0  # the accel run must end within 8 minutes on one H100, compile included
VOCAB = 256
SPARSE_RATIOS = (0.5, 0.25, 0.1, 0.05)  # activation ratios of the sparse_decode suite
SPARSE_LOSS_RATIOS = (0.25, 0.1, 0.05)  # the sparse_loss suite's: the targets' ratios and one sparser

SIZES = {  # per scale: model and problem sizes
    "smoke": dict(d=64, layers=2, seq=128, batch=4, matmul=512, copy_mb=16, lengths=(128, 256, 512),
                  tokens=1024, contexts=(128, 512), sparse=(256, 1024), sparse_train_steps=5, sparse_tokens=16, sparse_dram_layers=2, moe_tokens=512, reps=3,
                  sparse_finetune_steps=3, sparse_seeds=2),
    "cpu": dict(d=512, layers=6, seq=512, batch=8, matmul=2048, copy_mb=256, lengths=(1024, 4096, 16384),
                tokens=16384, contexts=(1024, 4096, 16384), sparse=(1024, 4096), sparse_train_steps=200, sparse_tokens=64, sparse_dram_layers=16, moe_tokens=4096, reps=5,
                sparse_finetune_steps=50, sparse_seeds=3),
    "full": dict(d=1024, layers=12, seq=2048, batch=16, matmul=8192, copy_mb=2048, lengths=(1024, 4096, 16384),
                 tokens=65536, contexts=(1024, 4096, 16384), sparse=(4096, 16384), sparse_train_steps=200, sparse_tokens=64, sparse_dram_layers=0, moe_tokens=16384, reps=10,
                 sparse_finetune_steps=50, sparse_seeds=3),
}


def compiled_bytes(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def ceilings(s: dict) -> dict:
    """Matmul FLOP/s through the matmul the model's projections use (`cblas.matmul`: MKL or XLA, named
    in `matmul_backend`) and, for reference, XLA's own dot; memory copy bandwidth."""
    n = s["matmul"]
    out = {}
    for dtype in ("float32", "bfloat16"):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        seconds = timed(jax.jit(cblas.matmul), a, a, reps=s["reps"])
        out[f"matmul_{dtype}_flops"] = 2 * n**3 / seconds
        out[f"matmul_{dtype}_backend"] = cblas.backend(a, a)
        if out[f"matmul_{dtype}_backend"][0] != "xla":
            out[f"matmul_{dtype}_xla_flops"] = 2 * n**3 / timed(jax.jit(lambda x, y: x @ y), a, a, reps=s["reps"])
    x = jnp.ones((s["copy_mb"] * 2**20 // 4,), jnp.float32)
    copy = jax.jit(lambda v: v * 1.0001)  # one read, one write
    out["copy_bytes_per_s"] = 2 * x.nbytes / timed(copy, x, reps=s["reps"])
    return out


def model_flops_per_token(model: LanguageModel, seq: int) -> float:
    """Forward FLOPs per token in training on length seq (average causal context seq / 2)."""
    return forward_flops_per_token(model, max(1, seq // 2))


def train_step_flops(model: LanguageModel, batch: int, seq: int) -> float:
    """Model FLOPs of one training step on (batch, seq) tokens: 3x the forward."""
    return 3 * model_flops_per_token(model, seq) * batch * seq


def out_of_time(s: dict) -> bool:
    """Whether the run's time budget (s["deadline"], time.monotonic(); none by default) is spent."""
    return s.get("deadline") is not None and time.monotonic() > s["deadline"]


OVER_BUDGET = {"skipped": "the run's time budget was spent before this measurement"}


def _train_step(cfg: ModelConfig, batch: int, seq: int):
    """(model, jitted train step, its arguments) for a fresh model on random tokens."""
    model = LanguageModel(cfg, VOCAB, rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, _ = make_optimizer(TrainConfig(steps=1000, warmup_steps=0))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, VOCAB)
    data = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
    return model, make_train_step(graphdef, tx, dtype=cfg.dtype), (params, rest, tx.init(params), data, 0)


def train_step_bench(cfg: ModelConfig, batch: int, seq: int, reps: int, ceiling: float | None) -> dict:
    model, step, args = _train_step(cfg, batch, seq)
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    seconds = timed(lambda: compiled(*args), reps=reps)
    flops = train_step_flops(model, batch, seq)
    return {
        "step_s": seconds, "tokens_per_s": batch * seq / seconds, "compile_s": compile_s,
        "model_flops_per_step": flops, "mfu": flops / seconds / ceiling if ceiling else None,
        "memory_bytes": compiled_bytes(compiled),
    }


def fwd_bwd_seconds(module, x: jax.Array, reps: int, argnums=0, dtype: str = "float32") -> float:
    """Median seconds of the gradient of mean(y^2) + the module's auxiliary loss for one module
    (x -> (y, aux)), with respect to its parameters (argnums 0) or parameters and input ((0, 1)), its
    weight matrices and input in the compute dtype (as `model.dtype` runs them in a model)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    x = x.astype(DTYPES[dtype])

    def loss(p, x):
        y, aux = nnx.merge(graphdef, compute_view(p, dtype), rest)(x)
        return jnp.mean(y.astype(jnp.float32) ** 2) + aux["loss"]

    return timed(jax.jit(jax.grad(loss, argnums=argnums)), params, x, reps=reps)


def mixer_bench(cfg: ModelConfig, batch: int, seq: int, reps: int) -> dict:
    """One mixer layer's forward + backward (parameter gradients) alone at the training shape, scaled
    to all layers: how much of the step the sequence mixer takes, and the FLOP rate of its own work."""
    ctx = LayerContext(d_model=cfg.d_model, n_layers=cfg.n_layers, layer=0, init_std=0.02)
    module = registry.build(cfg.mixer, ctx, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (batch, seq, cfg.d_model))
    seconds = fwd_bwd_seconds(module, x, reps, dtype=cfg.dtype) * cfg.n_layers
    flops = 3 * module.flops_per_token(max(1, seq // 2)) * batch * seq * cfg.n_layers
    return {"mixer_s": seconds, "mixer_flops_per_s": flops / seconds}


def variants() -> list[tuple[str, ModelConfig]]:
    """Every ffn kind with attention, every mixer kind with the dense FFN (default configs)."""
    out = []
    for kind in registry.kinds("ffn"):
        out.append((f"ffn={kind}", dict(ffn=registry.default_config("ffn", kind))))
    for kind in registry.kinds("mixer"):
        if kind != "attention":
            out.append((f"mixer={kind}", dict(mixer=registry.default_config("mixer", kind))))
    return out


def suite_train(s: dict, ceiling: float | None) -> dict:
    results = {}
    for name, slots in variants():
        if out_of_time(s):
            results[name] = OVER_BUDGET
            continue
        cfg = ModelConfig(d_model=s["d"], n_layers=s["layers"], dtype=s["dtype"], **slots)
        try:
            cfg.validate()
            results[name] = train_step_bench(cfg, s["batch"], s["seq"], s["reps"], ceiling)
            results[name].update(mixer_bench(cfg, s["batch"], s["seq"], s["reps"]))
        except UserError as e:
            results[name] = {"skipped": str(e)}
    dense = results.get("ffn=dense", {}).get("mfu")
    for r in results.values():
        if dense and r.get("mfu"):
            r["mfu_vs_dense"] = r["mfu"] / dense
    return results


def suite_compile(s: dict) -> dict:
    """First-step compile seconds of the dense transformer at 8 layers (the issue's target: < 30 s)."""
    cfg = ModelConfig(d_model=s["d"], n_layers=8)
    r = train_step_bench(cfg, s["batch"], s["seq"], 1, None)
    return {"layers": 8, "compile_s": r["compile_s"]}


def suite_torch(s: dict) -> dict:
    """The dense transformer's training step here vs a plain PyTorch eager twin, side by side: paired
    rounds (PyTorch's step, then ours) in one process, so the machine's drift hits both alike; then
    where the time goes (matmul libraries, our step's matmuls alone, one block's sublayers)."""
    from cfm_jax.bench import torch_twin as bench_torch

    twin = bench_torch.eager_train_step(s["d"], s["layers"], s["seq"], s["batch"], VOCAB)
    if twin is None:
        return {"skipped": "torch is not installed (pip install torch)"}
    torch_step, info = twin
    cfg = ModelConfig(d_model=s["d"], n_layers=s["layers"])
    model, step, args = _train_step(cfg, s["batch"], s["seq"])
    compiled = step.lower(*args).compile()
    ours = lambda: jax.block_until_ready(compiled(*args))  # noqa: E731
    ours()
    # Both frameworks share this process's malloc heap: a PyTorch step's allocations can take the
    # freed memory our step's temporaries used, which our next step then page-faults in again. Two
    # discarded rounds let the heap settle; the faults of every measured step are counted.
    paired_rounds(torch_step, ours, 2)
    faults = {"torch": [], "ours": []}
    rounds = paired_rounds(counting_faults(torch_step, faults["torch"]), counting_faults(ours, faults["ours"]),
                           max(8, s["reps"] + s["reps"] % 2))
    ratios = [t / j for t, j in rounds]
    with cblas.forced("xla"):  # a fresh step traced with XLA's dot: every matmul is a dot_general to list
        _, xla_step, xla_args = _train_step(cfg, s["batch"], s["seq"])
        matmuls = bench_matmuls.step_matmuls(xla_step, *xla_args)
    ours_ceiling = ceilings({**s, "copy_mb": 1})  # side by side with torch's
    return {
        "torch": {**info, "step_s": statistics.median(t for t, _ in rounds),
                  "matmul_flops": bench_torch.matmul_flops(s["matmul"], s["reps"]),
                  "sublayer_s": bench_torch.sublayer_seconds(s["d"], s["seq"], s["batch"], s["reps"])},
        "jax_step_s": statistics.median(j for _, j in rounds), "rounds": rounds, "minor_faults": faults,
        "torch_vs_jax_time": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
        "jax_params": int(sum(x.size for x in jax.tree.leaves(args[0]))),
        "jax_matmul_flops": ours_ceiling["matmul_float32_flops"],
        "jax_matmul_backend": ours_ceiling["matmul_float32_backend"],
        "xla_matmul_flops": ours_ceiling.get("matmul_float32_xla_flops", ours_ceiling["matmul_float32_flops"]),
        "jax_sublayer_s": sublayer_seconds(cfg, s["batch"], s["seq"], s["reps"]),
        "model_flops_per_step": train_step_flops(model, s["batch"], s["seq"]),
        "step_matmuls": {"count": sum(matmuls.values()), "shapes": len(matmuls),
                         "flops": sum(n * bench_matmuls.flops(m) for m, n in matmuls.items()),
                         "xla_s": bench_matmuls.xla_seconds(matmuls, timed, s["reps"]),
                         "torch_s": bench_torch.einsum_seconds(matmuls, s["reps"])},
    }


def sublayer_seconds(cfg: ModelConfig, batch: int, seq: int, reps: int) -> dict:
    """Forward + backward seconds of one block's mixer and FFN on (batch, seq, d) inputs (the PyTorch
    twin's `sublayer_seconds`, side by side)."""
    block = LanguageModel(cfg, VOCAB, rngs=nnx.Rngs(0)).blocks[0]
    x = jax.random.normal(jax.random.key(2), (batch, seq, cfg.d_model))
    return {name: fwd_bwd_seconds(module, x, reps, argnums=(0, 1)) for name, module in
            (("attention", block.mixer), ("ffn", block.ffn))}


def suite_seqlen(s: dict) -> dict:
    results = {}
    for kind in registry.kinds("mixer"):
        if out_of_time(s):
            results[kind] = OVER_BUDGET
            continue
        cfg = ModelConfig(d_model=s["d"], n_layers=2, dtype=s["dtype"], mixer=registry.default_config("mixer", kind))
        try:
            cfg.validate()
        except UserError as e:
            results[kind] = {"skipped": str(e)}
            continue
        rows = {}
        for length in s["lengths"]:
            batch = max(1, s["tokens"] // length)
            # three steps at least, so one step that page-faults its temporaries in is not half the median
            rows[str(length)] = train_step_bench(cfg, batch, length, max(3, s["reps"] // 2), None)
            rows[str(length)].update(mixer_bench(cfg, batch, length, max(1, s["reps"] // 2)))
        first, last = rows[str(s["lengths"][0])], rows[str(s["lengths"][-1])]
        rows["time_ratio_longest_vs_shortest"] = last["step_s"] / first["step_s"]
        results[kind] = rows
    return results


def suite_decode(s: dict) -> dict:
    results = {}
    ctx = LayerContext(d_model=s["d"], n_layers=1, layer=0, init_std=0.02)
    x = jax.random.normal(jax.random.key(0), (1, s["d"])).astype(DTYPES[s["dtype"]])
    for kind in registry.kinds("mixer"):
        if out_of_time(s):
            results[kind] = OVER_BUDGET
            continue
        cfg = registry.default_config("mixer", kind)
        try:
            cfg.validate(s["d"])
        except UserError as e:
            results[kind] = {"skipped": str(e)}
            continue
        module = registry.build(cfg, ctx, nnx.Rngs(0))
        graphdef, state = nnx.split(module)
        state = compute_view(state, s["dtype"])
        # The state is donated, so a KV cache is updated in place instead of copied every token.
        step = jax.jit(lambda st, xt, ms: nnx.merge(graphdef, st).step(xt, ms), donate_argnums=2)
        rows = {}
        for context in s["contexts"]:
            mixer_state = module.init_state(1, context)
            rows[str(context)] = {"latency_s": decode_latency(step, state, x, mixer_state, context, s["reps"] * 4),
                                  "state_bytes": module.state_bytes(context)}
        first, last = rows[str(s["contexts"][0])], rows[str(s["contexts"][-1])]
        rows["latency_ratio_longest_vs_shortest"] = last["latency_s"] / first["latency_s"]
        results[kind] = rows
    return results


def decode_latency(step, params, x, mixer_state, context: int, reps: int) -> float:
    """Median seconds of one decode step, the (donated) state threaded from call to call. A cache
    (state with "pos") is reset to hold `context - 1` tokens before every call, so each step attends
    over the full context."""
    def call(ms):
        if "pos" in ms:
            ms = {**ms, "pos": jnp.asarray(context - 1, jnp.int32)}
        y, ms = step(params, x, ms)
        jax.block_until_ready((y, ms))
        return ms

    mixer_state = call(mixer_state)  # warm-up (compile)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mixer_state = call(mixer_state)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def suite_sparse_decode(s: dict) -> dict:
    from cfm_jax.layers.neuron_sparse import NeuronSparseConfig, NeuronSparseFFN
    from cfm_jax.layers.sparse_decode import gather_ffn_step, prepare

    d, f = s["sparse"]
    ctx = LayerContext(d_model=d, n_layers=1, layer=0, init_std=0.02)
    x = jax.random.normal(jax.random.key(0), (d,))
    results = {}
    base = NeuronSparseFFN(NeuronSparseConfig(d_ff=f), ctx, rngs=nnx.Rngs(0))
    pre = np.asarray(x @ base.up.kernel[...])
    dense_w = (base.up.kernel[...], base.down.kernel[...])
    dense = jax.jit(lambda x, w: jax.nn.relu(x @ w[0]) @ w[1])
    dense_s = timed(dense, x, dense_w, reps=s["reps"] * 4)
    for ratio in SPARSE_RATIOS:
        threshold = float(np.quantile(pre, 1 - ratio))  # FATReLU threshold giving this activation ratio
        ffn = NeuronSparseFFN(NeuronSparseConfig(d_ff=f, threshold=max(threshold, 0.0)), ctx, rngs=nnx.Rngs(0))
        weights = prepare(ffn)
        budget = int(math.ceil(ratio * f)) + 8
        sparse = jax.jit(lambda x, w: gather_ffn_step(ffn, w, x, budget)[0])
        sparse_s = timed(sparse, x, weights, reps=s["reps"] * 4)
        read = d * f + budget * d  # selector in full + gathered rows of W_down
        results[str(ratio)] = {"dense_s": dense_s, "sparse_s": sparse_s, "speedup": dense_s / sparse_s,
                               "theoretical_speedup": 2 * d * f / read, "budget": budget,
                               **perfect_predictor(dense_w, x, pre, ffn.cfg.threshold, dense_s, s["reps"] * 4)}
    results["predicted"] = bench_predictor.predicted_decode(d, f, s["sparse_train_steps"], SPARSE_RATIOS,
                                                            s["sparse_tokens"], 2 * s["reps"] + 1, s["sparse_dram_layers"])
    return results


def active_rows_ffn(x: jax.Array, up_rows: jax.Array, down: jax.Array, active: jax.Array,
                    threshold: float) -> jax.Array:
    """A FATReLU FFN computed from the given neurons only. x: (d,), up_rows: (f, d) (W_up transposed),
    down: (f, d), active: (K,) neuron indices -> (d,). Equals the dense FFN when `active` holds every
    neuron whose pre-activation exceeds the threshold."""
    from cfm_jax.layers.neuron_sparse import fat_relu

    return fat_relu(up_rows[active] @ x, threshold) @ down[active]


def perfect_predictor(dense_w, x, pre, threshold: float, dense_s: float, reps: int) -> dict:
    """The best any active-set predictor could do: the exact active set handed over for free, only
    those neurons' rows of W_up and W_down gathered and used. Measured here (XLA), with the rows read
    in place by a C++ kernel (`cfm_jax.kernels.active_rows`) and, where torch is installed, with
    PyTorch's index_select against its own dense FFN."""
    from cfm_jax.bench.torch_twin import gather_ffn_seconds

    up, down = dense_w
    active = np.flatnonzero(pre > threshold)
    idx = jnp.asarray(active)
    up_rows = jnp.asarray(np.asarray(up).T)  # (f, d): one contiguous row per neuron
    oracle = jax.jit(functools.partial(active_rows_ffn, threshold=threshold))
    oracle_s = timed(oracle, x, up_rows, down, idx, reps=reps)
    out = {"active": int(len(active)), "perfect_predictor_s": oracle_s, "perfect_predictor_speedup": dense_s / oracle_s}
    if active_rows.available() is None:  # the same rows read in place (C++), no gathered copy
        in_place = jax.jit(functools.partial(active_rows.active_rows_ffn_in_place, threshold=threshold))
        expected = oracle(x, up_rows, down, idx)
        if not np.allclose(in_place(x, up_rows, down, idx), expected, rtol=1e-4, atol=1e-5):
            raise RuntimeError("in-place active-rows FFN differs from the gathered one: the timing would mislead")
        out["in_place_predictor_speedup"] = dense_s / timed(in_place, x, up_rows, down, idx, reps=reps)
    torch_r = gather_ffn_seconds(up, down, x, active, threshold, reps)
    if torch_r:
        out["torch_perfect_predictor_speedup"] = torch_r["dense_s"] / torch_r["gather_s"]
    return out


def suite_moe(s: dict) -> dict:
    n, d = s["moe_tokens"], s["d"]
    ctx = LayerContext(d_model=d, n_layers=1, layer=0, init_std=0.02)
    try:
        moe_cfg = registry.default_config("ffn", "moe")
    except UserError as e:
        return {"skipped": str(e)}
    moe_cfg = type(moe_cfg)(n_experts=8, top_k=2)
    dense_cfg = registry.default_config("ffn", "dense")
    dense_cfg = type(dense_cfg)(d_ff=moe_cfg.width(d) * (moe_cfg.top_k + moe_cfg.n_shared))  # equal active params
    x = jax.random.normal(jax.random.key(0), (n // 512 or 1, min(n, 512), d))
    out = {}
    for name, cfg in (("moe", moe_cfg), ("dense", dense_cfg)):
        # Input and parameter gradients, as in a training step (a layer inside a model passes its
        # input's gradient down). Parameters alone would let XLA skip the dense FFN's input-gradient
        # matmuls, while the MoE's hand-written backward (blocked_ffn) always computes them.
        module = registry.build(cfg, ctx, nnx.Rngs(0))
        out[f"{name}_fwd_bwd_s"] = fwd_bwd_seconds(module, x, s["reps"], argnums=(0, 1), dtype=s["dtype"])
    out["moe_vs_dense"] = out["moe_fwd_bwd_s"] / out["dense_fwd_bwd_s"]
    return out


def run(suites: tuple[str, ...], scale: str, dtype: str = "float32", budget_s: float | None = None) -> dict:
    """Measure `suites` at `scale` with `dtype` compute (train, seqlen, decode and moe); with a budget,
    measurements left when it is spent are recorded as skipped (the accel run's time limit)."""
    if scale not in SIZES:
        raise UserError(f"unknown scale {scale!r}; allowed: {', '.join(SIZES)}")
    if not suites:
        raise UserError(f"--suite names no suite; allowed: {', '.join(SUITES)}, all (comma list)")
    unknown = [x for x in suites if x not in SUITES]
    if unknown:
        raise UserError(f"unknown bench suite {unknown[0]!r}; allowed: {', '.join(SUITES)}, all, accel")
    if dtype not in DTYPES:
        raise UserError(f"unknown compute dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    s = {**SIZES[scale], "dtype": dtype,
         "deadline": None if budget_s is None else time.monotonic() + budget_s}
    result = {
        "scale": scale, "sizes": SIZES[scale], "dtype": dtype, "jax_version": jax.__version__, "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind, "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": __import__("os").cpu_count(),
    }
    ceiling = None
    if "ceilings" in suites or "train" in suites:
        result["ceilings"] = ceilings(s)
        ceiling = result["ceilings"][f"matmul_{dtype}_flops"]
    runners = {"train": lambda: suite_train(s, ceiling), "compile": lambda: suite_compile(s),
               "torch": lambda: suite_torch(s), "seqlen": lambda: suite_seqlen(s),
               "decode": lambda: suite_decode(s), "sparse_decode": lambda: suite_sparse_decode(s),
               "sparse_loss": lambda: bench_sparse_at_loss.at_measured_loss(
                   *s["sparse"], s["sparse_train_steps"], s["sparse_finetune_steps"], SPARSE_LOSS_RATIOS,
                   s["sparse_seeds"], s["sparse_tokens"], 2 * s["reps"] + 1, s["sparse_dram_layers"]),
               "moe": lambda: suite_moe(s), "seed_batch": lambda: bench_seed_batch.suite_seed_batch(scale, 2 * s["reps"])}
    for name in suites:
        if name in runners:
            print(f"bench: suite {name} ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)
            result[name] = runners[name]()
            result.setdefault("measured_at", {})[name] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return result


def run_accel(scale: str) -> dict:
    """The accelerator run (`--suite accel`): ACCEL_SUITES in bfloat16 within ACCEL_BUDGET_S."""
    return {**run(ACCEL_SUITES, scale, dtype="bfloat16", budget_s=ACCEL_BUDGET_S), "profile": "accel"}


def device_slug(device_kind: str) -> str:
    """A file-name word for a device: 'NVIDIA H100 80GB HBM3' -> 'h100', 'TPU v5 lite' -> 'tpu', 'cpu' -> 'cpu'."""
    words = [w for w in device_kind.lower().replace("-", " ").split() if w not in ("nvidia", "amd", "google")]
    return "".join(c for c in (words[0] if words else "device") if c.isalnum())


LINEAR_FAMILY = ("linear_attention", "gla", "mamba", "rwkv", "sliding_window")  # constant state per token


def accel_targets(result: dict) -> list[dict]:
    """The accelerator targets (bf16, full scale) against an accel run: [{target, measured, met}], each
    measured figure with how far it is from its target."""
    rows = []

    def add(target, value, bound, higher_is_better, fmt):
        met = value >= bound if higher_is_better else value <= bound
        rows.append({"target": target, "measured": f"{fmt(value)} ({value / bound:.2f}x the target)", "met": met})

    train = {k: v for k, v in result.get("train", {}).items() if "skipped" not in v}
    dense = train.get("ffn=dense")
    if dense and dense.get("mfu") is not None:
        add("dense training step MFU >= 45% of the measured bf16 matmul ceiling", dense["mfu"], 0.45, True,
            lambda v: f"{v:.1%}")
        worst = min(train, key=lambda k: train[k]["tokens_per_s"])
        add(f"every variant >= 60% of the dense step's tokens/s (slowest: {worst})",
            train[worst]["tokens_per_s"] / dense["tokens_per_s"], 0.60, True, lambda v: f"{v:.0%}")
        add(f"compile of the {result['scale']}-scale model ({result['sizes']['layers']} layers, d "
            f"{result['sizes']['d']}) < 60 s", dense["compile_s"], 60.0, False, lambda v: f"{v:.1f} s")
    moe = result.get("moe", {})
    if "moe_vs_dense" in moe:
        add("MoE layer fwd+bwd <= 1.3x a dense FFN of equal active parameters", moe["moe_vs_dense"], 1.3, False,
            lambda v: f"{v:.2f}x")
    for kind, rows_ in result.get("seqlen", {}).items():
        if kind in LINEAR_FAMILY and "skipped" not in rows_:
            lengths = [k for k in rows_ if k.isdigit()]
            add(f"seqlen {kind}: step at {lengths[-1]} <= 1.3x at {lengths[0]} (constant tokens)",
                rows_["time_ratio_longest_vs_shortest"], 1.3, False, lambda v: f"{v:.2f}x")
    skipped = [f"{suite}/{k}" for suite in ("train", "seqlen", "decode") for k, v in result.get(suite, {}).items()
               if v == OVER_BUDGET]
    if skipped:
        rows.append({"target": f"the run finishes within its {ACCEL_BUDGET_S:.0f} s budget",
                     "measured": f"{len(skipped)} measurements skipped: {', '.join(skipped)}", "met": False})
    return rows


def targets(result: dict) -> list[dict]:
    """The issue's targets against this run's measurements: [{target, measured, met}] (met None = not run)."""
    if result.get("profile") == "accel":
        return accel_targets(result)
    rows = []

    def add(target, measured, met):
        rows.append({"target": target, "measured": measured, "met": met})

    train = {k: v for k, v in result.get("train", {}).items() if "skipped" not in v}
    if "ffn=dense" in train and train["ffn=dense"].get("mfu") is not None:
        mfu = train["ffn=dense"]["mfu"]
        add("dense transformer MFU >= 40% of the fp32 matmul ceiling", f"{mfu:.1%}", mfu >= 0.40)
        worst = min(train, key=lambda k: train[k].get("mfu_vs_dense", 1.0))
        ratio = train[worst].get("mfu_vs_dense", 1.0)
        add("every variant's MFU >= 0.5x the dense transformer's", f"lowest {worst}: {ratio:.2f}x", ratio >= 0.5)
    if "compile" in result:
        c = result["compile"]["compile_s"]
        add("first-step compile of an 8-layer model < 30 s", f"{c:.1f} s", c < 30)
    if "torch" in result and "skipped" not in result["torch"]:
        r = result["torch"]["torch_vs_jax_time"]
        add("dense training step at least matches PyTorch eager (torch time / ours >= 1)", f"{r:.2f}", r >= 1.0)
    for kind, rows_ in result.get("seqlen", {}).items():
        if "skipped" in rows_:
            continue
        lengths = [k for k in rows_ if k.isdigit()]
        if kind in LINEAR_FAMILY:
            r = rows_["time_ratio_longest_vs_shortest"]
            add(f"seqlen {kind}: step time at {lengths[-1]} <= 1.3x at {lengths[0]}", f"{r:.2f}x", r <= 1.3)
        elif kind == "attention":
            m0, m1 = rows_[lengths[0]]["memory_bytes"], rows_[lengths[-1]]["memory_bytes"]
            if m0 and m1:  # constant tokens per batch: linear memory per sequence stays flat, quadratic grows ~L
                add(f"seqlen attention: memory at {lengths[-1]} vs {lengths[0]} (constant tokens) <= 2x "
                    f"(quadratic scores: ~{int(lengths[-1]) // int(lengths[0])}x)", f"{m1 / m0:.2f}x", m1 / m0 <= 2)
    for kind, rows_ in result.get("decode", {}).items():
        if "skipped" in rows_:
            continue
        contexts = [k for k in rows_ if k.isdigit()]
        r = rows_["latency_ratio_longest_vs_shortest"]
        if kind in LINEAR_FAMILY:
            add(f"decode {kind}: latency at {contexts[-1]} <= 1.2x at {contexts[0]}", f"{r:.2f}x", r <= 1.2)
        elif kind == "attention":
            bound = int(contexts[-1]) / int(contexts[0])
            add(f"decode attention: latency grows no worse than linearly ({contexts[0]} -> {contexts[-1]}: <= {bound:.0f}x)",
                f"{r:.2f}x", r <= bound)
    sparse = result.get("sparse_decode", {})
    predicted = sparse.get("predicted", {})
    for ratio, need in SPARSE_TARGETS:
        if ratio in sparse:
            r, p = sparse[ratio], predicted.get(ratio)
            measured = (f"exact gather {r['speedup']:.2f}x (its weights-read bound {r['theoretical_speedup']:.2f}x); "
                        f"perfect predictor in place {_x(r.get('in_place_predictor_speedup'))}")
            met = r["speedup"] >= need
            if p:
                # Against the fastest dense FFN measured alongside (XLA's, or the in-place kernel reading
                # every row), so that no part of the speedup is a better kernel rather than fewer rows
                # read; judged from DRAM (a model's weights do not stay cached between tokens) where it
                # was measured, else (and then saying so) with the single FFN cache-resident.
                cached = over_fastest_dense(p)
                measured += (f"; predicted, in place, FFN cache-resident: {p['speedup']:.2f}x XLA's dense FFN, "
                             f"{cached:.2f}x the faster of it and the kernel reading every row")
                judged, regime = cached, "cache-resident (no DRAM run)"
                if "dram" in p:
                    dram = p["dram"]
                    judged, regime = over_fastest_dense(dram), "from DRAM"
                    measured += (f"; from DRAM ({dram['layers']} layers' copies): {dram['speedup']:.2f}x XLA's dense "
                                 f"FFN, {judged:.2f}x the faster dense")
                measured += (f"; judged: {regime}, {judged:.2f}x; held-out recall {p['recall']:.4f}, output error "
                             f"{p['output_error']:.2%}; a trained byte-level model's FFN at FATReLU threshold "
                             f"{p['threshold']:.3f} (its own: 0), so approximate and not the trained function")
                met = met or (judged >= need and p["recall"] >= MIN_RECALL)
            add(f"sparse decode >= {need}x dense at activation ratio {ratio} (exact gather path, or a predicted "
                f"active set with held-out recall >= {MIN_RECALL}, against the fastest dense FFN, from DRAM where measured)", measured, met)
    moe = result.get("moe", {})
    if "moe_vs_dense" in moe:
        add("MoE layer fwd+bwd <= 1.5x a dense FFN of equal active parameters", f"{moe['moe_vs_dense']:.2f}x",
            moe["moe_vs_dense"] <= 1.5)
    return rows


def over_fastest_dense(r: dict) -> float:
    """A predicted-path measurement's speedup over the faster of XLA's dense FFN and the in-place kernel
    reading every row (its speedup over XLA's, when measured)."""
    return r["speedup"] / max(1.0, r.get("dense_in_place_speedup") or 1.0)


SPARSE_TARGETS = (("0.25", 2.5), ("0.1", 4.0))
MIN_RECALL = 0.99  # a predicted path counts toward the targets only if it misses at most 1 % of firing neurons


def _ceiling_reading(sparse: dict) -> str:
    """The perfect-predictor ceilings at the target ratios against the sparse-decode targets, in words
    (only the ones this run measured)."""
    rows = [(r, need) for r, need in SPARSE_TARGETS if r in sparse]
    keys = (("XLA", "perfect_predictor_speedup"), ("PyTorch", "torch_perfect_predictor_speedup"))
    measured = [(name, key) for name, key in keys if rows and all(sparse[r].get(key) is not None for r, _ in rows)]
    parts = []
    for name, key in measured:
        met = all(sparse[r][key] >= need for r, need in rows)
        parts.append(f"gathered in {name}, the ceiling {'reaches both targets' if met else 'misses a target'}")
    if rows and all(sparse[r].get("in_place_predictor_speedup") is not None for r, _ in rows):
        parts.append("in place it is " + " and ".join(
            f"{_x(sparse[r]['in_place_predictor_speedup'])} at {r} (target {need}x)" for r, need in rows)
            + ": the room a real predictor's own cost and its missed neurons would have to fit in")
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "." if parts else ""


def predicted_markdown(predicted: dict) -> list[str]:
    """The predicted-active-set table (`cfm_jax.bench.predictor.predicted_decode`) and how to read it."""
    if not predicted:
        return []
    lines = ["### Predicted active set, trained FFN", ""]
    if "skipped" in predicted:
        return lines + [f"Skipped: {predicted['skipped']}.", ""]
    m = predicted["model"]
    lines += [f"A 2-layer byte-level language model (d_model {m['d_model']}, ReLU `neuron_sparse` FFN of width "
              f"{m['d_ff']}) trained {m['train_steps']} steps on the standard-library text (final training loss "
              f"{m['train_loss']:.2f}); its last FFN. A rank-{m['rank']} predictor (`cfm_jax/layers/active_predictor.py`) "
              f"fitted on {m['fit_tokens']} of that FFN's inputs from training text, its margin set for recall "
              f"{m['recall_target']} on them; recall, candidates and output error (||y_predicted - y|| / ||y||) on "
              f"{m['held_out_tokens']} inputs from the held-out files. Latency per token over {m['timed_tokens']} of "
              "them, one token per call (a jitted lax.map), the dense FATReLU FFN (XLA) and the predicted path (one "
              "C++ call: the predictor, then the candidates' rows read in place, `cfm_jax/kernels/active_rows.py`) "
              "taking turns in paired rounds.", "",
              "The last three columns time the same kernel on the same tokens, against the same dense runs: "
              "with the exact firing set handed over (the ceiling of any predictor); with every neuron a candidate "
              "(the exact path in place: all of W_up read, W_down's firing rows); and with every neuron firing "
              "(threshold off: all of both matrices read, a dense FFN's work in this kernel, to compare its "
              "streaming speed with XLA's).", "",
              "| activation ratio | threshold | dense, XLA (us/token) | predicted (us/token) | speedup (range over rounds) "
              "| predictor weights / FFN weights | recall (held out) | candidates per firing neuron | output error "
              "| perfect predictor, in place | exact path, in place | all rows, in place |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ratio, p in predicted.items():
        if ratio == "model":
            continue
        lo, hi = p["speedup_range"]
        lines.append(f"| {ratio} | {p['threshold']:.3f} | {p['dense_s'] * 1e6:.1f} | {p['predicted_s'] * 1e6:.1f} | "
                     f"{p['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | {p['predictor_weights_share']:.1%} | {p['recall']:.4f} | "
                     f"{p['candidates_per_firing']:.3f} | {p['output_error']:.2%} | {_x(p.get('perfect_speedup'))} | "
                     f"{_x(p.get('exact_in_place_speedup'))} | {_x(p.get('dense_in_place_speedup'))} |")
    dram = {ratio: p["dram"] for ratio, p in predicted.items() if ratio != "model" and "dram" in p}
    if dram:
        first = next(iter(dram.values()))
        cache = first.get("last_level_cache_bytes")
        cache_text = f"this CPU's largest cache holds {cache / 2**20:.0f} MB" if cache else "the cache size was not readable"
        lines += ["", f"From DRAM: the same paths over {first['layers']} copies of the FFN and its predictor per token, "
                  f"as a model's layers, each layer's input depending on the previous layer's output. Each path reads "
                  f"{first['weight_bytes'] / 2**20:.0f} MB of FFN weights per token ({cache_text}), "
                  f"{first['tokens']} tokens per call:", "",
                  "| activation ratio | dense, XLA (us/token/layer) | all rows, in place (us/token/layer) "
                  "| predicted (us/token/layer) | speedup over XLA's dense (range over rounds) | over the fastest dense |",
                  "|---|---|---|---|---|---|"]
        for ratio, r in dram.items():
            lo, hi = r["speedup_range"]
            fastest = over_fastest_dense(r)
            lines.append(f"| {ratio} | {r['dense_s'] * 1e6:.1f} | {r.get('dense_in_place_s', float('nan')) * 1e6:.1f} | "
                         f"{r['predicted_s'] * 1e6:.1f} | {r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | {fastest:.2f}x |")
    if dram:
        cached = "; ".join(f"{over_fastest_dense(p):.2f}x at {ratio}"
                           for ratio, p in predicted.items() if ratio != "model")
        lines += ["", "The targets table judges the DRAM figures against the fastest dense: a model's weights are read "
                  "once per token and do not stay cached from one token to the next, and from DRAM both dense paths "
                  "run at the memory bandwidth (the ceilings' copy bandwidth). A single FFN timed in a loop stays in "
                  "the CPU's last-level cache instead, where the in-place kernel streams faster than XLA's dense "
                  f"matvec; against that faster dense the predicted path is {cached}."]
    lines += ["", f"How far this carries: this model's ReLU fires for {m['natural_ratio']:.1%} of neurons at threshold 0 "
              "on the held-out inputs, so the ratios use FATReLU thresholds other than its own 0 (s 1[s > t]; "
              "negative ones, for ratios above that, pass small negative values): each ratio's work, but not the "
              "trained function, and their effect on the model's loss is not measured. Its FFN inputs are easy to predict: "
              f"rank {m['rank']} holds {m['rank_energy']:.2%} of the held-out x W_up's energy, since a 256-symbol byte "
              "vocabulary and 2 layers keep the residual stream near a low-dimensional subspace. Models with larger "
              "vocabularies and more layers have higher-dimensional FFN inputs and need a higher rank (a larger "
              "predictor cost) for the same recall; that is not measured here. The output is approximate (missed "
              "neurons are dropped); the exact gather path above is not.", ""]
    return lines


def _x(ratio: float | None) -> str:
    """A speedup as '1.23x', or '-' when it was not measured."""
    return "-" if ratio is None else f"{ratio:.2f}x"


def to_markdown(result: dict, command: str) -> str:
    f = lambda v, spec=".3g": "" if v is None else format(v, spec)
    commands = [*result.get("commands", []), command]
    lines = [f"# Benchmarks ({result['scale']} scale)", "",
             "Regenerate with " + ", then ".join(f"`{c}`" for c in dict.fromkeys(commands)) + ". Device: "
             f"{result['backend']} ({result['device']}), {result['cpu_count']} CPUs, {result['machine']}, "
             f"jax {result['jax_version']}"
             + (f", compute dtype {result['dtype']} (float32 parameters)." if result.get("dtype", "float32") != "float32"
                else "."), ""]
    if len(set(result.get("measured_at", {}).values())) > 1:
        lines += ["Suites measured at: " + ", ".join(f"{k} {v}" for k, v in result["measured_at"].items())
                  + ". Ratios are only ever taken within one suite.", ""]
    if "ceilings" in result:
        c = result["ceilings"]
        lines += ["## Ceilings", "", "| fp32 matmul | bf16 matmul | memory copy |", "|---|---|---|",
                  f"| {c['matmul_float32_flops'] / 1e9:.1f} GFLOP/s | {c['matmul_bfloat16_flops'] / 1e9:.1f} GFLOP/s | "
                  f"{c['copy_bytes_per_s'] / 1e9:.1f} GB/s |", ""]
        if "matmul_float32_backend" in c:  # older results have no backend record
            lines += [f"Matmuls run through the model's `cblas.matmul`: fp32 in {c['matmul_float32_backend'][0]} "
                      f"({c['matmul_float32_backend'][1]}), bf16 in {c['matmul_bfloat16_backend'][0]}. MFU below is "
                      f"against the {'bf16' if result.get('dtype') == 'bfloat16' else 'fp32'} figure." + (f" XLA's own fp32 dot, same run: "
                      f"{c['matmul_float32_xla_flops'] / 1e9:.1f} GFLOP/s." if "matmul_float32_xla_flops" in c else ""), ""]
    if "train" in result:
        lines += ["## Training step per variant", "",
                  "`mixer alone`: the sequence mixer's forward + backward timed by itself at the same shape, times "
                  "the layer count, and the FLOP rate of its own work: where a variant's step time goes.", "",
                  "| variant | step (s) | tokens/s | MFU | MFU / dense | compile (s) | memory (MB) | mixer alone (s) "
                  "| mixer GFLOP/s |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in result["train"].items():
            if "skipped" in r:
                lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | | |")
                continue
            mem = r["memory_bytes"] / 2**20 if r["memory_bytes"] else None
            rate = r["mixer_flops_per_s"] / 1e9 if r.get("mixer_flops_per_s") else None
            lines.append(f"| {name} | {f(r['step_s'])} | {f(r['tokens_per_s'], '.0f')} | {f(r['mfu'], '.1%')} | "
                         f"{f(r.get('mfu_vs_dense'), '.2f')} | {f(r['compile_s'], '.1f')} | {f(mem, '.0f')} | "
                         f"{f(r.get('mixer_s'))} | {f(rate, '.0f')} |")
        lines.append("")
    if "seqlen" in result:
        lengths = [k for k in next(iter(result["seqlen"].values())) if k.isdigit()] if result["seqlen"] else []
        lines += ["## Sequence-length scaling (constant tokens per batch)", "",
                  "Each cell: training step seconds / compiled memory MB (the mixer layers' forward + backward "
                  "alone, seconds).", "",
                  "| mixer | " + " | ".join(f"@ {n}" for n in lengths) + " | time ratio |",
                  "|---|" + "---|" * (len(lengths) + 1)]
        for kind, rows in result["seqlen"].items():
            if "skipped" in rows:
                continue
            cells = [f"{f(rows[n]['step_s'])} / {f((rows[n]['memory_bytes'] or 0) / 2**20, '.0f')}"
                     + (f" ({f(rows[n]['mixer_s'])})" if "mixer_s" in rows[n] else "") for n in lengths]
            lines.append(f"| {kind} | " + " | ".join(cells) + f" | {f(rows['time_ratio_longest_vs_shortest'], '.2f')} |")
        lines.append("")
    if "decode" in result:
        contexts = [k for k in next(iter(result["decode"].values())) if k.isdigit()] if result["decode"] else []
        lines += ["## Batch-1 decode latency per token", "",
                  "| mixer | " + " | ".join(f"ms @ {n}" for n in contexts) + " | ratio | state bytes @ longest |",
                  "|---|" + "---|" * (len(contexts) + 2)]
        for kind, rows in result["decode"].items():
            if "skipped" in rows:
                continue
            cells = [f(rows[n]["latency_s"] * 1e3) for n in contexts]
            lines.append(f"| {kind} | " + " | ".join(cells) + f" | {f(rows['latency_ratio_longest_vs_shortest'], '.2f')} | "
                         f"{rows[contexts[-1]]['state_bytes']} |")
        lines.append("")
    if "sparse_decode" in result:
        lines += ["## Neuron-sparse decode (gather) vs dense FFN, batch 1", "",
                  "`perfect predictor`: the exact active set handed over for free, so only the active neurons' "
                  "rows of W_up and W_down are used: the ceiling of any predictor (Deja Vu's included), with the "
                  "rows gathered (XLA's take; PyTorch's index_select, against its own dense FFN) or read in place "
                  "by a C++ kernel (`cfm_jax/kernels/active_rows.py`, no gathered copy).", "",
                  "| activation ratio | dense (us) | gather (us) | measured speedup | theoretical (weights read) "
                  "| perfect predictor, XLA | perfect predictor, PyTorch | perfect predictor, in place |",
                  "|---|---|---|---|---|---|---|---|"]
        for ratio, r in result["sparse_decode"].items():
            if ratio == "predicted":
                continue
            lines.append(f"| {ratio} | {r['dense_s'] * 1e6:.1f} | {r['sparse_s'] * 1e6:.1f} | {r['speedup']:.2f}x | "
                         f"{r['theoretical_speedup']:.2f}x | {_x(r.get('perfect_predictor_speedup'))} | "
                         f"{_x(r.get('torch_perfect_predictor_speedup'))} | {_x(r.get('in_place_predictor_speedup'))} |")
        lines += ["", "Why the 2.5x / 4x targets cannot be met by the exact gather path: to know which neurons fire, "
                  "a ReLU FFN must compute x W_up in full (d x f weights read), and only W_down shrinks to the "
                  "active rows, so the weights read fall from 2 d f to d f + K d and the speedup of a "
                  "bandwidth-bound batch-1 FFN is at most 2 f / (f + K) < 2 (1.6x at ratio 0.25, 1.8x at 0.1; "
                  "gated forms: 3 f / (f + 2 K) < 3). Only an approximate predictor of the active set (Deja Vu's "
                  "low-rank predictor), which skips W_up's inactive columns too, can lift that bound; the "
                  "perfect-predictor columns are its ceiling. Gathering the rows (XLA, PyTorch) writes a copy "
                  "before the product reads it; reading them in place does not. " + _ceiling_reading(result["sparse_decode"])
                  + " The next table measures a real predictor.", ""]
        lines += predicted_markdown(result["sparse_decode"].get("predicted", {}))
    if "sparse_loss" in result:
        lines += ["## Sparse decode at a measured loss", ""] + bench_sparse_at_loss.markdown(result["sparse_loss"])
    if "compile" in result:
        lines += [f"First-step compile of the 8-layer dense transformer: {result['compile']['compile_s']:.1f} s.", ""]
    if "torch" in result:
        t = result["torch"]
        lines += ["## Dense training step vs PyTorch (eager, same architecture and sizes)", ""]
        if "skipped" in t:
            lines += [f"Skipped: {t['skipped']}.", ""]
        else:
            rounds = f" (medians of {len(t['rounds'])} paired rounds in one process, PyTorch's step and ours, " \
                "taking turns to go first)" if "rounds" in t else ""
            spread = (f", range over the rounds {t['ratio_range'][0]:.2f}-{t['ratio_range'][1]:.2f}"
                      if "ratio_range" in t else "")
            lines += [f"PyTorch {t['torch']['torch_version']} ({t['torch']['threads']} threads, {t['torch']['params']} "
                      f"parameters): {t['torch']['step_s'] * 1e3:.0f} ms per step; ours ({t['jax_params']} parameters): "
                      f"{t['jax_step_s'] * 1e3:.0f} ms{rounds}. PyTorch time / ours = {t['torch_vs_jax_time']:.2f}"
                      f"{spread} (above 1: ours is faster)."]
            if "minor_faults" in t:
                pairs = [(name, f) for name, f in (("PyTorch", t["minor_faults"]["torch"]), ("ours", t["minor_faults"]["ours"])) if f]
                slowest = max(range(len(t["rounds"])), key=lambda i: t["rounds"][i][1])
                lines[-1] += (" Minor page faults per step, median / max: " + ", ".join(
                    f"{name} {statistics.median(f):.0f} / {max(f)}" for name, f in pairs)
                    + f"; our slowest round ({t['rounds'][slowest][1] * 1e3:.0f} ms) faulted "
                    f"{t['minor_faults']['ours'][slowest]} times (PyTorch's tensors and our step's temporaries share one "
                    "malloc heap, so a PyTorch step can take memory our next step then faults in again).")
            if "matmul_flops" in t["torch"] and "jax_matmul_flops" in t:
                backend = t.get("jax_matmul_backend", ["xla"])[0]
                lines += ["", f"The matmul libraries on this machine, same run, fp32 {result['sizes']['matmul']}^2: "
                          f"PyTorch {t['torch']['matmul_flops'] / 1e9:.0f} GFLOP/s, ours ({backend}) "
                          f"{t['jax_matmul_flops'] / 1e9:.0f} GFLOP/s (PyTorch / ours = "
                          f"{t['torch']['matmul_flops'] / t['jax_matmul_flops']:.2f})"
                          + (f", XLA's own dot {t['xla_matmul_flops'] / 1e9:.0f} GFLOP/s." if backend != "xla" else ".")]
                if t.get("model_flops_per_step"):
                    theirs = t["model_flops_per_step"] / t["torch"]["step_s"] / t["torch"]["matmul_flops"]
                    ours = t["model_flops_per_step"] / t["jax_step_s"] / t["jax_matmul_flops"]
                    need = t["model_flops_per_step"] / t["torch"]["step_s"] / t["jax_matmul_flops"]
                    than = "higher" if need > theirs else "no higher"
                    lines += ["", f"Each step's model FLOPs against its own library's matmul ceiling: PyTorch "
                              f"{theirs:.0%}, ours {ours:.0%}. Matching PyTorch's step time would take ours to {need:.0%} "
                              f"of our ceiling, a {than} utilization than PyTorch reaches of its own."]
            if "step_matmuls" in t:
                m = t["step_matmuls"]
                rest = t["jax_step_s"] - m["xla_s"]
                lines += ["", f"Our step's matmuls alone: the step runs {m['count']} matmuls of {m['shapes']} shapes "
                          f"({m['flops'] / 1e9:.3g} GFLOP, listed from its jaxpr); each run alone and summed: XLA's dot "
                          f"{m['xla_s'] * 1e3:.0f} ms, PyTorch (torch.einsum, the same matmuls) {m['torch_s'] * 1e3:.0f} ms."]
                if t.get("jax_matmul_backend", ["xla"])[0] != "xla":
                    lines[-1] += (" Our step runs its projections and attention products in "
                                  f"{t['jax_matmul_backend'][0]} ({t['jax_matmul_backend'][1]}), PyTorch's own GEMM "
                                  "library, rather than XLA's dot: the gap between those two sums (each matmul timed alone) estimates what that saves.")
                elif rest > 0:
                    lines[-1] += (f" The rest of our step (step time - its matmuls alone) is {rest * 1e3:.0f} ms. With "
                                  f"PyTorch's matmul times and that rest, ours would take about "
                                  f"{(m['torch_s'] + rest) * 1e3:.0f} ms (PyTorch time / that = "
                                  f"{t['torch']['step_s'] / (m['torch_s'] + rest):.2f}; an estimate: matmuls alone "
                                  "need not take the same time inside a step).")
                else:  # tiny models: each matmul's dispatch outweighs its work
                    lines[-1] += " They take longer alone than the whole step, so no split is drawn from them."
            if "sublayer_s" in t["torch"] and "jax_sublayer_s" in t:
                lines += ["", "One block's sublayers, forward + backward at the training shape (no norms), same run:", "",
                          "| sublayer | PyTorch (ms) | ours (ms) | PyTorch / ours |", "|---|---|---|---|"]
                for name, ours in t["jax_sublayer_s"].items():
                    theirs = t["torch"]["sublayer_s"][name]
                    lines.append(f"| {name} | {theirs * 1e3:.1f} | {ours * 1e3:.1f} | {theirs / ours:.2f} |")
            lines.append("")
    if "moe" in result and "skipped" not in result["moe"]:
        m = result["moe"]
        lines += ["## MoE layer vs dense FFN of equal active parameters (forward + backward)", "",
                  "Both differentiate their input and their parameters, as inside a training step.", "",
                  f"MoE {m['moe_fwd_bwd_s'] * 1e3:.1f} ms, dense {m['dense_fwd_bwd_s'] * 1e3:.1f} ms: "
                  f"{m['moe_vs_dense']:.2f}x the dense time.", ""]
    if "seed_batch" in result:
        lines += bench_seed_batch.markdown(result["seed_batch"])
    rows = targets(result)
    if rows:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {r['target']} | {r['measured']} | {'yes' if r['met'] else 'NO'} |" for r in rows]
        lines.append("")
    return "\n".join(lines) + "\n"


def _stem(scale: str, device: str | None = None) -> str:
    """bench[_scale].md, or bench_<scale>_<device>.md for an accel run (one file per accelerator)."""
    if device is not None:
        return f"bench_{scale}_{device_slug(device)}"
    return "bench" if scale == "cpu" else f"bench_{scale}"


def read(out_dir: Path, scale: str, device: str | None = None) -> dict | None:
    path = Path(out_dir) / f"{_stem(scale, device)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def merge(old: dict | None, new: dict) -> dict:
    """`new`'s suites over `old`'s (same scale and machine, else `new` alone); each suite keeps the
    time it was measured at, so the markdown can say which suites come from which run."""
    if old is None or (old["scale"], old["machine"], old["device"]) != (new["scale"], new["machine"], new["device"]):
        return new
    merged = {**old, **{k: v for k, v in new.items() if k != "measured_at"}}
    merged["measured_at"] = {**old.get("measured_at", {}), **new["measured_at"]}
    return merged


def write(result: dict, out_dir: Path, command: str) -> Path:
    from cfm_jax import workdir as wd

    stem = _stem(result["scale"], result["device"] if result.get("profile") == "accel" else None)
    out_dir = Path(out_dir)
    result = {**result, "commands": [*result.get("commands", []), command]}
    wd.write_json(out_dir / f"{stem}.json", result)
    wd.write_atomic(out_dir / f"{stem}.md", to_markdown(result, command))
    return out_dir / f"{stem}.md"


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2)
