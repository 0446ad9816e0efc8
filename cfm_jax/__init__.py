"""cfm_jax: neuron-sparse FFNs vs MoE vs dense, attention vs linear mixers, in one block and one harness."""

__version__ = "0.1.0"
