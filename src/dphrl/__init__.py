"""dphrl: RL from verifiable rewards with the divergence as a first-class choice (DPH-RL)."""

__version__ = "0.1.0"
