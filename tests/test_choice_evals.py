"""train.evals: config checks, when each eval runs, the metrics log, exact resume, worker counts,
and a search that ranks trials by a multiple-choice score (slow: real runs, one on Ray)."""

import json
import shutil

import pytest
import torch
import yaml
from helpers import make_corpus, run_workers, search_raw, tiny_overrides, write_choice_files

from raygpt.config import load_config
from raygpt.errors import UserError
from raygpt.runs import read_metrics
from raygpt.search.spec import parse_search
from raygpt.training.choice_evals import ChoiceEvals
from raygpt.training.local import run_without_ray
from raygpt.training.runtime import Runtime


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    return write_choice_files(tmp_path_factory.mktemp("evals"))


def evals_set(*entries: str) -> str:
    return "train.evals=[" + ", ".join("{" + e + "}" for e in entries) + "]"


@pytest.mark.parametrize("entry, message", [
    ("task: mmlu, data: x.jsonl, every: 5", r"train.evals\[0\].task must be one of hellaswag, multiple_choice"),
    ("task: hellaswag, data: x.jsonl, every: 7", r"every must be a positive multiple of train.eval_freq \(5\)"),
    ("task: hellaswag, every: 5", r"train.evals\[0\].data must be the path or URI of a jsonl file"),
    ("task: hellaswag, data: x.jsonl, every: 5, limit: 0", r"limit must be a positive number of items"),
    ("task: hellaswag, data: x.jsonl, every: 5, name: Hella-Swag", r"name must be lower-case letters"),
    ("task: hellaswag, data: x.jsonl, every: 5, each: 2", r"unknown key 'each'; valid keys: task, data, every"),
])
def test_a_bad_eval_entry_is_refused_in_one_line(entry, message):
    with pytest.raises(UserError, match=message):
        load_config(None, ["train.eval_freq=5", evals_set(entry)])


def test_entries_are_completed_and_names_must_differ():
    cfg = load_config(None, [evals_set("task: hellaswag, data: h.jsonl, every: 10")])
    assert cfg.train.evals == [{"task": "hellaswag", "data": "h.jsonl", "every": 10, "limit": None,
                                "name": "hellaswag"}]
    with pytest.raises(UserError, match="name 'hellaswag' is used twice"):
        load_config(None, [evals_set("task: hellaswag, data: a, every: 5", "task: hellaswag, data: b, every: 5")])


def test_each_eval_runs_at_step_0_at_its_own_steps_and_at_the_end(eval_files, tmp_path):
    own, hs = eval_files
    cfg = load_config(None, ["model.context_len=16", "train.eval_freq=4",
                             evals_set(f"task: multiple_choice, data: {own}, every: 8, name: own",
                                       f"task: hellaswag, data: {hs}, every: 4, limit: 5")])
    history = [{"step": 4, "own_acc": 0.5, "own_acc_norm": 0.25, "hellaswag_acc": 0.1, "hellaswag_acc_norm": 0.2}]
    evals = ChoiceEvals(cfg, Runtime(), batch_size=8, history=history)
    assert [evals.due(s, final=False) for s in (0, 4, 8, 12)] == [[0, 1], [1], [0, 1], [1]]
    assert evals.due(6, final=True) == [0, 1]
    assert evals.latest == {k: v for k, v in history[0].items() if k != "step"}  # a resumed run keeps its scores
    assert len(evals.items[1]) == 5 and len(evals.requests[0]) == 4 * len(evals.items[0])


def test_a_search_may_rank_on_an_eval_score_only_when_the_config_has_that_eval(data_dir, eval_files, tmp_path):
    own, _ = eval_files
    raw = search_raw(data_dir, tmp_path, metric="own_acc_norm", mode="max")
    with pytest.raises(UserError, match="tune.metric 'own_acc_norm' is never reported by the trainer"):
        parse_search(json.loads(json.dumps(raw)))
    raw["train"]["evals"] = [{"task": "multiple_choice", "data": str(own), "every": 2, "name": "own"}]
    assert parse_search(raw).settings.metric == "own_acc_norm"


def _overrides(data_dir, tmp_path, own, hs, *more):
    return tiny_overrides(data_dir, tmp_path) + [
        evals_set(f"task: multiple_choice, data: {own}, every: 8, name: own", f"task: hellaswag, data: {hs}, every: 4"),
        *more]


def _scores(rows, name):
    return [(r["step"], r[f"{name}_acc"], r[f"{name}_acc_norm"]) for r in rows if f"{name}_acc" in r]


@pytest.mark.slow
def test_evals_are_logged_where_measured_and_equal_raygpt_eval_of_the_checkpoint(data_dir, eval_files, tmp_path,
                                                                                    run_cli, capsys):
    own, hs = eval_files
    torch.set_num_threads(1)
    run_without_ray(load_config(None, _overrides(data_dir, tmp_path, own, hs)), str(data_dir), str(tmp_path / "r"))
    rows = read_metrics(str(tmp_path / "r"))
    assert [s for s, _, _ in _scores(rows, "own")] == [0, 8, 12]
    assert [s for s, _, _ in _scores(rows, "hellaswag")] == [0, 4, 8, 12]
    assert all(r["hellaswag_items"] == 20 for r in rows if "hellaswag_items" in r)
    assert "| own acc " in capsys.readouterr().out  # the progress line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "r"), size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Scalars("evals/own_acc_norm")
    assert [e.step for e in logged] == [s for s, _, _ in _scores(rows, "own")]
    assert [e.value for e in logged] == pytest.approx([n for _, _, n in _scores(rows, "own")])
    code, out, err = run_cli("eval", "--checkpoint", str(tmp_path / "r" / "checkpoint_0000012"), "--task",
                             "multiple_choice", "--data", str(own), "--out", str(tmp_path / "own.json"))
    assert code == 0, err
    final = json.loads((tmp_path / "own.json").read_text())
    assert _scores(rows, "own")[-1] == (12, final["acc"], final["acc_norm"])


@pytest.mark.slow
def test_a_resumed_run_logs_the_same_scores_and_two_workers_score_like_one(data_dir, eval_files, tmp_path):
    own, hs = eval_files
    overrides = _overrides(data_dir, tmp_path, own, hs)
    run_workers(1, overrides, data_dir, tmp_path / "whole")
    part = tmp_path / "part"
    run_workers(1, overrides, data_dir, part)
    shutil.rmtree(part / "checkpoint_0000008")
    shutil.rmtree(part / "checkpoint_0000012")
    run_workers(1, overrides, data_dir, part)  # from step 4
    whole, resumed = read_metrics(str(tmp_path / "whole")), read_metrics(str(part))
    for name in ("own", "hellaswag"):
        assert _scores(whole, name) == _scores(resumed, name)
    # Two workers score their halves of the items and sum the counts: at step 0 (the same weights
    # on any worker count) the figures are the same exactly.
    run_workers(2, overrides, data_dir, tmp_path / "two")
    two = read_metrics(str(tmp_path / "two"))
    for name in ("own", "hellaswag"):
        assert _scores(two, name)[0] == _scores(whole, name)[0]
    assert all(r["hellaswag_items"] == 20 for r in two if "hellaswag_items" in r)


@pytest.mark.slow
def test_a_search_ranks_by_hellaswag_acc_norm_with_asha(ray_address, data_dir, eval_files, tmp_path, run_cli):
    from raygpt.search.analysis import analyze

    _, hs = eval_files
    raw = search_raw(data_dir, tmp_path / "runs", {"optim.peak_lr": {"grid": [0.002, 0.005, 0.03]}},
                     name="exp", metric="hellaswag_acc_norm", mode="max")
    raw["train"]["evals"] = [{"task": "hellaswag", "data": str(hs), "every": 2}]
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(raw))
    code, out, err = run_cli("tune", "--config", str(tmp_path / "search.yaml"), "--address", ray_address)
    assert code == 0, err
    assert "eval hellaswag (hellaswag, every 2 steps): 20 items, 80 choices" in out
    rows = analyze(str(tmp_path / "runs" / "exp")).rows
    best = [r["best_hellaswag_acc_norm"] for r in rows]
    assert len(rows) == 3 and None not in best and best == sorted(best, reverse=True)
    assert f"best trial {rows[0]['trial_id']}: hellaswag_acc_norm {best[0]:.4f}" in out
    header = next(line for line in out.splitlines() if line.startswith("trial_id"))
    assert "best_hellaswag_acc_norm" in header and "ASHA on hellaswag_acc_norm" in out


@pytest.mark.slow
def test_two_fsdp_workers_with_unequal_shares_score_like_one(data_dir, eval_files, tmp_path):
    # 5 items over 2 ranks: 12 and 8 choices, so rank 1 runs throwaway forwards to match rank 0's
    # (each forward of a sharded model is a collective); the run must not hang, and score the same.
    own, hs = eval_files
    overrides = tiny_overrides(data_dir, tmp_path) + ["train.max_steps=4",
                                                      evals_set(f"task: hellaswag, data: {hs}, every: 4, limit: 5")]
    run_workers(1, overrides, data_dir, tmp_path / "one")
    run_workers(2, overrides + ["run.strategy=fsdp"], data_dir, tmp_path / "fsdp")
    one, fsdp = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "fsdp"))
    assert _scores(fsdp, "hellaswag")[0] == _scores(one, "hellaswag")[0]
    assert [r["hellaswag_items"] for r in fsdp if "hellaswag_items" in r] == [5, 5]
