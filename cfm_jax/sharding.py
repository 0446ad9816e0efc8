"""Device mesh and partition rules, all in one place.

    train.mesh=data:4,expert:2     a 4 x 2 mesh over 8 devices (axes: data, expert)
    train.fsdp=true                shard dense weight matrices over `data` too (FSDP style)

The batch is split over every mesh axis (data and expert both hold different sequences); parameters
are replicated unless a rule below shards them; jit (GSPMD) inserts the communication. MoE expert
weights (E, ...) are split over `expert`, whose all_to_all dispatch lives in baselines/moe_parallel.py.
With several processes (one per host, see README "Scaling out"), each process builds only its rows
of the global batch.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from cfm_jax.errors import UserError

AXES = ("data", "expert")
# (regex on the parameter path, spec builder) - first match wins.
EXPERT_WEIGHT = re.compile(r"(^|/)w_(gate|up|down)$")


def parse_mesh(spec: str) -> dict[str, int]:
    """'data:4,expert:2' -> {'data': 4, 'expert': 2}; '' -> {}."""
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition(":")
        if name not in AXES or not size.isdigit() or int(size) < 1 or name in axes:
            raise UserError(f"bad train.mesh entry {part!r}; write AXIS:SIZE with AXIS in {', '.join(AXES)}, e.g. data:4,expert:2")
        axes[name] = int(size)
    return axes


def make_mesh(spec: str) -> jax.sharding.Mesh | None:
    """The mesh for train.mesh, or None for plain single-device execution."""
    axes = parse_mesh(spec)
    if not axes:
        return None
    n = int(np.prod(list(axes.values())))
    if n > jax.device_count():
        raise UserError(f"train.mesh={spec!r} needs {n} devices; {jax.device_count()} are visible")
    auto = (jax.sharding.AxisType.Auto,) * len(axes)  # let jit (GSPMD) propagate shardings
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=auto, devices=jax.devices()[:n])


def param_spec(path: str, shape: tuple[int, ...], mesh, fsdp: bool) -> P:
    axes = dict(zip(mesh.axis_names, mesh.devices.shape))
    if EXPERT_WEIGHT.search(path) and len(shape) == 3 and "expert" in axes and shape[0] % axes["expert"] == 0:
        return P("expert", None, None)
    if fsdp and len(shape) >= 2 and "data" in axes:
        for dim in np.argsort(shape)[::-1]:  # the largest dimension that divides evenly
            if shape[dim] % axes["data"] == 0:
                return P(*["data" if i == dim else None for i in range(len(shape))])
    return P()


def _path(keypath) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)


def state_shardings(state: dict, tx, mesh, fsdp: bool) -> dict:
    """NamedShardings for the train state {"params", "rest", "opt_state"}: optimizer moments follow
    their parameters, everything else is replicated."""
    replicated = NamedSharding(mesh, P())
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: NamedSharding(mesh, param_spec(_path(kp), x.shape, mesh, fsdp)), state["params"]
    )
    opt = optax.tree_map_params(
        tx, lambda _, s: s, state["opt_state"], params, transform_non_params=lambda _: replicated
    )
    return {"params": params, "rest": jax.tree.map(lambda _: replicated, state["rest"]), "opt_state": opt}


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def global_batch(batch: dict, mesh) -> dict:
    """Host arrays of the GLOBAL batch -> sharded jax arrays; each process contributes its rows."""
    sharding = batch_sharding(mesh)
    n_proc, proc = jax.process_count(), jax.process_index()

    def put(x):
        rows = x.shape[0] // n_proc
        return jax.make_array_from_process_local_data(sharding, x[proc * rows:(proc + 1) * rows], x.shape)

    return {k: put(v) for k, v in batch.items()}


def check_batch(batch_size: int, mesh) -> None:
    n = int(np.prod(mesh.devices.shape))
    if batch_size % n or batch_size % jax.process_count():
        raise UserError(f"train.batch_size={batch_size} must be divisible by the mesh's {n} devices")
