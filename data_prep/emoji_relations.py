"""Relations between emoji items, taken from the data itself, with templated descriptions.

An item is (emoji, style). Relation types (group key prefix: description template):

=================  =========================  ==============================================
type               group                      description
=================  =========================  ==============================================
subgroup           ``subgroup:food-fruit``    both are in the subgroup food-fruit
group              ``group:Food & Drink``     both are in the group Food & Drink
skin_variants      ``variants:1F44B``         both are the waving hand emoji in different skin tones
skin_tone          ``tone:3``                 both have medium skin tone
keyword            ``keyword:fire``           both are tagged fire
zwj_component      ``component:1F680``        both contain rocket
openmoji_artist    ``artist:Lisa Schulz``     both were drawn by the OpenMoji artist Lisa Schulz
release            ``release:13.1``           both were introduced in Emoji 13.1
same_emoji         ``emoji:1F525``            both are the fire emoji, drawn in different styles
=================  =========================  ==============================================

- ``skin_tone``: emoji whose modifiers all have one tone (mixed-tone pairs get none).
- ``zwj_component``: a ZWJ sequence and each emoji it joins (the component itself is a member too).
- ``openmoji_artist``: only items in an OpenMoji style (the artist drew that design, not the others).
- Size control: a keyword or ZWJ-component group with more than ``max_group_emoji`` emoji is dropped
  ("hand", "woman", the gender signs...), as is one with a single emoji; an emoji keeps at most
  ``max_keywords`` keyword relations, the rarest first. The structural types (subgroup, group, tone,
  release, artist) are kept whole.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from data_prep.emoji_sources import TONE_NAMES, Emoji

OPENMOJI_STYLES = ("openmoji", "openmoji-black")

TEMPLATES = {
    "subgroup": "both are in the subgroup {}",
    "group": "both are in the group {}",
    "skin_variants": "both are the {} emoji in different skin tones",
    "skin_tone": "both have {}",
    "keyword": "both are tagged {}",
    "zwj_component": "both contain {}",
    "openmoji_artist": "both were drawn by the OpenMoji artist {}",
    "release": "both were introduced in Emoji {}",
    "same_emoji": "both are the {} emoji, drawn in different styles",
}
RELATION_TYPES = tuple(TEMPLATES)
GENERIC_TEXT = "both are related"  # the "no relation descriptions" ablation


@dataclass(frozen=True)
class Relation:
    group: str
    type: str
    text: str


def emoji_relations(emoji: list[Emoji], *, max_keywords: int = 4, max_group_emoji: int = 64) -> dict[str, list[Relation]]:
    """Style-independent relations of every emoji (key -> relations, subgroup first).

    Groups are decided on the whole emoji list, before any split, so a group key means the same thing in
    every split; whether a group has 2+ members *within* a split is up to the split.
    """
    by_key = {e.key: e for e in emoji}
    families: dict[str, list[str]] = defaultdict(list)
    for e in emoji:
        families[e.base_key].append(e.key)
    keyword_count = Counter(t for e in emoji for t in set(e.tags))
    component_count = Counter(c for e in emoji for c in e.zwj_components)

    out: dict[str, list[Relation]] = {}
    for e in emoji:
        rels = [Relation(f"subgroup:{e.subgroup}", "subgroup", TEMPLATES["subgroup"].format(e.subgroup)),
                Relation(f"group:{e.group}", "group", TEMPLATES["group"].format(e.group))]
        family = families[e.base_key]
        if len(family) > 1:
            base = by_key.get(e.base_key)
            base_name = base.name if base is not None else e.name.split(":")[0]
            rels.append(Relation(f"variants:{e.base_key}", "skin_variants",
                                 TEMPLATES["skin_variants"].format(base_name)))
        tones = set(e.tones)
        if len(tones) == 1:
            tone = tones.pop()
            rels.append(Relation(f"tone:{tone}", "skin_tone", TEMPLATES["skin_tone"].format(TONE_NAMES[tone])))
        keywords = sorted({t for t in e.tags if 2 <= keyword_count[t] <= max_group_emoji},
                          key=lambda t: (keyword_count[t], t))[:max_keywords]
        rels += [Relation(f"keyword:{t}", "keyword", TEMPLATES["keyword"].format(t)) for t in keywords]
        # the component emoji belongs to its own component group
        components = list(e.zwj_components) + ([e.key] if component_count.get(e.key) else [])
        for c in dict.fromkeys(components):
            if c in by_key and 1 <= component_count[c] < max_group_emoji:
                rels.append(Relation(f"component:{c}", "zwj_component",
                                     TEMPLATES["zwj_component"].format(by_key[c].name)))
        rels.append(Relation(f"release:{e.version}", "release", TEMPLATES["release"].format(e.version)))
        rels.append(Relation(f"emoji:{e.key}", "same_emoji", TEMPLATES["same_emoji"].format(e.name)))
        out[e.key] = rels
    return out


def artist_relation(author: str) -> Relation | None:
    if not author:
        return None
    return Relation(f"artist:{author}", "openmoji_artist", TEMPLATES["openmoji_artist"].format(author))


def caption(e: Emoji, max_keywords: int = 5) -> str:
    """The CLDR name, then up to ``max_keywords`` CLDR keywords that are not words of the name."""
    words = set(e.name.lower().replace(":", " ").replace(",", " ").split())
    extra = [t for t in e.tags if t.lower() not in words][:max_keywords]
    return f"{e.name}; {', '.join(extra)}" if extra else e.name


def singleton_groups(item_id: str, rels: list[Relation]) -> list[Relation]:
    """Ablation "no cross-sample relations": each item's groups become its own (same types and texts)."""
    return [Relation(f"{r.group}@{item_id}", r.type, r.text) for r in rels]


def generic_descriptions(rels: list[Relation]) -> list[Relation]:
    """Ablation "no relation descriptions": the groups stay, every description becomes one generic text."""
    return [Relation(r.group, r.type, GENERIC_TEXT) for r in rels]
