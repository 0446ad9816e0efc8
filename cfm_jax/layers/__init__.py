"""Shared building blocks and the first registered kinds (attention mixer, dense and sparse FFNs)."""
