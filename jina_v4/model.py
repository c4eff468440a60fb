"""jina-embeddings-v4: tokens -> embeddings -> vision tower -> image features scattered into the pad tokens
-> M-RoPE decoder with the task LoRA -> pooled single vector or projected multi-vectors.

The public API keeps the released `encode_text` / `encode_image` names and meanings (modeling_jina_embeddings_v4.py)
and adds `encode` for text and images in one batch and a task per input. Inputs run packed and sorted by
length (processing.py), so no padding token is computed; results come back in input order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn

from . import lora
from .config import AdapterConfig, JinaV4Config, check_truncate_dim
from .heads import multi_vectors, single_vectors
from .images import ImageInput
from .modes import Mode, mode
from .loading import load_checkpoint, read_configs, resolve, to_dtype
from .processing import MAX_TEXT_TOKENS, Batch, Item, Processor, as_list
from .text import TextModel
from .vision import VisionTower

Output = Union[torch.Tensor, np.ndarray, list]


class JinaV4(nn.Module):
    def __init__(self, config: JinaV4Config, adapter_config: AdapterConfig):
        super().__init__()
        self.config, self.adapter_config = config, adapter_config
        self.model = TextModel(config.text_config)
        self.visual = VisionTower(config.vision_config)
        self.multi_vector_projector = lora.LoRALinear(config.text_config.hidden_size,
                                                      config.multi_vector_projector_dim)
        self.adapted = lora.attach_adapters(self, adapter_config, list(config.task_names))
        self.processor: Processor | None = None
        self._task: str | None = None
        self.max_batch_tokens = 16384  # tokens (+ image patches) per forward pass: what bounds memory
        self.varlen = False  # CUDA: packed attention through varlen_attn (see layers.attention)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = "jinaai/jina-embeddings-v4", device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None, *, revision: str | None = None,
        cache_dir: str | Path | None = None, local_files_only: bool = False, token: str | bool | None = None,
    ) -> "JinaV4":
        """A checkpoint directory or hub repo id. device: default cuda if available, else cpu.
        dtype: default the checkpoint's torch_dtype (bfloat16 for the release); float64 for exactness proofs."""
        path = resolve(name_or_path, revision, cache_dir, local_files_only, token)
        model = cls.on_meta(path)
        processor = Processor.from_dir(path, model.config)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: this torch build sees no CUDA device; use device='cpu'")
        load_checkpoint(model, path, to_dtype(dtype or model.config.torch_dtype), device)
        model.processor = processor
        return model.eval().requires_grad_(False)

    @classmethod
    def on_meta(cls, path: Path) -> "JinaV4":
        """The model on the meta device, from a checkpoint directory's two config files (no weights read)."""
        with torch.device("meta"):
            return cls(*read_configs(path))

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def task(self) -> str | None:
        """The default task of encode_* (the released API's `model.task`)."""
        return self._task

    @task.setter
    def task(self, task: str | None) -> None:
        self._task = None if task is None else self.processor.tasks(task, 1)[0]

    def merge(self, task: str | None) -> None:
        """Precompute W + s·BA for `task` in every adapted layer (faster for that task, with its own rounding);
        None unmerges. Other tasks and mixed-task batches still run, through the unmodified base weights."""
        if task is not None:
            self.processor.tasks(task, 1)
        lora.merge(self, task)

    def add_task(self, name: str, r: int | None = None, lora_alpha: float | None = None,
                 init_from: str | None = None) -> None:
        """A new task adapter for research: a copy of task `init_from`, or initialised as peft initialises
        (B zero, so it starts as the base model). The released format has one r and alpha for all tasks."""
        cfg = self.adapter_config
        if name in self.config.task_names:
            raise ValueError(f"task {name!r} exists already")
        if (r or cfg.r) != cfg.r or (lora_alpha or cfg.lora_alpha) != cfg.lora_alpha:
            raise ValueError(f"r={r}, lora_alpha={lora_alpha}: every task of a checkpoint shares the r={cfg.r} and "
                             f"lora_alpha={cfg.lora_alpha:g} of adapters/adapter_config.json")
        if init_from is not None:
            self.processor.tasks(init_from, 1)
        lora.add_task(self, cfg, name, init_from)
        self.config = dataclasses.replace(self.config, task_names=(*self.config.task_names, name))
        self.processor.config = self.config

    def forward(self, batch: Batch, hidden_states: list[torch.Tensor] | None = None,
                deterministic: bool = False) -> torch.Tensor:
        """A packed batch -> final-normed hidden states (T, D); `TextModel.forward` explains `hidden_states`.
        deterministic: every row's result is independent of what else shares the batch (modes.py)."""
        batch = batch.to(self.device, self.dtype)
        with mode(Mode(deterministic=deterministic, varlen=self.varlen)):
            x = self.model.embed_tokens(batch.input_ids)  # (T, D)
            if batch.pixel_values is not None:
                features = self.visual(batch.pixel_values, batch.vision)  # (N/4, D), frozen: no graph
                x = x.index_copy(0, batch.image_rows, features.to(x.dtype))
            return self.model(x, batch.position_ids, batch.seqs, batch.task, hidden_states)

    def encode_text(
        self, texts: str | Sequence[str], task: str | Sequence[str] | None = None, prompt_name: str | None = None,
        max_length: int = MAX_TEXT_TOKENS, batch_size: int | None = None, return_multivector: bool = False,
        return_numpy: bool = False, truncate_dim: int | None = None, deterministic: bool = False,
    ) -> Output:
        """Texts -> single vectors (N, D) (float32; float64 for a float64 model) on the CPU, or multi-vectors: a
        list of (L_i, P) tensors. A str gives one result. prompt_name: 'query' (default) or 'passage';
        text-matching always uses 'query'. `task` may be a list, one task per text. Batches hold up to
        `model.max_batch_tokens` tokens of length-sorted inputs and at most `batch_size` items when given."""
        one = isinstance(texts, str)
        texts = [texts] if one else as_list(texts, "texts")
        items = self.processor.prepare([{"text": t} for t in texts], task or self.task, prompt_name, max_length,
                                       name="texts")
        out = self.encode_items(items, batch_size, return_multivector, return_numpy, truncate_dim, deterministic)
        return out[0] if one else out

    def encode_image(
        self, images: ImageInput | Sequence[ImageInput], task: str | Sequence[str] | None = None,
        batch_size: int | None = None, return_multivector: bool = False, return_numpy: bool = False,
        truncate_dim: int | None = None, max_pixels: int | None = None, deterministic: bool = False,
    ) -> Output:
        """Images (PIL images, paths, bytes or http(s) URLs) -> as encode_text. max_pixels overrides the
        preprocessor's bound for this call."""
        one = not isinstance(images, (list, tuple))
        images = [images] if one else list(images)
        items = self.processor.prepare([{"image": x} for x in images], task or self.task, max_pixels=max_pixels,
                                       name="images")
        out = self.encode_items(items, batch_size, return_multivector, return_numpy, truncate_dim, deterministic)
        return out[0] if one else out

    def encode(
        self, inputs: Sequence[str | ImageInput | dict], task: str | Sequence[str] | None = None,
        prompt_name: str | None = None, max_length: int = MAX_TEXT_TOKENS, batch_size: int | None = None,
        return_multivector: bool = False, return_numpy: bool = False, truncate_dim: int | None = None,
        max_pixels: int | None = None, deterministic: bool = False,
    ) -> Output:
        """Text and images in one batch, each pooled by its own rule (the reference pools a whole batch by its
        first row's rule). A str is text; a PIL image, Path or bytes is an image; {"text": s} or
        {"image": path_or_url} say it explicitly."""
        items = self.processor.prepare(inputs, task or self.task, prompt_name, max_length, max_pixels)
        return self.encode_items(items, batch_size, return_multivector, return_numpy, truncate_dim, deterministic)

    @torch.inference_mode()
    def encode_items(self, items: list[Item], batch_size: int | None = None, return_multivector: bool = False,
                     return_numpy: bool = False, truncate_dim: int | None = None, deterministic: bool = False
                     ) -> Output:
        """The model half of `encode`, on items from `processor.prepare`."""
        if return_multivector and truncate_dim is not None:
            raise ValueError("truncate_dim applies to single vectors; multi-vectors are never truncated "
                             "(drop truncate_dim or return_multivector)")
        truncate_dim = truncate_dim or (None if return_multivector else self.config.truncate_dim)
        check_truncate_dim(truncate_dim, self.config.matryoshka_dims)
        out: list = [None] * len(items)
        for batch in self.processor.batches(items, self.max_batch_tokens, batch_size):
            batch = batch.to(self.device, self.dtype)
            h = self.forward(batch, deterministic=deterministic)  # (T, D)
            with mode(Mode(deterministic=deterministic)):  # the projector's matmuls too
                if return_multivector:
                    vecs = multi_vectors(self.multi_vector_projector, h, batch.task).cpu().split(batch.seqs.lengths)
                else:
                    vecs = single_vectors(h, batch.pool_rows, batch.pool_seqs, batch.pool_sizes, truncate_dim).cpu()
            for i, v in zip(batch.index, vecs):
                out[i] = v
        if return_multivector:
            return [v.numpy() if return_numpy else v for v in out]
        dim = truncate_dim or self.config.text_config.hidden_size
        res = torch.stack(out) if out else torch.empty(0, dim, dtype=torch.promote_types(self.dtype, torch.float32))
        return res.numpy() if return_numpy else res
