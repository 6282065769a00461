"""moco_jax: MoCo v1/v2 self-supervised pretraining in JAX/Flax."""
