"""blockprune_jax: how much should each part of GPT-2 be pruned? A JAX/Flax answer."""
__version__ = "0.1.0"
