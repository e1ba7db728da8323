from .sampling import Sampler, SamplingError, check_temperature, check_top_k, stream_sampler

__all__ = ["Sampler", "SamplingError", "check_temperature", "check_top_k", "stream_sampler"]
