"""Per-task LoRA, as the released `MultiAdapterLinear` (custom_lora_module.py) computes it:

    y = W x + b + scaling · B_task (A_task dropout(x)),   scaling = lora_alpha / r   (dropout: training only)

`LoRALinear` is an nn.Linear (so the base keys stay `...q_proj.weight`) plus one A/B pair per task
(`...q_proj.lora_A.<task>`). It takes x alone, like any Linear, so any module can replace it; the task comes
from `active(task)`, which `JinaV4.forward` and the multi-vector head enter for their batch: one task name for
all rows, or the `TaskRows` of a mixed batch (task names and a (T, k) row mask). `merge` precomputes W + s·BA
for speed; the base weight is never modified, so unmerging is exact.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, ConfigError, Task

_TASK: ContextVar = ContextVar("jina_v4_lora_task", default=None)


@contextlib.contextmanager
def active(task):
    """The task of the LoRA Linears called inside (per thread and task): a name, or a TaskRows."""
    token = _TASK.set(task)
    try:
        yield
    finally:
        _TASK.reset(token)


def current_task():
    return _TASK.get()


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = nn.ParameterDict()  # task -> (r, in)
        self.lora_B = nn.ParameterDict()  # task -> (out, r)
        self.scaling = 1.0
        self.dropout = 0.0  # lora_dropout, on the input of A in training mode
        self.merged_task: str | None = None
        # W + s·B A for merged_task: a buffer so that .to() moves it, but not part of the state dict.
        self.register_buffer("merged_weight", None, persistent=False)

    def add_tasks(self, tasks: list[str], r: int) -> None:
        for t in tasks:
            self.lora_A[t] = nn.Parameter(self.weight.new_empty(r, self.in_features), requires_grad=False)
            self.lora_B[t] = nn.Parameter(self.weight.new_empty(self.out_features, r), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, in) packed rows, under `active(task)`."""
        if not self.lora_A:  # a Linear the adapter config does not target
            return super().forward(x)
        task = _TASK.get()
        if task is None:
            raise ValueError(
                f"this layer carries task adapters; run it under lora.active(<one of {list(self.lora_A)}>)"
            )
        if isinstance(task, str) and task == self.merged_task:
            return F.linear(x, self.merged_weight, self.bias)
        names, masks = ([task], None) if isinstance(task, str) else (task.names, task.masks)
        y = F.linear(x, self.weight, self.bias)  # (T, out)
        x = F.dropout(x, self.dropout) if self.training and self.dropout else x
        for i, t in enumerate(names):
            u = F.linear(x, self.lora_A[t])  # (T, r)
            if masks is not None:  # rows of other tasks get exactly 0 added
                u = u * masks[:, i : i + 1]
            y.addmm_(u, self.lora_B[t].t(), alpha=self.scaling)  # + s·u Bᵀ inside the GEMM: no (T, out) temporary
        return y

    @torch.no_grad()
    def merge(self, task: str | None) -> None:
        """Precompute W + s·B_task A_task (in at least fp32, rounded once to the weight dtype); None unmerges."""
        if task is None or not self.lora_A:
            self.merged_task, self.merged_weight = None, None
            return
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = self.lora_B[task].to(dtype) @ self.lora_A[task].to(dtype) * self.scaling
        self.merged_weight = (self.weight.to(dtype) + delta).to(self.weight.dtype)
        self.merged_task = task

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", tasks={list(self.lora_A)}" if self.lora_A else "")


def adapted(root: nn.Module) -> list[LoRALinear]:
    return [m for m in root.modules() if isinstance(m, LoRALinear) and m.lora_A]


def attach_adapters(root: nn.Module, cfg: AdapterConfig, tasks: list[str], reference_name) -> list[str]:
    """Give every Linear selected by the adapter config one A/B pair per task; return their module names.

    Selection follows peft: `target_modules` / `exclude_modules` matched against the reference's module names
    (`reference_name` maps ours to those: loading.py).
    """
    names = []
    for name, module in root.named_modules():
        if not isinstance(module, nn.Linear) or not cfg.targets(reference_name(name)):
            continue
        if not isinstance(module, LoRALinear):
            raise ConfigError(
                f"adapters/adapter_config.json: 'target_modules' selects '{reference_name(name)}', "
                "which the released model never adapts (LoRA is for the decoder and the projector)"
            )
        module.add_tasks(tasks, cfg.r)
        module.scaling, module.dropout = cfg.scaling, cfg.lora_dropout
        names.append(name)
    if not names:
        raise ConfigError("adapters/adapter_config.json: 'target_modules' selects no module of the model")
    return names


def merge(root: nn.Module, task: str | None) -> None:
    for m in adapted(root):
        m.merge(task)


@torch.no_grad()
def add_task(root: nn.Module, cfg: AdapterConfig, task: Task, init_from: str | None = None) -> None:
    """A new task adapter in every adapted Linear: a copy of `init_from`'s, or initialised as peft initialises
    `init_lora_weights` (B zero, so the new task starts as the base model)."""
    for m in adapted(root):
        m.add_tasks([task.name], cfg.r)
        A, B = m.lora_A[task.name], m.lora_B[task.name]
        if init_from is not None:
            A.copy_(m.lora_A[init_from])
            B.copy_(m.lora_B[init_from])
            continue
        if cfg.init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / cfg.r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)
