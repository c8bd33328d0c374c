"""Config: YAML + overrides merge, and every bad value is rejected with the field named."""

import pytest

from rcml.config import ConfigError, load_config, parse_overrides


def test_overrides_and_yaml_merge(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("seed: 3\ndata:\n  train: a-{0..3}.tar\n  workers: 4\nmodel:\n  beta: 0.5\n")
    cfg = load_config(y, ["model.beta=0.25", "train.steps=17", "data.resampled=true", "loss.w_intra=0"])
    assert cfg.seed == 3
    assert cfg.data.train == "a-{0..3}.tar" and cfg.data.workers == 4 and cfg.data.resampled is True
    assert cfg.model.beta == 0.25 and cfg.train.steps == 17 and cfg.loss.w_intra == 0.0
    flat = cfg.flat()
    assert flat["train.steps"] == 17 and flat["model.beta"] == 0.25


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.stepz=3", "train.stepz"),          # unknown key
        ("train.steps=ten", "train.steps"),        # wrong type
        ("train.steps=0", "train.steps"),          # impossible value
        ("model.beta=1.5", "model.beta"),
        ("model.mode=blip", "model.mode"),
        ("data.resampled=maybe", "data.resampled"),
        ("loss.impl=cuda", "loss.impl"),
        ("data.min_group=9", "data.min_group"),    # larger than members_per_group
        ("data.weights=1::2", "data.weights"),     # two weights for one source
        ("loss.w_cond=-1", "loss.w_cond"),
        ("loss.cond_candidates=1", "loss.cond_candidates"),
        ("loss.w_cond=1 model.mode=clip", "loss.w_cond"),  # clip mode does not pool under relations
        ("loss.w_cond=x", "loss.w_cond"),
        ("model.mix=sum", "model.mix"),
        ("model.text_pool_tokens=lexical", "model.text_pool_tokens"),
        ("data.type_quotas=keyword=1.5", "data.type_quotas"),
        ("data.type_quotas=keyword", "data.type_quotas"),
        ("data.type_weights=keyword=-1", "data.type_weights"),
        # values that used to pass validation and fail (or poison the loss) once the ranks had started
        ("loss.w_inter=inf", "loss.w_inter"),
        ("loss.w_intra=nan", "loss.w_intra"),
        ("model.beta=nan", "model.beta"),
        ("data.type_weights=colour=inf", "data.type_weights"),
        ("data.max_image_pixels=0", "data.max_image_pixels"),
        ("data.max_image_pixels=-5", "data.max_image_pixels"),
        ("data.image_size=60", "data.image_size"),   # tiny's patch size is 8
        ("model.name=base data.image_size=48", "data.image_size"),  # base's is 32
        ("model.name=tinny", "model.name"),
        ("seed=9223372036854775808", "seed"),        # 2^63
        ("seed=-1", "seed"),
        ("eval.seed=18446744073709551616", "eval.seed"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train=x.tar", *override.split()])
    assert field in str(err.value)


@pytest.mark.parametrize("overrides, w_cond", [([], 1.0), (["model.mode=clip"], 0.0), (["loss.w_cond=0"], 0.0),
                                               (["loss.w_cond=0.5"], 0.5), (["loss.w_cond=auto"], 1.0),
                                               (["model.mode=clip", "loss.w_cond="], 0.0)])
def test_conditioned_weight_defaults_by_mode(overrides, w_cond):
    """An unset loss.w_cond resolves in the config (so run_config.yaml shows what runs): on for rcml, off for clip."""
    cfg = load_config(None, ["data.train=x.tar", *overrides])
    assert cfg.loss.w_cond == w_cond and isinstance(cfg.loss.w_cond, float)


@pytest.mark.parametrize("overrides, w_intra", [([], 1.0), (["model.mode=clip"], 0.0),
                                                (["model.mode=clip", "loss.w_intra=0.7"], 0.0),
                                                (["loss.w_intra=0.7"], 0.7)])
def test_clip_mode_has_no_intra_terms_in_the_config_itself(overrides, w_intra, tmp_path):
    """The clip rule lives in the config, so --print-config and run_config.yaml show the weight that runs."""
    from rcml.config import save_config

    cfg = load_config(None, ["data.train=x.tar", *overrides])
    assert cfg.loss.w_intra == w_intra
    save_config(cfg, tmp_path / "run_config.yaml")
    assert load_config(tmp_path / "run_config.yaml").loss.w_intra == w_intra


def test_clip_mode_without_cross_modal_terms_is_refused():
    with pytest.raises(ConfigError, match="loss.w_inter"):
        load_config(None, ["data.train=x.tar", "model.mode=clip", "loss.w_inter=0"])


def test_missing_train_data_is_reported():
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, ["train.steps=3"])


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=x=y"]) == {"a": {"b": "1", "c": "x=y"}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.steps"])


def test_demo_config_is_valid():
    cfg = load_config("configs/pretrain/demo.yaml", [])
    assert cfg.model.name == "tiny" and cfg.train.steps > 0
