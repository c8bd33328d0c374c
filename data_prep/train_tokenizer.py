"""Train the byte-level BPE tokenizer on the captions and relation texts of a set of shards.

    python -m data_prep.train_tokenizer --shards PATTERN --out tokenizer.json [--vocab-size V]

PATTERN is a brace pattern, a shard directory or its manifest.json (``rcml.shard_manifest.resolve_pattern``).

Byte-level, so any text encodes without ``<|unk|>``; lower-cased after NFKC normalisation like CLIP's
tokenizer. Special tokens, in id order: ``<|pad|>`` (0), ``<|startoftext|>``, ``<|endoftext|>``,
``<|unk|>`` (see ``rcml.tokenizer``). The saved post-processor wraps texts in start/end tokens, so the
file also behaves like CLIP's when loaded by ``transformers.PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

from rcml.decode import SkipCounter, iter_items
from rcml.shard_manifest import resolve_pattern
from rcml.tokenizer import BOS, EOS, SPECIAL_TOKENS


def iter_texts(pattern: str, counter: SkipCounter, max_pixels: int = 64_000_000,
               progress: bool | None = False) -> Iterator[str]:
    """Captions and distinct relation texts of every valid sample (``::`` joins several patterns; each may
    be a shard directory, see ``resolve_pattern``). ``progress=None``: a bar of samples read on stderr when
    stderr is a terminal."""
    import braceexpand
    from tqdm import tqdm

    pattern = resolve_pattern(pattern)
    seen_relations: set[str] = set()
    disable = None if progress is None else not progress  # tqdm: None = a bar iff stderr is a terminal
    with tqdm(desc="reading samples", unit="sample", file=sys.stderr, disable=disable) as bar:
        for source in pattern.split("::"):
            for url in braceexpand.braceexpand(source):
                for item in iter_items(url, counter, max_pixels):
                    bar.update(1)
                    yield item.caption
                    for rel in item.relations:
                        if rel["text"] not in seen_relations:  # relation texts repeat a lot: count each once
                            seen_relations.add(rel["text"])
                            yield rel["text"]


def build_tokenizer(texts: Iterator[str], vocab_size: int, min_frequency: int = 2):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[3]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)])
    return tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.train_tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="shard pattern, e.g. 'data/train/shard-{000000..000007}.tar', "
                   "or a shard directory / its manifest.json")
    p.add_argument("--out", required=True, help="output tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=8192, help="target vocabulary size (>= 261: 256 bytes + specials)")
    p.add_argument("--min-frequency", type=int, default=2)
    args = p.parse_args(argv)
    if args.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        p.error(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS) + 1} (byte alphabet + special tokens)")
    counter = SkipCounter(warn_ignored=False)  # ignored members are printed at the end
    n_texts = 0

    def counted(texts: Iterator[str]) -> Iterator[str]:
        nonlocal n_texts
        for text in texts:
            n_texts += 1
            yield text

    try:
        pattern = resolve_pattern(args.shards)  # before training: one line when it names no shard
    except ValueError as exn:
        print(f"error: --shards: {exn}", file=sys.stderr)
        return 2
    tok = build_tokenizer(counted(iter_texts(pattern, counter, progress=None)), args.vocab_size, args.min_frequency)
    if n_texts == 0:
        print(f"error: no text found in {args.shards} (skipped samples: {counter.counts})", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    print(f"trained on {n_texts} texts: vocabulary {tok.get_vocab_size()} -> {args.out}")
    if counter.counts:
        print(f"skipped samples: {counter.counts}")
    if counter.ignored:
        print(f"ignored members (not decoded, samples kept): {counter.ignored}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
