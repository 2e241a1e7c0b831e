"""odm-sr: quantization-aware training of super-resolution networks."""

__version__ = "0.1.0"
