import re
from pathlib import Path

import pytest

from raygpt.config import SCHEMA_VERSION, Config, config_from_dict, load_config
from raygpt.errors import UserError

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def test_defaults_are_the_recipe():
    cfg = load_config()
    assert (cfg.model.embedding_dim, cfg.model.num_layers, cfg.model.num_heads) == (768, 12, 12)
    assert (cfg.model.context_len, cfg.model.vocabulary_size, cfg.model.qkv_bias) == (1024, 50257, False)
    assert cfg.model.tie_embeddings is False
    assert (cfg.optim.initial_lr, cfg.optim.peak_lr, cfg.optim.warmup_steps) == (0.0001, 0.01, 15)
    assert cfg.optim.weight_decay == 0.1 and cfg.optim.max_norm == 1.0
    assert cfg.schema_version == SCHEMA_VERSION


def test_default_job_config_loads():
    cfg = load_config(JOBS / "pretrain.yaml")
    assert cfg.model.preset == "tiny" and cfg.model.embedding_dim == 128
    assert cfg.data.dir == "data/stdlib"


def _is_training_config(path: Path) -> bool:
    """Search files (a `search:` section; tests/test_spec.py loads them) and the job runtime env
    are not training configs."""
    text = path.read_text()
    return path.name != "runtime_env.yaml" and not re.search(r"^search:", text, re.M)


@pytest.mark.parametrize("path", sorted(p for p in JOBS.glob("*.yaml") if _is_training_config(p)),
                         ids=lambda p: p.name)
def test_every_job_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.batch_size % (cfg.run.num_workers * cfg.train.grad_accum_steps) == 0


def test_preset_then_keys_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n  num_layers: 2\n")
    cfg = load_config(path, ["model.dropout=0.2", "train.start_context=a: b", "optim.betas=[0.9, 0.95]"])
    assert (cfg.model.embedding_dim, cfg.model.num_layers, cfg.model.dropout) == (128, 2, 0.2)
    assert cfg.train.start_context == "a: b"
    assert cfg.optim.betas == [0.9, 0.95]


def test_override_can_switch_preset():
    cfg = load_config(JOBS / "pretrain.yaml", ["model.preset=gpt2-medium"])
    assert cfg.model.embedding_dim == 1024 and cfg.model.num_layers == 24


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  peak_lr: 1e-3\n  min_lr: 5e-5\n")
    cfg = load_config(path, ["optim.initial_lr=1e-5"])
    assert (cfg.optim.peak_lr, cfg.optim.min_lr, cfg.optim.initial_lr) == (1e-3, 5e-5, 1e-5)


def test_int_is_accepted_for_float_but_not_bool_for_int():
    assert load_config(None, ["optim.max_norm=2"]).optim.max_norm == 2.0
    with pytest.raises(UserError, match="train.batch_size: expected int"):
        load_config(None, ["train.batch_size=true"])


def test_to_dict_round_trips():
    from raygpt.config import config_from_dict

    cfg = load_config(JOBS / "pretrain.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg, Config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.embed_dim=64"], "unknown config key 'model.embed_dim'; valid keys in model: embedding_dim"),
        (["bogus.key=1"], "unknown config section 'bogus'; valid: schema_version, model"),
        (["train.batch_size=eight"], "train.batch_size: expected int, got 'eight'"),
        (["model.qkv_bias=3"], "model.qkv_bias: expected bool"),
        (["model.num_layers=0"], "model.num_layers must be > 0, got 0"),
        (["train.batch_size=-4"], "train.batch_size must be > 0"),
        (["model.context_len=0"], "model.context_len must be > 0"),
        (["model.num_heads=5"], r"model.embedding_dim \(768\) must be divisible by model.num_heads \(5\)"),
        (["optim.min_lr=0.1"], r"optim.min_lr \(0.1\) must be <= optim.peak_lr \(0.01\)"),
        (["optim.initial_lr=0.5"], r"optim.initial_lr \(0.5\) must be <= optim.peak_lr"),
        (["model.dropout=-0.1"], r"model.dropout must be in \[0, 1\), got -0.1"),
        (["model.dropout=1.0"], r"model.dropout must be in \[0, 1\)"),
        (["data.stride=0"], "data.stride must be > 0"),
        (["data.stride=-3"], "data.stride must be > 0"),
        (["model.preset=gpt5"], "model.preset: unknown preset 'gpt5'; choose one of tiny, gpt2-small"),
        (["nodot=1"], "expected section.key=value"),
        (["model.dropout"], "expected section.key=value"),
        (["optim.betas=[0.9]"], "optim.betas must be two numbers"),
        (["train.eval_mode=random"], "train.eval_mode must be one of spread, first, got 'random'"),
        (["train.eval_tokens=0"], "train.eval_tokens must be >= 1, got 0"),
        (["train.eval_tokens=-5"], "train.eval_tokens must be >= 1, got -5"),
        (["train.eval_tokens=1.5"], "train.eval_tokens: expected int"),
        (["train.final_eval_tokens=0"], r"train.final_eval_tokens must be >= 1 \(or null: the whole split\), got 0"),
    ],
)
def test_bad_values_give_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_eval_defaults_and_values():
    t = load_config().train
    assert (t.eval_mode, t.eval_tokens, t.final_eval_tokens) == ("spread", 65536, 262144)
    t = load_config(None, ["train.eval_mode=first", "train.eval_tokens=1", "train.final_eval_tokens=null"]).train
    assert (t.eval_mode, t.eval_tokens, t.final_eval_tokens) == ("first", 1, None)


def test_missing_file():
    with pytest.raises(UserError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_not_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  preset: [tiny\n")
    with pytest.raises(UserError, match=r"is not valid YAML \(line \d+\)"):
        load_config(path)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must hold a mapping of sections, got list"):
        load_config(path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.yaml"
    path.write_text(f"schema_version: {SCHEMA_VERSION + 1}\n")
    with pytest.raises(UserError, match="schema_version"):
        load_config(path)


@pytest.mark.parametrize("override", ["optim.min_lr=.nan", "optim.peak_lr=.inf", "optim.eps=.nan",
                                      "run.cpus_per_worker=.nan", "model.dropout=-.inf", "optim.peak_lr=nan"])
def test_nan_and_inf_are_refused_in_one_line(override):
    """NaN passes every range check (comparisons with it are false); inf breaks the schedule."""
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"^{key}: expected a finite number, got"):
        load_config(None, [override])


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "/abs", ""])
def test_a_run_name_is_one_folder_inside_the_storage(name):
    with pytest.raises(UserError, match="run.name must be a plain folder name"):
        load_config(None, [f"run.name={name}"])


def test_a_key_given_twice_is_refused_naming_it_and_the_line(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  batch_size: 8\n  seed: 1\n  batch_size: 16\n")
    with pytest.raises(UserError, match=r"\(line 4\): key 'batch_size' is given twice"):
        load_config(tmp_path / "c.yaml")


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"train:\n  seed: \xff\n")
    with pytest.raises(UserError, match=r"c.yaml is not UTF-8 text \(byte 0xff at offset 15\)"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("overrides, said", [
    (["run.use_gpu=true", "run.num_workers=2", "run.gpus_per_worker=0.5"], "two workers would share one GPU"),
    (["run.use_gpu=true", "run.gpus_per_worker=2"], "a worker trains on one GPU"),
])
def test_gpus_per_worker_that_would_share_or_idle_gpus_is_refused(overrides, said):
    with pytest.raises(UserError, match=said) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_a_fraction_of_a_gpu_for_one_worker_is_allowed():
    # Tune trials of one worker each may share a GPU; only several workers of one run may not.
    cfg = load_config(None, ["run.use_gpu=true", "run.num_workers=1", "run.gpus_per_worker=0.5"])
    assert cfg.run.gpus_per_worker == 0.5


@pytest.mark.parametrize("override, says", [
    ("train.seed=18446744073709551616", r"train.seed must be an integer in \[0, 2\^63\), got 18446744073709551616"),
    ("train.seed=-1", r"train.seed must be an integer in \[0, 2\^63\)"),
    ("model.vocabulary_size=1000000000000", r"model.vocabulary_size must be at most 1,048,576"),
])
def test_values_the_launch_would_fail_on_are_refused_by_the_check(override, says):
    with pytest.raises(UserError, match=says):
        load_config(None, [override])


@pytest.mark.parametrize("text, says", [
    ("a: " + "[" * 5000 + "]" * 5000, "is not valid YAML: nested too deeply"),
    ("? [a, b]\n: 1\n", r"is not valid YAML \(line 1\): a key is a list or a mapping"),
    ("model:\n  ? {x: 1}\n  : 2\n", r"is not valid YAML \(line 2\): a key is a list or a mapping"),
])
def test_hostile_yaml_is_one_line(tmp_path, text, says):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=says) as info:
        load_config(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content, says", [
    (b"\xff\xfe", "is not UTF-8 text"),
    (b"model: [", "is not valid YAML"),
    (b"a: 1\na: 2\n", "key 'a' is given twice"),
    (b"- 1\n- 2\n", "must hold a mapping, got list"),
])
def test_a_stored_config_is_read_back_as_checked_data(tmp_path, content, says):
    from raygpt.config import read_stored_yaml

    (tmp_path / "config.yaml").write_bytes(content)
    with pytest.raises(UserError, match=says):
        read_stored_yaml(str(tmp_path / "config.yaml"), "run config")


def test_a_preset_that_is_not_a_name_is_one_line():
    """Found by tests/test_fuzz.py: `preset: []` was a TypeError (unhashable) traceback."""
    with pytest.raises(UserError, match=r"model.preset: unknown preset \[\]"):
        config_from_dict({"model": {"preset": []}})
