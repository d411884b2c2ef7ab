"""JAX/Flax neural machine translation toolkit."""
