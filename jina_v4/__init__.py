"""jina_v4: a minimal PyTorch implementation of jina-embeddings-v4 that reproduces the reference outputs."""

from .config import AdapterConfig, ConfigError, JinaV4Config, PreprocessorConfig, TokenizerConfig
from .late import maxsim, pad_multivectors
from .loading import CheckpointError
from .model import JinaV4
from .processing import InputError

__all__ = ["JinaV4", "maxsim", "pad_multivectors", "JinaV4Config", "AdapterConfig", "PreprocessorConfig",
           "TokenizerConfig", "ConfigError", "CheckpointError", "InputError"]
