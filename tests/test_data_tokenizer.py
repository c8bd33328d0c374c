"""Tokenizer: the train_tokenizer CLI on shards (a pattern or a shard directory; a progress bar on stderr),
and TextTokenizer.encode's contract (bos + tokens + eos, eos kept when truncating, pad 0, mask) against the
raw ``tokenizers`` encoding."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

from data_prep.synthetic import build
from rcml.tokenizer import TextTokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    m = build(root / "d", items=150, val_items=10, seed=0, shard_size=50)
    out = root / "sub" / "tokenizer.json"
    proc = subprocess.run([sys.executable, "-m", "data_prep.train_tokenizer", "--shards", m["train"]["pattern"],
                           "--out", str(out), "--vocab-size", "330"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "trained on" in proc.stdout
    return out


def test_special_tokens_and_vocab(trained):
    tok = TextTokenizer.from_file(trained)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 261 < tok.vocab_size <= 330
    assert TextTokenizer.from_file(trained.parent).vocab_size == tok.vocab_size  # a directory works too
    raw = Tokenizer.from_file(str(trained))
    # relation words seen in training are merged into few tokens: BPE has learned the corpus
    assert len(raw.encode("both are red", add_special_tokens=False).ids) <= 5


def test_encode_matches_reference(trained):
    tok = TextTokenizer.from_file(trained)
    raw = Tokenizer.from_file(str(trained))
    texts = ["a small red striped circle in the top left", "", "Ünïcode 😀 text: ☃", "x " * 40, "same shape"]
    L = 12
    ids, mask = tok.encode(texts, L)
    assert ids.shape == (5, L) and ids.dtype == torch.long and mask.dtype == torch.bool
    ids2, mask2, truncated = tok.encode_counting(texts, L)
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    for row, text in enumerate(texts):
        body = raw.encode(text, add_special_tokens=False).ids
        assert truncated[row] == (len(body) > L - 2)
        assert tok.unk_id not in body  # byte-level: nothing is unknown
        expected = [1] + body[: L - 2] + [2]
        n = len(expected)
        assert ids[row, :n].tolist() == expected
        assert ids[row, n:].eq(0).all() and mask[row].tolist() == [True] * n + [False] * (L - n)
        assert (ids[row] == tok.eos_id).sum() == 1  # eos always present, also when truncated
        if len(body) + 2 <= L:  # the saved post-processor adds the same bos/eos (HF-compatible file)
            assert raw.encode(text).ids == expected
    assert truncated[0] and truncated[3] and not truncated[1]
    assert texts[0].startswith(tok.decode(ids[0]).strip())  # truncated to L - 2 tokens
    assert tok.decode(tok.encode([texts[0]], 64)[0][0]).strip() == texts[0]
    empty_ids, empty_mask = tok.encode([], L)
    assert empty_ids.shape == (0, L) and empty_mask.shape == (0, L)
    with pytest.raises(ValueError, match="context_length"):
        tok.encode(["a"], 1)


def test_rejects_tokenizers_without_special_tokens(tmp_path):
    bare = Tokenizer(models.BPE(unk_token="[UNK]"))
    bare.add_special_tokens(["[UNK]"])
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"lacks the special token\(s\).*train_tokenizer"):
        TextTokenizer.from_file(tmp_path / "tokenizer.json")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert spec["added_tokens"][0]["content"] == "[UNK]"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextTokenizer.from_file(tmp_path / "missing.json")


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so tqdm (``disable=None``) draws its bar into it."""

    def isatty(self) -> bool:
        return True


def test_cli_takes_a_shard_directory_and_shows_progress_on_stderr(trained, tmp_path, capsys, monkeypatch):
    from data_prep.train_tokenizer import main

    shards = trained.parents[1] / "d" / "train"  # the fixture's shard directory (it holds manifest.json)
    stderr = _Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    out = tmp_path / "tokenizer.json"
    assert main(["--shards", str(shards), "--out", str(out), "--vocab-size", "330"]) == 0
    assert TextTokenizer.from_file(out).vocab_size == TextTokenizer.from_file(trained).vocab_size
    stdout = capsys.readouterr().out
    assert "trained on" in stdout and "reading samples" not in stdout
    assert "reading samples" in stderr.getvalue() and "150" in stderr.getvalue()  # every sample, on stderr


def test_cli_names_a_pattern_that_matches_nothing(tmp_path, capsys):
    from data_prep.train_tokenizer import main

    missing = str(tmp_path / "shard-{0..2}.tar")
    assert main(["--shards", missing, "--out", str(tmp_path / "tok.json")]) == 2
    err = capsys.readouterr().err
    assert f"shard pattern {missing!r} matches no file" in err and err.count("\n") == 1
    assert not (tmp_path / "tok.json").exists()
