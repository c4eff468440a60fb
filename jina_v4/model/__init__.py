"""The model: what a reader studies. Config and loading, processing (inputs to packed batches), the two towers,
LoRA and the heads. How it runs is jina_v4/pipeline.py (inputs to vectors) and jina_v4/execution.py (kernels,
deterministic shapes); it imports nothing from jina_v4/apps."""

from .config import AdapterConfig, ConfigError, JinaV4Config, PreprocessorConfig, Task, TokenizerConfig
from .heads import Both, Multi, Single
from .loading import CheckpointError
from .model import JinaV4
from .processing import InputError

__all__ = [
    "JinaV4",
    "Single",
    "Multi",
    "Both",
    "Task",
    "JinaV4Config",
    "AdapterConfig",
    "PreprocessorConfig",
    "TokenizerConfig",
    "ConfigError",
    "CheckpointError",
    "InputError",
]
