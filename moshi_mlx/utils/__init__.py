from .sampling import Sampler

__all__ = ["Sampler"]
