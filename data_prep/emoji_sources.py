"""Parse the fetched emoji sources into one record per emoji and one image source per (emoji, style).

The emoji universe is Unicode's ``emoji-test.txt`` (Debian ``unicode-data``): its fully-qualified
entries, with their group, subgroup, CLDR name and the Emoji version that introduced them. Other sources
are joined on a normalised code-point key (upper-case hex, ``-``-joined, without the U+FE0F variation
selector, which the sources spell inconsistently):

- emojibase-data ``en/data.json``: CLDR keywords (``tags``; skin-tone variants inherit their base's);
- emoji-datasource-{twitter,google}: 64 px PNGs (``img/<set>/64/<image>``), skin variations included;
- openmoji ``data/openmoji.json`` + ``color/svg``, ``black/svg``: SVGs and each design's artist;
- @iconify-json/fluent-emoji-flat ``chars.json`` + ``icons.json``: SVG bodies (32 x 32 view box);
- fonts-noto-color-emoji ``NotoColorEmoji.ttf``: a colour bitmap font, rendered with Pillow.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

SKIN_TONES = {"1F3FB": 1, "1F3FC": 2, "1F3FD": 3, "1F3FE": 4, "1F3FF": 5}
TONE_NAMES = {1: "light skin tone", 2: "medium-light skin tone", 3: "medium skin tone",
              4: "medium-dark skin tone", 5: "dark skin tone"}
ZWJ, VS16 = "200D", "FE0F"
STYLES = ("twitter", "google", "noto", "openmoji", "openmoji-black", "fluent")

_TEST_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*([a-z-]+)\s*#\s*\S+\s+E(\d+\.\d+)\s+(.+)$")


def norm(hexcode: str) -> str:
    """``"0023-fe0f-20e3"`` / ``"0023 FE0F 20E3"`` -> ``"0023-20E3"``: the join key across sources."""
    parts = re.split(r"[-_ ]+", hexcode.strip().upper())
    return "-".join(p.lstrip("0").rjust(4, "0") for p in parts if p and p != VS16)


@dataclass
class Emoji:
    key: str                  # normalised hexcode (norm)
    hexcode: str              # fully-qualified, as in emoji-test.txt ("0023-FE0F-20E3")
    chars: str
    name: str                 # CLDR short name ("waving hand: medium skin tone")
    group: str                # "Smileys & Emotion"
    subgroup: str             # "face-smiling"
    version: str              # Emoji version that introduced it ("13.1")
    tags: list[str] = field(default_factory=list)  # CLDR keywords (emojibase)

    @property
    def code_points(self) -> list[str]:
        return self.key.split("-")

    @property
    def tones(self) -> list[int]:
        return [SKIN_TONES[c] for c in self.code_points if c in SKIN_TONES]

    @property
    def base_key(self) -> str:
        """The key without skin-tone modifiers: shared by an emoji and its skin-tone variants."""
        return "-".join(c for c in self.code_points if c not in SKIN_TONES)

    @property
    def zwj_components(self) -> list[str]:
        """Keys of the emoji joined by U+200D (skin tones removed); [] for a non-ZWJ emoji."""
        cps = [c for c in self.code_points if c not in SKIN_TONES]
        if ZWJ not in cps:
            return []
        parts, cur = [], []
        for c in cps + [ZWJ]:
            if c == ZWJ:
                if cur:
                    parts.append("-".join(cur))
                cur = []
            else:
                cur.append(c)
        return list(dict.fromkeys(parts))


def parse_emoji_test(path: str | Path) -> list[Emoji]:
    """Fully-qualified entries of ``emoji-test.txt``, in file order."""
    out: list[Emoji] = []
    group = subgroup = ""
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            m = _TEST_LINE.match(line)
            if m is None:
                raise ValueError(f"{path}:{lineno}: unexpected line {line!r}")
            codes, status, version, name = m.groups()
            if status != "fully-qualified":
                continue
            hexcode = "-".join(codes.split())
            chars = "".join(chr(int(c, 16)) for c in codes.split())
            out.append(Emoji(key=norm(hexcode), hexcode=hexcode, chars=chars, name=name.strip(), group=group,
                             subgroup=subgroup, version=version))
    if not out:
        raise ValueError(f"{path}: no fully-qualified emoji found")
    return out


def load_tags(path: str | Path) -> dict[str, list[str]]:
    """emojibase ``data.json`` -> key -> CLDR keywords (skin variants inherit their base's tags)."""
    tags: dict[str, list[str]] = {}
    for entry in json.loads(Path(path).read_text(encoding="utf-8")):
        base = [str(t) for t in entry.get("tags", [])]
        tags[norm(entry["hexcode"])] = base
        for skin in entry.get("skins", []) or []:
            tags[norm(skin["hexcode"])] = list(skin.get("tags", base))
    return tags


def datasource_images(root: str | Path, image_set: str) -> dict[str, Path]:
    """emoji-datasource-<set> ``emoji.json`` -> key -> 64 px PNG path (only images that exist)."""
    root = Path(root)
    img_dir = root / "img" / image_set / "64"
    out: dict[str, Path] = {}
    for entry in json.loads((root / "emoji.json").read_text(encoding="utf-8")):
        variants = [entry] + list((entry.get("skin_variations") or {}).values())
        for v in variants:
            if v.get(f"has_img_{image_set}", True) and (img_dir / v["image"]).is_file():
                out[norm(v["unified"])] = img_dir / v["image"]
    return out


@dataclass
class OpenMojiEntry:
    color: Path
    black: Path
    author: str


def openmoji_entries(root: str | Path) -> dict[str, OpenMojiEntry]:
    root = Path(root)
    out: dict[str, OpenMojiEntry] = {}
    for entry in json.loads((root / "data" / "openmoji.json").read_text(encoding="utf-8")):
        hexcode = entry["hexcode"]
        color, black = root / "color" / "svg" / f"{hexcode}.svg", root / "black" / "svg" / f"{hexcode}.svg"
        if color.is_file() and black.is_file():
            out[norm(hexcode)] = OpenMojiEntry(color, black, str(entry.get("openmoji_author") or "").strip())
    return out


def fluent_svgs(root: str | Path) -> dict[str, str]:
    """Iconify fluent-emoji-flat -> key -> a complete SVG document (aliases and flips resolved)."""
    root = Path(root)
    chars = json.loads((root / "chars.json").read_text(encoding="utf-8"))
    data = json.loads((root / "icons.json").read_text(encoding="utf-8"))
    icons, aliases = data["icons"], data.get("aliases", {})
    size_w, size_h = data.get("width", 16), data.get("height", 16)

    def document(name: str, flip: bool = False) -> str | None:
        if name in aliases:
            alias = aliases[name]
            return document(alias["parent"], flip ^ bool(alias.get("hFlip")))
        icon = icons.get(name)
        if icon is None:
            return None
        w, h = icon.get("width", size_w), icon.get("height", size_h)
        body = icon["body"]
        if flip:
            body = f'<g transform="translate({w} 0) scale(-1 1)">{body}</g>'
        return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}">{body}</svg>'

    out: dict[str, str] = {}
    for hexcode, name in chars.items():
        svg = document(name)
        if svg is not None:
            out[norm(hexcode)] = svg
    return out


@dataclass
class SourcePaths:
    """Where each source lives inside the fetch cache (``<cache>/src/<name>/...``)."""

    emoji_test: Path
    emojibase: Path
    twitter: Path
    google: Path
    openmoji: Path
    fluent: Path
    noto_font: Path

    @classmethod
    def in_cache(cls, cache: str | Path) -> "SourcePaths":
        src = Path(cache) / "src"
        paths = cls(
            emoji_test=src / "unicode-data/usr/share/unicode/emoji/emoji-test.txt",
            emojibase=src / "emojibase/package/en/data.json",
            twitter=src / "twitter/package",
            google=src / "google/package",
            openmoji=src / "openmoji/package",
            fluent=src / "fluent/package",
            noto_font=src / "noto-font/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
        )
        missing = [f"{name}: {p}" for name, p in vars(paths).items() if not p.exists()]
        if missing:
            raise FileNotFoundError("emoji sources missing from the cache (run `python -m data_prep.emoji_fetch "
                                    f"--cache {cache}`):\n  " + "\n  ".join(missing))
        return paths
