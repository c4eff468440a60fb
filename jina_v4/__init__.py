"""jina_v4: a minimal PyTorch implementation of jina-embeddings-v4 that reproduces the reference outputs.

jina_v4/model is the model (what to read and change); jina_v4/pipeline.py runs it from prepared inputs to vectors,
jina_v4/execution.py decides how (attention kernel, deterministic shapes); jina_v4/apps holds the applications
built on them (the CLI, corpus jobs, the server, Ray, training, late chunking and late interaction)."""

from .apps.chunking import encode_chunks
from .apps.scoring import maxsim, pad_multivectors, similarity_map
from .model import (
    AdapterConfig,
    Both,
    CheckpointError,
    ConfigError,
    InputError,
    JinaV4,
    JinaV4Config,
    Multi,
    PreprocessorConfig,
    Single,
    Task,
    TokenizerConfig,
)
from .pipeline import encode

__all__ = [
    "JinaV4",
    "encode",
    "Single",
    "Multi",
    "Both",
    "Task",
    "maxsim",
    "pad_multivectors",
    "similarity_map",
    "encode_chunks",
    "JinaV4Config",
    "AdapterConfig",
    "PreprocessorConfig",
    "TokenizerConfig",
    "ConfigError",
    "CheckpointError",
    "InputError",
]
