"""Integrations of dphrl's methods into other training libraries.

* :mod:`dphrl.integrations.trl`: ``DPHGRPOTrainer`` (DPH-RL on TRL's ``GRPOTrainer``), plus adapters that
  turn dphrl rewards and examples into TRL reward functions and datasets. Importing it needs ``trl``.

Nothing here is imported by ``dphrl`` itself, so dphrl does not depend on these libraries.
"""
