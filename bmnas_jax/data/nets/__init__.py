"""Backbones of the paper's datasets, with converters from the original PyTorch weights."""
