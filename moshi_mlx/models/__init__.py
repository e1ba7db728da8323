from .checkpoint import CheckpointError
from .config import ConfigError, LmConfig, config1b_202412, config1b_202412_16rvq, config_v0_1
from .generate import LmGen
from .lm import DepFormer, Lm, quantize

__all__ = ["CheckpointError", "ConfigError", "DepFormer", "Lm", "LmConfig", "LmGen",
           "config1b_202412", "config1b_202412_16rvq", "config_v0_1", "quantize"]
