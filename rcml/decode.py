"""Safe reading and decoding of untrusted shard samples, with every skipped sample counted by reason.

A shard is untrusted input. Only the members we expect are ever decoded: one image (``jpg``/``jpeg``/
``png``/``webp``, opened by Pillow restricted to JPEG/PNG/WebP, so no Ghostscript or other plug-in ever
runs), ``txt`` (strict UTF-8) and ``json`` (``json.loads``). Any other member -- the ``.cls`` of an
ImageNet-style shard, or a ``.pyd``/``.pickle`` that WebDataset's default decoders would unpickle -- is
*ignored*: its bytes are never read, the sample is kept, and ``SkipCounter.ignored`` counts it by
extension (apart from the skipped samples). A member with a reserved extension (``.__key__``, which would
overwrite the sample's own fields) makes its sample a skip, ``reserved_member``.

A json without ``relations`` (img2dataset's ``{"url", "caption", "key", "status", ...}``) is an item with no
relations: the grouping sampler emits it as a singleton row, a plain image-text pair.

Memory is bounded before any data is read, from the tar headers: a member over ``MAX_MEMBER_BYTES``, or
one that would take its sample past ``MAX_SAMPLE_BYTES``, is stepped over in the stream, and once a
sample is known to be skipped none of its remaining members is read either. A gzip shard of a few MB can
otherwise expand to gigabytes of zeros held by one worker.

Every string that leaves this module is valid Unicode (encodable as UTF-8): ``json.loads`` accepts lone
surrogate escapes (``"\\udc80"``) and tarfile maps non-UTF-8 name bytes to lone surrogates, and such a
string would only fail much later (hashing a group id, tokenizing), far from the shard that holds it.

Reading is split in two so that the grouping buffer holds no pixels:

- ``iter_tar_samples`` + ``parse_sample`` (the *light* stage, before grouping): tar members -> ``Item``
  with the caption and relations decoded and the image *header* checked (format, pixel count). This is
  what the grouping sampler buffers.
- ``load_image`` (the *heavy* stage, after grouping): full pixel decode to RGB, reusing the parsed header.

``iter_tar_positions`` also gives each sample's byte offset in a local uncompressed shard (that of its
first tar header) and the offset where the next sample starts, and can start reading at such an offset:
what lets a checkpoint name buffered samples and reader positions instead of replaying the stream
(``rcml.stream``).

This module does not import torch: the offline tools in ``data_prep`` use it too.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")       # priority order when a sample has several
TEXT_EXTS = ("txt", "json")
KNOWN_EXTS = frozenset(IMAGE_EXTS + TEXT_EXTS)  # the members that are read; any other one is ignored
PIL_FORMATS = ("JPEG", "PNG", "WEBP")              # the only Pillow plug-ins allowed to parse shard bytes
MAX_MEMBER_BYTES = 256 << 20                       # a member this large is not read (a tar bomb, not an image)
# A usable sample is one image (up to MAX_MEMBER_BYTES, the most data_prep.build_shards writes) plus a
# caption and a json, which leaves them as much again. Only members that are read count towards it.
MAX_SAMPLE_BYTES = 2 * MAX_MEMBER_BYTES
SHARD_RETRY_DELAY_S = 1.0                          # wait before the one retry of a shard that fails to open

# Reasons a sample is skipped (the keys of SkipCounter.counts; the trainer logs them as skipped_<reason>).
REASONS = {
    "truncated_tar": "the tar ends inside this sample (or is not a tar); the sample being read is lost",
    "duplicate_member": "two members of one sample have the same extension",
    "member_too_large": "a member larger than MAX_MEMBER_BYTES (not read into memory)",
    "sample_too_large": "the members of one sample add up to more than MAX_SAMPLE_BYTES (the rest are not read)",
    "shard_unreadable": "the shard cannot be opened (OSError), also after one retry; its samples are not read",
    "reserved_member": "a member whose extension starts with '__' (it would overwrite the sample's __key__)",
    "non_utf8_name": "a member name (hence the sample key) is not valid UTF-8",
    "missing_image": "no jpg/jpeg/png/webp member",
    "corrupt_image": "the image bytes do not decode as JPEG/PNG/WebP",
    "image_too_large": "more pixels than the limit (decompression-bomb guard)",
    "missing_txt": "no txt member (caption)",
    "non_utf8_txt": "the caption is not valid UTF-8",
    "empty_txt": "the caption is empty",
    "missing_json": "no json member (relations)",
    "invalid_json": "the json member does not parse",
    "non_utf8_json": "a string in the json (key or value) is not valid Unicode, e.g. a lone surrogate \\udc80",
    "invalid_relations": "json parses but 'relations' is not a list of {group, type, text} strings",
}


class BadSampleError(ValueError):
    """Strict mode: a sample that would have been skipped. The message names shard, key and reason."""


@dataclass
class SkipCounter:
    """Counts skipped samples by reason; in strict mode the first one raises ``BadSampleError``.

    Apart from those, ``ignored`` counts the members of kept samples that are not decoded (by extension,
    e.g. ``{"cls": 1000}``): the sample is used without them, so they are not in ``counts`` or ``total``
    and "samples in = rows out + skipped" holds. The first time an extension is ignored, this counter logs
    one warning naming the member, sample and shard (``warn_ignored=False``: no warning, for tools that
    report ``ignored`` themselves); each DataLoader worker has its own counter, so it warns once per worker.
    """

    strict: bool = False
    max_examples: int = 3
    warn_ignored: bool = True
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, shard: str, key: str, detail: str = "") -> None:
        where = f"shard {shard}, sample {key!r}" if key else f"shard {shard}"
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise BadSampleError(f"{message}. Repair or remove the sample, or set data.strict=false to skip "
                                 "and count bad samples instead.")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(message)

    def ignore(self, ext: str, shard: str, key: str) -> None:
        """Count one member with extension ``ext`` that a kept sample carries but nothing decodes."""
        if ext not in self.ignored and self.warn_ignored:
            log.warning("member .%s of sample %r in shard %s is not decoded; ignored members are counted, "
                        "not skipped", ext, key, shard)
        self.ignored[ext] = self.ignored.get(ext, 0) + 1

    @property
    def total(self) -> int:
        """Skipped samples (ignored members are not among them)."""
        return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def since(self, snapshot: dict[str, int]) -> dict[str, int]:
        """Counts added after ``snapshot`` was taken (only reasons with a positive difference)."""
        return {k: v - snapshot.get(k, 0) for k, v in self.counts.items() if v > snapshot.get(k, 0)}


@dataclass(slots=True)
class Item:
    """One sample after the light stage: text decoded, image header checked, pixels not yet decoded."""

    key: str
    url: str
    image: bytes                      # encoded image, decoded later by load_image
    caption: str
    relations: list[dict[str, str]]   # [{"group", "type", "text"}], distinct groups, in shard order
    opened: Image.Image | None = None  # the header parsed by the light stage, reused by load_image
    # how a checkpoint names this sample, set by the stream reader (rcml.stream): (source, shard index,
    # byte offset of the sample's first tar header, crc32 of the key); None where it cannot be re-read
    ref: tuple[int, int, int, int] | None = None


# ----------------------------------------------------------------------------------------------- tar
def is_local(url: str) -> bool:
    """A local file path (or ``file:path``): opened directly, and seekable. ``pipe:`` and ``scheme://`` are not."""
    return "://" not in url and not url.startswith("pipe:")


def _open_url(url: str):
    """A local path is opened directly; anything else (``pipe:``, ``http(s)://``, ...) by WebDataset's
    ``gopen``, like any WebDataset reader. (Importing webdataset imports torch: the offline tools in
    ``data_prep`` avoid it for local shards.)"""
    if is_local(url):
        return open(url.removeprefix("file:"), "rb")
    import webdataset as wds

    return wds.gopen(url, "rb")


def _split_name(name: str) -> tuple[str | None, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``), WebDataset's key rule (first dot of the basename)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1 or dot == len(name) - 1:
        return None, ""
    return name[:dot], name[dot + 1:].lower()


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (what ``json.loads`` makes of ``"\\udc80"``, and tarfile
    of a name byte that is not UTF-8): Python accepts it as a str, but it cannot be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def first_non_unicode(obj: Any) -> str | None:
    """The first string (dict key or value, at any depth) of a parsed json that is not valid Unicode, else None.

    Iterative: ``json.loads`` accepts nesting close to the recursion limit, a recursive walk would not.
    """
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if not is_unicode(node):
                return node
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _open_shard(url: str, counter: SkipCounter):
    """The shard's byte stream, or None once ``shard_unreadable`` is counted.

    A network filesystem hiccup or a file being replaced makes one open fail now and the next succeed,
    so a failure is retried once after ``SHARD_RETRY_DELAY_S``; a shard still unreadable is skipped
    like a bad sample rather than ending the job (strict mode raises, as for any skip).
    """
    try:
        return _open_url(url)
    except OSError:
        time.sleep(SHARD_RETRY_DELAY_S)
    try:
        return _open_url(url)
    except OSError as exn:
        counter.skip("shard_unreadable", url, "", f"{type(exn).__name__}: {exn}")
        return None


def _member_error(info: tarfile.TarInfo, ext: str, sample: dict[str, Any], sample_bytes: int, wanted: bool):
    """(reason, detail) that makes the sample of member ``info`` a skip, judged from its header alone.

    ``sample_bytes``: the sample's data read so far; ``wanted``: this member's data would be read next.
    A member that is not decoded (not in ``KNOWN_EXTS``) is never read, so only its name can be wrong.
    """
    decoded = ext in KNOWN_EXTS
    if decoded and info.size > MAX_MEMBER_BYTES:
        return "member_too_large", f"{info.name}: {info.size} bytes"
    if wanted and sample_bytes + info.size > MAX_SAMPLE_BYTES:
        return "sample_too_large", f"{sample_bytes + info.size} bytes at member {info.name} > {MAX_SAMPLE_BYTES}"
    if not is_unicode(info.name):
        return "non_utf8_name", f"member {ascii(info.name)}"
    if ext.startswith("__"):  # would overwrite the sample's own fields (``__key__``, ``__error__``)
        return "reserved_member", f"member {ascii(info.name)}: extensions starting with '__' are reserved"
    if decoded and ext in sample:
        return "duplicate_member", f"two .{ext} members"
    return None


def iter_tar_samples(url: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Group consecutive tar members by key: ``{"__key__", "__url__", ext: bytes, ...}`` (``iter_tar_positions``
    without the offsets)."""
    samples = iter_tar_positions(url, counter)
    try:
        for sample, _, _ in samples:
            yield sample
    finally:
        samples.close()


def iter_tar_positions(url: str, counter: SkipCounter,
                       start: int = 0) -> Iterator[tuple[dict[str, Any], int, int | None]]:
    """(sample, offset, next offset): consecutive tar members grouped by key, ``{"__key__", "__url__", ext:
    bytes, ...}``, with the byte offset in the shard of the sample's first tar header and that of the next
    sample (None after the last one).

    Both offsets are -1 where they cannot be used to seek: in a compressed tar (they would count
    decompressed bytes) and after a global pax header (it applies to the members after it, so reading
    cannot start past it). ``start`` > 0, an offset of an earlier read of this local, uncompressed shard,
    starts reading there: tarfile's stream mode reads from any header boundary.

    Only the members ``parse_sample`` decodes (``KNOWN_EXTS``) of a sample not yet known to be skipped
    are read; the extensions of the other members are listed in ``"__ignored__"`` (in tar order), their
    data stepped over in the stream. A sample to be skipped carries ``"__error__": (reason, detail)``, the
    first one found.

    A tar that ends early (an interrupted copy, a bad disk) loses the sample being read when the data
    stops; that sample is counted as ``truncated_tar`` -- also when the cut falls exactly between two
    members, which Python's tarfile would otherwise take for a clean end of archive.

    Names are decoded as UTF-8 whatever the locale (the shard format says UTF-8); a name that is not
    (tarfile's ``surrogateescape`` keeps its bytes as lone surrogates) marks its sample ``non_utf8_name``.
    """
    stream = _open_shard(url, counter)
    if stream is None:
        return
    current: dict[str, Any] | None = None
    first = -1            # offset of ``current``'s first header
    sample_bytes = 0      # data read for ``current`` so far
    doomed = False        # ``current`` will be skipped by parse_sample whatever its bytes
    try:
        try:
            if start:
                stream.seek(start)
            # at an offset the tar is known to be uncompressed: no compression sniffing of a header block
            tf = tarfile.open(fileobj=stream, mode="r|" if start else "r|*", encoding="utf-8",
                              errors="surrogateescape")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exn:
            counter.skip("truncated_tar", url, "", f"cannot open as a tar: {exn}")
            return
        plain = tf.fileobj.comptype == "tar"
        try:
            for info in tf:
                if not info.isreg():
                    continue
                prefix, ext = _split_name(info.name)
                basename = info.name.rsplit("/", 1)[-1]
                if prefix is None or basename.startswith("__"):
                    continue  # tar-level metadata (``__index__``) or a name without extension: not a sample member
                offset = start + info.offset if plain and not tf.pax_headers else -1
                if current is not None and prefix != current["__key__"]:
                    yield current, first, offset
                    current = None
                if current is None:  # before reading the data: a cut inside it is charged to this sample
                    current, first, sample_bytes, doomed = {"__key__": prefix, "__url__": url}, offset, 0, False
                # parse_sample skips a sample with an error without looking at its bytes, and never looks
                # at an ignored member: their data stay in the stream, which tarfile steps over
                decoded = ext in KNOWN_EXTS
                error = _member_error(info, ext, current, sample_bytes, decoded and not doomed)
                if error is not None:
                    current.setdefault("__error__", error)
                doomed = doomed or error is not None
                if decoded and not doomed:
                    data = tf.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} is truncated")
                    sample_bytes += len(data)
                    current[ext] = data
                elif decoded:
                    current[ext] = b""
                elif not ext.startswith("__"):
                    current.setdefault("__ignored__", []).append(ext)
                tf.members = []  # stream mode keeps every TarInfo otherwise: memory grows with the shard
            # tarfile stops silently when the data ends exactly at a member boundary; a complete archive
            # has an end-of-archive block of zeros, which tarfile has read iff it moved past the offset.
            if tf.fileobj.tell() - tf.offset < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("no end-of-archive marker")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exn:
            key = current["__key__"] if current is not None else ""
            counter.skip("truncated_tar", url, key, str(exn))
            current = None
        if current is not None:
            yield current, first, None
    finally:
        stream.close()


# ------------------------------------------------------------------------------------- light stage
def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the image header only (no pixel decode). Raises ValueError with the reason as first arg."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError as exn:
        raise ValueError("image_too_large", str(exn)) from None
    except Exception as exn:  # Pillow raises many types (UnidentifiedImageError, SyntaxError, struct.error...)
        raise ValueError("corrupt_image", f"{type(exn).__name__}: {exn}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError("corrupt_image", f"image size {width}x{height}")
    if width * height > max_pixels:
        raise ValueError("image_too_large", f"{width}x{height} = {width * height} pixels > limit {max_pixels}")
    return image


def parse_relations(obj: Any) -> list[dict[str, str]] | None:
    """The ``relations`` list of a sample's json, or None when its shape is wrong. Duplicate groups dropped."""
    if not isinstance(obj, dict):
        return None
    relations = obj.get("relations", [])
    if not isinstance(relations, list):
        return None
    out, seen = [], set()
    for rel in relations:
        if type(rel) is not dict:
            return None
        group, rtype, text = rel.get("group"), rel.get("type"), rel.get("text")
        if not (type(group) is str and type(rtype) is str and type(text) is str
                and group.strip() and rtype.strip() and text.strip()):
            return None
        if group not in seen:
            seen.add(group)
            out.append(rel if len(rel) == 3 else {"group": group, "type": rtype, "text": text})
    return out


def parse_sample(sample: dict[str, Any], counter: SkipCounter, max_pixels: int) -> Item | None:
    """Light stage: check members, decode caption and relations, check the image header.

    Returns None (after counting the reason) for a bad sample; a kept sample's ignored members are counted.
    """
    key, url = sample["__key__"], sample["__url__"]
    if "__error__" in sample:
        counter.skip(sample["__error__"][0], url, key, sample["__error__"][1])
        return None
    image_ext = next((ext for ext in IMAGE_EXTS if ext in sample), None)
    if image_ext is None:
        counter.skip("missing_image", url, key)
        return None
    if "txt" not in sample:
        counter.skip("missing_txt", url, key)
        return None
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        counter.skip("non_utf8_txt", url, key, str(exn))
        return None
    if not caption:
        counter.skip("empty_txt", url, key)
        return None
    if "json" not in sample:
        counter.skip("missing_json", url, key)
        return None
    try:
        meta = json.loads(sample["json"])
    except (ValueError, RecursionError) as exn:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        counter.skip("invalid_json", url, key, str(exn)[:200])
        return None
    bad_text = first_non_unicode(meta)
    if bad_text is not None:
        counter.skip("non_utf8_json", url, key, f"string {ascii(bad_text)[:200]}")
        return None
    relations = parse_relations(meta)
    if relations is None:
        counter.skip("invalid_relations", url, key, "expected {'relations': [{'group', 'type', 'text'}, ...]}")
        return None
    try:
        opened = open_image(sample[image_ext], max_pixels)
    except ValueError as exn:
        counter.skip(exn.args[0], url, key, exn.args[1])
        return None
    for ext in sample.get("__ignored__", ()):
        counter.ignore(ext, url, key)
    return Item(key=key, url=url, image=sample[image_ext], caption=caption, relations=relations, opened=opened)


def iter_items(url: str, counter: SkipCounter, max_pixels: int) -> Iterator[Item]:
    """Light-stage items of one shard, in shard order."""
    for sample in iter_tar_samples(url, counter):
        item = parse_sample(sample, counter, max_pixels)
        if item is not None:
            yield item


# ------------------------------------------------------------------------------------- heavy stage
def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (emoji and icons are mostly transparent background)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int, opened: Image.Image | None = None) -> Image.Image:
    """Full decode to an RGB PIL image. Raises ValueError(reason, detail) like ``open_image``.

    ``opened``: the not-yet-loaded image of ``open_image(data)``, to skip parsing the header again.
    """
    image = opened if opened is not None else open_image(data, max_pixels)
    try:
        image.load()
    except Exception as exn:  # truncated or corrupt pixel data behind a valid header
        raise ValueError("corrupt_image", f"{type(exn).__name__}: {exn}") from None
    return to_rgb(image)


def load_image(item: Item, max_pixels: int) -> Image.Image:
    """Heavy stage for one item: decode its pixels (once; the parsed header is released)."""
    opened, item.opened = item.opened, None
    return decode_image(item.image, max_pixels, opened)
