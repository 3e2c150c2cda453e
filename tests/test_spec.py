"""The search file: definition, validation, expansion, sampling and launch order (fast, no Ray)."""

from pathlib import Path

import pytest
import yaml
from helpers import make_corpus, one_line_error, search_raw

from raygpt.errors import UserError
from raygpt.search.spec import expand, load_search, parse_search

JOBS = Path(__file__).resolve().parent.parent / "jobs"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_default_search_file_covers_a_grid(data_dir):
    search = load_search(str(JOBS / "tune.yaml"), [f"data.dir={data_dir}", "model.context_len=16"])
    trials, rejected = expand(search)
    assert len(trials) == 8 and not rejected


def test_grid_times_samples_and_draws_are_reproducible(data_dir, tmp_path):
    space = {"optim.peak_lr": {"grid": [0.001, 0.01]}, "model.dropout": {"uniform": [0.0, 0.2]},
             "optim.weight_decay": {"choice": [0.0, 0.1]}, "optim.min_lr": {"loguniform": [1e-5, 1e-4]}}
    search = parse_search(search_raw(data_dir, tmp_path, space, num_samples=3, seed=5))
    trials, rejected = expand(search)
    assert len(trials) == 6 and not rejected
    assert all(0.0 <= t.config.model.dropout <= 0.2 and 1e-5 <= t.config.optim.min_lr <= 1e-4 for t in trials)
    again, _ = expand(parse_search(search_raw(data_dir, tmp_path, space, num_samples=3, seed=5)))
    assert [t.overrides for t in trials] == [t.overrides for t in again]


def test_the_recipes_nine_keys_are_searchable(data_dir, tmp_path):
    space = {"train.batch_size": {"grid": [4]}, "model.dropout": {"grid": [0.1]},
             "optim.warmup_steps": {"grid": [2]}, "optim.weight_decay": {"grid": [0.01]},
             "optim.max_norm": {"grid": [0.5]}, "optim.peak_lr": {"grid": [0.005]},
             "optim.initial_lr": {"grid": [0.0001]}, "optim.min_lr": {"grid": [0.00001]},
             "train.num_epochs": {"grid": [2]}}
    raw = search_raw(data_dir, tmp_path, space)
    raw["train"]["max_steps"] = None  # num_epochs decides the length
    (trial,), _ = expand(parse_search(raw))
    from raygpt.data.shards import load_manifest
    from raygpt.data.windows import num_windows

    windows = num_windows(load_manifest(data_dir)["splits"]["train"]["tokens"], 16, 16)
    assert trial.total_steps == 2 * (windows // 4)  # batch size and epochs set the schedule's length
    assert trial.config.optim.max_norm == 0.5 and trial.config.train.num_epochs == 2


def test_rejected_combinations_are_counted_with_reasons(data_dir, tmp_path):
    space = {"optim.min_lr": {"grid": [0.0001, 0.5]}, "train.batch_size": {"grid": [8, 3]},
             "optim.warmup_steps": {"grid": [2, 50]}}
    raw = search_raw(data_dir, tmp_path, space)
    raw["run"]["num_workers"] = 2
    trials, rejected = expand(parse_search(raw))
    assert len(trials) == 1 and len(rejected) == 7
    assert any("optim.min_lr (0.5) must be <= optim.peak_lr" in r for r in rejected)
    assert any("does not divide over run.num_workers 2" in r for r in rejected)
    assert any("optim.warmup_steps 50 must be < total steps 12" in r for r in rejected)


@pytest.mark.parametrize(
    "space, tune, message",
    [
        ({"optim.peak": {"grid": [1]}}, {},
         "search key 'optim.peak' is not a config key; valid keys: model.embedding_dim"),
        ({"optim.peak_lr": {"grid": []}}, {}, "grid needs a non-empty list"),
        ({"optim.peak_lr": {"uniform": [0.01, 0.001]}}, {}, r"uniform needs low < high, got \[0.01, 0.001\]"),
        ({"optim.peak_lr": {"loguniform": [0, 1]}}, {}, "loguniform needs low > 0"),
        ({"optim.peak_lr": [0.1]}, {}, "give one of grid, choice, uniform, loguniform"),
        ({"run.num_workers": {"grid": [1, 2]}}, {}, "run settings and the data folder are fixed"),
        ({"optim.peak_lr": {"grid": [0.1]}}, {"grace_period": 20, "max_t": 10},
         "grace_period 20 must be <= tune.max_t 10"),
        ({"optim.peak_lr": {"grid": [0.1]}}, {"metric": "val_acc"}, "tune.metric 'val_acc' is never reported"),
        ({"optim.peak_lr": {"grid": [0.1]}}, {"time_attr": "training_iteration"},
         "tune.time_attr must be one of step, tokens_seen"),
        ({"optim.peak_lr": {"grid": [0.1]}}, {"bogus": 1}, "unknown tune setting 'tune.bogus'"),
        # three identical trials: a repeated grid value is refused
        ({"optim.peak_lr": {"grid": [0.001, 0.001, 0.001]}}, {},
         r"search.optim.peak_lr: grid value 0.001 is given more than once \(3 times\); list each value once"),
        ({"train.batch_size": {"grid": [4, 8, 4.0]}}, {}, r"search.train.batch_size: grid value 4 is given more"),
        ({"optim.betas": {"grid": [[0.9, 0.95], [0.9, 0.999], [0.9, 0.95]]}}, {},
         r"search.optim.betas: grid value \[0.9, 0.95\] is given more than once \(2 times\)"),
    ],
)
def test_bad_search_definitions(data_dir, tmp_path, space, tune, message):
    with pytest.raises(UserError, match=message):
        parse_search(search_raw(data_dir, tmp_path, space, **tune))


def test_set_values_leave_the_search_base_plain_data(data_dir, tmp_path):
    search = parse_search(search_raw(data_dir, tmp_path), ["data.dir=/elsewhere", "train.max_steps=9"])
    assert search.base["data"]["dir"] == "/elsewhere" and search.base["train"]["max_steps"] == 9
    assert yaml.safe_load(yaml.safe_dump(search.base)) == search.base  # saved with the experiment


def test_empty_search_section(data_dir, tmp_path):
    raw = search_raw(data_dir, tmp_path)
    raw["search"] = {}
    with pytest.raises(UserError, match="needs a non-empty `search` section"):
        parse_search(raw)


def test_cli_refuses_resume_and_analyze_of_a_folder_without_experiment(run_cli, tmp_path):
    code, _, err = run_cli("tune", "--resume", str(tmp_path))
    assert code == 2 and "no raygpt experiment to resume" in err
    code, _, err = run_cli("analyze", str(tmp_path))
    assert code == 2 and "no raygpt experiment in" in err




# ----------------------------------------------------------------------------- launch order and sampling


def test_grid_is_launched_in_a_seeded_random_order(data_dir, tmp_path):
    """Asynchronous ASHA judges a trial against those that reached a rung before it: a grid
    launched as listed (weakest first) would set a low bar. The order is shuffled, reproducibly."""
    space = {"optim.peak_lr": {"grid": [0.002, 0.003, 0.005, 0.008, 0.01, 0.02, 0.03, 0.05]}}
    listed = [t.overrides["optim.peak_lr"] for t in expand(parse_search(search_raw(data_dir, tmp_path, space,
                                                                                   shuffle=False)))[0]]
    assert listed == space["optim.peak_lr"]["grid"]
    order = [t.overrides["optim.peak_lr"] for t in expand(parse_search(search_raw(data_dir, tmp_path, space)))[0]]
    assert sorted(order) == listed and order != listed
    again = [t.overrides["optim.peak_lr"] for t in expand(parse_search(search_raw(data_dir, tmp_path, space)))[0]]
    other = [t.overrides["optim.peak_lr"]
             for t in expand(parse_search(search_raw(data_dir, tmp_path, space, seed=1)))[0]]
    assert again == order and other != order


SEED_GRID_KEYS = ["train.batch_size", "model.dropout", "optim.warmup_steps", "optim.weight_decay", "optim.max_norm",
                  "optim.peak_lr", "optim.initial_lr", "optim.min_lr", "train.num_epochs"]


def test_the_recipe_grid_file_holds_the_nine_keys_and_samples_distinct_points(data_dir):
    overrides = [f"data.dir={data_dir}", "data.source=null", "model.context_len=16"]
    search = load_search(str(JOBS / "tune-seed-grid.yaml"), overrides)
    assert list(search.space) == SEED_GRID_KEYS and search.grid_size == 38_880
    assert search.settings.search_alg == "random"
    trials, rejected = expand(search)
    assert len(trials) == search.settings.num_samples
    points = [tuple(t.overrides[k] for k in SEED_GRID_KEYS) for t in trials]
    assert len(set(points)) == len(points)  # without replacement
    assert all(t.config.optim.initial_lr <= t.config.optim.peak_lr for t in trials)  # refused ones skipped
    again, _ = expand(load_search(str(JOBS / "tune-seed-grid.yaml"), overrides))
    assert [t.overrides for t in again] == [t.overrides for t in trials]  # reproducible from the seed
    other, _ = expand(load_search(str(JOBS / "tune-seed-grid.yaml"), overrides + ["tune.seed=9"]))
    assert [t.overrides for t in other] != [t.overrides for t in trials]


def test_random_search_samples_a_huge_grid_without_listing_it(data_dir, tmp_path):
    """Five keys of 10,000 values: 10^20 points, more than a Python list (or range) can hold.
    Random search draws its points without building the grid."""
    n = 10_000
    space = {"train.seed": {"grid": list(range(n))}, "optim.weight_decay": {"grid": [i * 1e-5 for i in range(n)]},
             "model.dropout": {"grid": [i * 1e-5 for i in range(n)]},
             "optim.max_norm": {"grid": [0.5 + i * 1e-4 for i in range(n)]},
             "optim.peak_lr": {"grid": [0.002 + i * 1e-6 for i in range(n)]}}

    def sample(seed):
        search = parse_search(search_raw(data_dir, tmp_path, space, search_alg="random", num_samples=4, seed=seed))
        assert search.grid_size == 10**20
        trials, rejected = expand(search)
        assert len(trials) == 4 and not rejected
        return [tuple(t.overrides.values()) for t in trials]

    points = sample(0)
    assert len(set(points)) == 4 and sample(0) == points and sample(1) != points


def test_random_search_over_a_huge_grid_stops_after_a_bounded_number_of_refused_points(data_dir, tmp_path,
                                                                                      monkeypatch):
    """Every point refused (warmup longer than the run): the draws stop; the grid is not walked."""
    from raygpt.search import spec

    monkeypatch.setattr(spec, "MAX_RANDOM_DRAWS", 50)
    n = 100_000
    space = {"optim.warmup_steps": {"grid": list(range(1000, 1000 + n))}, "train.seed": {"grid": list(range(n))}}
    search = parse_search(search_raw(data_dir, tmp_path, space, search_alg="random", num_samples=2))
    trials, rejected = expand(search)
    assert not trials and len(rejected) == spec.MAX_RANDOM_DRAWS < search.grid_size


def test_random_search_draws_distributions_per_point(data_dir, tmp_path):
    space = {"optim.peak_lr": {"grid": [0.002, 0.005, 0.01]}, "model.dropout": {"uniform": [0.0, 0.2]}}
    trials, _ = expand(parse_search(search_raw(data_dir, tmp_path, space, search_alg="random", num_samples=3)))
    assert sorted(t.overrides["optim.peak_lr"] for t in trials) == [0.002, 0.005, 0.01]
    assert len({t.overrides["model.dropout"] for t in trials}) == 3


@pytest.mark.parametrize(
    "tune, message",
    [
        ({"grace_period": "abc"}, r"tune.grace_period: expected int, got 'abc' \(str\)"),
        ({"reduction_factor": [3]}, "tune.reduction_factor: expected float"),
        ({"early_stopping": "maybe"}, "tune.early_stopping: expected bool"),
        ({"max_failures": -1}, "tune.max_failures must be >= 0"),
        ({"search_alg": "bayes"}, "tune.search_alg must be one of grid, random, optuna, got 'bayes'"),
        ({"name": "../elsewhere"}, "tune.name must be a plain folder name"),
        ({"scheduler": "bohb"}, "tune.scheduler must be one of asha, hyperband, got 'bohb'"),
        ({"search_alg": "random", "num_samples": 9}, r"tune.num_samples 9 is larger than the grid \(8 points\)"),
    ],
)
def test_bad_tune_settings(data_dir, tmp_path, tune, message):
    with pytest.raises(UserError, match=message):
        parse_search(search_raw(data_dir, tmp_path, **tune))


def test_cli_refuses_a_tune_setting_of_the_wrong_type_in_one_line(run_cli, data_dir, tmp_path):
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(search_raw(data_dir, tmp_path / "runs")))
    code, _, err = run_cli("tune", "--config", str(cfg), "--set", "tune.grace_period=abc")
    assert code == 2 and err.strip().count("\n") == 0
    assert "tune.grace_period: expected int, got 'abc'" in err


@pytest.mark.parametrize("setting, said", [
    ("tune.name=[1", "tune.name must be a plain folder name (letters, digits, '.', '_', '-'), got '[1'"),
    ("tune.num_samples=[1", "tune.num_samples: expected int, got '[1' (str)"),
    ("tune.seed={a: 1", "tune.seed: expected int, got '{a: 1' (str)"),
    ("tune.name", "--set 'tune.name': expected section.key=value"),
])
def test_cli_refuses_a_tune_setting_that_is_not_yaml_in_one_line(run_cli, data_dir, tmp_path, setting, said):
    """`--set tune.KEY=VALUE` reads VALUE as a `--set` of the config does: text that is not YAML
    is the text (the setting's own check names it), never a YAMLError traceback."""
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(search_raw(data_dir, tmp_path / "runs")))
    err = one_line_error(run_cli, "tune", "--config", str(cfg), "--set", setting)
    assert said in err


@pytest.mark.parametrize("parametrization", ["mup", "standard"])
def test_the_mup_transfer_search_is_the_benchmarks_grid(parametrization, data_dir):
    # widths 64-512 x 7 powers of 2 of the lr, the same tokens per trial, both parametrizations
    trials, rejected = expand(load_search(str(JOBS / "mup-transfer.yaml"),
                                          [f"model.parametrization={parametrization}", f"data.dir={data_dir}"]))
    assert not rejected and len(trials) == 28
    widths = sorted({t.config.model.embedding_dim for t in trials})
    lrs = sorted({t.config.optim.peak_lr for t in trials})
    assert widths == [64, 128, 256, 512] and lrs == [2.0 ** k for k in range(-12, -5)]
    assert {(t.config.model.parametrization, t.config.model.num_layers, t.config.model.context_len,
             t.total_steps * t.config.train.batch_size) for t in trials} == {(parametrization, 4, 128, 640)}


def test_the_seed_search_is_the_transfer_search_at_other_seeds(data_dir):
    # pooled with jobs/mup-transfer.yaml by `raygpt bench mup-transfer`: only the grid may differ
    main, seeds = (yaml.safe_load((JOBS / f"mup-transfer{end}.yaml").read_text()) for end in ("", "-seeds"))
    assert {k: v for k, v in main.items() if k not in ("search", "tune")} == \
        {k: v for k, v in seeds.items() if k not in ("search", "tune")}
    assert {**main["tune"], "name": None} == {**seeds["tune"], "name": None}
    trials, rejected = expand(load_search(str(JOBS / "mup-transfer-seeds.yaml"), [f"data.dir={data_dir}"]))
    assert not rejected and len(trials) == 16
    assert main["train"]["seed"] not in {t.config.train.seed for t in trials}
    assert {t.config.optim.peak_lr for t in trials} <= set(main["search"]["optim.peak_lr"]["grid"])
