"""`kat train CONFIG.yaml key=value ...`: run configuration (typed sections and the YAML loader)."""

from kat_megatron.config.loader import config_to_dict, dump_config, format_config, load_config
from kat_megatron.config.schema import (
    CheckpointConfig,
    DataConfig,
    KatConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    TrainingConfig,
    check_layout,
)

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "KatConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainingConfig",
    "check_layout",
    "config_to_dict",
    "dump_config",
    "format_config",
    "load_config",
]
