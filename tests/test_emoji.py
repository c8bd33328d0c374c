"""data_prep.emoji on a small fake cache laid out like the real packages (no network): parsing, relations,
splits, ablation variants, rendering, shards through build_shards, determinism."""

import io
import json
import os
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import matplotlib
import pytest
from PIL import Image, ImageDraw

from data_prep.emoji import build, split_families
from data_prep.emoji_relations import GENERIC_TEXT, caption, emoji_relations
from data_prep.emoji_sources import fluent_svgs, norm, parse_emoji_test

# (code points, status, version, name, group, subgroup, tags)
EMOJI = [
    ("2764 FE0F", "E0.6", "red heart", "Smileys & Emotion", "heart", ["heart", "love"]),
    ("1F525", "E0.6", "fire", "Travel & Places", "sky & weather", ["fire", "flame", "hot", "tool"]),
    ("2600 FE0F", "E0.6", "sun", "Travel & Places", "sky & weather", ["bright", "hot", "sunny", "tool"]),
    ("270C FE0F", "E0.6", "victory hand", "People & Body", "hand-fingers-partial", ["hand", "v", "victory"]),
    ("270C 1F3FB", "E1.0", "victory hand: light skin tone", "People & Body", "hand-fingers-partial", []),
    ("270C 1F3FF", "E1.0", "victory hand: dark skin tone", "People & Body", "hand-fingers-partial", []),
    ("1F9D1", "E5.0", "person", "People & Body", "person", ["adult", "person", "tool"]),
    ("1F680", "E0.6", "rocket", "Travel & Places", "transport-air", ["space", "tool"]),
    ("1F9D1 200D 1F680", "E12.1", "astronaut", "People & Body", "person-role", ["astronaut", "rocket", "space"]),
    ("1F9D1 1F3FB 200D 1F680", "E12.1", "astronaut: light skin tone", "People & Body", "person-role", []),
    ("1F34E", "E0.6", "red apple", "Food & Drink", "food-fruit", ["apple", "fruit", "red", "tool"]),
    ("1F34F", "E0.6", "green apple", "Food & Drink", "food-fruit", ["apple", "fruit", "green"]),
]
ARTISTS = {"1F525": "Ada", "2600": "Ada", "1F34E": "Ben"}


def _png(size, colour):
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((4, 4, size - 4, size - 4), fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _svg(colour):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle cx="36" cy="36" r="30" '
            f'fill="{colour}"/></svg>')


def make_cache(root: Path) -> Path:
    src = root / "src"
    lines, current = ["# emoji-test.txt (test subset)", ""], (None, None)
    for cps, ver, name, group, sub, _ in EMOJI:
        if current[0] != group:
            lines.append(f"# group: {group}")
        if current != (group, sub):
            lines.append(f"# subgroup: {sub}")
        current = (group, sub)
        chars = "".join(chr(int(c, 16)) for c in cps.split())
        lines.append(f"{cps:40s}; fully-qualified     # {chars} {ver} {name}")
        if "FE0F" in cps:  # an unqualified twin that must be ignored
            bare = cps.replace(" FE0F", "")
            lines.append(f"{bare:40s}; unqualified         # {chars} {ver} {name}")
    test_file = src / "unicode-data/usr/share/unicode/emoji/emoji-test.txt"
    test_file.parent.mkdir(parents=True)
    test_file.write_text("\n".join(lines) + "\n", encoding="utf-8")

    base_entries: dict[str, dict] = {}
    for cps, _, name, _, _, tags in EMOJI:
        key = norm(cps)
        base = "-".join(c for c in key.split("-") if c not in ("1F3FB", "1F3FF"))
        if base == key:
            base_entries[key] = {"label": name, "hexcode": cps.replace(" ", "-"), "tags": tags, "skins": []}
        else:
            base_entries[base]["skins"].append({"label": name, "hexcode": cps.replace(" ", "-")})
    (src / "emojibase/package/en").mkdir(parents=True)
    (src / "emojibase/package/en/data.json").write_text(json.dumps(list(base_entries.values())))

    for image_set, colour in (("twitter", "red"), ("google", "blue")):
        pkg = src / image_set / "package"
        (pkg / "img" / image_set / "64").mkdir(parents=True)
        entries = []
        for cps, *_ in EMOJI:
            if image_set == "google" and cps == "2600 FE0F":
                continue  # a style without this emoji: must be counted, not fail
            fname = cps.lower().replace(" ", "-") + ".png"
            (pkg / "img" / image_set / "64" / fname).write_bytes(_png(72, colour))  # resized to --size
            entries.append({"unified": cps.replace(" ", "-"), "image": fname, f"has_img_{image_set}": True})
        (pkg / "emoji.json").write_text(json.dumps(entries))

    om = src / "openmoji/package"
    for sub in ("data", "color/svg", "black/svg"):
        (om / sub).mkdir(parents=True)
    om_entries = []
    for cps, *_ in EMOJI:
        hexcode = cps.replace(" ", "-")
        (om / "color/svg" / f"{hexcode}.svg").write_text(_svg("orange"))
        (om / "black/svg" / f"{hexcode}.svg").write_text(_svg("black"))
        om_entries.append({"hexcode": hexcode, "openmoji_author": ARTISTS.get(norm(cps), "Cy")})
    (om / "data/openmoji.json").write_text(json.dumps(om_entries))

    fl = src / "fluent/package"
    fl.mkdir(parents=True)
    body = '<circle cx="16" cy="16" r="14" fill="#0a0"/>'
    chars = {norm(c).lower(): norm(c).lower() for c, *_ in EMOJI if not c.startswith("1F9D1")}
    chars["1f34f"] = "green-apple"  # an alias with a horizontal flip
    icons = {name: {"body": body} for name in chars.values() if name != "green-apple"}
    (fl / "chars.json").write_text(json.dumps(chars))
    (fl / "icons.json").write_text(json.dumps({"prefix": "fluent-emoji-flat", "icons": icons, "width": 32, "height": 32,
                                               "aliases": {"green-apple": {"parent": "1f34e", "hFlip": True}}}))
    font = src / "noto-font/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
    font.parent.mkdir(parents=True)
    # a real TrueType font without emoji glyphs: ZWJ sequences fall apart into several glyphs and are refused
    shutil.copy(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf", font)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("emoji")
    cache = make_cache(root / "cache")
    summary = build(cache, root / "out", seed=3, size=32, train_styles=("twitter", "google", "noto"),
                    heldout_styles=("openmoji", "openmoji-black", "fluent"), heldout_emoji=0.25, val_styles_emoji=100,
                    shard_size=7, max_keywords=2, max_group_emoji=4, vocab_size=300, ablations=True, progress=False,
                    log=lambda *a: None)
    return root, summary


def read_split(out: Path, split: str) -> dict[str, dict]:
    samples: dict[str, dict] = defaultdict(dict)
    for tar_path in sorted((out / split).glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def groups_of(samples):
    out = defaultdict(set)
    for key, s in samples.items():
        for r in json.loads(s["json"])["relations"]:
            out[r["group"]].add(key)
    return out


def test_parsers():
    assert norm("0023-fe0f-20e3") == norm("0023 FE0F 20E3") == "0023-20E3"
    assert norm("270c") == "270C"


def test_emoji_test_parser_and_relations(built):
    root, _ = built
    emoji = parse_emoji_test(root / "cache/src/unicode-data/usr/share/unicode/emoji/emoji-test.txt")
    assert [e.name for e in emoji] == [row[2] for row in EMOJI]  # unqualified twins skipped
    by_name = {e.name: e for e in emoji}
    astro = by_name["astronaut: light skin tone"]
    assert astro.tones == [1] and astro.base_key == "1F9D1-200D-1F680"
    assert astro.zwj_components == ["1F9D1", "1F680"]
    assert by_name["victory hand"].hexcode == "270C-FE0F" and by_name["victory hand"].version == "0.6"
    for e in emoji:
        e.tags = next(row[5] for row in EMOJI if row[2] == e.name)
    rels = emoji_relations(emoji, max_keywords=2, max_group_emoji=4)
    texts = {r.group: r.text for rs in rels.values() for r in rs}
    assert texts["subgroup:food-fruit"] == "both are in the subgroup food-fruit"
    assert texts["keyword:hot"] == "both are tagged hot"
    assert texts["component:1F680"] == "both contain rocket"
    assert "keyword:tool" not in texts  # shared by 5 emoji > max_group_emoji=4: dropped
    assert "keyword:flame" not in texts  # a keyword of one emoji relates nothing
    kinds = {r.type for rs in rels.values() for r in rs}
    assert kinds == {"subgroup", "group", "skin_variants", "skin_tone", "keyword", "zwj_component", "release",
                     "same_emoji"}
    assert all(sum(r.type == "keyword" for r in rs) <= 2 for rs in rels.values())
    assert all(rs[0].type == "subgroup" for rs in rels.values())  # primary group: locality in the shards
    assert caption(by_name["fire"]) == "fire; flame, hot, tool"


def test_fluent_alias_flip(built):
    root, _ = built
    svgs = fluent_svgs(root / "cache/src/fluent/package")
    assert "scale(-1 1)" in svgs["1F34F"] and "scale(-1 1)" not in svgs["1F34E"]
    assert "1F9D1" not in svgs


def test_splits_groups_and_images(built):
    root, summary = built
    out = root / "out"
    train, val_styles, val_emoji = (read_split(out, s) for s in ("train", "val_styles", "val_emoji"))
    style = lambda key: key.split("_")[0]  # noqa: E731
    emoji_of = lambda key: key.split("_", 1)[1]  # noqa: E731
    assert {style(k) for k in train} == {"twitter", "google", "noto"}
    assert {style(k) for k in val_styles} == {"openmoji", "openmoji-black", "fluent"}
    assert {style(k) for k in val_emoji} <= {"twitter", "google", "noto"}
    # held-out emoji are never trained on, and skin-tone families are not split
    train_emoji, held = {emoji_of(k) for k in train}, {emoji_of(k) for k in val_emoji}
    assert held and not train_emoji & held
    assert {emoji_of(k) for k in val_styles} <= train_emoji
    families = lambda keys: {"-".join(c for c in k.upper().split("-") if c not in ("1F3FB", "1F3FF")) for k in keys}  # noqa: E731
    assert not families(train_emoji) & families(held)
    assert summary["splits"]["train"]["items"] == len(train)
    # a missing image (google has no sun) and an undrawable sequence (noto astronaut) are counted, not written
    assert summary["splits"]["train"]["missing_images"] == {"google:not_in_style": 1}      # the sun
    assert summary["splits"]["val_styles"]["missing_images"] == {"fluent:not_in_style": 1}  # the person
    assert summary["splits"]["val_emoji"]["missing_images"]["noto:render_failed"] >= 1     # an astronaut
    assert "google_2600" not in train and "twitter_2600" in train
    assert held >= {"1f9d1-200d-1f680", "1f9d1-1f3fb-200d-1f680"}  # seed 3 holds the astronaut family out
    for s in list(train.values())[:5] + list(val_styles.values())[:5]:
        im = Image.open(io.BytesIO(s["png"]))
        assert im.size == (32, 32)
        assert s["txt"].decode()
    groups = groups_of(train)
    for key, s in train.items():
        rels = json.loads(s["json"])["relations"]
        assert rels[0]["type"] == "subgroup"
        assert {"group": f"emoji:{emoji_of(key).upper()}", "type": "same_emoji"}.items() <= {
            **next(r for r in rels if r["type"] == "same_emoji")}.items()
        # the artist relation belongs to OpenMoji designs only
        assert all(r["type"] != "openmoji_artist" for r in rels)
    # same emoji in several styles are positives of each other
    assert any(len(members) >= 2 for g, members in groups.items() if g.startswith("emoji:"))
    artists = groups_of(val_styles)
    assert all(style(k).startswith("openmoji") for g, ms in artists.items() if g.startswith("artist:") for k in ms)
    assert (out / "tokenizer.json").is_file() and (out / "emoji_manifest.json").is_file()


def test_ablation_variants(built):
    root, _ = built
    out = root / "out"
    train, singleton, generic = (read_split(out, s) for s in ("train", "train_singleton", "train_generic"))
    assert set(train) == set(singleton) == set(generic)
    assert all(len(members) == 1 for members in groups_of(singleton).values())
    assert groups_of(generic) == groups_of(train)
    texts = {r["text"] for s in generic.values() for r in json.loads(s["json"])["relations"]}
    assert texts == {GENERIC_TEXT}
    for key in train:  # same types and texts, only the groups differ
        a, b = (json.loads(d[key]["json"])["relations"] for d in (train, singleton))
        assert [(r["type"], r["text"]) for r in a] == [(r["type"], r["text"]) for r in b]


def test_deterministic_rebuild(built, tmp_path):
    root, _ = built
    again = build(root / "cache", tmp_path / "out", seed=3, size=32, train_styles=("twitter", "google", "noto"),
                  heldout_styles=("openmoji", "openmoji-black", "fluent"), heldout_emoji=0.25, val_styles_emoji=100,
                  shard_size=7, max_keywords=2, max_group_emoji=4, vocab_size=300, progress=False,
                  log=lambda *a: None)
    for split in ("train", "val_styles", "val_emoji"):
        first = json.loads((root / "out" / split / "manifest.json").read_text())["shards"]
        second = json.loads((tmp_path / "out" / split / "manifest.json").read_text())["shards"]
        assert [s["sha256"] for s in first] == [s["sha256"] for s in second]
    emoji = parse_emoji_test(root / "cache/src/unicode-data/usr/share/unicode/emoji/emoji-test.txt")
    assert split_families(emoji, 0.25, 3) == split_families(emoji, 0.25, 3)
    assert split_families(emoji, 0.25, 3)[1] != split_families(emoji, 0.25, 4)[1]


def test_missing_cache_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_prep.emoji_fetch"):
        build(tmp_path / "empty", tmp_path / "out", log=lambda *a: None)
    with pytest.raises(ValueError, match="both trained on and held out"):
        build(tmp_path, tmp_path / "out", train_styles=("twitter",), heldout_styles=("twitter",))
    assert not os.path.exists(tmp_path / "out" / "train")
