"""Moshi, Kyutai's full-duplex speech-text model, running on MLX."""

__version__ = "0.1.0"
