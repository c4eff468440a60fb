"""Per-task LoRA, as the released `MultiAdapterLinear` (custom_lora_module.py) computes it:

    y = W x + b + scaling * B_task (A_task x),   scaling = lora_alpha / r   (dropout is the identity at eval)

`LoRALinear` is an `nn.Linear` (so the base keys stay `...q_proj.weight`) plus one A/B pair per task
(`...q_proj.lora_A.<task>`). A forward takes `task`: one task name for all rows, or `TaskRows` (a task per
packed row, the mixed-task batch the reference cannot expose). `merge(task)` precomputes W + s·BA for speed;
the base weight is never modified, so unmerging is exact.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, ConfigError

# A list of (task, row indices) groups, covering every row once: the mixed-task form of `task`.
TaskRows = list[tuple[str, torch.Tensor]]
Task = Union[str, TaskRows]


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = nn.ParameterDict()  # task -> (r, in)
        self.lora_B = nn.ParameterDict()  # task -> (out, r)
        self.scaling = 1.0
        self.merged_task: str | None = None
        # W + s·B A for merged_task: a buffer so that .to() moves it, but not part of the state dict.
        self.register_buffer("merged_weight", None, persistent=False)

    def add_tasks(self, tasks: list[str], r: int, scaling: float) -> None:
        for t in tasks:
            self.lora_A[t] = nn.Parameter(self.weight.new_empty(r, self.in_features), requires_grad=False)
            self.lora_B[t] = nn.Parameter(self.weight.new_empty(self.out_features, r), requires_grad=False)
        self.scaling = scaling

    def forward(self, x: torch.Tensor, task: Task | None = None) -> torch.Tensor:
        if not self.lora_A:  # a decoder Linear the adapter config does not target
            return F.linear(x, self.weight, self.bias)
        if task is None:
            raise ValueError(f"this layer carries task adapters; pass task=<name> (one of {list(self.lora_A)})")
        if isinstance(task, str) and task == self.merged_task:
            return F.linear(x, self.merged_weight, self.bias)
        y = F.linear(x, self.weight, self.bias)
        x2, y2 = x.reshape(-1, self.in_features), y.view(-1, self.out_features)  # (T, in), (T, out)
        # The low-rank term accumulates into y in place (no (T, out) temporary), scaled on the way.
        for t, rows in [(task, None)] if isinstance(task, str) else task:
            A, B = self.lora_A[t], self.lora_B[t]
            if rows is None:
                y2.addmm_(F.linear(x2, A), B.t(), alpha=self.scaling)
            else:  # the rows of one task, through the same addmm
                y2[rows] = y2[rows].addmm_(F.linear(x2[rows], A), B.t(), alpha=self.scaling)
        return y

    @torch.no_grad()
    def merge(self, task: str | None) -> None:
        """Precompute W + s·B_task A_task (in fp32, rounded once to the weight dtype); None unmerges."""
        if task is None or not self.lora_A:
            self.merged_task, self.merged_weight = None, None
            return
        delta = self.lora_B[task].float() @ self.lora_A[task].float() * self.scaling
        self.merged_weight = (self.weight.float() + delta).to(self.weight.dtype)
        self.merged_task = task

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", tasks={list(self.lora_A)}" if self.lora_A else "")


def reference_name(name: str) -> str:
    """Our module name -> the name peft matched in the released (transformers >= 4.52) module tree."""
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    if name.startswith("visual."):
        return "model." + name
    return name


def attach_adapters(root: nn.Module, cfg: AdapterConfig, tasks: list[str]) -> list[str]:
    """Give every Linear selected by the adapter config one A/B pair per task; return their module names.

    Selection follows peft: `target_modules` / `exclude_modules` matched against the reference module names.
    """
    adapted = []
    for name, module in root.named_modules():
        if not isinstance(module, nn.Linear) or not cfg.targets(reference_name(name)):
            continue
        if not isinstance(module, LoRALinear):
            raise ConfigError(
                f"adapters/adapter_config.json: 'target_modules' selects '{reference_name(name)}', which the "
                "released model never adapts (LoRA is for the decoder and the multi-vector projector only)"
            )
        module.add_tasks(tasks, cfg.r, cfg.scaling)
        adapted.append(name)
    if not adapted:
        raise ConfigError("adapters/adapter_config.json: 'target_modules' selects no module of the model")
    return adapted


def task_rows(tasks: list[str], cu_seqlens: list[int], device: torch.device) -> Task:
    """Per-sequence task names -> one task name if they agree, else (task, packed row indices) groups."""
    if len(set(tasks)) == 1:
        return tasks[0]
    seq = torch.repeat_interleave(torch.arange(len(tasks)), torch.tensor(cu_seqlens).diff())
    names = sorted(set(tasks))
    ids = torch.tensor([names.index(t) for t in tasks])[seq]
    return [(t, (ids == i).nonzero().squeeze(1).to(device)) for i, t in enumerate(names)]


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on the device (0 when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 0
