"""Progress bars of the offline tools are drawn on stderr, and only when it is a terminal: stdout reports
and redirected logs never hold one."""

from __future__ import annotations

import io
import sys

from data_prep.build_shards import build_shards
from tests.item_tables import MAX_PIXELS, make_inputs


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_shard_build_bar_only_on_a_terminal_stderr(tmp_path, capsys, monkeypatch):
    items, rels, valid = make_inputs(tmp_path)
    for name, stderr in (("logged", io.StringIO()), ("shown", _Terminal())):  # a StringIO is no terminal
        monkeypatch.setattr(sys, "stderr", stderr)
        manifest = build_shards(items, rels, tmp_path / "images", tmp_path / name, shard_size=7,
                                max_image_pixels=MAX_PIXELS, progress=True)
        assert manifest["num_samples"] == len(valid)
        assert (f"shards {name}" in stderr.getvalue()) is (name == "shown")  # desc "shards <out dir name>"
    assert "shards " not in capsys.readouterr().out
