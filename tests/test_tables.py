"""Input tables the shard builder cannot use end in one clear BuildError naming the file (and where), not in
a pyarrow traceback; valid CSV with big or multi-line quoted fields is read correctly."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_prep.manifest as manifest_module
from data_prep.build_shards import build_shards
from data_prep.manifest import ITEM_COLUMNS, RELATION_COLUMNS, BuildError, read_table
from tests.item_tables import MAX_PIXELS, make_inputs

REPO = Path(__file__).resolve().parents[1]


def _caption(rng: random.Random, size: int) -> str:
    """Text with everything a CSV field must quote: commas, quotes, newlines (CR LF too), non-ASCII."""
    pieces = ["word", ",", '"', "\n", "\r\n", "é", "字", " ", "''"]
    out, length = [], 0
    while length < size:
        piece = rng.choice(pieces) if rng.random() < 0.3 else "x" * rng.randint(1, 4000)
        out.append(piece)
        length += len(piece)
    return "".join(out)


def _write_csv(path: Path, rows: list[dict[str, str]], delimiter: str = ",") -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
        writer.writeheader()
        writer.writerows(rows)


def _random_rows(rng: random.Random, n: int, sizes: list[int]) -> list[dict[str, str]]:
    return [{"id": f"{i:03d}", "caption": _caption(rng, sizes[i % len(sizes)]), "image": f"img/{i}.png",
             "note": _caption(rng, rng.randint(0, 50))} for i in range(n)]


def test_csv_with_quoted_fields_over_a_megabyte_and_newlines_is_read_exactly(tmp_path):
    rng = random.Random(17)
    # fields larger than pyarrow's 1 MiB default block, some over several blocks, between small ones
    sizes = [rng.randint(1 << 20, 3 << 20) for _ in range(3)] + [rng.randint(0, 3000) for _ in range(4)]
    rows = _random_rows(rng, rng.randint(9, 15), sizes)
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        path = tmp_path / f"items{suffix}"
        _write_csv(path, rows, delimiter)
        table = read_table(path, "ITEMS", ITEM_COLUMNS)
        # ids stay text ("007"), captions come back byte for byte, newlines inside quotes included
        assert table.column("id").to_pylist() == [r["id"] for r in rows]
        assert table.column("caption").to_pylist() == [r["caption"] for r in rows]
        assert table.column("image").to_pylist() == [r["image"] for r in rows]


def test_rows_larger_than_the_first_block_are_read_with_larger_blocks(tmp_path, monkeypatch):
    rng = random.Random(29)
    monkeypatch.setattr(manifest_module, "_FIRST_BLOCK_BYTES", 1000)
    monkeypatch.setattr(manifest_module, "_BLOCK_GROWTH", 3)
    rows = _random_rows(rng, rng.randint(11, 21), [rng.randint(900, 90_000) for _ in range(5)])
    _write_csv(tmp_path / "items.csv", rows)
    assert read_table(tmp_path / "items.csv", "ITEMS", ITEM_COLUMNS).to_pylist() == \
        [{k: r[k] for k in ITEM_COLUMNS} for r in rows]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert read_table(tmp_path / "items.jsonl", "ITEMS", ITEM_COLUMNS).to_pylist() == \
        [{k: r[k] for k in ITEM_COLUMNS} for r in rows]


def test_jsonl_line_over_a_megabyte_is_read(tmp_path):
    rng = random.Random(3)
    rows = _random_rows(rng, 5, [rng.randint(1 << 20, 2 << 20), 10])
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    table = read_table(tmp_path / "items.jsonl", "ITEMS", ITEM_COLUMNS)
    assert table.column("caption").to_pylist() == [r["caption"] for r in rows]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path, suffix):
    rng = random.Random(suffix)
    rows = _random_rows(rng, rng.randint(7, 19), [rng.randint(0, 300)])
    bad_row = rng.randrange(len(rows))
    rows[bad_row]["caption"] = "caf\udce9 " + "au lait"  # a Latin-1 é, the bytes a cp1252 export writes
    path = tmp_path / f"items{suffix}"
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        if suffix == ".csv":
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        else:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    data = path.read_bytes()
    offset = data.index(b"caf\xe9")
    line = data.count(b"\n", 0, offset) + 1
    with pytest.raises(BuildError, match=re.escape(f"ITEMS: {path} is not UTF-8 text: byte 0xe9 at line {line} "
                                                   f"(byte offset {offset + 3})")):
        read_table(path, "ITEMS", ITEM_COLUMNS)


@pytest.mark.parametrize("column", ["image", "id"])
@pytest.mark.parametrize("kind", ["struct", "float", "list"])
def test_image_or_id_column_of_a_wrong_type_names_column_and_type(tmp_path, column, kind):
    items, rels, _ = make_inputs(tmp_path, n=random.Random(kind).randint(5, 13))
    n = items.num_rows
    values = {"struct": pa.array([{"path": f"p{i}.png", "w": i} for i in range(n)]),
              "float": pa.array([i + 0.5 for i in range(n)]),
              "list": pa.array([[i, i + 1] for i in range(n)])}[kind]
    items = items.set_column(items.column_names.index(column), column, values)
    pq.write_table(items, tmp_path / "items.parquet")
    for source in (items, tmp_path / "items.parquet"):
        type_name = {"struct": "struct<", "float": "double;", "list": "list<"}[kind]  # Parquet renames list items
        with pytest.raises(BuildError, match=re.escape(f"ITEMS: column {column!r} has type {type_name}")):
            build_shards(source, rels, tmp_path / "images", tmp_path / "out", max_image_pixels=MAX_PIXELS,
                         progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_relations_column_of_a_wrong_type_names_the_table(tmp_path):
    items, rels, _ = make_inputs(tmp_path, n=7)
    rels = rels.set_column(rels.column_names.index("group"), "group", pa.array([1.5] * rels.num_rows))
    with pytest.raises(BuildError, match=r"RELATIONS: column 'group' has type double; expected text"):
        build_shards(items, rels, tmp_path / "images", tmp_path / "out", progress=False)


def _valid_parquet(rng: random.Random) -> bytes:
    n = rng.randint(50, 400)
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [f"i{k}" for k in range(n)], "caption": ["c"] * n, "image": ["x.png"] * n}), buf)
    return buf.getvalue()


@pytest.mark.parametrize("damage", ["random_bytes", "truncated", "empty", "footer_overwritten"])
def test_corrupt_parquet_names_the_file(tmp_path, damage):
    rng = random.Random(damage)
    good = _valid_parquet(rng)
    cut = rng.randint(1, len(good) - 1)
    data = {"random_bytes": rng.randbytes(rng.randint(1, 5000)), "truncated": good[:cut], "empty": b"",
            "footer_overwritten": good[:-12] + rng.randbytes(4) + good[-8:]}[damage]
    path = tmp_path / "items.parquet"
    path.write_bytes(data)
    with pytest.raises(BuildError, match=re.escape(f"ITEMS: {path} is not a readable Parquet file")) as exn:
        read_table(path, "ITEMS", ITEM_COLUMNS)
    assert "\n" not in str(exn.value)


@pytest.mark.parametrize("damage", ["cut_line", "bad_token", "type_change", "not_an_object"])
def test_broken_jsonl_names_the_file_and_row(tmp_path, damage):
    rng = random.Random(damage)
    lines = [json.dumps({"id": f"i{k}", "group": "g", "type": "t", "text": "x"}) for k in range(rng.randint(5, 40))]
    row = rng.randrange(1, len(lines))
    lines[row] = {"cut_line": lines[row][:rng.randint(1, len(lines[row]) - 2)],
                  "bad_token": lines[row].replace('"g"', "g"),
                  "type_change": lines[row].replace('"g"', "17"),
                  "not_an_object": "[1, 2]"}[damage]
    path = tmp_path / "relations.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BuildError, match=re.escape(f"RELATIONS: cannot read {path} as JSONL")) as exn:
        read_table(path, "RELATIONS", RELATION_COLUMNS)
    assert f"row {row}" in str(exn.value) and "\n" not in str(exn.value)


def test_malformed_csv_names_the_file_on_one_line(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text('id,caption,image\na,"an unclosed\nquote,x.png\nb,c,d\n')
    with pytest.raises(BuildError, match=re.escape(f"ITEMS: cannot read {path} as CSV: CSV parse error")) as exn:
        read_table(path, "ITEMS", ITEM_COLUMNS)
    assert "\n" not in str(exn.value)


def test_cli_prints_a_table_error_on_one_line(tmp_path):
    items, rels, _ = make_inputs(tmp_path, n=5)
    pq.write_table(rels, tmp_path / "rels.parquet")
    good = io.BytesIO()
    pq.write_table(items, good)
    (tmp_path / "items.parquet").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "multi.csv").write_text('id,caption,image\na,"x\ny",z,extra\n')
    for items_path, expected in ((tmp_path / "items.parquet", "is not a readable Parquet file"),
                                 (tmp_path / "multi.csv", "cannot read")):
        proc = subprocess.run([sys.executable, "-m", "data_prep.build_shards", "--items", str(items_path),
                               "--relations", str(tmp_path / "rels.parquet"), "--out", str(tmp_path / "out"),
                               "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ITEMS: ") and expected in lines[0], proc.stderr
        assert str(items_path) in lines[0]
