"""The architectures cfm_jax is compared with (MoE, Mamba, linear attention, ...), each a registered
ffn or mixer kind. Every module in this package is imported by `cfm_jax.registry.load_plugins`."""
