"""An export's round trip through the engine itself, embedding exactly as the export's README.md tells users to.

    python scripts/check_export.py --model M --task T --engine llama.cpp [--converter PATH] [--work DIR]

llama.cpp: `jina-v4 export --format text` of the task (fp32), converted by llama.cpp's own convert_hf_to_gguf.py
(the command README.md shows) to an f32 and a q8_0 GGUF, the f32 one quantised to q4_k_m with
`llama_cpp.llama_model_quantize` (README.md's snippet), each loaded by llama-cpp-python with README.md's snippet
run verbatim (its file name replaced), and a fixed probe set (scripts, code, multi-line text, NFD text, a typed
special token, a long text) embedded by its `embed`. Per input and GGUF: whether the token ids equal jina_v4's,
the cosine and the largest absolute difference against jina_v4's fp32 single vector.

Exit status: 0 when every input's ids are equal and the f32 GGUF with an f32 KV cache is within --tol (1e-6) of
jina_v4 on every input; 1 when not; 2 when something needed is missing (llama-cpp-python, the converter, vLLM or
a GPU), saying what. `--engine vllm` needs vLLM and a GPU; it says so and exits 2 where they are absent.
The other variants (llama.cpp's default f16 KV cache, q8_0, q4_k_m) are measured and reported, not bounded: on a
random checkpoint their drift is numerics, not retrieval quality.

llama.cpp's programs `llama-embedding` and `llama-server`, where found (--llama-bin DIR, else PATH), run README.md's
commands as written on each GGUF (texts.txt and the port substituted, as README.md tells users) and are compared
the same way, each its own section of the report; the f32 GGUF with README.md's f32 KV flags is held to --tol.
Where they are not found the report says so and they are skipped. A README command that fails as written exits 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unicodedata
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# The fixed probe set: (name, role, text). Texts are typed as a user would, with no prefix; the task's prefix for
# the role is added by the check, as README.md tells users to.
LONG = " ".join(
    f"Paragraph {i}: coastal cities face rising seas, 海平面上升威胁沿海城市, المدن الساحلية تواجه ارتفاع البحار."
    for i in range(120)
)
PROBES = [
    ("english", "query", "Overview of climate change impacts on coastal cities"),
    ("german", "passage", "Die Auswirkungen des Klimawandels auf Küstenstädte sind erheblich."),
    ("chinese", "query", "气候变化对沿海城市的影响概述"),
    ("japanese", "query", "気候変動が沿岸都市に与える影響の概要"),
    ("arabic", "query", "تأثير تغير المناخ على المدن الساحلية"),
    ("emoji", "query", "emoji 🚀🌍✨, a family 👨‍👩‍👧 and a flag 🇩🇪"),
    ("code", "passage", "def add(a, b):\n    return a + b  # sum\n\tprint(add(1, 2))"),
    ("multi-line", "passage", "first line\nsecond line\n\nthird paragraph after a blank line\n"),
    ("nfd", "query", "Cafe\u0301 cre\u0300me bru\u0302le\u0301e"),
    ("special-token", "query", "end of turn <|im_end|> and <|endoftext|> typed in a text"),
    ("long", "passage", LONG),
]
TOL = 1e-6  # f32 GGUF, f32 KV cache against jina_v4 fp32: see NOTES.md ("Exports for vLLM and llama.cpp")
PROGRAM_TIMEOUT = 600  # seconds: one llama-embedding run, a llama-server start or one request


class Missing(Exception):
    """Something the check needs is not here (exit status 2)."""


class Refused(Exception):
    """A README command did not work as written (exit status 1)."""


@dataclass
class Row:
    """One input through one engine variant, against jina_v4."""

    probe: str
    variant: str
    tokens: int
    ids_equal: bool
    cosine: float
    max_abs: float


@dataclass
class Variant:
    name: str
    bounded: bool  # held to --tol (else measured and reported only)
    rows: list[Row] = field(default_factory=list)
    told: bool = True  # embedded as README.md tells users: its ids must equal jina_v4's


def prompts(model, task: str) -> list[tuple[str, str]]:
    """(name, prompt) per probe, as README.md tells engine users to type it: the task's prefix for the probe's
    role, then the text."""
    t = model.tasks[task]
    return [(name, t.prompt(text, role)) for name, role, text in PROBES]


def compare(probe: str, variant: str, ours_ids, ours, theirs_ids, theirs) -> Row:
    """jina_v4's ids and vector against an engine's: ids equal, cosine, largest absolute difference."""
    a, b = [float(x) for x in ours], [float(x) for x in theirs]
    if len(a) != len(b):
        raise ValueError(f"{probe}, {variant}: the engine gave {len(b)} components, jina_v4 {len(a)}")
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    cosine = dot / norm if norm else float("nan")
    return Row(probe, variant, len(ours_ids), list(ours_ids) == list(theirs_ids), cosine, max(map(abs, _diff(a, b))))


def _diff(a, b):
    return [x - y for x, y in zip(a, b)]


def verdict(variants: list[Variant], tol: float) -> list[str]:
    """What fails: every bounded variant's input beyond tol, and every input whose ids differ."""
    bad = []
    for v in variants:
        for r in v.rows if v.told else []:
            if not r.ids_equal:
                bad.append(f"{r.probe} ({v.name}): the engine's token ids differ from jina_v4's")
            elif v.bounded and not r.max_abs <= tol:
                bad.append(f"{r.probe} ({v.name}): max abs {r.max_abs:.2e} > {tol:.0e}")
    return bad


def report(variants: list[Variant], tol: float) -> str:
    """A table per variant, each variant's worst cosine and max abs, and the verdict."""
    lines = []
    for v in variants:
        how = f" (bounded: max abs <= {tol:.0e})" if v.bounded else " (measured)" if v.told else " (not as told)"
        lines.append(f"\n{v.name}{how}")
        lines.append(f"  {'input':<14} {'tokens':>6}  {'ids':<5} {'cosine':>12} {'max abs':>9}")
        for r in v.rows:
            ids = "equal" if r.ids_equal else "DIFF"
            lines.append(f"  {r.probe:<14} {r.tokens:>6}  {ids:<5} {r.cosine:>12.9f} {r.max_abs:>9.2e}")
        if v.rows:
            worst = min(v.rows, key=lambda r: r.cosine)
            most = max(v.rows, key=lambda r: r.max_abs)
            lines.append(
                f"  worst: cosine {worst.cosine:.9f} ({worst.probe}), max abs {most.max_abs:.2e} ({most.probe})"
            )
    bad = verdict(variants, tol)
    lines.append("")
    lines += [f"FAIL: {b}" for b in bad] or [f"PASS: ids equal on every input; bounded variants within {tol:.0e}"]
    return "\n".join(lines)


def find_converter(given: str | None) -> Path:
    """convert_hf_to_gguf.py: --converter (the file, a llama.cpp checkout, or an unpacked llama-cpp-python source
    tree), else $LLAMA_CPP_CONVERTER, else beside an installed llama_cpp package (an editable install's tree)."""
    candidates = []
    for root in [given, os.environ.get("LLAMA_CPP_CONVERTER")]:
        if root:
            candidates.append(Path(root))
    spec = importlib.util.find_spec("llama_cpp")
    if not given and spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parents[1])
    tried = []
    for c in candidates:
        for path in (c, c / "convert_hf_to_gguf.py", c / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"):
            tried.append(str(path))
            if path.is_file() and path.name == "convert_hf_to_gguf.py":
                return path
    where = "; looked at " + ", ".join(tried) if tried else ""
    raise Missing(
        "llama.cpp's convert_hf_to_gguf.py was not found: pass --converter PATH (the script, a llama.cpp checkout, "
        f"or an unpacked llama-cpp-python source distribution, whose vendor/llama.cpp holds it){where}"
    )


def convert(converter: Path, python: str, export_dir: Path, outtype: str, out: Path) -> Path:
    """README.md's convert command, with this export, outtype and file."""
    from jina_v4.apps.export import CONVERT, GGUF_NAME

    args = CONVERT.split()[2:]  # python convert_hf_to_gguf.py | EXPORT_DIR --outfile NAME --outtype f32
    args = [str(export_dir) if a == "EXPORT_DIR" else str(out) if a == GGUF_NAME else a for a in args]
    args[args.index("--outtype") + 1] = outtype
    run = subprocess.run([python, str(converter), *args], capture_output=True, text=True)
    if run.returncode != 0 or not out.is_file():
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-12:])
        missing = re.search(r"No module named '([^']+)'", run.stderr or "")
        hint = (
            f" (the converter's Python lacks the package {missing.group(1)!r}; --converter-python)" if missing else ""
        )
        raise Missing(f"{converter} failed on {export_dir} (--outtype {outtype}){hint}:\n{tail}")
    return out


def edited(code: str, old: str, new: str, count: int = 1) -> str:
    if code.count(old) != count:
        raise RuntimeError(f"README.md's snippet no longer has {old!r} {count} time(s)")
    return code.replace(old, new)


def engine_snippet(path: Path, variant: str = "as-told") -> str:
    """README.md's llama-cpp-python snippet, to run as written: its GGUF file name replaced by `path`. The
    variants that show what each rule is for (measured, never bounded): "default-kv" drops its type_k/type_v
    lines (llama.cpp's default f16 KV cache); "ubatch-512" leaves n_ubatch at llama.cpp's default; "plain" is
    llama_cpp.Llama without the rules (no NFC, special tokens not parsed)."""
    from jina_v4.apps.export import GGUF_NAME, LLAMA_CPP_PYTHON

    code = edited(LLAMA_CPP_PYTHON, f'"{GGUF_NAME}"', json.dumps(str(path)))
    if variant == "default-kv":
        kept = [line for line in code.splitlines() if not re.match(r"\s*type_[kv]=", line)]
        if len(kept) != len(code.splitlines()) - 2:
            raise RuntimeError("README.md's snippet no longer sets type_k and type_v on lines of their own")
        code = "\n".join(kept) + "\n"
    elif variant == "ubatch-512":
        code = re.sub(r"n_ubatch=\d+", "n_ubatch=512", code)
    elif variant == "plain":
        code = edited(code, "llm = JinaLlama(", "llm = llama_cpp.Llama(")
        code = edited(code, 'unicodedata.normalize("NFC", t) for t in texts', "t for t in texts")
    elif variant != "as-told":
        raise ValueError(f"variant {variant!r}")
    return code


def llama_cpp_run(path: Path, texts: list[str], variant: str = "as-told") -> tuple[list[list[int]], list[list[float]]]:
    """The snippet run on `path`; then its `embed` on `texts`, and the ids its model tokenizes them to (the call
    Llama.embed makes, on the text embed passes it)."""
    import unicodedata

    ns: dict = {}
    exec(compile(engine_snippet(path, variant), "README.md (llama-cpp-python)", "exec"), ns)
    llm = ns["llm"]
    try:
        nfc = (lambda t: t) if variant == "plain" else (lambda t: unicodedata.normalize("NFC", t))
        ids = [llm.tokenize(nfc(t).encode("utf-8")) for t in texts]
        return ids, ns["embed"](llm, texts)
    finally:
        llm.close()


def quantize(f32: Path, out: Path) -> Path:
    """README.md's q4_k_m snippet, run with these file names."""
    from jina_v4.apps.export import GGUF_NAME, QUANTIZE

    code = QUANTIZE.replace(f'b"{GGUF_NAME}"', repr(str(f32).encode())).replace(
        'b"model-q4_k_m.gguf"', repr(str(out).encode())
    )
    exec(compile(code, "README.md (quantize)", "exec"), {})
    return out


def find_program(name: str, llama_bin: Path | None) -> Path | None:
    """llama.cpp's program `name`: in --llama-bin DIR when given, else on PATH; None when not found."""
    if llama_bin is not None:
        path = Path(llama_bin) / name
        return path if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which(name)
    return Path(found) if found else None


def separator() -> str:
    """The separator README.md's llama-embedding command gives `--embd-separator`."""
    from jina_v4.apps.export import LLAMA_EMBEDDING

    argv = shlex.split(LLAMA_EMBEDDING.splitlines()[-1])
    return argv[argv.index("--embd-separator") + 1]


def _tail(text: str, n: int = 12) -> str:
    return "\n".join((text or "").strip().splitlines()[-n:])


def parse_embedding_json(stdout: str, count: int) -> list[list[float]]:
    """The vectors of llama-embedding's `--embd-output-format json` ({"object": "list", "data": [{"index": i,
    "embedding": [...]}, ...]}), in index order; anything else on stdout before it (a verbose prompt) skipped."""
    start = stdout.find('{\n  "object": "list"')
    if start < 0:
        raise Refused(f"llama-embedding printed no JSON list of embeddings on stdout:\n{_tail(stdout)}")
    try:
        doc, _ = json.JSONDecoder().raw_decode(stdout[start:])
        data = sorted(doc["data"], key=lambda d: d["index"])
        vectors = [[float(x) for x in d["embedding"]] for d in data]
    except (ValueError, KeyError, TypeError) as e:
        raise Refused(f"llama-embedding's JSON is not a list of embeddings ({e}):\n{_tail(stdout[start:])}") from None
    if len(vectors) != count:
        raise Refused(f"llama-embedding gave {len(vectors)} embeddings for {count} texts (a text split in two?)")
    return vectors


def parse_verbose_ids(stdout: str, stderr: str, count: int) -> list[list[int]]:
    """The token ids llama-embedding's `--verbose-prompt` prints: per prompt "number of tokens in prompt = K" (on
    stderr) and K lines "%6d -> '<piece>'" (on stdout, before the JSON)."""
    sizes = [int(k) for k in re.findall(r"number of tokens in prompt = (\d+)", stderr)]
    end = stdout.find('{\n  "object": "list"')
    head = stdout if end < 0 else stdout[:end]
    ids = [int(i) for i in re.findall(r"(?m)^[ \t]*(-?\d+) -> '", head)]
    if len(sizes) != count or sum(sizes) != len(ids):
        raise Refused(
            f"llama-embedding --verbose-prompt: {len(sizes)} prompts and {len(ids)} tokens, not {count} texts"
        )
    out, at = [], 0
    for k in sizes:
        out.append(ids[at : at + k])
        at += k
    return out


def llama_embedding_run(program: Path, gguf: Path, texts: list[str], work: Path) -> tuple[list, list]:
    """README.md's llama-embedding lines run as written in `work` by bash (the NFC filter, then the program found
    first on PATH, here `program`), GGUF_NAME replaced by `gguf`; texts.txt holds `texts` joined by the
    separator, ending with a newline as an editor writes it. Vectors from that run; the ids from the same command
    with `--verbose-prompt` added (the ids are not otherwise printed)."""
    from jina_v4.apps.export import GGUF_NAME, LLAMA_EMBEDDING

    work.mkdir(parents=True, exist_ok=True)
    (work / "texts.txt").write_text(separator().join(texts) + "\n", encoding="utf-8")
    command = edited(LLAMA_EMBEDDING, GGUF_NAME, shlex.quote(str(gguf)))
    env = {**os.environ, "PATH": f"{program.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    runs = []
    for extra in ("", " --verbose-prompt"):
        try:
            run = subprocess.run(
                ["bash", "-c", command + extra], cwd=work, env=env, capture_output=True, timeout=PROGRAM_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            raise Refused(f"README.md's llama-embedding command ran past {PROGRAM_TIMEOUT} s") from None
        out, err = run.stdout.decode("utf-8", "replace"), run.stderr.decode("utf-8", "replace")
        if run.returncode != 0:
            raise Refused(f"README.md's llama-embedding command{extra} failed (exit {run.returncode}):\n{_tail(err)}")
        runs.append((out, err))
    vectors = parse_embedding_json(runs[0][0], len(texts))
    return parse_verbose_ids(runs[1][0], runs[1][1], len(texts)), vectors


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def llama_server_run(program: Path, gguf: Path, texts: list[str], work: Path) -> tuple[list, list]:
    """README.md's llama-server command run as written (the program `program`, GGUF_NAME replaced by `gguf`, its
    port by a free one; it listens on 127.0.0.1, its default), then POST /v1/embeddings with the NFC-normalised
    texts as README.md says, and POST /tokenize (special tokens added and parsed, as /v1/embeddings tokenizes)
    for the ids. The server is stopped afterwards; every wait is bounded."""
    from jina_v4.apps.export import GGUF_NAME, LLAMA_SERVER

    port = free_port()
    argv = shlex.split(edited(edited(LLAMA_SERVER, GGUF_NAME, shlex.quote(str(gguf))), "--port 8080", f"--port {port}"))
    work.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    nfc = [unicodedata.normalize("NFC", t) for t in texts]
    with open(work / "llama-server.log", "wb") as log:
        proc = subprocess.Popen([str(program), *argv[1:]], stdout=log, stderr=subprocess.STDOUT, cwd=work)
        try:
            deadline = time.monotonic() + PROGRAM_TIMEOUT
            while True:
                if proc.poll() is not None:
                    text = (work / "llama-server.log").read_text("utf-8", "replace")
                    raise Refused(f"README.md's llama-server command exited ({proc.returncode}):\n{_tail(text)}")
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise Refused(f"llama-server did not answer /health within {PROGRAM_TIMEOUT} s")
                time.sleep(0.2)
            try:
                doc = _post(f"{base}/v1/embeddings", {"input": nfc}, PROGRAM_TIMEOUT)
                data = sorted(doc["data"], key=lambda d: d["index"])
                vectors = [[float(x) for x in d["embedding"]] for d in data]
                ids = [_post(f"{base}/tokenize", {"content": t, "add_special": True}, 60)["tokens"] for t in nfc]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise Refused(f"llama-server's /v1/embeddings or /tokenize failed: {e}") from None
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
    if len(vectors) != len(texts):
        raise Refused(f"llama-server gave {len(vectors)} embeddings for {len(texts)} texts")
    return ids, vectors


def check_programs(llama_bin, ggufs, named, ours_ids, ours, work: Path) -> tuple[list[Variant], list[str]]:
    """llama-embedding and llama-server, where found, on the GGUFs [(name, path, bounded)], as README.md tells:
    each a Variant; and what was not found (skipped, not an error)."""
    variants, notes = [], []
    texts = [p for _, p in named]
    runs = {"llama-embedding": llama_embedding_run, "llama-server": llama_server_run}
    for program_name, run in runs.items():
        program = find_program(program_name, llama_bin)
        if program is None:
            where = f"in {llama_bin}" if llama_bin is not None else "on PATH (--llama-bin DIR)"
            notes.append(f"{program_name}: not found {where}; its README.md command was not run")
            continue
        for name, path, bounded in ggufs:
            v = Variant(f"{program_name}, {name}", bounded)
            ids, vectors = run(program, path, texts, work / f"{program_name}-{path.stem}")
            for (probe, _), oi, o, ti, t in zip(named, ours_ids, ours, ids, vectors):
                v.rows.append(compare(probe, v.name, oi, o, ti, t))
            variants.append(v)
    return variants, notes


def jina_v4_run(model, task: str) -> tuple[list[list[int]], list[list[float]]]:
    """jina_v4's ids and fp32 single vectors (full width, L2-normalised) for each probe, through its own API:
    the text and its role (jina_v4 adds the prefix)."""
    ids, vectors = [], []
    for _, role, text in PROBES:
        items = model.prepare([{"text": text}], task, role)
        ids.append(items[0].input_ids)
        vectors.append(model.encode_items(items)[0].tolist())
    return ids, vectors


def check_llama_cpp(args, model, out: Path) -> tuple[list[Variant], list[str]]:
    from jina_v4.apps.export import export

    if importlib.util.find_spec("llama_cpp") is None:
        raise Missing("llama-cpp-python is not installed (pip install llama-cpp-python; it builds llama.cpp)")
    converter = find_converter(args.converter)
    export_dir = export(model, args.model, args.task, "text", out / "export")
    named = prompts(model, args.task)
    texts = [p for _, p in named]
    ours_ids, ours = jina_v4_run(model, args.task)
    f32 = convert(converter, args.converter_python, export_dir, "f32", out / "model-f32.gguf")
    # (name, GGUF, snippet variant, bounded by --tol, ids must equal jina_v4's)
    ggufs = [("f32 GGUF, f32 KV cache", f32, "as-told", True, True)]
    ggufs.append(("f32 GGUF, default KV cache", f32, "default-kv", False, True))
    if "q8_0" in args.quant:
        q8 = convert(converter, args.converter_python, export_dir, "q8_0", out / "model-q8_0.gguf")
        ggufs.append(("q8_0 GGUF, f32 KV cache", q8, "as-told", False, True))
    if "q4_k_m" in args.quant:
        ggufs.append(("q4_k_m GGUF, f32 KV cache", quantize(f32, out / "model-q4_k_m.gguf"), "as-told", False, True))
    if args.without_rules:
        ggufs.append(("f32 GGUF, n_ubatch 512", f32, "ubatch-512", False, False))
        ggufs.append(("f32 GGUF, plain Llama.embed (no NFC, no special tokens)", f32, "plain", False, False))
    variants = []
    for name, path, kind, bounded, told in ggufs:
        v = Variant(f"llama-cpp-python, {name}", bounded, told=told)
        ids, vectors = llama_cpp_run(path, texts, kind)
        for (probe, _), oi, o, ti, t in zip(named, ours_ids, ours, ids, vectors):
            v.rows.append(compare(probe, v.name, oi, o, ti, t))
        variants.append(v)
    programs = [(name, path, bounded) for name, path, kind, bounded, told in ggufs if kind == "as-told"]
    more, notes = check_programs(args.llama_bin, programs, named, ours_ids, ours, out / "programs")
    return variants + more, notes


def check_vllm(args, model, out: Path) -> tuple[list[Variant], list[str]]:
    if importlib.util.find_spec("vllm") is None:
        raise Missing("vLLM is not installed here: --engine vllm needs vLLM and a GPU")
    import torch

    if not torch.cuda.is_available():
        raise Missing("no GPU: --engine vllm needs vLLM and a GPU")
    from vllm import LLM  # pragma: no cover - needs vLLM and a GPU

    from jina_v4.apps.export import export

    export_dir = export(model, args.model, args.task, "vllm", out / "export")
    named = prompts(model, args.task)
    ours_ids, ours = jina_v4_run(model, args.task)
    llm = LLM(model=str(export_dir), runner="pooling", dtype="float32", max_model_len=32768)
    v = Variant("vLLM, fp32", True)
    for (probe, prompt), oi, o in zip(named, ours_ids, ours):
        ids = llm.get_tokenizer()(prompt, add_special_tokens=False)["input_ids"]
        states = llm.encode([prompt], pooling_task="token_embed")[0].outputs.data.float()
        mean = torch.nn.functional.normalize(states.mean(0), dim=-1)
        v.rows.append(compare(probe, v.name, oi, o, ids, mean.tolist()))
    return [v], []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a jina-embeddings-v4 checkpoint directory or hub id")
    ap.add_argument("--task", default="retrieval", help="the task to export (default retrieval)")
    ap.add_argument("--engine", choices=["llama.cpp", "vllm"], default="llama.cpp")
    ap.add_argument("--converter", help="convert_hf_to_gguf.py, a llama.cpp checkout or a llama-cpp-python source tree")
    ap.add_argument("--converter-python", default=sys.executable, help="the Python that runs the converter")
    ap.add_argument("--quant", nargs="*", default=["q8_0", "q4_k_m"], choices=["q8_0", "q4_k_m"])
    ap.add_argument("--tol", type=float, default=TOL, help=f"bound on the f32 GGUF's max abs difference ({TOL})")
    ap.add_argument("--work", type=Path, help="keep the export and GGUFs here (a new or empty directory)")
    ap.add_argument(
        "--without-rules", action="store_true", help="also measure n_ubatch 512 and a plain Llama.embed (no NFC, ...)"
    )
    ap.add_argument(
        "--llama-bin", type=Path, help="the folder of llama.cpp's llama-embedding and llama-server (else PATH)"
    )
    ap.add_argument("--json", type=Path, help="also write every row as JSON here")
    args = ap.parse_args(argv)

    from jina_v4 import JinaV4

    try:
        model = JinaV4.from_pretrained(args.model, device="cpu", dtype="float32")
        model.config.tasks_for(args.task, 1)
    except (OSError, ValueError, KeyError) as e:
        print(f"check_export: {args.model}: {e}", file=sys.stderr)
        return 2
    check = check_llama_cpp if args.engine == "llama.cpp" else check_vllm
    with tempfile.TemporaryDirectory() as tmp:
        out = args.work or Path(tmp)
        try:
            variants, notes = check(args, model, out)
        except Missing as e:
            print(f"check_export: {e}", file=sys.stderr)
            return 2
        except Refused as e:
            print(f"check_export: FAIL: {e}", file=sys.stderr)
            return 1
    print(f"{args.engine} against jina_v4 fp32, task {args.task}, {args.model}")
    for note in notes:
        print(note)
    print(report(variants, args.tol))
    if args.json:
        rows = [r.__dict__ for v in variants for r in v.rows]
        args.json.write_text(json.dumps({"tol": args.tol, "rows": rows}, indent=2) + "\n")
    return 1 if verdict(variants, args.tol) else 0


if __name__ == "__main__":
    sys.exit(main())
