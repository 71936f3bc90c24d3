"""Generation engines behind one interface: Hugging Face ``generate`` (default) and vLLM (lazy)."""

from dphrl.engines.base import Engine, Generation

__all__ = ["Engine", "Generation"]
