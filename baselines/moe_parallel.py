"""Expert parallelism for the `moe` FFN: experts sharded over the mesh axis `expert`, tokens exchanged
with fixed-size `jax.lax.all_to_all` inside `jax.shard_map`.

Active when a mesh with an `expert` axis of size P > 1 is set (`with jax.set_mesh(mesh): ...`, as
the trainer does for `train.mesh=data:D,expert:P`). As in cfm_jax/sharding.py, the batch is split
over every mesh axis and the expert weights over `expert` (replicated over `data`). Routing and
statistics run outside the shard_map on the global arrays, so they are global by construction.
Inside, each device fills capacity buffers (E, G_local*C, d) for its own sequences, sends expert e's
rows to the device of its `expert` row holding e, runs its E/P experts on the rows from the P
devices, and sends the outputs back to combine. Dropless uses the same buffers with C = T (a token
uses an expert once, so nothing can be dropped); that computes E/K times the useful expert work,
since ragged exchanges (`ragged_all_to_all`) are unimplemented on XLA:CPU.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from baselines import moe_dispatch as dispatch
from cfm_jax.errors import UserError

AXIS = "expert"


def expert_axis_size() -> int:
    """Size of the active mesh's `expert` axis (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.shape[AXIS] if AXIS in mesh.axis_names else 1


def check_mesh(cfg, expert_devices: int | None = None) -> None:
    """UserError unless cfg.n_experts divides over the expert axis (default: the active mesh's)."""
    p = expert_axis_size() if expert_devices is None else expert_devices
    if cfg.n_experts % p:
        raise UserError(f"model.ffn.n_experts={cfg.n_experts} is not divisible by the mesh's expert axis ({p} devices)")


def expert_parallel_dispatch(x, r, w: dispatch.Experts, cfg, batch: int, seq: int):
    """Same contract and result as the single-device dispatch: x (N, d), routing r of (N, K) arrays
    -> (y (N, d), kept (N, K)). Capacity groups never straddle devices."""
    check_mesh(cfg)
    mesh = jax.sharding.get_abstract_mesh()
    devices = math.prod(mesh.shape.values())
    if batch % devices:
        raise UserError(f"batch size {batch} is not divisible by the mesh's {devices} devices")
    local_batch = batch // devices
    if cfg.dispatch == "dropless":
        groups, cap = (local_batch, seq), seq
    else:
        if cfg.group_size and (local_batch * seq) % cfg.group_size:
            raise UserError(f"model.ffn.group_size={cfg.group_size} must divide the tokens per device "
                            f"({local_batch * seq}) under expert parallelism")
        groups = dispatch.group_shape(local_batch, seq, cfg.group_size)
        cap = dispatch.capacity(groups[1], cfg.slots(), cfg.n_experts, cfg.capacity_factor)

    def local(x, experts, weights, valid, gate, up, down):
        local_w = dispatch.Experts(gate, up, down, w.act)  # (E/P, ...) this device's experts

        def exchange_and_compute(xb):  # (E, G_local*C, d), rows for every expert
            xb = jax.lax.all_to_all(xb, AXIS, 0, 1, tiled=True)  # (E/P, P*G_local*C, d)
            yb = dispatch.expert_ffn(xb, local_w)
            return jax.lax.all_to_all(yb, AXIS, 1, 0, tiled=True)  # back to (E, G_local*C, d)

        return dispatch.capacity_dispatch(x, experts, weights, valid, local_w, groups=groups, cap=cap,
                                          n_experts=cfg.n_experts, expert_fn=exchange_and_compute)

    tokens, per_expert = P(tuple(mesh.axis_names), None), P(AXIS, None, None)  # batch over every axis
    specs = (tokens,) * 4 + (per_expert,) * 3
    fn = jax.shard_map(local, in_specs=specs, out_specs=(tokens, tokens))
    args = (x, r.experts, r.weights, r.valid, w.gate, w.up, w.down)
    if mesh.axis_types[mesh.axis_names.index(AXIS)] == jax.sharding.AxisType.Explicit:
        args = [jax.reshard(a, s) for a, s in zip(args, specs)]  # explicit sharding: place them first
    return fn(*args)
