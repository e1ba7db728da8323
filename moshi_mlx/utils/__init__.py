"""Sampling (`Sampler`, which needs MLX) and file helpers (`utils.files`, which does not)."""

__all__ = ["Sampler"]


def __getattr__(name: str):
    # Imported on first use, so that `utils.files` stays free of MLX for the audio modules.
    if name == "Sampler":
        from .sampling import Sampler

        return Sampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
