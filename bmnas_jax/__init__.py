"""bmnas_jax: BM-NAS (Bilevel Multimodal Neural Architecture Search) in JAX/Flax."""

__version__ = "0.1.0"
