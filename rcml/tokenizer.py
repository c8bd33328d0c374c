"""TextTokenizer: a ``tokenizers`` tokenizer.json -> fixed-length token ids + mask, CLIP style.

``encode`` returns ``bos + tokens + eos`` right-padded with ``pad``. When a text is too long its tokens
are truncated, never the eos: CLIP's text tower pools the hidden state at the (first) eos token, so a
sequence without one would silently pool the wrong position.

Two kinds of tokenizer files work:

- ours, written by ``python -m data_prep.train_tokenizer`` (byte-level BPE; special tokens ``<|pad|>`` = 0,
  ``<|startoftext|>``, ``<|endoftext|>``, ``<|unk|>``);
- a Hugging Face tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``), e.g. a CLIP BPE
  tokenizer, whose ``bos_token`` / ``eos_token`` / ``pad_token`` / ``unk_token`` name its special tokens.
  Without a tokenizer_config.json the names above are used, and a tokenizer without ``<|pad|>`` pads with
  its eos token, as OpenAI's CLIP does (the text tower only reads up to the first eos).

``write_pretrained`` writes the same tokenizer as a folder that ``transformers.AutoTokenizer`` loads and
that encodes exactly like ``encode`` with ``padding="max_length", max_length=context_length,
truncation=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PAD, BOS, EOS, UNK = "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # in id order, as data_prep.train_tokenizer writes them
CONFIG_FILE = "tokenizer_config.json"  # the Hugging Face file naming the special tokens
ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
# tokenizer classes of transformers that load a CLIP BPE tokenizer.json as it is; any other tokenizer is
# exported as the generic PreTrainedTokenizerFast, which applies tokenizer.json unchanged
CLIP_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


class TextTokenizer:
    def __init__(self, tokenizer, special_tokens: dict[str, str] | None = None, tokenizer_class: str = "") -> None:
        """Wrap a ``tokenizers.Tokenizer``.

        ``special_tokens``: {"bos_token": ..., "eos_token": ..., "pad_token": ..., "unk_token": ...}, as in a
        tokenizer_config.json; missing roles get the defaults of the module docstring. bos, eos and pad must
        be tokens of the vocabulary; unk may be absent (byte-level BPE never needs it).
        """
        self._tok = tokenizer
        names = _default_names(tokenizer) | {k: v for k, v in (special_tokens or {}).items() if v}
        ids = {role: tokenizer.token_to_id(names[role]) if names.get(role) else None for role in ROLES}
        missing = list(dict.fromkeys(names.get(role) or role for role in ROLES[:3] if ids[role] is None))
        if missing:
            raise ValueError(f"tokenizer lacks the special token(s) {missing}; build one with "
                             "`python -m data_prep.train_tokenizer --shards PATTERN --out tokenizer.json`, or give "
                             f"a Hugging Face tokenizer folder whose {CONFIG_FILE} names its bos/eos/pad tokens")
        self.special_tokens = {role: names[role] for role in ROLES if ids[role] is not None}
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (ids[r] for r in ROLES)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.tokenizer_class = tokenizer_class if tokenizer_class in CLIP_CLASSES else "PreTrainedTokenizerFast"
        self._fast = hasattr(tokenizer, "encode_batch_fast")  # tokenizers >= 0.21

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        """A tokenizer.json, or a folder holding one; a tokenizer_config.json beside it names the special tokens."""
        from tokenizers import Tokenizer

        path = tokenizer_file(path)
        config = _read_config(path.parent / CONFIG_FILE)
        special = {role: _token_text(config.get(role)) for role in ROLES}
        return cls(Tokenizer.from_file(str(path)), special, str(config.get("tokenizer_class") or ""))

    # ------------------------------------------------------------------ encoding
    def encode(self, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` -> (ids LongTensor [n, L], mask BoolTensor [n, L]); L = context_length >= 2."""
        ids, mask, _ = self.encode_counting(texts, context_length)
        return ids, mask

    def encode_counting(self, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Like ``encode``, plus which texts lost tokens to the context length: bool ndarray [n]."""
        import torch  # here, not at module level: data_prep.train_tokenizer runs without torch
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (bos + eos), got {context_length}")
        n, body = len(texts), context_length - 2
        ids = np.full((n, context_length), self.pad_id, dtype=np.int64)  # [n, L]
        lengths = np.empty(n, dtype=np.int64)
        truncated = np.zeros(n, dtype=bool)
        # encode_batch_fast skips character offsets (unused here): ~2.5x faster than encode_batch
        encode_batch = self._tok.encode_batch_fast if self._fast else self._tok.encode_batch
        encodings = encode_batch(list(texts), add_special_tokens=False) if n else []
        for row, enc in enumerate(encodings):
            tokens = enc.ids[:body]
            truncated[row] = len(enc.ids) > body
            ids[row, 0] = self.bos_id
            ids[row, 1:1 + len(tokens)] = tokens
            ids[row, 1 + len(tokens)] = self.eos_id
            lengths[row] = len(tokens) + 2
        mask = np.arange(context_length)[None, :] < lengths[:, None]  # [n, L]
        return torch.from_numpy(ids), torch.from_numpy(mask), truncated

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Token ids -> text, special tokens dropped (for logs and debugging)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        text = self._tok.decode(ids, skip_special_tokens=True)
        suffix = getattr(self._tok.model, "end_of_word_suffix", None)  # CLIP's BPE marks word ends with </w>
        return " ".join(text.replace(suffix, " ").split()) if suffix else text

    # ------------------------------------------------------------------ files
    def with_swapped_ids(self, a: int, b: int) -> "TextTokenizer":
        """The same tokenizer with token ids ``a`` and ``b`` exchanged (vocabulary, added tokens, post-processor)."""
        from tokenizers import Tokenizer

        swap = {a: b, b: a}
        data = json.loads(self._tok.to_str())
        model = data["model"]
        if isinstance(model.get("vocab"), dict):  # BPE, WordPiece, WordLevel: {token: id}
            model["vocab"] = {t: swap.get(i, i) for t, i in model["vocab"].items()}
        elif isinstance(model.get("vocab"), list):  # Unigram: the id is the position
            vocab = model["vocab"]
            vocab[a], vocab[b] = vocab[b], vocab[a]
            if model.get("unk_id") in swap:
                model["unk_id"] = swap[model["unk_id"]]
        else:
            raise ValueError(f"cannot renumber a {model.get('type')} tokenizer model")
        for token in data.get("added_tokens") or []:
            token["id"] = swap.get(token["id"], token["id"])
        _swap_processor_ids(data.get("post_processor"), swap)
        out = TextTokenizer(Tokenizer.from_str(json.dumps(data)), self.special_tokens, self.tokenizer_class)
        for role, i in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id)):
            if getattr(out, f"{role}_id") != swap.get(i, i):
                raise ValueError(f"renumbering ids {a} and {b} left {role} at id {getattr(out, f'{role}_id')}")
        return out

    def write_pretrained(self, folder: str | Path, context_length: int) -> None:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` (special tokens, context length) into ``folder``."""
        folder = Path(folder)
        self._tok.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": self.tokenizer_class, **self.special_tokens,
                  "model_max_length": int(context_length), "padding_side": "right", "truncation_side": "right"}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def tokenizer_file(path: str | Path, key: str = "") -> Path:
    """``path`` (a tokenizer.json, or a folder holding one) -> the tokenizer.json; FileNotFoundError naming it
    (and the config ``key`` it came from)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{key + ': ' if key else ''}tokenizer file {path} does not exist (a Hugging Face "
                                "tokenizer folder needs a tokenizer.json: save it with a fast tokenizer's "
                                "save_pretrained)")
    return path


def _default_names(tokenizer) -> dict[str, str]:
    has = lambda token: tokenizer.token_to_id(token) is not None  # noqa: E731
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD if has(PAD) else EOS,
            "unk_token": UNK if has(UNK) else ""}


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exn:
        raise ValueError(f"{path} is not readable JSON: {exn}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def _token_text(value) -> str:
    """A tokenizer_config.json special token: "<|x|>" or {"content": "<|x|>", ...} (AddedToken) -> "<|x|>"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _swap_processor_ids(processor: dict | None, swap: dict[int, int]) -> None:
    if not processor:
        return
    for sub in processor.get("processors") or []:  # Sequence
        _swap_processor_ids(sub, swap)
    for key in ("sep", "cls"):  # RobertaProcessing / BertProcessing: [token, id]
        if isinstance(processor.get(key), list):
            processor[key][1] = swap.get(processor[key][1], processor[key][1])
    for special in (processor.get("special_tokens") or {}).values():  # TemplateProcessing
        special["ids"] = [swap.get(i, i) for i in special["ids"]]
