"""Interop with the authors' JAX/Flax checkpoints."""
