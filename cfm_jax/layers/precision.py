"""Compute precision (`model.dtype`): parameters, optimizer state, checkpoints and the loss stay
float32; with `bfloat16` every floating weight matrix (ndim >= 2: embeddings, projections, experts)
is cast to bfloat16 for the forward pass, so activations and matmuls run in bfloat16 while gradients
flow back to the float32 parameters through the cast. Vectors (norm scales, decays, biases) stay
float32; every mixer's recurrence and RMSNorm's statistics already compute in float32 and return
the input's dtype; the logits are float32 before the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_view(state, dtype: str):
    """state (params or a whole model state) with every floating matrix in the compute dtype."""
    if dtype == "float32":
        return state
    target = DTYPES[dtype]
    return jax.tree.map(lambda p: p.astype(target) if jnp.issubdtype(p.dtype, jnp.floating) and p.ndim >= 2 else p,
                        state)
