"""Pieces the apps share: sampling (`Sampler`, `SamplingSettings` and their checks, on MLX) and
file writing (`output`, no MLX). The sampling names are imported on first use, so that modules
which only move audio or bytes can use `utils.output` without importing MLX."""

from importlib import import_module

__all__ = ["Sampler", "SamplingError", "SamplingSettings", "check_temperature", "check_top_k"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module(".sampling", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
