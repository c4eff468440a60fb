"""What the applications share: the default checkpoint, files written whole or not at all, and the error policy
of a corpus run (a bad input stops it, or is left out and reported)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

from ..model.processing import preview

DEFAULT_MODEL = "jinaai/jina-embeddings-v4"


def loaded_model(name: str, device: str | None, dtype: str | None, quiet: bool = False):
    """JinaV4.from_pretrained, then one line on stderr unless quiet: the dtype, the device and why
    (loading.choose_dtype). That line replaces the warning for bf16 asked for on a CPU that emulates it."""
    from ..model import JinaV4

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dtype=bfloat16: ")
        model = JinaV4.from_pretrained(name, device=device, dtype=dtype)
    if not quiet:
        dtype_name = str(model.dtype).removeprefix("torch.")
        print(f"jina-v4: {dtype_name} on {model.device} ({model.dtype_reason})", file=sys.stderr, flush=True)
    return model


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename over `path`: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def json_line(obj) -> str:
    """One line of JSON, UTF-8 as it is, but a lone surrogate (a command-line argument that was not UTF-8) as its
    JSON escape, which UTF-8 cannot hold and any JSON reader decodes."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8") + "\n"


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, written atomically."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json_line(r) for r in records)

    atomic_write(path, write)


def error_policy(
    results: list, names: list[str], labels: list[str], on_error: str, error: type = ValueError
) -> list[dict | None]:
    """Per result of pipeline.encode(..., errors="return"): None for a vector, {"input", "error"} for a bad input.
    on_error="fail" raises `error` for the first bad input instead, named as names[i] (e.g. "input 7" or
    "id 'a'") with labels[i] (what it was) and the reason."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error={on_error!r} is not 'fail' or 'skip'")
    records = []
    for j, (r, name, label) in enumerate(zip(results, names, labels)):
        if not isinstance(r, Exception):
            records.append(None)
            continue
        reason = getattr(r, "reason", None) or str(r)
        for local in (f"inputs[{j}] ", f"texts[{j}] ", f"images[{j}] "):  # the position in this call, not the run's
            reason = reason.replace(local, "the input ", 1) if reason.startswith(local) else reason
        if on_error == "fail":
            raise error(f"{name} ({preview(label, 100)}): {reason}")
        records.append({"input": label, "error": reason})
    return records
