"""loom: train Transformer models on one device or thousands."""

__version__ = "0.1.0"
