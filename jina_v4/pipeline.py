"""The one way from prepared inputs to vectors: items -> packed batches -> model(batch) -> a head -> results in
input order. `encode` is the only loop of its kind; `encode_*`, training (with gradients), late chunking, the
server's worker, corpus jobs and Ray all call it.

    items = model.prepare(inputs, task)                  # processing.py: inputs -> Items (ids, patches, grids)
    out = encode(model, items, Single(), deterministic=False)
      for batch in processor.batches(items):              # longest first under model.max_batch_tokens
          batch = batch.to(model.device, model.dtype)
          h = model(batch)                                # model.py: embeddings -> vision -> decoder -> norm
          head(model, h, batch)                           # heads.py: pooled / projected, one output per input
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch

from . import execution
from .model.config import PROMPT_NAMES
from .model.heads import head_for
from .model.images import ImageInput
from .model.processing import MAX_TEXT_TOKENS, Item, as_list

Output = Union[torch.Tensor, np.ndarray, list]


def encode(
    model,
    items: list,
    head: Callable,
    batch_size: int | None = None,
    deterministic: bool = False,
    errors: str = "raise",
) -> list[Any]:
    """Prepared items -> head(model, h, batch) per item, in input order, on the model's device. An item that is an
    exception (what `model.prepare(..., errors="return")` leaves for a bad input) is raised (errors="raise") or
    kept in its place (errors="return"). Runs with autograd as the caller has it: training calls this too.
    deterministic: each item's result bit-identical whatever else is in the call (execution.py)."""
    if errors not in ("raise", "return"):
        raise ValueError(f"errors={errors!r} is not 'raise' or 'return'")
    out: list[Any] = list(items)
    good = [i for i, it in enumerate(items) if not isinstance(it, Exception)]
    if errors == "raise" and len(good) < len(items):
        raise next(it for it in items if isinstance(it, Exception))
    with execution.mode(deterministic=deterministic):
        for batch in model.processor.batches([items[i] for i in good], model.max_batch_tokens, batch_size):
            batch = batch.to(model.device, model.dtype)  # for the model and the head alike
            h = model(batch)  # (T, D)
            for j, result in zip(batch.index, head(model, h, batch)):
                out[good[j]] = result
    return out


def collect(vectors: list[torch.Tensor], multivector: bool, numpy: bool, dim: int, dtype: torch.dtype):
    """The released return convention: single vectors stacked into one (N, D) CPU tensor (float32, or float64 for
    a float64 model), multi-vectors a list of (L_i, P) CPU tensors; numpy arrays with numpy=True."""
    if multivector:
        cpu = torch.cat(vectors).cpu().split([len(v) for v in vectors]) if vectors else []
        return [v.numpy() if numpy else v for v in cpu]
    out = (
        torch.stack(vectors).cpu() if vectors else torch.empty(0, dim, dtype=torch.promote_types(dtype, torch.float32))
    )
    return out.numpy() if numpy else out


class EncodeAPI:
    """The released API's names and meanings (modeling_jina_embeddings_v4.py), for JinaV4: inputs -> `prepare`
    (processing.py) -> `encode` above -> vectors, as the release returns them."""

    # ---- the released API: inputs -> prepare (processing.py) -> pipeline.encode -> vectors ----------------------

    def prepare(
        self,
        inputs: Sequence[str | ImageInput | dict],
        task: str | Sequence[str] | None = None,
        prompt_name: str | None = None,
        max_length: int = MAX_TEXT_TOKENS,
        max_pixels: int | None = None,
        errors: str = "raise",
        name: str = "inputs",
    ) -> list:
        """Inputs -> Items (processing.Processor.prepare) under `task` (one name, or one per input; default
        model.task), with that task's prompt rule for `prompt_name` ('query', the default, or 'passage')."""
        prompt_name = prompt_name or "query"
        if prompt_name not in PROMPT_NAMES:
            raise ValueError(f"prompt_name={prompt_name!r} is not one of {list(PROMPT_NAMES)}")
        inputs = as_list(inputs, name)
        tasks = self.config.tasks_for(task or self.task, len(inputs))
        return self.processor.prepare(inputs, tasks, prompt_name, max_length, max_pixels, errors, name)

    def encode_text(
        self,
        texts: str | Sequence[str],
        task: str | Sequence[str] | None = None,
        prompt_name: str | None = None,
        max_length: int = MAX_TEXT_TOKENS,
        batch_size: int | None = None,
        return_multivector: bool = False,
        return_numpy: bool = False,
        truncate_dim: int | None = None,
        deterministic: bool = False,
    ) -> Output:
        """Texts -> single vectors (N, D) (float32; float64 for a float64 model) on the CPU, or multi-vectors: a
        list of (L_i, P) tensors. A str gives one result. prompt_name: 'query' (default) or 'passage'; a
        symmetric task (text-matching) uses its one prefix for both. `task` may be a list, one task per text.
        Batches hold up to `model.max_batch_tokens` tokens of length-sorted inputs and at most `batch_size`
        items when given."""
        one = isinstance(texts, str)
        items = self.prepare(
            [{"text": t} for t in ([texts] if one else as_list(texts, "texts"))],
            task,
            prompt_name,
            max_length,
            name="texts",
        )
        out = self.encode_items(items, batch_size, return_multivector, return_numpy, truncate_dim, deterministic)
        return out[0] if one else out

    def encode_image(
        self,
        images: ImageInput | Sequence[ImageInput],
        task: str | Sequence[str] | None = None,
        batch_size: int | None = None,
        return_multivector: bool = False,
        return_numpy: bool = False,
        truncate_dim: int | None = None,
        max_pixels: int | None = None,
        deterministic: bool = False,
    ) -> Output:
        """Images (PIL images, paths, bytes or http(s) URLs) -> as encode_text. max_pixels overrides the
        preprocessor's bound for this call."""
        one = not isinstance(images, (list, tuple))
        items = self.prepare(
            [{"image": x} for x in ([images] if one else images)], task, max_pixels=max_pixels, name="images"
        )
        out = self.encode_items(items, batch_size, return_multivector, return_numpy, truncate_dim, deterministic)
        return out[0] if one else out

    def encode(
        self,
        inputs: Sequence[str | ImageInput | dict],
        task: str | Sequence[str] | None = None,
        prompt_name: str | None = None,
        max_length: int = MAX_TEXT_TOKENS,
        batch_size: int | None = None,
        return_multivector: bool = False,
        return_numpy: bool = False,
        truncate_dim: int | None = None,
        max_pixels: int | None = None,
        deterministic: bool = False,
    ) -> Output:
        """Text and images in one batch, each pooled by its own rule (the reference pools a whole batch by its
        first row's rule). A str is text; a PIL image, Path or bytes is an image; {"text": s} or
        {"image": path_or_url} say it explicitly."""
        items = self.prepare(inputs, task, prompt_name, max_length, max_pixels)
        return self.encode_items(items, batch_size, return_multivector, return_numpy, truncate_dim, deterministic)

    @torch.inference_mode()
    def encode_items(
        self,
        items: list[Item],
        batch_size: int | None = None,
        return_multivector: bool = False,
        return_numpy: bool = False,
        truncate_dim: int | None = None,
        deterministic: bool = False,
    ) -> Output:
        """The model half of `encode`, on items from `prepare`: pipeline.encode with the head asked for."""
        truncate_dim = truncate_dim or (None if return_multivector else self.config.truncate_dim)
        head = head_for(return_multivector, truncate_dim, self.config.matryoshka_dims)
        out = encode(self, items, head, batch_size, deterministic)
        dim = truncate_dim or self.config.text_config.hidden_size
        return collect(out, return_multivector, return_numpy, dim, self.dtype)
