"""Saving trained task adapters as a complete checkpoint directory in the released layout, which jina_v4, the
released loader and peft read as they read the original.

- adapters/adapter_model.safetensors: every task in one file, peft's key format
  (`base_model.model.model.language_model.layers.N....lora_A.<task>.weight`). Tasks not trained are copied
  from the source file tensor for tensor; trained tasks are written from the model in its dtype. peft's
  `save_pretrained` strips the adapter name from the keys, so the file is written here directly.
- config.json: the source's, with `task_names` extended (peft loads with strict=False and ignores a task not
  listed there, so a new task must be listed and complete) and every task's prompt rule under `task_prompts`
  (jina_v4's key; the released loader keeps unknown keys and ignores them).
- adapters/adapter_config.json (one r, alpha and target set for all tasks) and every other top-level file
  (weights, tokenizer, preprocessor) are hard-linked, or symlinked across file systems: never rewritten.
Each file is written under a temporary name and renamed, so a reader sees the old file or the whole new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..model.loading import ADAPTER_FILE, adapter_key, adapter_name, read_tensors
from .common import atomic_write

LINKED = "adapters/adapter_config.json"


def adapter_tensors(model: nn.Module, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """`tasks`' LoRA A/B under their adapter-file keys, on the CPU."""
    suffixes = tuple(f".{ab}.{t}" for t in tasks for ab in ("lora_A", "lora_B"))
    return {adapter_key(n): p.detach().cpu().contiguous() for n, p in model.named_parameters() if n.endswith(suffixes)}


def link(src: Path, dst: Path) -> None:
    """dst as a hard link to src (a symlink across file systems); an existing link to the same file stays."""
    src = src.resolve()
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        os.symlink(src, tmp)
    os.replace(tmp, dst)


def save_checkpoint(model: nn.Module, source: str | Path, out: str | Path, tasks: Sequence[str]) -> Path:
    """Write `out` as a checkpoint directory: `source`'s files, with `tasks` (trained, new or not) taken from
    the model and every other task of the model copied from `source`'s adapter file."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise ValueError(f"{out}: the output directory must not be the source checkpoint")
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    names = list(model.config.task_names)
    missing = [t for t in tasks if t not in names]
    if missing:
        raise ValueError(f"tasks {missing} are not tasks of the model ({names})")
    kept = {
        k: v
        for k, v in read_tensors(source / ADAPTER_FILE).items()
        if adapter_name(k).split(".lora_", 1)[-1][2:] not in tasks
    }
    tensors = {**kept, **adapter_tensors(model, tasks)}
    expected = set(adapter_tensors(model, names))
    if set(tensors) != expected:  # a task of the model absent from the source file, or a stray key
        bad = sorted(set(tensors) ^ expected)
        raise ValueError(f"{source / ADAPTER_FILE}: does not hold the model's other tasks ({bad[:3]} ...)")
    atomic_write(out / ADAPTER_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    config = json.loads((source / "config.json").read_text())
    config["task_names"] = names
    config["task_prompts"] = {t.name: {"query": t.query, "passage": t.passage} for t in model.tasks.values()}
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name != "config.json" and not f.name.endswith(".tmp"):
            link(f, out / f.name)
    link(source / LINKED, out / LINKED)
    return out
