"""jina-embeddings-v4: tokens -> embeddings -> vision tower -> image features scattered into the pad tokens
-> M-RoPE decoder with the task LoRA -> pooled single vector or projected multi-vectors.

`JinaV4` is the nn.Module: the towers, the heads' modules, `from_pretrained` and `forward(batch)`. The released
API's `encode_text` / `encode_image` (and `encode`, `prepare`, `encode_items`) come from `pipeline.EncodeAPI`:
each prepares the inputs (processing.py) and runs `pipeline.encode`, which packs items into batches sorted by
length (no padding token is computed), runs the model and a head, and returns the results in input order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..pipeline import EncodeAPI
from . import lora
from .config import AdapterConfig, JinaV4Config, Task
from .heads import MeanPooling
from .loading import choose_dtype, load_checkpoint, read_configs, reference_name, resolve, to_dtype
from .processing import Batch, Processor
from .text import TextModel
from .vision import VisionTower


class NoInit(TorchFunctionMode):
    """torch.nn.init's functions do nothing to meta tensors: the checkpoint replaces every value, and their meta
    versions import torch._dynamo, about a second at the start of every process that loads a model."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__module__", None) == "torch.nn.init" and isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return func(*args, **kwargs)


class JinaV4(EncodeAPI, nn.Module):
    def __init__(self, config: JinaV4Config, adapter_config: AdapterConfig):
        super().__init__()
        self.config, self.adapter_config = config, adapter_config
        self.model = TextModel(config.text_config)
        self.visual = VisionTower(config.vision_config)
        self.pooling = MeanPooling()  # which rows make a single vector (heads.py); no parameters
        self.multi_vector_projector = lora.LoRALinear(config.text_config.hidden_size, config.multi_vector_projector_dim)
        self.adapted = lora.attach_adapters(self, adapter_config, list(config.task_names), reference_name)
        self.processor: Processor | None = None
        self._task: str | None = None
        self.max_batch_tokens = 16384  # tokens (+ image patches) per forward pass: what bounds memory
        self.dtype_reason = ""  # why from_pretrained chose the dtype (loading.choose_dtype); the CLI prints it

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = "jinaai/jina-embeddings-v4",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> JinaV4:
        """A checkpoint directory or hub repo id. device: default cuda if available, else cpu. dtype: default the
        checkpoint's torch_dtype (bfloat16 for the release), except float32 on a CPU without native bf16 matmul
        (loading.choose_dtype); float64 for exactness proofs."""
        path = resolve(name_or_path, revision, cache_dir, local_files_only, token)
        model = cls.on_meta(path)
        processor = Processor.from_dir(path, model.config)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: this torch build sees no CUDA device; use device='cpu'")
        asked = None if dtype is None else to_dtype(dtype)
        dtype, model.dtype_reason = choose_dtype(device, to_dtype(model.config.torch_dtype), asked)
        load_checkpoint(model, path, dtype, device)
        model.processor = processor
        return model.eval().requires_grad_(False)

    @classmethod
    def on_meta(cls, path: Path) -> JinaV4:
        """The model on the meta device, from a checkpoint directory's two config files (no weights read)."""
        with torch.device("meta"), NoInit():
            return cls(*read_configs(path))

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def tasks(self) -> dict[str, Task]:
        """The checkpoint's tasks with their prompt rules (config.Task)."""
        return self.config.tasks

    @property
    def task(self) -> str | None:
        """The default task of encode_* (the released API's `model.task`)."""
        return self._task

    @task.setter
    def task(self, task: str | None) -> None:
        self._task = None if task is None else self.config.tasks_for(task, 1)[0].name

    def merge(self, task: str | None) -> None:
        """Precompute W + s·BA for `task` in every adapted layer (faster for that task, with its own rounding);
        None unmerges. Other tasks and mixed-task batches still run, through the unmodified base weights."""
        if task is not None:
            self.config.tasks_for(task, 1)
        lora.merge(self, task)

    def add_task(
        self,
        name: str,
        r: int | None = None,
        lora_alpha: float | None = None,
        init_from: str | None = None,
        query: str = "Query: ",
        passage: str = "Passage: ",
    ) -> None:
        """A new task adapter for research: a copy of task `init_from`, or initialised as peft initialises
        (B zero, so it starts as the base model), with its prompt rule: the prefixes of queries and passages
        (the same for a symmetric task). The released format has one r and alpha for all tasks."""
        cfg = self.adapter_config
        if name in self.config.task_names:
            raise ValueError(f"task {name!r} exists already")
        if (r or cfg.r) != cfg.r or (lora_alpha or cfg.lora_alpha) != cfg.lora_alpha:
            raise ValueError(
                f"r={r}, lora_alpha={lora_alpha}: every task of a checkpoint shares the r={cfg.r} and "
                f"lora_alpha={cfg.lora_alpha:g} of adapters/adapter_config.json"
            )
        if init_from is not None:
            self.config.tasks_for(init_from, 1)
        lora.add_task(self, cfg, Task(name, query, passage), init_from)
        prompts = {**self.config.task_prompts, name: {"query": query, "passage": passage}}
        self.config = dataclasses.replace(self.config, task_names=(*self.config.task_names, name), task_prompts=prompts)

    def forward(self, batch: Batch, hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """A packed batch -> final-normed hidden states (T, D); `TextModel.forward` explains `hidden_states`.
        A batch still on the host is moved to the model's device first (one that is there stays as it is)."""
        batch = batch.to(self.device, self.dtype)
        with lora.active(batch.task):
            x = self.model.embed_tokens(batch.input_ids)  # (T, D)
            if batch.pixel_values is not None:
                features = self.visual(batch.pixel_values, batch.vision)  # (N/4, D)
                x = x.index_copy(0, batch.image_rows, features.to(x.dtype))
            return self.model(x, batch.position_ids, batch.seqs, hidden_states)
