"""The slot contracts: what a registered kind must provide, as `typing.Protocol`s.

The model, its accounting and the analyses ask these (isinstance) rather than probing for methods,
and the contract tests check every registered kind against them. Shapes: x (batch, seq, d_model);
aux = {"loss": scalar, "stats": {name: scalar}} (cfm_jax.layers.common.make_aux).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Mixer(Protocol):
    """A sequence mixer: causal in its __call__, with a token-by-token decoding form that equals it."""

    def __call__(self, x: Any) -> tuple[Any, dict]: ...  # (batch, seq, d) -> (y, aux)

    def init_state(self, batch: int, max_len: int) -> Any: ...  # decoding state for up to max_len tokens

    def step(self, x: Any, state: Any) -> tuple[Any, Any]: ...  # (batch, d), state -> (y_t, new state)

    def state_bytes(self, context_len: int) -> int: ...  # decoding state per sequence at that context

    def flops_per_token(self, context_len: int) -> int: ...  # forward FLOPs per token at that context


@runtime_checkable
class FFN(Protocol):
    """A channel mixer. `active_params_per_token` may take `activation_ratio` (and `gate_ratio`): the
    model's accounting then passes the measured ratios (layers.model.ffn_active_params)."""

    def __call__(self, x: Any) -> tuple[Any, dict]: ...  # (batch, seq, d) -> (y, aux)

    def flops_per_token(self) -> int: ...

    def active_params_per_token(self) -> int: ...


@runtime_checkable
class NeuronFFN(FFN, Protocol):
    """An FFN with neurons the analyses can read and rewrite: y = down(hidden(x)), a neuron inactive
    for a token where its hidden activation is exactly 0."""

    down: Any  # Linear (d_ff -> d_model)

    def hidden(self, x: Any) -> Any: ...  # (..., d_model) -> (..., d_ff)


@runtime_checkable
class ExpertFFN(FFN, Protocol):
    """An FFN of experts whose per-token combine weights (batch, seq, E) a hook can read and rewrite."""

    def expert_forward(self, x: Any, hook: Any) -> Any: ...  # (batch, seq, d) -> y, with weights = hook(weights)
