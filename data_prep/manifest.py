"""Read and validate the two input tables of the shard builder.

ITEMS     columns ``id``, ``caption``, ``image`` (a path relative to --images-root, or inline bytes)
RELATIONS columns ``id`` (item id), ``group`` (group key), ``type`` (relation type), ``text`` (description)

Each is a Parquet, JSONL or CSV file (chosen by extension) or an in-memory ``pyarrow.Table``; these column
names are a public interface. Extra columns are ignored. Text files must be UTF-8; a quoted CSV field may
hold newlines and be of any size. A table that cannot be read raises ``BuildError`` naming the file. Every
rejected record is counted by reason in a ``SkipReport`` (with the first examples) -- or, in strict mode,
raises ``BuildError`` naming the record.
"""

from __future__ import annotations

import codecs
import io
import os
import stat
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

ITEM_COLUMNS = ("id", "caption", "image")
RELATION_COLUMNS = ("id", "group", "type", "text")

# Formats the builder accepts as input. JPEG/PNG/WebP are stored as they are; the others are re-encoded
# to PNG. Anything else (EPS, PDF, ...) is refused: some Pillow plug-ins run external programs.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
CONVERTED_FORMATS = ("GIF", "BMP", "TIFF")
# An encoded image larger than this is refused before it is read: far above any real image, far below the
# reader's per-member limit (rcml.decode.MAX_MEMBER_BYTES, 256 MiB), and it bounds what a worker holds.
DEFAULT_MAX_IMAGE_BYTES = 64 << 20

# Why a record is skipped (keys of skip_report.json "counts").
REASONS = {
    "missing_id": "ITEMS row with an empty id",
    "invalid_id": "id contains '.', '/', '\\\\' or whitespace (WebDataset splits keys at the first dot)",
    "duplicate_id": "a second ITEMS row with an id already seen (the first one is kept)",
    "empty_caption": "caption is empty",
    "missing_image": "no image value, the file does not exist or cannot be read, or a path without --images-root",
    "image_outside_root": "the path resolves (after '..', an absolute path, symlinks) outside --images-root",
    "image_not_a_file": "the path is not a regular file (a directory, FIFO, socket or device such as /dev/zero)",
    "image_file_too_large": "the encoded image is larger than --max-image-bytes (default 64 MiB)",
    "undecodable_image": "the image does not decode (corrupt, truncated or an unsupported format)",
    "image_too_large": "more pixels than --max-image-pixels (decompression-bomb guard)",
    "unknown_item": "RELATIONS row naming an id that is not in ITEMS",
    "item_skipped": "RELATIONS row of an item that was itself skipped",
    "empty_relation_field": "RELATIONS row with an empty group, type or text",
    "duplicate_relation": "RELATIONS row repeating the same (id, group)",
}


class BuildError(ValueError):
    """A bad input record in strict mode, or an unusable input table; the message says which and where."""


@dataclass
class SkipReport:
    strict: bool = False
    max_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def skip(self, reason: str, table: str, row: int, record_id: Any, detail: str = "") -> None:
        if self.strict:
            raise BuildError(f"{table} row {row} (id {record_id!r}): {reason}" + (f": {detail}" if detail else "")
                             + f" -- {REASONS.get(reason, '')}. Fix the record, or drop --strict to skip and "
                               "report such records.")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append({"table": table, "row": row, "id": record_id, "detail": detail})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(sorted(self.counts.items())),
                "examples": dict(sorted(self.examples.items())), "reasons": REASONS}

    def summary(self) -> str:
        if not self.counts:
            return "no record skipped"
        parts = [f"{reason} {n}" for reason, n in sorted(self.counts.items())]
        return f"{self.total} record(s) skipped: " + ", ".join(parts)


@dataclass(slots=True)
class ItemRecord:
    row: int                  # row in ITEMS (0-based), for messages
    id: str
    caption: str
    image: str | bytes        # path relative to images_root, or the encoded image itself


# ------------------------------------------------------------------------------------------ tables
# pyarrow splits a CSV/JSONL file into blocks (1 MiB by default) and fails on a row that does not fit in
# one ("straddling object"): a long caption, a quoted caption with newlines. Reads start with larger blocks
# and, on that error, retry with blocks _BLOCK_GROWTH times larger, until one block holds the whole file.
_FIRST_BLOCK_BYTES = 16 << 20
_BLOCK_GROWTH = 8
_MAX_BLOCK_BYTES = (1 << 31) - 1  # pyarrow's block_size is an int32


def read_table(source: pa.Table | str | Path, what: str, columns: tuple[str, ...]) -> pa.Table:
    """Load ITEMS or RELATIONS (``what`` names it in messages) and check the required columns.

    A file pyarrow cannot read (corrupt Parquet, malformed CSV or JSONL, text that is not UTF-8) raises
    BuildError naming the file, with pyarrow's own account of where (its rows count from 0).
    """
    if isinstance(source, pa.Table):
        table = source
    else:
        path = Path(source)
        if not path.is_file():
            raise BuildError(f"{what}: file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix in (".parquet", ".pq"):
            table = _read_parquet(path, what)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            _check_utf8(path, what)  # pyarrow's JSON reader would silently replace bad bytes by U+FFFD
            table = _read_blocks(path, what, "JSONL (one JSON object per line)", partial(_read_jsonl, path))
        elif suffix in (".csv", ".tsv"):
            _check_utf8(path, what)
            table = _read_blocks(path, what, suffix[1:].upper(), partial(_read_csv, path, columns, suffix == ".tsv"))
        else:
            raise BuildError(f"{what}: {path} has extension {suffix!r}; use .parquet, .jsonl or .csv")
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise BuildError(f"{what}: missing column(s) {missing}; expected {list(columns)}, found {table.column_names}")
    return table.select(list(columns))


def _one_line(exn: BaseException) -> str:
    return " ".join(str(exn).split())


def _read_parquet(path: Path, what: str) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exn:  # a truncated file is an OSError, random bytes ArrowInvalid
        raise BuildError(f"{what}: {path} is not a readable Parquet file (corrupt or truncated?): "
                         f"{_one_line(exn)}") from None


def _read_csv(path: Path, columns: tuple[str, ...], tsv: bool, block_size: int) -> pa.Table:
    import pyarrow.csv as pc

    return pc.read_csv(path, read_options=pc.ReadOptions(block_size=block_size),
                       # a quoted field may hold newlines (a multi-line caption)
                       parse_options=pc.ParseOptions(delimiter="\t" if tsv else ",", newlines_in_values=True),
                       # every column we use is text: keep "007" an id, not the number 7
                       convert_options=pc.ConvertOptions(column_types={c: pa.string() for c in columns}))


def _read_jsonl(path: Path, block_size: int) -> pa.Table:
    import pyarrow.json as pj

    return pj.read_json(path, read_options=pj.ReadOptions(block_size=block_size))


def _read_blocks(path: Path, what: str, kind: str, read: Callable[[int], pa.Table]) -> pa.Table:
    """``read(block_size)``, with larger blocks while a row straddles two; ArrowException -> BuildError."""
    block_size, file_size = _FIRST_BLOCK_BYTES, path.stat().st_size
    while True:
        try:
            return read(block_size)
        except pa.ArrowException as exn:
            if "straddl" in str(exn) and block_size <= file_size and block_size < _MAX_BLOCK_BYTES:
                block_size = min(block_size * _BLOCK_GROWTH, _MAX_BLOCK_BYTES)
                continue
            raise BuildError(f"{what}: cannot read {path} as {kind}: {_one_line(exn)}") from None


def _check_utf8(path: Path, what: str, chunk_bytes: int = 1 << 20) -> None:
    """BuildError naming the line and byte offset of the first bytes that are not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exn:
                bad_line = line + chunk.count(b"\n", 0, exn.start)
                raise BuildError(f"{what}: {path} is not UTF-8 text: byte {chunk[exn.start]:#04x} at line {bad_line} "
                                 f"(byte offset {offset + exn.start}); save the file as UTF-8") from None
            offset, line = offset + len(chunk), line + chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise BuildError(f"{what}: {path} is not UTF-8 text: it ends inside a multi-byte character (byte "
                             f"offset {offset}); save the file as UTF-8") from None


def _text_column(table: pa.Table, what: str, name: str) -> list[Any]:
    column = table.column(name)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type):
        return column.to_pylist()
    if pa.types.is_integer(column.type):
        return [None if v is None else str(v) for v in column.to_pylist()]
    raise BuildError(f"{what}: column {name!r} has type {column.type}; expected text")


def _image_column(table: pa.Table) -> list[str | bytes | None]:
    """ITEMS ``image``: paths (a text column) or encoded images (a binary column); nothing else."""
    t = table.column("image").type
    if (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_null(t)):
        return table.column("image").to_pylist()
    raise BuildError(f"ITEMS: column 'image' has type {t}; expected text (a path relative to --images-root) or "
                     "binary (the encoded image file)")


def _bad_id(item_id: str) -> bool:
    return any(ch in item_id for ch in "./\\") or any(ch.isspace() or not ch.isprintable() for ch in item_id)


def validate_items(table: pa.Table, report: SkipReport) -> list[ItemRecord]:
    """ITEMS -> records with a usable id and caption (images are checked when they are loaded)."""
    ids = _text_column(table, "ITEMS", "id")
    captions = _text_column(table, "ITEMS", "caption")
    images = _image_column(table)
    records, seen = [], set()
    for row, (item_id, caption, image) in enumerate(zip(ids, captions, images)):
        if item_id is None or not item_id.strip():
            report.skip("missing_id", "ITEMS", row, item_id)
            continue
        if _bad_id(item_id):
            report.skip("invalid_id", "ITEMS", row, item_id, "rename the item (e.g. replace '.' by '_')")
            continue
        if item_id in seen:
            report.skip("duplicate_id", "ITEMS", row, item_id)
            continue
        seen.add(item_id)
        if caption is None or not caption.strip():
            report.skip("empty_caption", "ITEMS", row, item_id)
            continue
        if image is None or (isinstance(image, (str, bytes)) and len(image) == 0):
            report.skip("missing_image", "ITEMS", row, item_id, "no image value")
            continue
        records.append(ItemRecord(row=row, id=item_id, caption=caption.strip(), image=image))
    return records


def validate_relations(table: pa.Table, items: dict[str, ItemRecord], all_item_ids: set[str],
                       report: SkipReport) -> dict[str, list[dict[str, str]]]:
    """RELATIONS -> {item id: [{"group", "type", "text"}, ...]} in table order (the first is the primary)."""
    columns = [_text_column(table, "RELATIONS", c) for c in RELATION_COLUMNS]
    out: dict[str, list[dict[str, str]]] = {}
    seen: set[tuple[str, str]] = set()
    for row, (item_id, group, rtype, text) in enumerate(zip(*columns)):
        if item_id is None or item_id not in all_item_ids:
            report.skip("unknown_item", "RELATIONS", row, item_id)
            continue
        if item_id not in items:
            report.skip("item_skipped", "RELATIONS", row, item_id)
            continue
        values = [v.strip() if isinstance(v, str) else "" for v in (group, rtype, text)]
        if not all(values):
            empty = [n for n, v in zip(("group", "type", "text"), values) if not v]
            report.skip("empty_relation_field", "RELATIONS", row, item_id, f"empty {', '.join(empty)}")
            continue
        if (item_id, values[0]) in seen:
            report.skip("duplicate_relation", "RELATIONS", row, item_id, f"group {values[0]!r} again")
            continue
        seen.add((item_id, values[0]))
        out.setdefault(item_id, []).append({"group": values[0], "type": values[1], "text": values[2]})
    return out


# ------------------------------------------------------------------------------------------ images
def resolve_image_path(image: str, images_root: str | Path) -> str:
    """The real path of ``image`` (relative to ``images_root``), which must lie inside the real root.

    Both are resolved (``..``, symlinks; an absolute ``image`` replaces the root in the join), so a table
    cannot make the builder read -- and embed in shards -- a file outside the directory it was given.
    Raises ValueError(reason, detail).
    """
    try:
        root = os.path.realpath(images_root)
        path = os.path.realpath(os.path.join(root, image))
    except (OSError, ValueError) as exn:  # e.g. an embedded NUL byte, a symlink loop on some platforms
        raise ValueError("missing_image", f"path {image!r}: {exn}") from None
    if not _inside(path, root):
        raise ValueError("image_outside_root", f"path {image!r} resolves to {path}, outside {root}")
    return path


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # Windows: different drives
        return False


# O_NONBLOCK: opening a FIFO does not wait for a writer; O_NOFOLLOW: the resolved final component must not
# have become a symlink; O_NOCTTY: a terminal never becomes ours. Each is 0 where the platform lacks it.
_OPEN_FLAGS = os.O_RDONLY
for _name in ("O_NONBLOCK", "O_NOFOLLOW", "O_NOCTTY", "O_CLOEXEC", "O_BINARY"):
    _OPEN_FLAGS |= getattr(os, _name, 0)
del _name


def _check_file(st: os.stat_result, path: str, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("image_not_a_file", f"{path} is not a regular file (mode {stat.filemode(st.st_mode)})")
    if st.st_size > max_bytes:
        raise ValueError("image_file_too_large", f"{path}: {st.st_size} bytes > limit {max_bytes}")


def read_image_file(path: str, max_bytes: int) -> bytes:
    """Read a regular file of at most ``max_bytes``. Raises ValueError(reason, detail).

    The type is checked before opening, so a device or FIFO is never opened (opening some devices has
    side effects; a FIFO blocks until a writer comes), and again on the opened descriptor, in case the path
    was swapped in between (see _OPEN_FLAGS). The read stops at ``max_bytes + 1`` whatever the size said
    (a file that grows after the check).
    """
    try:
        _check_file(os.stat(path), path, max_bytes)
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exn:
        raise ValueError("missing_image", f"{path}: {exn.strerror or exn}") from None
    try:
        with open(fd, "rb", closefd=True) as f:
            _check_file(os.fstat(f.fileno()), path, max_bytes)
            data = f.read(max_bytes + 1)
    except OSError as exn:
        raise ValueError("missing_image", f"{path}: {exn.strerror or exn}") from None
    if len(data) > max_bytes:
        raise ValueError("image_file_too_large", f"{path}: more than {max_bytes} bytes")
    return data


def load_image(image: str | bytes, images_root: str | Path | None, max_pixels: int,
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> tuple[str, bytes]:
    """Read and fully decode one image -> (extension, bytes to store).

    A path is only read inside ``images_root``, from a regular file of at most ``max_bytes``; a path with
    no root is refused (nothing to confine it to). Inline bytes obey the same size limit.
    JPEG/PNG/WebP bytes are stored unchanged (byte-identical shards, no quality loss); GIF/BMP/TIFF are
    re-encoded to PNG. Raises ValueError(reason, detail) with a reason of ``REASONS``.
    """
    from PIL import Image

    if isinstance(image, str):
        if images_root is None:
            raise ValueError("missing_image", f"path {image!r} given but no --images-root")
        data = read_image_file(resolve_image_path(image, images_root), max_bytes)
    else:
        data = bytes(image)
        if len(data) > max_bytes:
            raise ValueError("image_file_too_large", f"inline image of {len(data)} bytes > limit {max_bytes}")
    try:
        with Image.open(io.BytesIO(data), formats=tuple(STORED_FORMATS) + CONVERTED_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ValueError("image_too_large", f"{width}x{height} > {max_pixels} pixels")
            img.load()
            if img.format in STORED_FORMATS:
                return STORED_FORMATS[img.format], data
            out = io.BytesIO()
            frame = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
            frame.save(out, format="PNG")
            return "png", out.getvalue()
    except ValueError as exn:
        if exn.args and exn.args[0] in REASONS:
            raise
        raise ValueError("undecodable_image", f"{type(exn).__name__}: {exn}") from None
    except Image.DecompressionBombError as exn:
        raise ValueError("image_too_large", str(exn)) from None
    except Exception as exn:  # Pillow raises many types for bad bytes
        raise ValueError("undecodable_image", f"{type(exn).__name__}: {exn}") from None
