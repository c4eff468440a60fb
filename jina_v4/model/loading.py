"""Checkpoint loading: a local directory or a hub repo in the released layout, read through safetensors
(memory-mapped) and assigned into a model built on the meta device, so the weights exist once in memory.

Released layout: `model.embed_tokens`, `model.layers.N...`, `model.norm`, `visual...`, `multi_vector_projector`
(the names of transformers < 4.52, which are our module names), sharded through `model.safetensors.index.json`
or one `model.safetensors`; adapters in `adapters/adapter_model.safetensors` as peft names them,
`base_model.model.model.language_model.layers.N....lora_{A,B}.<task>.weight`. Loading is strict: every tensor
in the files is used once, every parameter is filled, shapes agree, or a `CheckpointError` names the tensors
and the files.
"""

from __future__ import annotations

import platform
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import AdapterConfig, JinaV4Config, read_json

FILES = [
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "adapters/adapter_config.json",
    "adapters/adapter_model.safetensors",
]
CONFIG_FILES = ["config.json", "adapters/adapter_config.json"]
ADAPTER_FILE = "adapters/adapter_model.safetensors"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


class CheckpointError(ValueError):
    pass


# ---- the checkpoint-name map, both ways -------------------------------------------------------------------
# transformers >= 4.52 (the reference's module tree, which peft's target regex and the adapter file use) nests
# the language model and the vision tower one level deeper than the released weight files and our modules.
NESTED = (("model.", "model.language_model."), ("visual.", "model.visual."))


def reference_name(name: str) -> str:
    """Our module or parameter name -> the reference's (`model.layers.0...` -> `model.language_model.layers.0...`)."""
    for ours, theirs in NESTED:
        if name.startswith(ours) and not name.startswith(theirs):
            return theirs + name[len(ours) :]
    return name


def module_name(name: str) -> str:
    """The reference's name (or ours, unchanged) -> ours."""
    for ours, theirs in NESTED:
        if name.startswith(theirs):
            return ours + name[len(theirs) :]
    return name


def adapter_key(name: str) -> str:
    """Our `<module>.lora_A.<task>` -> its key in adapters/adapter_model.safetensors."""
    return f"base_model.model.{reference_name(name)}.weight"


def adapter_name(key: str) -> str:
    """A key of adapters/adapter_model.safetensors -> our `<module>.lora_A.<task>` (unrecognised: unchanged)."""
    if key.startswith("base_model.model.") and key.endswith(".weight"):
        return module_name(key[len("base_model.model.") : -len(".weight")])
    return key


# ---- files ----------------------------------------------------------------------------------------------------


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not one of {sorted(set(DTYPES))}")


CPUINFO = Path("/proc/cpuinfo")  # Linux on Arm: the CPU's extensions
EMULATED = "this CPU has no native bf16 matmul (AVX512-BF16 or AMX): torch emulates bf16, up to 7x slower than float32"


def native_bf16() -> str | None:
    """AMX or AVX512-BF16 on x86, Linux's `bf16` flag on Arm (oneDNN/ACL use it); None: torch emulates bf16."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        amx, avx512 = torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()
        return "AMX" if amx else "AVX512-BF16" if avx512 else None
    if machine in ("aarch64", "arm64") and CPUINFO.is_file():
        flags = re.search(r"^Features\s*:(.*)$", CPUINFO.read_text(), re.MULTILINE)
        return "BF16" if flags and "bf16" in flags[1].split() else None
    return None  # macOS and the rest: counted as emulating


def choose_dtype(device: torch.device, checkpoint: torch.dtype, asked: torch.dtype | None) -> tuple[torch.dtype, str]:
    """-> (dtype, why). asked=None: the checkpoint's, except float32 for a bf16 checkpoint on a CPU that emulates
    bf16 (twice the memory, 3-7x the speed). bf16 asked for on such a CPU is kept, with a warning."""
    if asked is None and (device.type != "cpu" or checkpoint != torch.bfloat16):
        return checkpoint, "the checkpoint's dtype"
    native = native_bf16() if device.type == "cpu" else device.type  # a GPU multiplies bf16 natively
    if asked is None and native:
        return checkpoint, f"the checkpoint's dtype; this CPU multiplies bf16 natively: {native}"
    if asked is None:
        return torch.float32, EMULATED
    if asked == torch.bfloat16 and not native:
        warnings.warn(f"dtype=bfloat16: {EMULATED}", stacklevel=3)  # once per calling line
        return asked, f"as asked; {EMULATED}"
    return asked, "as asked"


def resolve(
    name_or_path: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    files: list[str] = FILES,
) -> Path:
    """A local directory as is; otherwise a hub repo id, downloaded (only `files`: what jina_v4 reads)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"{name}: not a checkpoint directory, nor a hub repo id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=files,
                local_files_only=local_files_only,
                token=token,
            )
        )
    except Exception as e:  # network, auth, missing revision: the whole message, and the ways around the hub
        raise FileNotFoundError(
            f"{name}: cannot fetch from the hub ({type(e).__name__}: {e})\n{without_hub(cache_dir)}"
        ) from None


def without_hub(cache_dir: str | Path | None) -> str:
    """What to do when the hub cannot be reached: a local checkpoint, or the hub cache read offline."""
    from huggingface_hub import constants

    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    return (
        "Without the hub:\n"
        "  --model DIR (in Python: from_pretrained(DIR)) reads a checkpoint directory in the released layout:\n"
        "    config files, model*.safetensors, adapters/, tokenizer; `python scripts/synthetic.py DIR` writes a\n"
        "    small one with random weights, for trying the tools.\n"
        f"  A model downloaded before is read from the hub cache, {cache} (HF_HOME moves it);\n"
        "    HF_HUB_OFFLINE=1 reads it from there without asking the hub."
    )


def read_configs(path: Path) -> tuple[JinaV4Config, AdapterConfig]:
    """config.json and adapters/adapter_config.json of a checkpoint directory."""
    config = JinaV4Config.from_dict(read_json(path / "config.json"), str(path / "config.json"))
    adapter_file = path / "adapters" / "adapter_config.json"
    return config, AdapterConfig.from_dict(read_json(adapter_file), str(adapter_file))


def weight_files(path: Path) -> dict[Path, list[str] | None]:
    """Shard file -> the tensor names the index assigns to it (None: a single model.safetensors)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: key 'weight_map' is missing or empty")
        shards: dict[Path, list[str]] = {}
        for key, file in weight_map.items():
            shards.setdefault(path / file, []).append(key)
        for file in shards:
            if not file.is_file():
                raise CheckpointError(f"{index}: names shard '{file.name}', which is missing from {path}")
        return shards
    if (path / "model.safetensors").is_file():
        return {path / "model.safetensors": None}
    raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json is present")


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, memory-mapped (no copy until a dtype or device change)."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def load_checkpoint(model: nn.Module, path: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Fill a meta-device model from the checkpoint directory, strictly, by assignment."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # our name -> "file: tensor name", for messages

    def add(file: Path, tensors: dict[str, torch.Tensor], rename) -> None:
        for key, t in tensors.items():
            name = rename(key)
            where = f"{file.relative_to(path)}: tensor '{key}'"
            if name in state:  # in two shards, or under both the old and the new layout
                raise CheckpointError(f"{where} duplicates {origin[name]}")
            state[name], origin[name] = t, where

    for file, listed in weight_files(path).items():
        tensors = read_tensors(file)
        add(file, tensors, module_name)
        if listed is not None and set(tensors) != set(listed):
            missing, extra = sorted(set(listed) - set(tensors)), sorted(set(tensors) - set(listed))
            raise CheckpointError(
                f"{file}: disagrees with model.safetensors.index.json"
                f"{_names(' lacks', missing)}{_names(' has unlisted', extra)}"
            )
    if not (path / ADAPTER_FILE).is_file():
        raise CheckpointError(f"{path}: {ADAPTER_FILE} is missing (the task adapters)")
    add(path / ADAPTER_FILE, read_tensors(path / ADAPTER_FILE), adapter_name)

    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(origin[k] for k in set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not fit the config"
            f"{_names(' - missing', missing)}{_names(' - unexpected', unexpected)}"
        )
    for k, t in state.items():
        if t.shape != expected[k]:
            hint = " (the LoRA rank must equal r in adapter_config.json)" if ".lora_" in k else ""
            raise CheckpointError(f"{origin[k]} has shape {tuple(t.shape)}, expected {tuple(expected[k])}{hint}")
        if not t.is_floating_point():
            raise CheckpointError(f"{origin[k]} has dtype {t.dtype}, expected a floating-point tensor")
        state[k] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)


def _names(label: str, names: list[str], most: int = 5) -> str:
    if not names:
        return ""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return f"{label}: " + ", ".join(names[:most]) + more
