"""The training loop: AdamW + warmup/cosine + clipping, orbax checkpoints, metrics.jsonl, resume.

    train(resolve("smoke", ["data.task=mqar"]), Path("runs/demo"))

Running again on the same workdir resumes from the latest checkpoint; batches are a pure function of
(seed, step), so a resumed run reproduces the losses of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cfm_jax import policy
from cfm_jax import workdir as wd
from cfm_jax.checkpoint import Checkpoints
from cfm_jax.config import Config, TrainConfig, to_dict
from cfm_jax.data import IGNORE, make_task
from cfm_jax.errors import TrainingDiverged, UserError
from cfm_jax.layers.common import TrainingStep
from cfm_jax.layers.model import build_model
from cfm_jax.layers.precision import compute_view
from cfm_jax.progress import progress_bar
from cfm_jax.tracking import Trackers
from cfm_jax.sharding import check_batch, global_batch, make_mesh, state_shardings


def make_optimizer(cfg: TrainConfig):
    """AdamW on a linear-warmup + cosine schedule, with global-norm clipping. Returns (tx, schedule)."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # matrices only
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
    return tx, schedule


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits (batch, seq, vocab), labels (batch, seq) with IGNORE -> (sum of CE, #correct, #scored)."""
    mask = labels != IGNORE
    safe = jnp.where(mask, labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == safe) & mask
    return jnp.sum(ce * mask), jnp.sum(correct), jnp.sum(mask)


def make_train_step(graphdef, tx, skip_nonfinite: bool = False, dtype: str = "float32", jit: bool = True):
    """The jitted step: (params, rest, opt_state, batch, step) -> (params, rest, opt_state, metrics).

    `rest` is every non-parameter variable of the model (e.g. a router's selection bias); whatever
    the forward pass writes into it is carried to the next step. jit=False: the plain function, to
    transform further (cfm_jax.bench.seed_batch vmaps it over seeds).
    """

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, compute_view(params, dtype), rest)
        positions = batch.get("positions")  # a task that scores few positions: the head runs only there
        logits, aux = model(batch["inputs"], positions=positions)
        labels = batch["labels"] if positions is None else jnp.take_along_axis(batch["labels"], positions, axis=1)
        ce_sum, _, n = cross_entropy(logits, labels)
        ce = ce_sum / jnp.maximum(n, 1)
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        return ce + aux["loss"], (ce, aux, new_rest)

    def train_step(params, rest, opt_state, batch, step):
        rest = with_training_step(graphdef, params, rest, step)
        (loss, (ce, aux, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # Checked before any save (a norm would overflow for large finite parameters, so element by element).
        params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))
        new = (new_params, new_rest, new_opt_state)
        if skip_nonfinite:
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
            new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, (params, rest, opt_state))
        metrics = {"loss": loss, "ce": ce, "aux_loss": aux["loss"], "grad_norm": grad_norm,
                   "params_finite": params_finite.astype(jnp.float32)}
        return *new, {**metrics, **aux["stats"]}

    return jax.jit(train_step) if jit else train_step


def with_training_step(graphdef, params, rest, step):
    """`rest` with every TrainingStep variable set to `step`."""
    model = nnx.merge(graphdef, params, rest)
    counters = nnx.state(model, TrainingStep)
    nnx.update(model, jax.tree.map(lambda v: jnp.full_like(v, step), counters))
    return nnx.state(model, nnx.Not(nnx.Param))


BYTES_PER_PARAM = 16  # float32 parameters, gradients and AdamW's two moments


def available_memory() -> int | None:
    """Bytes the OS can still give this process (MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(cfg: Config, vocab_size: int) -> None:
    """Refuse, before anything is allocated, a model whose parameters, gradients and optimizer
    state alone exceed the host memory available (on a CPU backend; accelerators report OOM
    themselves). The count comes from an abstract model (nnx.eval_shape), so it is exact and free."""
    if not policy.on_cpu() or (free := available_memory()) is None:
        return
    abstract = nnx.eval_shape(lambda: build_model(cfg.model, vocab_size, 0))
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    need = BYTES_PER_PARAM * n // max(1, jax.device_count())
    if need > free:
        raise UserError(f"model of {n:,} parameters needs about {need / 2**30:.1f} GiB for parameters, gradients and "
                        f"optimizer state, more than the {free / 2**30:.1f} GiB available; make it smaller "
                        "(model.d_model, model.n_layers, d_ff)")


def init_state(cfg: Config, vocab_size: int):
    """(graphdef, state, tx, schedule) with state = {"params", "rest", "opt_state"}."""
    model = build_model(cfg.model, vocab_size, cfg.train.seed)
    model.train()  # training-mode graphdef (see layers/common.py); evaluation calls model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, schedule = make_optimizer(cfg.train)
    return graphdef, {"params": params, "rest": rest, "opt_state": tx.init(params)}, tx, schedule


def train(cfg: Config, workdir: Path, progress: bool = True, reconfigure: bool = False) -> dict:
    """Train (or resume) the run in `workdir` up to cfg.train.steps. Returns the last metrics row.

    A workdir refuses a config that differs from its config.json (beyond RESUMABLE_KEYS) unless
    `reconfigure`: then training continues from the checkpoint under the new config, if it fits.
    """
    workdir = Path(workdir)
    if not reconfigure:
        wd.check_compatible(workdir, cfg)  # before anything is written
    task = make_task(cfg.data)
    tc = cfg.train
    mesh = make_mesh(tc.mesh)
    check_memory(cfg, task.vocab_size)
    graphdef, state, tx, schedule = init_state(cfg, task.vocab_size)
    if mesh is not None:
        check_batch(tc.batch_size, mesh)
        state = jax.device_put(state, state_shardings(state, tx, mesh, tc.fsdp))
    writer = jax.process_index() == 0  # only process 0 writes config and metrics

    with wd.locked(workdir) if writer else contextlib.nullcontext():  # one writer per workdir (process 0 of a multi-host run)
        if not reconfigure:
            wd.check_compatible(workdir, cfg)  # again, now that no other writer can change it
        ckpt = Checkpoints(workdir / wd.CHECKPOINTS, tc.keep_checkpoints)
        try:
            start, restored = ckpt.restore_latest(state)
        except UserError:
            ckpt.close()
            raise
        start, state = (start, restored) if start else (0, state)
        if writer:
            wd.save_config(workdir, cfg)
        rows = wd.truncate_metrics(workdir, start) if writer else wd.read_metrics(workdir)
        seconds = rows[-1]["seconds"] if rows else 0.0
        last = rows[-1] if rows else {}
        if start >= tc.steps:
            ckpt.close()
            return last

        step_fn = make_train_step(graphdef, tx, skip_nonfinite=tc.skip_nonfinite, dtype=cfg.model.dtype)
        validate = make_validation(graphdef, task, cfg) if tc.eval_every else None
        place = (lambda b: global_batch(b, mesh)) if mesh is not None else (lambda b: b)
        tokens_per_step = tc.batch_size * cfg.data.seq_len
        bar = progress_bar(tc.steps, start, workdir.name, enabled=bool(progress and writer))
        trackers = None
        batch = place(task.train_batch(tc.seed, start, tc.batch_size))
        skipped, in_a_row = int(last.get("skipped_steps", 0)), 0
        t0 = time.perf_counter()
        try:
            if writer and (tc.tensorboard or tc.wandb):
                trackers = Trackers(workdir, to_dict(cfg), tc.wandb, tensorboard=tc.tensorboard)
            with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
                for step in range(start, tc.steps):
                    params, rest, opt_state, metrics = step_fn(state["params"], state["rest"], state["opt_state"], batch, step)
                    state = {"params": params, "rest": rest, "opt_state": opt_state}
                    if step + 1 < tc.steps:  # prepare the next batch while the device works
                        batch = place(task.train_batch(tc.seed, step + 1, tc.batch_size))
                    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
                    done = step + 1
                    if not (math.isfinite(loss) and math.isfinite(grad_norm) and float(metrics["params_finite"]) == 1.0):
                        if not tc.skip_nonfinite:
                            raise TrainingDiverged(_diverged_message(done, metrics, ckpt.latest_step(), workdir))
                        skipped += 1  # the step function left parameters and optimizer state unchanged
                        in_a_row += 1
                        if in_a_row >= tc.max_consecutive_skips:
                            raise TrainingDiverged(
                                f"{in_a_row} non-finite steps in a row up to step {done} (train.max_consecutive_skips="
                                f"{tc.max_consecutive_skips}): stopped; parameters are those of the last finite step, "
                                f"last checkpoint: {ckpt.latest_step() or 'none'} in {workdir / wd.CHECKPOINTS}")
                    else:
                        in_a_row = 0
                    bar.update(1)
                    evaluating = validate is not None and (done % tc.eval_every == 0 or done == tc.steps)
                    if done % tc.log_every == 0 or done == tc.steps or evaluating:
                        bar.set_postfix(loss=f"{loss:.4f}")
                        last = {
                            "step": done, "loss": loss, "lr": float(schedule(step)), "tokens": done * tokens_per_step,
                            "seconds": round(seconds + time.perf_counter() - t0, 3),
                            **{k: float(v) for k, v in metrics.items() if k != "loss"},
                        }
                        if tc.skip_nonfinite:
                            last["skipped_steps"] = skipped
                        if evaluating:
                            last.update(validate(state["params"], state["rest"]))
                        if writer:
                            wd.append_metrics(workdir, last)
                        if trackers is not None:
                            trackers.log(last, tokens_per_step)
                    if done % tc.checkpoint_every == 0 or done == tc.steps:
                        jax.block_until_ready(state)
                        ckpt.save(done, state)
        finally:  # sys.exc_info(): the error propagating through this finally, if any
            close_all([bar.close, ckpt.close, *([trackers.close] if trackers is not None else [])],
                      failing=sys.exc_info()[1] is not None)
        return last


def close_all(closers, failing: bool) -> None:
    """Call every closer. While an error propagates (`failing`), a failure in closing is its
    consequence (TensorBoard flushing its buffer onto the disk a checkpoint save just filled) and must
    not replace it; otherwise the first such failure is raised once all have run."""
    first = None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - re-raised below unless another error is already on its way
            first = first or e
    if first is not None and not failing:
        raise first


def make_validation(graphdef, task, cfg: Config):
    """`train.eval_every`: fn(params, rest) -> {"eval/SET/loss", "eval/SET/accuracy", ...} on the
    task's evaluation set at the training length (text: "val"; synthetic tasks: "lenL", L = seq_len, or
    every "lenLkvK" of MQAR with data.eval_kv_pairs; else the first set), in evaluation mode. The keys' "eval/" prefix tells them from training values
    in metrics.jsonl; `cfm-jax report` draws the curves from them."""
    from cfm_jax.harness.evaluate import evaluate_sets

    sets = task.eval_sets(cfg.train.batch_size)
    at_length = re.compile(rf"len{cfg.data.seq_len}(kv\d+)?")  # MQAR with data.eval_kv_pairs: one set per count
    names = [n for n in sets if at_length.fullmatch(n)] or [next(iter(sets))]

    def validate(params, rest) -> dict:
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        results, _ = evaluate_sets(model, task, {n: sets[n] for n in names})
        return {f"eval/{n}/{k}": float(v) for n in names for k, v in results[n].items() if k != "tokens"}

    return validate


def _diverged_message(step: int, metrics: dict, kept: int | None, workdir: Path) -> str:
    """One line: the step, the non-finite quantity, the first layer whose statistics are non-finite."""
    values = {k: float(v) for k, v in metrics.items()}
    what = ("loss" if not math.isfinite(values["loss"]) else "gradient norm" if not math.isfinite(values["grad_norm"])
            else "parameters after the update" if values.get("params_finite", 1.0) != 1.0 else "value")
    layers = sorted({k.rsplit("/", 1)[1] for k, v in values.items() if "/layer" in k and not math.isfinite(v)})
    where = f" (first non-finite statistics in {layers[0]})" if layers else ""
    return (
        f"non-finite {what} at step {step}{where}: loss={values['loss']}, grad_norm={values['grad_norm']}; "
        f"stopped, last good checkpoint: {'step ' + str(kept) if kept else 'none'} in {workdir / wd.CHECKPOINTS} "
        "(train.skip_nonfinite=true skips such steps instead)"
    )


def restore_model(workdir: Path, cfg: Config, vocab_size: int):
    """The trained model at the workdir's latest checkpoint, plus that step."""
    graphdef, state, _, _ = init_state(cfg, vocab_size)
    ckpt = Checkpoints(Path(workdir) / wd.CHECKPOINTS, cfg.train.keep_checkpoints)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"workdir {str(workdir)!r} has no checkpoint yet (run `cfm-jax train` first)")
        state = ckpt.restore(step, state)  # the latest only: evaluating an older step would mislabel eval.json
    finally:
        ckpt.close()
    model = nnx.merge(graphdef, state["params"], state["rest"])
    model.eval()
    return model, step
