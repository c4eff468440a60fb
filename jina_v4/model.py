"""jina-embeddings-v4: tokens -> embeddings -> vision tower -> image features scattered into the pad tokens
-> M-RoPE decoder with the task LoRA -> pooled single vector or projected multi-vectors.

The public API keeps the released `encode_text` / `encode_image` names and meanings (modeling_jina_embeddings_v4.py)
and adds `encode` for text and images in one batch and a task per input. Inputs run packed and sorted by
length, so no padding token is computed; results come back in input order.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from .config import AdapterConfig, JinaV4Config
from .heads import check_truncate_dim, multi_vectors, single_vectors
from .late import chunk_spans, patch_scores, pool_chunks
from .loading import load_checkpoint, read_configs, resolve, to_dtype
from .lora import LoRALinear, Task, attach_adapters, free_memory, task_rows
from .processing import (MAX_TEXT_TOKENS, PREFIXES, Batch, ImageInput, InputError, Item, Processor, as_list,
                         checked_text, describe, text_prompt, token_batches)
from .text import TextModel
from .vision import VisionTower

Output = Union[torch.Tensor, np.ndarray, list]


class JinaV4(nn.Module):
    def __init__(self, config: JinaV4Config, adapter_config: AdapterConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config.text_config)
        self.visual = VisionTower(config.vision_config)
        self.multi_vector_projector = LoRALinear(config.text_config.hidden_size, config.multi_vector_projector_dim)
        self.adapted = attach_adapters(self, adapter_config, list(config.task_names))
        self.processor: Processor | None = None
        self._task: str | None = None
        self.tokens_processed = 0  # a running count of the tokens all encode calls have run
        self.max_batch_tokens = 16384  # tokens (+ image patches) per forward pass: what bounds memory
        self.auto_merge = True  # fold a lone task's LoRA into the weights for large calls (see _auto_merge)
        self._merged: str | None = None

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
    ) -> "JinaV4":
        """A checkpoint directory or hub repo id. device: default cuda if available, else cpu.
        dtype: default the checkpoint's torch_dtype (bfloat16 for the release)."""
        path = resolve(name_or_path, revision, cache_dir, local_files_only, token)
        config, adapter_config = read_configs(path)
        processor = Processor.from_dir(path, config)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: this torch build sees no CUDA device; use device='cpu'")
        with torch.device("meta"):
            model = cls(config, adapter_config)
        load_checkpoint(model, path, to_dtype(dtype or config.torch_dtype), device)
        model.processor = processor
        return model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def task(self) -> str | None:
        return self._task

    @task.setter
    def task(self, task: str) -> None:
        self._task = self._tasks(task, 1)[0]

    def _tasks(self, task: str | Sequence[str] | None, n: int) -> list[str]:
        names = list(self.config.task_names)
        task = self._task if task is None else task
        if task is None:
            raise ValueError(f"no task given: pass task=... or set model.task to one of {names}")
        tasks = [task] * n if isinstance(task, str) else list(task)
        if len(tasks) != n:
            raise ValueError(f"task: got {len(tasks)} tasks for {n} inputs")
        for t in tasks:
            if t not in names:
                raise ValueError(f"unknown task {t!r}: valid tasks are {names}")
        return tasks

    def _truncate_dim(self, truncate_dim: int | None) -> int | None:
        truncate_dim = truncate_dim or self.config.truncate_dim  # the reference's fallback
        check_truncate_dim(truncate_dim, self.config.matryoshka_dims)
        return truncate_dim

    def merge(self, task: str | None) -> None:
        """Precompute W + s·BA for `task` in every adapted layer (faster for that task); None unmerges.
        Other tasks and mixed-task batches still run, through the unmodified base weights."""
        if task is not None:
            self._tasks(task, 1)
        for m in self.modules():
            if isinstance(m, LoRALinear):
                m.merge(task)
        self._merged = task

    def add_task(self, name: str, r: int = 32, lora_alpha: float = 32.0) -> None:
        """A new task adapter for research: A random, B zero, so it starts as the base model (to be trained)."""
        if name in self.config.task_names:
            raise ValueError(f"task {name!r} exists already")
        for m in self.modules():
            if isinstance(m, LoRALinear) and m.lora_A:
                m.add_tasks([name], r, lora_alpha / r)
                torch.nn.init.kaiming_uniform_(m.lora_A[name], a=5**0.5)
                torch.nn.init.zeros_(m.lora_B[name])
        self.config = dataclasses.replace(self.config, task_names=(*self.config.task_names, name))

    def forward(self, batch: Batch, task: Task, hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """A packed batch -> final-normed hidden states (T, D). See `TextModel.forward` for `hidden_states`."""
        dev = self.device
        x = self.model.embed_tokens(batch.input_ids.to(dev))  # (T, D)
        if batch.pixel_values is not None:
            features = self.visual(batch.pixel_values.to(dev), batch.grids)  # (U, D)
            x[batch.image_mask.to(dev)] = features.to(x.dtype)
        return self.model(x, batch.position_ids.to(dev), batch.cu_seqlens, task, hidden_states)

    @torch.inference_mode()
    def last_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, task: str | None = None,
        pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """For research: right-padded (B, L) ids -> (B, L, D) final-normed states (zero at padding), the
        reference's `get_last_hidden_states`. Image rows (those holding the image token) take the patches
        `pixel_values` (N, C·t·p·p) and grids `image_grid_thw` (I, 3) in row order. output_hidden_states:
        every layer's input and the final output, num_hidden_layers + 1 tensors, as the reference's."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        grids = [] if image_grid_thw is None else [tuple(g) for g in image_grid_thw.tolist()]
        items, start = [], 0
        for row, m in zip(input_ids, mask):
            ids = row[m.bool()].tolist()
            item = Item(ids)
            if self.config.image_token_id in ids:
                if not grids or pixel_values is None:
                    raise ValueError("input_ids hold more images than pixel_values and image_grid_thw describe")
                item.grid = grids.pop(0)
                n = item.grid[0] * item.grid[1] * item.grid[2]
                item.pixel_values, start = pixel_values[start:start + n], start + n
            items.append(item)
        batch = self.processor.collate(items)
        layers: list[torch.Tensor] | None = [] if output_hidden_states else None
        h = self.forward(batch, task_rows(self._tasks(task, len(items)), batch.cu_seqlens, self.device), layers)

        def unpack(x: torch.Tensor) -> torch.Tensor:  # (T, D) -> (B, L, D)
            out = x.new_zeros(*input_ids.shape, x.shape[-1])
            out[mask.bool().to(x.device)] = x
            return out

        return [unpack(x) for x in layers] if layers is not None else unpack(h)

    def _auto_merge(self, tasks: list[str], tokens: int) -> None:
        """Fold a lone task's LoRA into the weights for a large call, when a merged copy of the adapted
        weights fits in free memory; it stays merged for later calls of that task."""
        task = tasks[0] if len(set(tasks)) == 1 else None
        if not self.auto_merge or task is None or task == self._merged or tokens < 2048:
            return
        need = sum(m.weight.numel() * m.weight.element_size() for m in self.modules()
                   if isinstance(m, LoRALinear) and m.lora_A)
        if free_memory(self.device) > 2 * need:
            self.merge(task)

    @torch.inference_mode()
    def _run(self, items: list[Item], tasks: list[str], multivector: bool, truncate_dim: int | None,
             batch_size: int | None) -> list[torch.Tensor]:
        batches = token_batches(items, self.max_batch_tokens, batch_size)
        self._auto_merge(tasks, sum(len(it.input_ids) for it in items))
        out: list[Any] = [None] * len(items)
        for idx in batches:
            batch = self.processor.collate([items[i] for i in idx])
            task = task_rows([tasks[i] for i in idx], batch.cu_seqlens, self.device)
            h = self.forward(batch, task)
            self.tokens_processed += h.shape[0]
            if multivector:
                lengths = [len(items[i].input_ids) for i in idx]
                vecs = multi_vectors(self.multi_vector_projector, h, task).cpu().split(lengths)
            else:
                vecs = single_vectors(h, batch.cu_seqlens, batch.pool_mask.to(h.device), truncate_dim).cpu()
            for i, v in zip(idx, vecs):
                out[i] = v
        return out

    def _output(self, vecs: list[torch.Tensor], multivector: bool, return_numpy: bool) -> Output:
        if multivector:
            return [v.numpy() if return_numpy else v for v in vecs]
        dim = vecs[0].shape[-1] if vecs else self.config.text_config.hidden_size
        res = torch.stack(vecs) if vecs else torch.empty(0, dim)
        return res.numpy() if return_numpy else res

    def encode_text(
        self, texts: str | Sequence[str], task: str | Sequence[str] | None = None, prompt_name: str | None = None,
        max_length: int = 32768, batch_size: int | None = None, return_multivector: bool = False,
        return_numpy: bool = False, truncate_dim: int | None = None,
    ) -> Output:
        """Texts -> single vectors (N, D) float32 on the CPU, or multi-vectors: a list of (L_i, P) tensors.
        A str gives one result. prompt_name: 'query' (default) or 'passage'; text-matching always uses 'query'.
        `task` may also be a list, one task per text. Batches hold up to `model.max_batch_tokens` tokens of
        length-sorted inputs and, when `batch_size` is given, at most that many items."""
        one = isinstance(texts, str)
        texts = [texts] if one else as_list(texts, "texts")
        items = self.prepare([{"text": t} for t in texts], task, prompt_name, max_length, what="texts")
        out = self.encode_items(items, task, batch_size, return_multivector, return_numpy, truncate_dim)
        return out[0] if one else out

    def encode_image(
        self, images: ImageInput | Sequence[ImageInput], task: str | Sequence[str] | None = None,
        batch_size: int | None = None, return_multivector: bool = False, return_numpy: bool = False,
        truncate_dim: int | None = None, max_pixels: int | None = None,
    ) -> Output:
        """Images (PIL images, paths, bytes or http(s) URLs) -> as encode_text. max_pixels overrides the
        preprocessor's bound for this call."""
        one = not isinstance(images, (list, tuple))
        images = [images] if one else list(images)
        items = self.prepare([{"image": x} for x in images], task, max_pixels=max_pixels, what="images")
        out = self.encode_items(items, task, batch_size, return_multivector, return_numpy, truncate_dim)
        return out[0] if one else out

    def encode(
        self, inputs: Sequence[str | ImageInput | dict], task: str | Sequence[str] | None = None,
        prompt_name: str | None = None, max_length: int = 32768, batch_size: int | None = None,
        return_multivector: bool = False, return_numpy: bool = False, truncate_dim: int | None = None,
        max_pixels: int | None = None,
    ) -> Output:
        """Text and images in one batch, each pooled by its own rule (the reference pools a whole batch by its
        first row's rule). A str is text; a PIL image, Path or bytes is an image; {"text": s} or
        {"image": path_or_url} say it explicitly."""
        items = self.prepare(as_list(inputs, "inputs"), task, prompt_name, max_length, max_pixels)
        return self.encode_items(items, task, batch_size, return_multivector, return_numpy, truncate_dim)

    def prepare(
        self, inputs: Sequence[str | ImageInput | dict], task: str | Sequence[str] | None = None,
        prompt_name: str | None = None, max_length: int = 32768, max_pixels: int | None = None,
        what: str = "inputs", errors: str = "raise",
    ) -> list[Item]:
        """The input half of `encode`: prompts, token ids and image patches, one `Item` per input. A bad input
        raises an error naming it (`inputs[3] ('...'): ...`), or with errors="return" stands in the list as
        its exception. A text over max_length is cut on the right, with a warning."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors={errors!r} is not 'raise' or 'return'")
        prompt_name = prompt_name or "query"
        if prompt_name not in PREFIXES:
            raise ValueError(f"prompt_name={prompt_name!r} is not one of {list(PREFIXES)}")
        tasks = self._tasks(task, len(inputs))
        texts: dict[int, str] = {}
        items: list[Any] = [None] * len(inputs)
        for i, x in enumerate(inputs):
            kind, value = next(iter(x.items())) if isinstance(x, dict) and len(x) == 1 else (None, x)
            try:
                if kind == "text" or (kind is None and isinstance(x, str)):
                    texts[i] = text_prompt(checked_text(value, f"{what}[{i}]"), tasks[i], prompt_name)
                elif kind == "image" or (kind is None and isinstance(x, (Image.Image, Path, bytes))):
                    try:
                        items[i] = self.processor.image_item(value, max_pixels)
                    except Exception as e:
                        raise InputError(f"{what}[{i}]", value, f"{type(e).__name__}: {e}") from e
                else:
                    raise TypeError(f"{what}[{i}] is neither text nor an image: {describe(x)}")
            except (TypeError, ValueError) as e:
                if errors == "raise":
                    raise
                items[i] = e
        for i, enc in zip(texts, self.processor.encode(list(texts.values()), max_length) if texts else []):
            if enc.overflowing:
                dropped = sum(len(o.ids) for o in enc.overflowing)
                text = inputs[i]["text"] if isinstance(inputs[i], dict) else inputs[i]
                warnings.warn(f"{what}[{i}] ({describe(text)}): {dropped} tokens past max_length="
                              f"{min(max_length, MAX_TEXT_TOKENS)} were dropped", stacklevel=3)
            items[i] = Item(enc.ids)
        return items

    def encode_items(
        self, items: list[Item], task: str | Sequence[str] | None = None, batch_size: int | None = None,
        return_multivector: bool = False, return_numpy: bool = False, truncate_dim: int | None = None,
    ) -> Output:
        """The model half of `encode`, on items from `prepare` (for pipelines that prepare inputs apart)."""
        tasks = self._tasks(task, len(items))
        truncate_dim = self._truncate_dim(truncate_dim)
        vecs = self._run(items, tasks, return_multivector, truncate_dim, batch_size)
        return self._output(vecs, return_multivector, return_numpy)

    @torch.inference_mode()
    def encode_chunks(
        self, text: str, chunks: str | int | Sequence[tuple[int, int]] = "sentences", task: str | None = None,
        prompt_name: str = "passage", max_length: int = 32768, truncate_dim: int | None = None,
        return_numpy: bool = False,
    ) -> tuple[Output, list[tuple[int, int]]]:
        """Late chunking: embed `text` once (up to 32768 tokens), then one single vector per chunk, the
        normalised mean of the chunk's token states, so each chunk sees its whole context. chunks:
        "sentences", an int token budget (consecutive groups of that many tokens), or (start, end) character
        spans. A token belongs to the chunk holding its first character; the prefix tokens belong to none.
        Returns (C, D) vectors and the chunks' character spans."""
        text = checked_text(text, "text")
        tasks = self._tasks(task, 1)
        truncate_dim = self._truncate_dim(truncate_dim)
        prompt = text_prompt(text, tasks[0], prompt_name)
        shift = len(prompt) - len(text)
        enc = self.processor.encode([prompt], max_length)[0]
        offsets = [(a - shift, b - shift) for a, b in enc.offsets]  # prefix tokens get negative offsets
        spans, mask = chunk_spans(text, chunks, offsets, max_length)
        batch = self.processor.collate([Item(enc.ids)])
        h = self.forward(batch, tasks[0])
        self.tokens_processed += h.shape[0]
        vecs = pool_chunks(h, mask, truncate_dim).cpu()
        return (vecs.numpy() if return_numpy else vecs), spans

    @torch.inference_mode()
    def similarity_map(self, query: str, image: ImageInput, task: str | None = None,
                       max_pixels: int | None = None) -> torch.Tensor:
        """(h, w) over the image's merge units (28x28 px each of the resized image): each unit's
        late-interaction score with the query's multi-vectors (see `late.patch_scores`)."""
        q = self.encode_text(query, task=task, return_multivector=True)
        item = self.prepare([{"image": image}], task, max_pixels=max_pixels, what="image")[0]
        d = self.encode_items([item], task, return_multivector=True)[0]
        cells = torch.tensor(item.input_ids) == self.config.image_token_id
        merge = self.processor.image_cfg.merge_size
        return patch_scores(q, d[cells]).view(item.grid[1] // merge, item.grid[2] // merge)
