"""Frozen configs parsed from the released JSON files, keeping the released field names.

Files: `config.json` (Qwen2.5-VL + the Jina fields), `adapters/adapter_config.json` (peft LoRA),
`preprocessor_config.json` (Qwen2-VL image processor), `tokenizer_config.json`. A missing or mistyped field
is a `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union


class ConfigError(ValueError):
    pass


def _check(value: Any, tp: Any, file: str, key: str) -> Any:
    """Validate `value` against a type hint; return it (lists become tuples, an int where a float is asked a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (Union, types.UnionType):
        for arg in args:
            with contextlib.suppress(ConfigError):
                return _check(value, arg, file, key)
    elif origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_check(v, args[0], file, f"{key}[{i}]") for i, v in enumerate(value))
    elif tp is float and number:
        return float(value)
    elif (
        (tp is type(None) and value is None)
        or (tp is int and number and isinstance(value, int))
        or (tp not in (int, float) and isinstance(tp, type) and isinstance(value, tp))
    ):
        return value
    raise ConfigError(f"{file}: key '{key}' should be {_name(tp)}, got {value!r}")


def _name(tp: Any) -> str:
    args = typing.get_args(tp)
    if args and typing.get_origin(tp) is tuple:
        return f"a list of {_name(args[0])}"
    if args:
        return " or ".join(_name(a) for a in args)
    return {dict: "an object", type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def parse(cls: type, data: dict, file: str, prefix: str = "") -> Any:
    """Build the dataclass `cls` from `data`, reading each field under its released name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: '{prefix.rstrip('.') or '<root>'}' should be an object")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{file}: key '{prefix}{f.name}' is missing")
            continue
        values[f.name] = _check(data[f.name], hints[f.name], file, prefix + f.name)
    return cls(**values)


def require(checks: list[tuple[bool, str, str]], file: str) -> None:
    """(ok, key, why) triples: the first failing one is a ConfigError naming the file and key."""
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"{file}: key '{key}' {why}")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def check_truncate_dim(truncate_dim: int | None, dims: tuple[int, ...]) -> None:
    if truncate_dim is not None and truncate_dim not in dims:
        raise ValueError(f"truncate_dim={truncate_dim!r} is not one of the Matryoshka dims {list(dims)}")


PROMPT_NAMES = ("query", "passage")


@dataclass(frozen=True)
class Task:
    """A task: its LoRA adapter (by name) and its prompt rule, the prefix put before a text for each prompt name.
    A symmetric task (text-matching) puts the same prefix on both sides."""

    name: str
    query: str = "Query: "
    passage: str = "Passage: "

    @property
    def symmetric(self) -> bool:
        return self.query == self.passage

    def prompt(self, text: str, prompt_name: str) -> str:
        if prompt_name not in PROMPT_NAMES:
            raise ValueError(f"prompt_name={prompt_name!r} is not one of {list(PROMPT_NAMES)}")
        return (self.query if prompt_name == "query" else self.passage) + text


# The released config.json holds no prompt rules: its remote code hard-codes them, text-matching with the query
# prefix on both sides and every other task "Query: " / "Passage: ". Checkpoints jina_v4 saves write every task's
# rule under `task_prompts`, which overrides these.
RELEASED_PROMPTS = {"text-matching": {"query": "Query: ", "passage": "Query: "}}


@dataclass(frozen=True)
class TextConfig:
    """`text_config` of config.json (the Qwen2.5-VL language model)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mrope_section(self) -> tuple[int, ...]:
        return tuple(self.rope_scaling["mrope_section"])


@dataclass(frozen=True)
class VisionConfig:
    """`vision_config` of config.json (the Qwen2.5-VL vision tower)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    in_channels: int = 3
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class JinaV4Config:
    """config.json: the backbone configs plus the Jina fields (tasks, Matryoshka dims, projector)."""

    text_config: TextConfig
    vision_config: VisionConfig
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    task_names: tuple[str, ...]
    matryoshka_dims: tuple[int, ...]
    multi_vector_projector_dim: int
    torch_dtype: str = "bfloat16"
    truncate_dim: int | None = None
    task_prompts: dict = field(default_factory=dict)  # jina_v4's key: task -> {"query": prefix, "passage": prefix}

    @property
    def tasks(self) -> dict[str, Task]:
        """Every task of the checkpoint with its prompt rule."""
        rules = {**RELEASED_PROMPTS, **self.task_prompts}
        return {name: Task(name, **rules.get(name, {})) for name in self.task_names}

    def tasks_for(self, task: str | Task | Sequence | None, n: int) -> list[Task]:
        """One Task per input: a name (or Task) for all n inputs, or a list of n."""
        known = self.tasks
        if task is None:
            raise ValueError(f"no task given: pass task=... or set model.task to one of {list(known)}")
        tasks = [task] * n if isinstance(task, (str, Task)) else list(task)
        if len(tasks) != n:
            raise ValueError(f"task: got {len(tasks)} tasks for {n} inputs")
        out = []
        for t in tasks:
            name = t.name if isinstance(t, Task) else t
            if name not in known:
                raise ValueError(f"unknown task {name!r}: valid tasks are {list(known)}")
            out.append(known[name])
        return out

    @classmethod
    def from_dict(cls, data: dict, file: str = "config.json") -> JinaV4Config:
        data = dict(data)
        arch = (data.get("architectures") or ["?"])[0]
        if "task_names" not in data and arch != "JinaEmbeddingsV4Model":
            raise ConfigError(f"{file}: a {arch} checkpoint, not jina-embeddings-v4 (key 'task_names' is missing)")
        # transformers reads `text_config` when present; older files keep the text fields at the top level.
        text = data.get("text_config") or data
        prefix = "text_config." if "text_config" in data and data["text_config"] else ""
        data["text_config"] = parse(TextConfig, text, file, prefix)
        data["vision_config"] = parse(VisionConfig, data.get("vision_config"), file, "vision_config.")
        cfg = parse(cls, data, file)
        cfg.validate(file)
        return cfg

    def validate(self, file: str) -> None:
        t, v = self.text_config, self.vision_config
        mrope = t.rope_scaling.get("mrope_section")
        if not (isinstance(mrope, list) and mrope and all(isinstance(x, int) for x in mrope)):
            raise ConfigError(f"{file}: key 'text_config.rope_scaling.mrope_section' should be a list of int")
        checks = [
            (t.hidden_size % t.num_attention_heads == 0, "text_config.num_attention_heads", "must divide hidden_size"),
            (
                t.num_attention_heads % t.num_key_value_heads == 0,
                "text_config.num_key_value_heads",
                "must divide num_attention_heads",
            ),
            (2 * sum(mrope) == t.head_dim, "text_config.rope_scaling.mrope_section", "must sum to head_dim / 2"),
            (t.hidden_act == "silu", "text_config.hidden_act", "must be 'silu'"),
            (v.hidden_act == "silu", "vision_config.hidden_act", "must be 'silu'"),
            (
                v.hidden_size % v.num_heads == 0 and v.head_dim % 2 == 0,
                "vision_config.num_heads",
                "must divide hidden_size into an even head dim",
            ),
            (
                v.window_size % (v.patch_size * v.spatial_merge_size) == 0,
                "vision_config.window_size",
                "must be a multiple of patch_size * spatial_merge_size",
            ),
            (
                all(0 <= i < v.depth for i in v.fullatt_block_indexes),
                "vision_config.fullatt_block_indexes",
                "must index blocks below depth",
            ),
            (len(self.task_names) > 0, "task_names", "must not be empty"),
            (
                all(0 < d <= t.hidden_size for d in self.matryoshka_dims),
                "matryoshka_dims",
                "must lie in 1..hidden_size",
            ),
        ]
        require(checks, file)
        try:
            check_truncate_dim(self.truncate_dim, self.matryoshka_dims)
        except ValueError as e:
            raise ConfigError(f"{file}: {e}") from None
        for name, rule in self.task_prompts.items():
            fine = isinstance(rule, dict) and set(rule) == set(PROMPT_NAMES)
            if not (fine and all(isinstance(v, str) for v in rule.values()) and name in self.task_names):
                raise ConfigError(
                    f"{file}: key 'task_prompts.{name}' should be a task of 'task_names' mapped to "
                    '{"query": prefix, "passage": prefix}'
                )


@dataclass(frozen=True)
class AdapterConfig:
    """adapters/adapter_config.json (peft LoRA). Only the plain-LoRA subset the release uses is accepted."""

    r: int
    lora_alpha: Union[int, float]
    target_modules: Union[str, tuple[str, ...]]
    exclude_modules: Union[str, tuple[str, ...], None] = None
    lora_dropout: float = 0.0
    init_lora_weights: Union[bool, str] = True
    peft_type: str = "LORA"
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, file: str = "adapters/adapter_config.json") -> AdapterConfig:
        cfg = parse(cls, data, file)
        unsupported = [
            (cfg.peft_type != "LORA", "peft_type", "must be 'LORA'"),
            (cfg.r <= 0, "r", "must be positive"),
            (cfg.use_dora, "use_dora", "is not supported"),
            (cfg.bias != "none" or cfg.lora_bias, "bias", "LoRA biases are not supported"),
            (cfg.fan_in_fan_out, "fan_in_fan_out", "is not supported"),
            (bool(cfg.rank_pattern), "rank_pattern", "per-module ranks are not supported"),
            (bool(cfg.alpha_pattern), "alpha_pattern", "per-module alphas are not supported"),
        ]
        require([(not bad, key, why) for bad, key, why in unsupported], file)
        return cfg

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def targets(self, name: str) -> bool:
        """peft's rule: a module is adapted when its name fullmatches target_modules (a regex, or a list of
        name suffixes) and does not match exclude_modules."""
        return _matches(self.target_modules, name) and not (
            self.exclude_modules is not None and _matches(self.exclude_modules, name)
        )


def _matches(pattern: Union[str, tuple[str, ...]], name: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


@dataclass(frozen=True)
class PreprocessorConfig:
    """preprocessor_config.json (Qwen2-VL image processor)."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    resample: int = 3
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def check_against(self, vision: VisionConfig, file: str, config_file: str) -> None:
        """The patch, merge and temporal patch sizes must be the vision tower's, or images come out in pieces
        the tower cannot take."""
        for key, theirs in (
            ("patch_size", "patch_size"),
            ("merge_size", "spatial_merge_size"),
            ("temporal_patch_size", "temporal_patch_size"),
        ):
            if getattr(self, key) != getattr(vision, theirs):
                raise ConfigError(
                    f"{file}: key '{key}' is {getattr(self, key)}, but {config_file} has "
                    f"'vision_config.{theirs}' {getattr(vision, theirs)}; the two must agree"
                )

    @classmethod
    def from_dict(cls, data: dict, file: str = "preprocessor_config.json") -> PreprocessorConfig:
        data = dict(data)
        size = data.get("size") or {}
        # transformers lets `min_pixels`/`max_pixels` override `size`; either spelling is accepted here.
        data.setdefault("min_pixels", size.get("shortest_edge"))
        data.setdefault("max_pixels", size.get("longest_edge"))
        cfg = parse(cls, data, file)
        checks = [
            (cfg.resample == 3, "resample", "must be 3 (bicubic)"),
            (
                cfg.do_convert_rgb and cfg.do_resize and cfg.do_rescale and cfg.do_normalize,
                "do_resize",
                "the do_* switches must all be true",
            ),
            (len(cfg.image_mean) == 3 and len(cfg.image_std) == 3, "image_mean", "mean and std need 3 values"),
            (0 < cfg.min_pixels <= cfg.max_pixels, "min_pixels", "must be positive and at most max_pixels"),
        ]
        require(checks, file)
        return cfg


@dataclass(frozen=True)
class TokenizerConfig:
    """tokenizer_config.json: the fields the text path needs."""

    pad_token: str
    add_bos_token: bool = False

    @classmethod
    def from_dict(cls, data: dict, file: str = "tokenizer_config.json") -> TokenizerConfig:
        data = dict(data)
        if isinstance(data.get("pad_token"), dict):  # serialized AddedToken
            data["pad_token"] = data["pad_token"].get("content")
        cfg = parse(cls, data, file)
        require([(not cfg.add_bos_token, "add_bos_token", "must be false (the model was trained without BOS)")], file)
        return cfg
