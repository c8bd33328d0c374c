"""Run configuration: nested dataclasses, merged from YAML and ``key=value`` overrides.

Every default lives here, once. ``load_config(yaml_path, overrides)`` returns a validated ``RunConfig``;
any unknown key, wrong type or impossible value raises ``ConfigError`` naming the field (``train.lr``),
before a single rank starts training. DeepSpeed's own JSON stays DeepSpeed's: optimizer, scheduler,
precision, clipping and accumulation are read from it, not duplicated here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


MODES = ("rcml", "clip")  # model.mode: relation-conditioned, or the CLIP baseline (relation text joined to the caption)
MIXES = ("normalized", "legacy")  # model.mix
TEXT_POOL_TOKENS = ("contextual", "contextual+lexical")  # model.text_pool_tokens
POSITIVES = ("membership", "group", "item")  # loss.positives


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible; the message names the field."""


@dataclass
class DataConfig:
    train: str = ""                 # shard URL pattern(s), brace-expanded; "a::b" joins sources
    val: str = ""                   # held-out shards for periodic evaluation
    weights: str = ""               # per-source sampling weights for "::" sources, e.g. "3::1"
    tokenizer: str = ""             # tokenizer.json (default: <dir of first train shard>/tokenizer.json)
    resampled: bool = False         # sample shards with replacement ("virtual epochs", infinite stream)
    shard_shuffle: int = 100        # shard shuffle buffer (0 = keep order)
    sample_shuffle: int = 0         # sample shuffle buffer before grouping (0 = off; grouping needs locality)
    workers: int = 2                # DataLoader workers per rank
    image_size: int = 64            # pixels per side after crop and resize; a multiple of the patch size
    context_length: int = 32        # tokens per caption / relation text, bos and eos included
    groups_per_batch: int = 16      # P
    members_per_group: int = 4      # K; local batch = P x K rows
    min_group: int = 2              # a group is emitted once it has this many buffered members
    buffer_size: int = 2048         # grouping buffer (items); overflow evicts oldest as singletons
    type_weights: str = ""          # "subgroup=2,color=1"; empty = uniform over types present
    type_quotas: str = ""           # "keyword=2,release=1": at most that many groups of a type per batch
    hard_batches: bool = False      # build a batch's groups around shared members (rcml/sampler.py)
    strict: bool = False            # raise on the first bad sample instead of skipping and counting
    max_image_pixels: int = 64_000_000  # decompression-bomb guard


@dataclass
class ModelConfig:
    name: str = "tiny"              # tiny | base | path to a model JSON
    mode: str = "rcml"              # rcml | clip (baseline: beta = 1, relation text joined to caption)
    beta: float = 0.3               # e = normalize(beta * global + (1 - beta) * pooled)
    mix: str = "normalized"         # normalized: global and pooled unit-norm before the mix | legacy: raw vectors
    text_pool_tokens: str = "contextual"  # what the text pooling attends over: the tower's last states |
                                    # contextual+lexical: those and the captions' own word embeddings
    vision_path: str = ""           # optional local transformers directory (CLIPVisionModel)
    text_path: str = ""             # optional local transformers directory (CLIPTextModel)
    init_from: str = ""             # optional local CLIPModel directory: both towers, projections, logit scale,
                                    # and its tokenizer when data.tokenizer is empty


@dataclass
class LossConfig:
    w_inter: float = 1.0            # cross-modal terms (image->text, text->image)
    w_intra: float = 1.0            # intra-modal terms (image->image, text->text); 0 in clip mode
    w_cond: float | None = None     # conditioned contrast term (rcml/conditioned.py); empty = 1 in rcml mode,
                                    # 0 in clip mode; 0 = the paper's objective
    cond_candidates: int = 32       # items embedded under each relation of a batch for that term
    positives: str = "membership"   # membership: items in the row's group under any relation | group: rows
                                    # drawn for the same group (the paper) | item: the row's own item (plain CLIP)
    impl: str = "auto"              # auto | torch | triton | reference


@dataclass
class TrainConfig:
    steps: int = 100                # optimizer steps; also the schedule length in the DeepSpeed JSON
    out_dir: str = "runs/default"   # checkpoints, metrics.jsonl, eval reports, export, MLflow store
    log_every: int = 5
    ckpt_every: int = 50            # 0 = only at the end
    keep_checkpoints: int = 3       # newest complete checkpoints kept
    eval_every: int = 0             # 0 = only at the end
    max_nonfinite_steps: int = 5    # consecutive non-finite losses before aborting
    collective_timeout_s: int = 60  # per step: a dead rank fails the job instead of hanging
    phase_timeout_s: int = 1800     # start-up (incl. a resumed loader's fast-forward), checkpoints, evaluation,
                                    # export: the ranks drift apart there (rcml/train/distributed.py)
    stop_grace_s: int = 90          # after SIGTERM/SIGUSR1: time to reach the next step and checkpoint
    export: bool = True             # write <out_dir>/export at the end (rcml.from_pretrained loads it)
    overwrite: bool = False         # a fresh start in an out_dir holding another run deletes that run's files
    record_keys: bool = False       # write each step's item keys to keys_rank*.jsonl (resume audits, tests)


@dataclass
class EvalConfig:
    max_items: int = 512            # items from data.val used by the periodic evaluation
    negatives: int = 20             # relation-guided retrieval: 1 positive + this many negatives
    seed: int = 0                   # the evaluation plan (negatives drawn) is a function of this seed


@dataclass
class TrackingConfig:
    mlflow: bool = True             # log to MLflow (MLFLOW_TRACKING_URI, else a store in out_dir)
    experiment: str = "rcml"        # MLflow experiment name
    run_name: str = ""              # MLflow run name (default: <out_dir name>-<UTC time>)


@dataclass
class RunConfig:
    seed: int = 0                   # weights init, data order, crops: a run is a function of it
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.steps": 100, ...}``: for MLflow params and messages."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                key = f"{prefix}{f.name}"
                if dataclasses.is_dataclass(value):
                    walk(key + ".", value)
                else:
                    out[key] = value

        walk("", self)
        return out


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value or an override string to the field's declared type."""
    if annotation in (bool, "bool"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, "int"):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if annotation in (float, "float"):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # inf and nan pass every range check below and poison the loss later
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null", "auto")):
            return None
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, inner, where)
    if annotation in (str, "str"):
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
        return "" if value is None else str(value)
    raise ConfigError(f"{where}: unsupported field type {annotation!r}")


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        where = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(prefix + n for n in names))
            raise ConfigError(f"unknown config key '{where}' (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping of sub-keys, got {value!r}")
            _apply(current, value, where + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "model.beta=0.5"]`` -> nested dict (values stay strings until coerced)."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return nested


def validate(cfg: RunConfig) -> None:
    """Reject impossible values with a message naming the field."""

    def need(cond: bool, where: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{where}: {msg}")

    d, m, lo, t = cfg.data, cfg.model, cfg.loss, cfg.train
    need(m.mode in MODES, "model.mode", f"must be one of {'|'.join(MODES)}, got {m.mode!r}")
    need(0.0 <= m.beta <= 1.0, "model.beta", f"must be in [0, 1], got {m.beta}")
    need(lo.impl in ("auto", "torch", "triton", "reference"), "loss.impl",
         f"must be auto|torch|triton|reference, got {lo.impl!r}")
    need(lo.w_inter >= 0 and lo.w_intra >= 0, "loss.w_inter/w_intra", "weights must be >= 0")
    need(lo.w_inter + lo.w_intra > 0, "loss.w_inter/w_intra", "at least one weight must be > 0")
    need(m.mode != "clip" or lo.w_inter > 0, "loss.w_inter",
         "model.mode=clip trains the cross-modal terms only (loss.w_intra is 0 there): must be > 0")
    need(m.mix in MIXES, "model.mix", f"must be one of {'|'.join(MIXES)}, got {m.mix!r}")
    need(m.text_pool_tokens in TEXT_POOL_TOKENS, "model.text_pool_tokens",
         f"must be one of {'|'.join(TEXT_POOL_TOKENS)}, got {m.text_pool_tokens!r}")
    need(lo.w_cond is None or lo.w_cond >= 0, "loss.w_cond", f"must be >= 0 (or empty: by mode), got {lo.w_cond}")
    need(lo.positives in POSITIVES, "loss.positives", f"must be one of {'|'.join(POSITIVES)}, got {lo.positives!r}")
    need(lo.cond_candidates >= 2, "loss.cond_candidates", f"must be >= 2, got {lo.cond_candidates}")
    need(not lo.w_cond or m.mode == "rcml", "loss.w_cond",
         "the conditioned term embeds items under a relation: it needs model.mode=rcml (set loss.w_cond=0)")
    need(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
    need(bool(t.out_dir), "train.out_dir", "must not be empty")
    need(t.log_every > 0, "train.log_every", "must be > 0")
    need(t.ckpt_every >= 0, "train.ckpt_every", "must be >= 0")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    need(t.stop_grace_s >= 1, "train.stop_grace_s", "must be >= 1 second")
    need(t.collective_timeout_s >= 5, "train.collective_timeout_s", "must be >= 5 seconds")
    need(t.phase_timeout_s >= t.collective_timeout_s, "train.phase_timeout_s",
         f"must be >= train.collective_timeout_s ({t.collective_timeout_s}), got {t.phase_timeout_s}")
    need(d.workers >= 0, "data.workers", "must be >= 0")
    need(d.image_size >= 8, "data.image_size", "must be >= 8")
    need(d.max_image_pixels > 0, "data.max_image_pixels", f"must be > 0, got {d.max_image_pixels}")
    for where, seed in (("seed", cfg.seed), ("eval.seed", cfg.eval.seed)):
        need(0 <= seed < 2**63, where, f"must be in [0, 2^63) (torch and numpy seeds are 64-bit), got {seed}")
    need(not m.init_from or not (m.vision_path or m.text_path), "model.init_from",
         "loads both towers from one CLIPModel directory: leave model.vision_path and model.text_path empty")
    if not m.vision_path and not m.init_from:  # a pretrained tower brings its own patch size, checked when loaded
        from rcml.model_size import load_size  # torch-free

        try:
            patch = load_size(m.name)["vision"]["patch_size"]
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.name: {err}") from None
        need(d.image_size % patch == 0, "data.image_size",
             f"must be a multiple of the patch size {patch} of model.name={m.name!r}, got {d.image_size}")
    need(d.context_length >= 4, "data.context_length", "must be >= 4")
    need(d.groups_per_batch >= 1, "data.groups_per_batch", "must be >= 1")
    need(d.members_per_group >= 1, "data.members_per_group", "must be >= 1")
    need(1 <= d.min_group <= max(d.members_per_group, 1), "data.min_group",
         "must be between 1 and data.members_per_group")
    need(d.buffer_size >= d.groups_per_batch * d.members_per_group, "data.buffer_size",
         "must hold at least one batch (groups_per_batch x members_per_group)")
    need(d.shard_shuffle >= 0 and d.sample_shuffle >= 0, "data.shard_shuffle/sample_shuffle", "must be >= 0")
    need(cfg.eval.negatives >= 1, "eval.negatives", "must be >= 1")
    from rcml.sampler import parse_type_quotas, parse_type_weights  # torch-free

    for parse, value in ((parse_type_weights, d.type_weights), (parse_type_quotas, d.type_quotas)):
        try:
            parse(value)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if d.weights:
        n_src = len(d.train.split("::"))
        n_w = len(d.weights.split("::"))
        need(n_w == n_src, "data.weights", f"has {n_w} weights for {n_src} '::'-joined sources in data.train")


def resolve_defaults(cfg: RunConfig) -> RunConfig:
    """Fill the values whose default depends on other keys (in place), so that what runs is what
    ``run_config.yaml`` (and ``--print-config``) says: an empty ``loss.w_cond`` is 1 in rcml mode and 0 in
    the clip baseline, and the clip baseline has no intra-modal terms (``loss.w_intra`` becomes 0: the
    paper's CLIP is trained on image-text pairs only, whatever a shared YAML sets)."""
    if cfg.loss.w_cond is None:
        cfg.loss.w_cond = 1.0 if cfg.model.mode == "rcml" else 0.0
    if cfg.model.mode == "clip":
        cfg.loss.w_intra = 0.0
    return cfg


def load_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None,
                require_data: bool = True) -> RunConfig:
    import yaml

    cfg = RunConfig()
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        _apply(cfg, loaded)
    if overrides:
        _apply(cfg, parse_overrides(overrides))
    validate(cfg)
    resolve_defaults(cfg)
    if require_data and not cfg.data.train:
        raise ConfigError("data.train: no training shards given (e.g. data.train='shards/train-{000000..000009}.tar')")
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe_keys() -> list[tuple[str, Any, str]]:
    """``[("data.train", "", "shard URL pattern(s), ..."), ...]``: every key with its default and the comment
    beside its field in this file (the single place defaults and their meaning are written), for ``--help``."""
    import inspect
    import re

    field_line = re.compile(r"^\s+(\w+): [^=]+=.*?(?:#\s?(.*))?$")
    comments: dict[type, dict[str, str]] = {}
    for cls in (RunConfig, DataConfig, ModelConfig, LossConfig, TrainConfig, EvalConfig, TrackingConfig):
        notes: dict[str, str] = {}
        last = None
        for line in inspect.getsource(cls).splitlines():
            match = field_line.match(line)
            if match:
                last = match.group(1)
                notes[last] = (match.group(2) or "").strip()
            elif last and line.strip().startswith("#"):  # a comment continued on the next line
                notes[last] = f"{notes[last]} {line.strip().lstrip('#').strip()}".strip()
            else:
                last = None
        comments[cls] = notes
    out: list[tuple[str, Any, str]] = []

    def walk(prefix: str, obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(f"{prefix}{f.name}.", value)
            else:
                out.append((prefix + f.name, value, comments[type(obj)].get(f.name, "")))

    walk("", RunConfig())
    return out


def dumps(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)

