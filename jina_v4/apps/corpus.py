"""The one corpus reader behind `jina-v4 embed --input` (jobs.py), `embed --ray` (ray_data.py) and `score --docs-file`.

    .jsonl     one object per line: {"text": ...} or {"image": path or URL}, and an optional "id" (in every line
               or in none); image paths are relative to the file
    .parquet   a `text` and/or an `image` column (bytes, or paths relative to the file), an optional `id` column
    DIR        its image files, recursively, in path order; an image's id is its path
    any other  one text per line

Every input of a run has a global index, its position among all the inputs in the order given (texts given on the
command line first, then the files, then --image paths; blank lines are not counted), and an id: its `id` field or
column, else its path (an image of a directory), else its index. A line that cannot be used (not JSON, no text or
image, a text that is not a str, an id repeated...) is a bad row: under on_error="fail" a `CorpusError` naming the
file and line stops the run before the model loads, under "skip" the row keeps its index and goes to the report.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model.processing import checked_text, describe, preview

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
URL = ("http://", "https://")
FIELDS = ("id", "text", "image")  # the id, text and image fields (or columns); `--text-field` renames the second


class CorpusError(ValueError):
    """A file that cannot be read, or (under on_error="fail") a bad row: the message names the file and line."""


@dataclass
class Row:
    index: int  # the global index
    id: Any  # the `id` field, the image's path, or the index; None for a bad line whose id is unknown
    input: dict | None  # {"text": str} or {"image": path, URL or bytes}; None for a bad row
    label: str  # what outputs and reports call the input: the text, the image's path, "<N bytes>"
    error: str | None = None  # why a bad row cannot be used, naming its file and line

    def record(self, error: str | None = None) -> dict:
        """The row's line in a skip report."""
        return {"index": self.index, "id": self.id, "input": preview(self.label, 200), "error": error or self.error}


def name(index: int, id_: Any) -> str:
    """How messages name an input: by its index, and its id when that is not the index."""
    return f"input {index}" if id_ is None or id_ == index else f"input {index}, id {id_!r}"


def read(
    texts: list[str] = (),
    files: list[str] | None = None,
    images: list[str] | None = None,
    fields: tuple[str, str, str] = FIELDS,
    on_error: str = "fail",
    stdin: bool = False,
) -> list[Row]:
    """Texts, then the rows of each file (any kind above), then image paths, globs or directories; with none of
    them and `stdin`, the lines of a piped stdin."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error={on_error!r} is not 'fail' or 'skip'")
    rows = [Row(i, i, {"text": t}, t) for i, t in enumerate(texts)]
    seen: dict = {}  # id given -> where, for repeats
    for file in files or []:
        rows += read_file(Path(file), len(rows), fields, on_error, seen)
    rows += [Row(len(rows) + i, len(rows) + i, {"image": p}, p) for i, p in enumerate(expand_images(images))]
    if not rows and stdin and not sys.stdin.isatty():
        rows = [
            Row(i, i, {"text": t}, t)
            for i, t in enumerate(line for line in sys.stdin.read().splitlines() if line.strip())
        ]
    return rows


def read_file(path: Path, start: int, fields: tuple[str, str, str], on_error: str, seen: dict) -> list[Row]:
    """One --input: a directory of images, a .jsonl or .parquet file, or a file of texts, one per line."""
    if path.is_dir():
        found = image_files(path)
        return [Row(start + i, p, {"image": p}, p) for i, p in enumerate(found)]
    if not path.is_file():
        raise CorpusError(f"{path}: no such file or directory")
    if path.suffix == ".parquet":
        return read_parquet([path], start, fields, on_error, seen)
    lines = text_lines(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path, lines, start, fields, on_error, seen)
    return [Row(start + i, start + i, {"text": t}, t) for i, (_, t) in enumerate(lines)]


def text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e})") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_jsonl(path: Path, lines: list, start: int, fields: tuple[str, str, str], on_error: str, seen: dict) -> list:
    id_f, text_f, image_f = fields
    rows, has_ids = [], None  # the first object decides whether the file gives ids
    for n, line in lines:
        index, where, id_ = start + len(rows), f"{path}:{n}", None
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"not a JSON object: {describe(obj)}")
            has_ids = id_f in obj if has_ids is None else has_ids
            if (id_f in obj) != has_ids:
                raise ValueError(
                    f"the {id_f!r} field is in some lines and not in others (without it, the id is the index)"
                )
            id_ = obj[id_f] if has_ids else index
            if not isinstance(id_, (int, str)) or isinstance(id_, bool):
                bad, id_ = id_, None
                raise ValueError(f"the {id_f!r} field is {describe(bad)}, not an int or a str")
            if has_ids and id_ in seen:
                raise ValueError(f"id {id_!r} repeats {seen[id_]}'s")
            row = make_row(index, id_, obj.get(text_f), obj.get(image_f), fields, path.parent)
        except (TypeError, ValueError) as e:
            if on_error == "fail":
                raise CorpusError(f"{where}: {e}") from None
            rows.append(Row(index, id_, None, line, f"{where}: {e}"))
            continue
        if has_ids:
            seen[id_] = where
        rows.append(row)
    return rows


def make_row(index: int, id_: Any, text: Any, image: Any, fields: tuple[str, str, str], base: Path) -> Row:
    """A row holding exactly one of a text (a valid str) and an image (bytes, or a path relative to `base`)."""
    _, text_f, image_f = fields
    if (text is None) == (image is None):
        have = "and this one has neither" if text is None else "not both"
        raise ValueError(f"a row holds a {text_f!r} or an {image_f!r}, {have}")
    if text is not None:
        return Row(index, id_, {"text": checked_text(text, text_f)}, text)
    if isinstance(image, (bytes, bytearray)):
        return Row(index, id_, {"image": bytes(image)}, f"<{len(image)} bytes>")
    if not isinstance(image, str):
        raise TypeError(f"{image_f} is {type(image).__name__}, not a path: {describe(image)}")
    image = absolute(checked_text(image, image_f), base.absolute())  # relative to the file
    return Row(index, id_, {"image": image}, image)


def image_files(directory: Path) -> list[str]:
    found = sorted(str(p) for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise CorpusError(f"{directory}: no image files")
    return found


def expand_images(specs: list[str] | None) -> list[str]:
    """Paths, globs and directories (searched recursively for image files), in a stable order."""
    out = []
    for spec in specs or []:
        path = Path(spec)
        if path.is_dir():
            found = image_files(path)
        elif any(c in spec for c in "*?["):
            found = sorted(glob.glob(spec, recursive=True))
        elif path.is_file() or spec.startswith(URL):
            found = [spec]
        else:
            raise CorpusError(f"{spec}: no such file")
        if not found:
            raise CorpusError(f"{spec}: matches no image file")
        out += found
    return out


# ---- parquet: the files' row groups, read whole here or one per Ray task --------------------------------------


def parquet_pieces(paths: list[Path], fields: tuple[str, str, str] = FIELDS) -> tuple[list[dict], int, bool]:
    """The row groups of parquet files as pieces {path, group, first: the index of its first row, row: its first
    row's number in its file}, the row count and whether the files hold ids: from the footers, without reading a
    row. Checks the columns and that the ids are unique."""
    pq = pyarrow_parquet()
    id_f, text_f, image_f = fields
    pieces, ids, n, has_id = [], [], 0, None
    for p in paths:
        file = pq.ParquetFile(p)
        names = file.schema_arrow.names
        has_id = id_f in names if has_id is None else has_id
        if not {text_f, image_f} & set(names) or has_id != (id_f in names):
            raise CorpusError(
                f"{p}: columns {names}: each file needs a {text_f!r} or {image_f!r} column, "
                f"and an {id_f!r} column if and only if the first file has one"
            )
        ids += file.read([id_f])[id_f].to_pylist() if has_id else []
        row = 0
        for g in range(file.metadata.num_row_groups):
            pieces.append({"path": str(p), "group": g, "first": n + row, "row": row})
            row += file.metadata.row_group(g).num_rows
        n += row
    if len(set(ids)) < len(ids):
        raise CorpusError(f"the {id_f!r} column is not unique")
    return pieces, n, bool(has_id)


def read_row_group(piece: dict, fields: tuple[str, str, str] = FIELDS):
    """One piece -> a pyarrow Table of index, id (the id column, else the index), text and/or image (bytes, or
    paths made absolute against the file's folder)."""
    import pyarrow as pa

    pq = pyarrow_parquet()
    (path, group, first), (id_f, text_f, image_f) = (piece[k] for k in ("path", "group", "first")), fields
    t = pq.ParquetFile(str(path)).read_row_group(int(group))
    index = pa.array(range(int(first), int(first) + t.num_rows), pa.int64())
    cols = {"index": index, "id": t[id_f] if id_f in t.column_names else index}
    if text_f in t.column_names:
        cols["text"] = t[text_f]
    if image_f in t.column_names:
        images = t[image_f]
        if pa.types.is_string(images.type) or pa.types.is_large_string(images.type):
            base = Path(str(path)).absolute().parent
            images = pa.array([absolute(x, base) for x in images.to_pylist()], pa.string())
        cols["image"] = images
    return pa.table(cols)


def absolute(image: str | None, base: Path) -> str | None:
    """An image path relative to `base` made absolute; absolute paths, URLs and None stay as they are."""
    return image if image is None or image.startswith(URL) or os.path.isabs(image) else str(base / image)


def read_parquet(paths: list[Path], start: int, fields: tuple[str, str, str], on_error: str, seen: dict) -> list:
    """Parquet files read whole in this process (`embed --ray` reads them a row group per task instead)."""
    rows = []
    pieces, _, has_id = parquet_pieces(paths, fields)
    for piece in pieces:
        t = read_row_group(piece, fields).to_pydict()
        none = [None] * len(t["index"])
        for k, (index, id_, text, image) in enumerate(
            zip(t["index"], t["id"], t.get("text", none), t.get("image", none))
        ):
            index, where = start + index, f"{piece['path']}: row {piece['row'] + k}"
            id_ = id_ if has_id else index
            try:
                if has_id and id_ in seen:
                    raise ValueError(f"id {id_!r} repeats {seen[id_]}'s")
                rows.append(make_row(index, id_, text, image, fields, Path(piece["path"]).parent))
            except (TypeError, ValueError) as e:
                if on_error == "fail":
                    raise CorpusError(f"{where}: {e}") from None
                rows.append(Row(index, id_, None, describe(text if image is None else image, 200), f"{where}: {e}"))
                continue
            if has_id:
                seen[id_] = where
    return rows


def pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("reading .parquet needs pyarrow: pip install pyarrow (the [ray] extra brings it)") from None
    return pq
