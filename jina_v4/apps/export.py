"""Deployable checkpoints of one task (`jina-v4 export`), any task of the checkpoint (a trained one included):

- `vllm`: a Qwen2.5-VL checkpoint (`Qwen2_5_VLForConditionalGeneration`), laid out as the released
  `jina-embeddings-v4-vllm-<task>` ones: config.json, the weights with the task's LoRA merged into the decoder
  (W + s·B A, computed in at least fp32 and rounded once to the export dtype) under the released names
  (`model.layers.N...`, `visual...`), the tokenizer and preprocessor files. The caller pools (README.md written
  beside the weights says how). The multi-vector projector, with the task's LoRA merged, goes in its own file,
  `multi_vector_projector.safetensors` (`weight` (P, D), `bias` (P,)): multi-vectors = normalize(h W^T + b).
- `text`: a text-only Qwen2 checkpoint (`Qwen2ForCausalLM`) that llama.cpp's convert_hf_to_gguf.py reads: the
  vision tower dropped, LoRA merged, the embedding tied to the (absent) LM head. For text, M-RoPE's three
  position axes are equal, so Qwen2's 1-D rotary with the same theta gives the same positions. README.md states
  the prompt rule users must type (the task's prefixes) and the pooling.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..model.processing import MAX_TEXT_TOKENS
from .common import atomic_write

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
PREPROCESSOR_FILES = ("preprocessor_config.json",)
# config.json keys of jina-embeddings-v4 that a plain Qwen2.5-VL config does not have
JINA_KEYS = (
    "auto_map",
    "task_names",
    "task_prompts",
    "matryoshka_dims",
    "truncate_dim",
    "multi_vector_projector_dim",
    "single_vector_pool_strategy",
    "pretrained_peft_model_name_or_path",
    "verbosity",
    "_attn_implementation",
    "_name_or_path",
)
SHARD_BYTES = 4 * 2**30  # larger exports are split into shards of at most this size, with an index
PROJECTOR_FILE = "multi_vector_projector.safetensors"


def merged_weights(model, task: str) -> dict[str, torch.Tensor]:
    """The model's weights under the released names with `task`'s LoRA merged into every adapted Linear (no LoRA
    tensors left). The model's own weights are untouched: merging writes a separate buffer (lora.py)."""
    model.config.tasks_for(task, 1)
    model.merge(task)
    try:
        state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
        for name in model.adapted:
            state[f"{name}.weight"] = model.get_submodule(name).merged_weight
    finally:
        model.merge(None)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def write_weights(directory: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    """One model.safetensors, or shards with model.safetensors.index.json when over SHARD_BYTES."""
    from safetensors.torch import save_file

    shards, size = [[]], 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        part = {k: tensors[k] for k in keys}
        atomic_write(directory / name, lambda tmp: save_file(part, str(tmp), metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: name for name, keys in zip(names, shards) for k in keys},
        }
        write_json(directory / "model.safetensors.index.json", index)
    return names


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n"))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def vllm_config(source: dict, dtype: torch.dtype) -> dict:
    cfg = {k: v for k, v in source.items() if k not in JINA_KEYS}
    cfg["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    cfg["model_type"] = "qwen2_5_vl"
    cfg["torch_dtype"] = dtype_name(dtype)
    for sub in ("text_config", "vision_config"):
        if isinstance(cfg.get(sub), dict):
            cfg[sub] = {**cfg[sub], "torch_dtype": dtype_name(dtype)}
    return cfg


def text_config(model, source: dict, dtype: torch.dtype) -> dict:
    t = model.config.text_config
    raw = source.get("text_config") or source
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": t.hidden_act,
        "max_position_embeddings": MAX_TEXT_TOKENS,  # jina_v4 reads at most this many tokens (not Qwen's 128000)
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "bos_token_id": raw.get("bos_token_id", source.get("bos_token_id")),
        "eos_token_id": raw.get("eos_token_id", source.get("eos_token_id")),
        "attention_dropout": 0.0,
        "initializer_range": raw.get("initializer_range", 0.02),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": t.num_hidden_layers,
        "use_cache": True,
        "torch_dtype": dtype_name(dtype),
    }


def prompt_rule(model, task: str) -> str:
    t = model.tasks[task]
    if t.symmetric:
        return f"every text, on both sides: `{t.query}` + text"
    return f"queries: `{t.query}` + text; passages: `{t.passage}` + text"


def vllm_readme(model, task: str, source: str) -> str:
    t, p = model.tasks[task], model.config.multi_vector_projector_dim
    return f"""# jina-embeddings-v4, task `{task}`, merged for vLLM

Exported by `jina-v4 export --format vllm` from `{source}`: a Qwen2.5-VL checkpoint
(`Qwen2_5_VLForConditionalGeneration`) with the `{task}` LoRA merged into the decoder. The engine returns the
final hidden states of every token (a pooling runner that keeps all token states); the caller pools:

- prompts: {prompt_rule(model, task)}; images: the fixed prompt
  `<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\\n`
  (the engine expands `<|image_pad|>` to the image's tokens)
- single vector: text, the mean of all tokens' final hidden states; image, the mean over the tokens from
  `<|vision_start|>` to `<|vision_end|>` inclusive; then L2-normalise. Matryoshka: the first d components
  ({", ".join(map(str, model.config.matryoshka_dims))}), L2-normalised again.
- multi-vectors: `{PROJECTOR_FILE}` holds the projector with the task's LoRA merged, `weight`
  ({p}, {model.config.text_config.hidden_size}) and `bias` ({p},): each token's vector is
  normalize(h @ weight.T + bias), over all tokens of the input.

The prefixes above are this task's (`query`: {t.query!r}, `passage`: {t.passage!r}).

Limits and text handling: jina_v4 reads at most {MAX_TEXT_TOKENS} tokens of a text (cut on the right): start
the engine with `max_model_len={MAX_TEXT_TOKENS}` (config.json keeps Qwen2.5-VL's `max_position_embeddings`,
128000). The engine's tokenizer is the `tokenizer.json` beside the weights, as jina_v4's: it NFC-normalises
texts and reads special tokens typed in a text (`<|im_end|>`) as those tokens, as jina_v4 does; do not add
special tokens (no BOS, EOS or chat template).
"""


# How llama.cpp users embed a text as jina_v4 does. README.md of a text export shows these verbatim, and
# scripts/check_export.py runs them (GGUF_NAME replaced by the file it converted).
GGUF_NAME = "model-f32.gguf"
CONTEXT = 8192  # the context the instructions use: jina_v4 reads at most MAX_TEXT_TOKENS (32768)
CONVERT = f"python convert_hf_to_gguf.py EXPORT_DIR --outfile {GGUF_NAME} --outtype f32"
LLAMA_CPP_PYTHON = f"""import unicodedata

import llama_cpp


class JinaLlama(llama_cpp.Llama):
    # jina_v4 reads special tokens typed in a text (<|im_end|>) as those tokens; Llama.embed does not by default
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True):
        return super().tokenize(text, add_bos, special)


def embed(llm, texts):
    # the prefix typed by the caller; NFC as jina_v4's tokenizer does (llama.cpp does not); mean pooling; L2
    return llm.embed([unicodedata.normalize("NFC", t) for t in texts], normalize=True)


llm = JinaLlama(
    "{GGUF_NAME}",
    embedding=True,
    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    n_ctx={CONTEXT},  # the longest text in tokens, up to 32768 (jina_v4's limit)
    n_batch={CONTEXT},  # a text is embedded in one batch: n_batch and n_ubatch at least its tokens
    n_ubatch={CONTEXT},
    type_k=llama_cpp.GGML_TYPE_F32,  # an f32 KV cache: fp32 parity; the default f16 moves vectors by ~1e-4
    type_v=llama_cpp.GGML_TYPE_F32,
    verbose=False,
)
vectors = embed(llm, ["Query: Overview of climate change impacts on coastal cities"])
"""
QUANTIZE = f"""import llama_cpp

params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
assert llama_cpp.llama_model_quantize(b"{GGUF_NAME}", b"model-q4_k_m.gguf", params) == 0
"""
NFC_SHELL = 'python3 -c \'import sys, unicodedata; print(unicodedata.normalize("NFC", sys.stdin.read()), end="")\''
LLAMA_EMBEDDING = (
    f"{NFC_SHELL} < texts.txt > texts-nfc.txt\n"
    f"llama-embedding -m {GGUF_NAME} --pooling mean --embd-normalize 2 -c {CONTEXT} -b {CONTEXT} -ub {CONTEXT} "
    "-ctk f32 -ctv f32 -fa off --embd-separator '<#sep#>' --embd-output-format json -f texts-nfc.txt"
)
LLAMA_SERVER = (
    f"llama-server -m {GGUF_NAME} --embedding --pooling mean -c {CONTEXT} -b {CONTEXT} -ub {CONTEXT} "
    "-ctk f32 -ctv f32 -fa off --port 8080"
)


def text_readme(model, task: str, source: str) -> str:
    t = model.config.text_config
    return f"""# jina-embeddings-v4, task `{task}`, text only

Exported by `jina-v4 export --format text` from `{source}`: a Qwen2 checkpoint (`Qwen2ForCausalLM`, vision
tower dropped) with the `{task}` LoRA merged into every decoder layer, for llama.cpp's `convert_hf_to_gguf.py`.
It reads at most {MAX_TEXT_TOKENS} tokens (config.json's `max_position_embeddings`), as jina_v4 does.

## The rules jina_v4 applies, which the engine must be told

- Prompt rule, typed by the user before every text: {prompt_rule(model, task)}.
  Nothing else is added: no BOS or EOS token, no chat template.
- Unicode NFC: jina_v4's tokenizer normalises every text to NFC; llama.cpp does not. NFC-normalise each text
  before the engine (`unicodedata.normalize("NFC", text)`), or "Café" written with a combining accent gets
  other tokens and another vector.
- Special tokens typed in a text (`<|im_end|>`, `<|endoftext|>`, ...) are read as those single tokens by jina_v4
  (as by the released model's tokenizer). `llama-embedding` and `llama-server` do the same; llama-cpp-python's
  `Llama.embed` does not unless told to (the `JinaLlama` class below).
- Pooling: the mean of all tokens' final hidden states (the prefix included), then L2-normalise; Matryoshka:
  the first d components ({", ".join(map(str, model.config.matryoshka_dims))}), L2-normalised again. The GGUF
  has no pooling type: say `mean`. Each text must be embedded in one batch (batch and micro-batch sizes at
  least its tokens): llama.cpp pools each micro-batch on its own.
- Context: set it (here {CONTEXT}; at most {MAX_TEXT_TOKENS}). Without one llama.cpp allocates the whole
  `max_position_embeddings`.

## Convert

llama.cpp's `convert_hf_to_gguf.py` with its `gguf-py` (a llama.cpp checkout, or `vendor/llama.cpp` in the
llama-cpp-python source distribution). It needs Python packages `torch`, `numpy`, `transformers` (llama.cpp pins
4.57.6; 4.52.4 converted this layout with llama-cpp-python 0.3.36's copy) and `sentencepiece` (imported by the
Qwen2 converter even for this BPE tokenizer; 0.2.3 tried, with protobuf 7.36.2 present), and recognises
Qwen2's tokenizer by its output (a checkpoint with another tokenizer is refused:
"BPE pre-tokenizer was not recognized"); EXPORT_DIR is this folder:

```bash
{CONVERT}   # or f16, bf16, q8_0
```

q4_k_m: `llama-quantize {GGUF_NAME} model-q4_k_m.gguf Q4_K_M`, or from Python:

```python
{QUANTIZE}```

## Embed with llama-cpp-python

```python
{LLAMA_CPP_PYTHON}```

## Embed with llama-embedding

`texts.txt` holds the texts, prefixes typed, separated by `<#sep#>` (without `--embd-separator` each line is
embedded on its own):

```bash
{LLAMA_EMBEDDING}
```

`--embedding` is a `llama-server` flag: `llama-embedding` refuses it. Ignore its warnings "last token in the
prompt is not SEP or EOS" and "'tokenizer.ggml.add_eos_token' should be set to 'true'": jina_v4 adds no EOS, and
adding one changes every vector. Ignore too "model default pooling_type is [-1], but [1] was specified" (any
program): the GGUF carries no pooling type, and mean is the one to specify.

## Serve with llama-server

```bash
{LLAMA_SERVER}
```

POST `/v1/embeddings` with `{{"input": ["Query: ..."]}}` returns L2-normalised vectors; NFC-normalise the texts
first. The server reads special tokens typed in a text, as jina_v4 does. Its warning "embeddings required but some
input tokens were not marked as outputs -> overriding" is harmless (every token is pooled).

## Numerics

An f32 GGUF with an f32 KV cache and flash attention off gives jina_v4's fp32 vectors within about 1e-6;
llama.cpp's defaults (f16 KV cache, flash attention where available) move them by about 1e-4; q8_0 and q4_k_m
weights move them more (`scripts/check_export.py` in the jina_v4 repository measures all of these). Hidden size
{t.hidden_size}, {t.num_hidden_layers} layers.
"""


def export(model, source: str | Path, task: str, fmt: str, out: str | Path) -> Path:
    """Write `task`'s merged checkpoint in format `fmt` ("vllm" or "text") to the new or empty directory `out`.
    `source`: the checkpoint directory `model` was loaded from (its config, tokenizer and preprocessor files)."""
    from safetensors.torch import save_file

    from ..model.loading import resolve

    if fmt not in ("vllm", "text"):
        raise ValueError(f"format {fmt!r} is not 'vllm' or 'text'")
    model.config.tasks_for(task, 1)  # an unknown task is refused before anything is written
    source_dir, out = resolve(source, local_files_only=True), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads((source_dir / "config.json").read_text())
    weights = merged_weights(model, task)
    projector = {k.split(".", 1)[1]: weights.pop(k) for k in list(weights) if k.startswith("multi_vector_projector.")}
    if fmt == "vllm":
        write_json(out / "config.json", vllm_config(raw, model.dtype))
        meta = {"format": "pt", "task": task, "rule": "normalize(h @ weight.T + bias) per token"}
        atomic_write(out / PROJECTOR_FILE, lambda tmp: save_file(projector, str(tmp), metadata=meta))
        readme, files = vllm_readme(model, task, str(source)), TOKENIZER_FILES + PREPROCESSOR_FILES
    else:
        weights = {k: v for k, v in weights.items() if k.startswith("model.")}
        write_json(out / "config.json", text_config(model, raw, model.dtype))
        readme, files = text_readme(model, task, str(source)), TOKENIZER_FILES
    write_weights(out, weights)
    for name in files:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out / name)
    atomic_write(out / "README.md", lambda tmp: tmp.write_text(readme))
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes its files owner-only; a serving engine often runs as another user
    return out


def main(args) -> None:
    """`jina-v4 export` (cli.py parses the arguments)."""
    import sys

    from ..model.loading import CONFIG_FILES, resolve
    from .common import loaded_model

    # an export is files, not speed: the checkpoint's dtype unless --dtype says otherwise (not the CPU's choice)
    checkpoint_dtype = json.loads((resolve(args.model, files=CONFIG_FILES) / "config.json").read_text())["torch_dtype"]
    model = loaded_model(args.model, args.device or "cpu", args.dtype or checkpoint_dtype, args.quiet)
    out = export(model, args.model, args.task, args.format, args.output)
    if not args.quiet:
        print(f"wrote the {args.format} export of task {args.task!r} ({model.dtype}) to {out}", file=sys.stderr)
