from .checkpoint import CheckpointError
from .config import ConfigError, LmConfig, config_v0_1
from .generate import LmGen
from .lm import DepFormer, Lm

__all__ = ["CheckpointError", "ConfigError", "DepFormer", "Lm", "LmConfig", "LmGen", "config_v0_1"]
