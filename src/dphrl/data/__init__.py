"""Datasets: one common example record, loaders, prompt templates, synthetic tasks."""

from dphrl.data.example import Example

__all__ = ["Example"]
