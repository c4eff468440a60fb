"""jina_v4: a minimal PyTorch implementation of jina-embeddings-v4 that reproduces the reference outputs."""

from .chunking import encode_chunks
from .config import AdapterConfig, ConfigError, JinaV4Config, PreprocessorConfig, TokenizerConfig
from .loading import CheckpointError
from .model import JinaV4
from .processing import InputError
from .scoring import maxsim, pad_multivectors, similarity_map

__all__ = ["JinaV4", "maxsim", "pad_multivectors", "similarity_map", "encode_chunks", "JinaV4Config",
           "AdapterConfig", "PreprocessorConfig", "TokenizerConfig", "ConfigError", "CheckpointError", "InputError"]
