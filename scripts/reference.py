"""The reference oracle: transformers 4.52.4 Qwen2.5-VL + peft 0.15.2 (one LoRA adapter per task, named after
the task) + the released pooling rules (modeling_jina_embeddings_v4.py), loaded from a checkpoint directory
in the released layout. Used by the tests and by scripts/parity.py; jina_v4 never imports it (it shares only jina_v4's
checkpoint-name map, so that both sides read the files under the same names). It also runs on transformers 5.x
(checked with 5.17 and peft 0.21), whose `get_rope_index` takes the modality of each token (1: image pad).

Hidden states come from the inner `Qwen2_5_VLModel` with `get_rope_index` positions: the released code's
`hidden_states[-1]` without the LM head.

Run as a script, it writes the reference's stage file (jina_v4/apps/stages.py: every stage of the probe set,
recorded by hooks on the transformers modules), which `scripts/parity.py --stages --against FILE` compares with:

    python scripts/reference.py --model DIR --dtype float32 -o reference-stages.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from jina_v4.model.loading import module_name, reference_name  # the one checkpoint-name map, both ways

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
PREFIX = {"query": "Query", "passage": "Passage"}
IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"


def wide(dtype: torch.dtype) -> torch.dtype:
    """Outputs in fp32 at least (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


class RefModel(nn.Module):
    """The released module tree: `model` (Qwen2_5_VLModel) and `multi_vector_projector`."""

    base_model_prefix = ""  # peft under transformers 5 reads it from any module that carries a config

    def __init__(self, config: Qwen2_5_VLConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        dtype_kw = {"dtype" if TRANSFORMERS_5 else "torch_dtype": dtype}  # 5.x renamed the keyword
        self.model = Qwen2_5_VLModel._from_config(config, attn_implementation="sdpa", **dtype_kw).to(dtype)
        self.multi_vector_projector = nn.Linear(
            config.text_config.hidden_size, config.multi_vector_projector_dim, dtype=dtype
        )

    @classmethod
    def from_config_dict(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> RefModel:
        return cls(Qwen2_5_VLConfig.from_dict(cfg, attn_implementation="sdpa"), dtype)


def released_state_dict(ref: RefModel) -> dict[str, torch.Tensor]:
    """Module names -> the released checkpoint names (pre-4.52 layout: `model.*` for the LM, `visual.*`)."""
    return {module_name(k): v for k, v in ref.state_dict().items()}


def add_task_adapters(ref: RefModel, adapter_cfg: dict, tasks: list[str]):
    """One standard peft LoRA adapter per task. The released target regex also matches peft's own LoRA
    sub-modules once one adapter exists, so it is anchored at the module name's end (same base modules)."""
    target = adapter_cfg["target_modules"]
    if isinstance(target, str):
        target = target.replace(".*$", "$")
    lora = LoraConfig(
        r=adapter_cfg["r"],
        lora_alpha=adapter_cfg["lora_alpha"],
        target_modules=target,
        exclude_modules=adapter_cfg.get("exclude_modules"),
        lora_dropout=adapter_cfg["lora_dropout"],
        bias="none",
        use_rslora=adapter_cfg.get("use_rslora", False),
    )
    peft_model = get_peft_model(ref, lora, adapter_name=tasks[0])
    for t in tasks[1:]:
        peft_model.add_adapter(t, lora)
    return peft_model


class Reference:
    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        """dtype float32 or float64: plain arithmetic in that dtype. bfloat16/float16: half weights run under
        autocast, as the released encode_* does (peft keeps the LoRA weights in fp32; autocast runs their
        matmuls in half precision)."""
        path = Path(path)
        self.device, self.dtype = torch.device(device), dtype
        cfg = json.loads((path / "config.json").read_text())
        self.config = cfg
        with self.device:  # built where it runs: initialising a full-size fp32 model on a CPU takes minutes
            self.ref = RefModel.from_config_dict(cfg, dtype)
        weights = {}
        index = path / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
        for f in files:
            weights.update(load_file(path / f, device=str(self.device)))
        renamed = {reference_name(k): v.to(dtype) for k, v in weights.items()}
        self.ref.load_state_dict(renamed, strict=True)
        adapter_cfg = json.loads((path / "adapters" / "adapter_config.json").read_text())
        self.tasks = cfg["task_names"]
        self.peft = add_task_adapters(self.ref, adapter_cfg, self.tasks)
        lora = {k: v.to(dtype) for k, v in load_file(path / "adapters" / "adapter_model.safetensors").items()}
        result = self.peft.load_state_dict(lora, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys[:5]
        missing = [k for k in result.missing_keys if ".lora_" in k]
        assert not missing, missing[:5]
        self.peft.eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.path = path

    def autocast(self):
        if self.dtype in (torch.float32, torch.float64):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def hidden_states(
        self,
        input_ids,
        attention_mask,
        task: str,
        pixel_values=None,
        image_grid_thw=None,
        output_hidden_states: bool = False,
    ):
        """Final-normed hidden states (B, L, D), as the released get_last_hidden_states; differentiable when grad
        is enabled (`hidden` is the same without autograd)."""
        self.peft.set_adapter(task)
        model = self.ref.model
        dev = self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        pixel_values = None if pixel_values is None else pixel_values.to(dev)
        image_grid_thw = None if image_grid_thw is None else image_grid_thw.to(dev)
        rope_kw = dict(image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        if "mm_token_type_ids" in inspect.signature(model.get_rope_index).parameters:  # transformers 5
            rope_kw["mm_token_type_ids"] = (input_ids == self.config["image_token_id"]).int()  # 1: image token
        position_ids, _ = model.get_rope_index(input_ids, **rope_kw)
        with self.autocast():
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                use_cache=False,
                output_hidden_states=output_hidden_states,
            )
        return out.hidden_states if output_hidden_states else out.last_hidden_state

    hidden = torch.no_grad()(hidden_states)

    def text_batch(self, texts: list[str], task: str, prompt_name: str = "query", max_length: int = 32768):
        prefix = PREFIX["query" if task == "text-matching" else prompt_name]
        return self.tokenizer(
            [f"{prefix}: {t}" for t in texts],
            return_tensors="pt",
            padding="longest",
            max_length=min(max_length, 32768),
            truncation=True,
        )

    @torch.no_grad()
    def pool(self, h, input_ids, attention_mask, task, multivector=False, truncate_dim=None):
        """The released heads: single vector pooled by row 0's rule, or masked multi-vectors."""
        return self.heads(h, input_ids, attention_mask, task, multivector, truncate_dim)

    def heads(self, h, input_ids, attention_mask, task, multivector=False, truncate_dim=None):
        """`pool`, differentiable when grad is enabled."""
        cfg = self.config
        input_ids, attention_mask = input_ids.to(h.device), attention_mask.to(h.device)
        if multivector:
            self.peft.set_adapter(task)
            with self.autocast():
                v = F.normalize(self.ref.multi_vector_projector(h), dim=-1) * attention_mask.unsqueeze(-1)
            return [e[m.bool()].to(wide(e.dtype)).cpu() for e, m in zip(v, attention_mask)]
        with self.autocast():
            if cfg["vision_start_token_id"] in input_ids[0]:
                start = torch.where(input_ids == cfg["vision_start_token_id"])[1]
                end = torch.where(input_ids == cfg["vision_end_token_id"])[1]
                pos = torch.arange(input_ids.shape[1], device=h.device).expand(input_ids.shape[0], -1)
                mask = (pos >= start[:, None]) & (pos <= end[:, None])
                pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            else:
                pooled = (h * attention_mask.unsqueeze(-1)).sum(1) / attention_mask.sum(1, keepdim=True)
            v = F.normalize(pooled, dim=-1)
            v = v if truncate_dim is None else F.normalize(v[:, :truncate_dim], dim=-1)
        return v.to(wide(v.dtype)).cpu()

    def encode_text(
        self,
        texts: list[str],
        task: str,
        prompt_name: str = "query",
        multivector=False,
        truncate_dim=None,
        max_length=32768,
    ):
        b = self.text_batch(texts, task, prompt_name, max_length)
        h = self.hidden(b["input_ids"], b["attention_mask"], task)
        return self.pool(h, b["input_ids"], b["attention_mask"], task, multivector, truncate_dim)

    def image_batch(self, grid) -> dict:
        """The released image prompt with its pad token expanded to t·h·w/4 copies, as the processor does."""
        n = int(torch.tensor(grid).prod()) // 4
        return self.tokenizer([IMAGE_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * n)], return_tensors="pt")

    def encode_image(self, pixel_values, grid, task: str, multivector=False, truncate_dim=None):
        """One image: its patches (N, 1176) and grid (t, h, w) -> the released single or multi-vector."""
        b = self.image_batch(grid)
        h = self.hidden(b["input_ids"], b["attention_mask"], task, pixel_values, torch.tensor([grid]))
        return self.pool(h, b["input_ids"], b["attention_mask"], task, multivector, truncate_dim)

    # ---- gradients: peft's own LoRA parameters, the released forward and heads with autograd ----------------

    def trainable(self, task: str) -> dict[str, nn.Parameter]:
        """Exactly `task`'s LoRA A/B require grad (peft's set_adapter); returns them under their adapter-file
        keys (peft's state-dict names, `base_model.model....lora_A.<task>.weight`)."""
        self.peft.set_adapter(task)
        out = {}
        for k, p in self.peft.named_parameters():
            p.requires_grad_(".lora_" in k and k.endswith(f".{task}.weight"))
            if p.requires_grad:
                out[k] = p
        return out

    def embed_with_grad(self, inputs: list, task: str, prompt_name: str = "query"):
        """Texts (str) and images ((pixel_values, grid) pairs) -> ([single (D,)], [multi (L_i, P)]) with
        autograd: the texts as one right-padded batch, each image on its own, in input order."""
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        single, multi = [None] * len(inputs), [None] * len(inputs)
        batches = []
        if texts:
            b = self.text_batch([x for _, x in texts], task, prompt_name)
            batches.append(([i for i, _ in texts], b["input_ids"], b["attention_mask"], None, None))
        for i, x in enumerate(inputs):
            if not isinstance(x, str):
                b = self.image_batch(x[1])
                batches.append(([i], b["input_ids"], b["attention_mask"], x[0], torch.tensor([x[1]])))
        for index, ids, mask, pixels, grid in batches:
            h = self.hidden_states(ids, mask, task, pixels, grid)
            s = self.heads(h, ids, mask, task)
            m = self.heads(h, ids, mask, task, multivector=True)
            for j, i in enumerate(index):
                single[i], multi[i] = s[j], m[j]
        return single, multi

    # ---- stage files: the reference's activations, stage by stage (jina_v4/apps/stages.py) --------------------

    def case_batch(self, case, image_cfg):
        """A probe case as the reference takes it: right-padded ids and mask, and its images' patches and grids
        (from jina_v4's preprocessing, which is bit-identical to the released fast image processor)."""
        from jina_v4.model.images import image_patches, load_image

        rows, pixels, grids = [], [], []
        for x in case.inputs:
            if "text" in x:
                prefix = PREFIX["query" if case.task == "text-matching" else case.prompt_name]
                rows.append(self.tokenizer(f"{prefix}: {x['text']}")["input_ids"])
            else:
                p, grid = image_patches(load_image(x["image"]), image_cfg)
                pixels.append(p)
                grids.append(grid)
                rows.append(self.image_batch(grid)["input_ids"][0].tolist())
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        pixel_values = torch.cat(pixels) if pixels else None
        return ids, mask, pixel_values, torch.tensor(grids) if grids else None

    @torch.no_grad()
    def stages(self, cases) -> dict[str, torch.Tensor]:
        """Every stage of each probe case (stage names and layout: jina_v4/apps/stages.py), by forward hooks on
        the transformers modules: vision block outputs put back from window order into the processor's order."""
        from jina_v4.apps.stages import windows_to_rows
        from jina_v4.model.config import PreprocessorConfig, read_json

        image_cfg = PreprocessorConfig.from_dict(read_json(self.path / "preprocessor_config.json"))
        model = self.ref.model
        visual, text = model.visual, model.language_model
        unit = visual.spatial_merge_unit
        out = {}
        for case in cases:
            ids, mask, pixel_values, grid = self.case_batch(case, image_cfg)
            valid = mask.bool().to(self.device)
            got = {}

            def keep(name, index=None):
                def hook(module, args, output):
                    x = output[0] if isinstance(output, tuple) else output
                    if index is not None:
                        x = windows_to_rows(x, index, unit)
                    elif x.dim() == 3:  # (B, L, D) -> the unpadded tokens
                        x = x[valid]
                    got[name] = x.detach()

                return hook

            def embeddings(module, args, kwargs):
                got["embeddings"] = kwargs["inputs_embeds"][valid].detach()

            hooks = [text.register_forward_pre_hook(embeddings, with_kwargs=True)]
            hooks += [layer.register_forward_hook(keep(f"decoder.layers.{i}")) for i, layer in enumerate(text.layers)]
            hooks.append(text.norm.register_forward_hook(keep("decoder.norm")))
            if grid is not None:
                index = visual.get_window_index(grid.to(self.device))[0]
                hooks.append(visual.patch_embed.register_forward_hook(keep("visual.patch_embed")))
                hooks += [
                    b.register_forward_hook(keep(f"visual.blocks.{i}", index)) for i, b in enumerate(visual.blocks)
                ]
                hooks.append(visual.register_forward_hook(keep("visual.merger")))
            try:
                h = self.hidden(ids, mask, case.task, pixel_values, grid)
            finally:
                for hook in hooks:
                    hook.remove()
            rope_kw = dict(
                image_grid_thw=None if grid is None else grid.to(self.device), attention_mask=mask.to(self.device)
            )
            if "mm_token_type_ids" in inspect.signature(model.get_rope_index).parameters:  # transformers 5
                rope_kw["mm_token_type_ids"] = (ids == self.config["image_token_id"]).int().to(self.device)
            positions = model.get_rope_index(ids.to(self.device), **rope_kw)[0]  # (3, B, L)
            got["input_ids"], got["position_ids"] = ids[mask.bool()], positions[:, valid]
            if grid is not None:
                got["pixel_values"], got["image_grid_thw"] = pixel_values, grid
            # each input pooled by its own rule (the released code pools a batch by its first row's rule)
            got["single"] = torch.cat(
                [self.pool(h[i : i + 1], ids[i : i + 1], mask[i : i + 1], case.task) for i in range(len(ids))]
            )
            got["multi"] = torch.cat(self.pool(h, ids, mask, case.task, multivector=True))
            out.update({f"{case.name}/{k}": v.cpu().contiguous() for k, v in got.items()})
        return out


def main(argv: list[str] | None = None) -> int:
    from jina_v4.apps import stages
    from jina_v4.model.loading import resolve

    ap = argparse.ArgumentParser(description="write the reference's stage file (transformers + peft)")
    ap.add_argument("--model", required=True, help="checkpoint directory or hub repo id")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--inputs", help="record on the probe inputs of this stage file instead of the built-in probe")
    ap.add_argument("-o", "--output", required=True, help="the stage file to write (.safetensors)")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    path = resolve(args.model)
    cases = stages.probe_cases() if args.inputs is None else stages.cases_from(*stages.load(args.inputs))
    ref = Reference(path, getattr(torch, args.dtype), args.device)
    tensors = {**ref.stages(cases), **stages.image_tensors(cases)}
    prompts = {
        t: {"query": f"{PREFIX['query']}: ", "passage": f"{PREFIX['query' if t == 'text-matching' else 'passage']}: "}
        for t in ref.tasks
    }
    settings = {
        **json.loads((path / "preprocessor_config.json").read_text()),
        "image_prompt": IMAGE_PROMPT,
        "prompts": prompts,
    }
    implementation = (
        f"transformers {transformers.__version__} + peft {__import__('peft').__version__} (scripts/reference.py)"
    )
    meta = stages.header(args.model, path, args.dtype, args.device, cases, implementation, settings)
    stages.save(args.output, tensors, meta)
    print(f"wrote {len(tensors)} tensors ({len(cases)} cases) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
