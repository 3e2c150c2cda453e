"""Property-based fuzzing (Hypothesis) of every file raygpt reads back and of its output folders.

The contract for each reader, on any input: it returns what it documents, or raises `UserError`
with a one-line message; never another exception (a traceback), never a hang. A bounded profile
runs in CI ("ci", the default); `HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py` runs 20x the
examples by hand.
"""

import json
import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raygpt import checkpoint, runs, storage
from raygpt.config import SECTIONS, Config, load_config, read_stored_yaml
from raygpt.data.shards import load_manifest
from raygpt.errors import UserError
from raygpt.search.experiment_state import read_trials

settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=1200, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Values a hostile file can hold: every JSON/YAML scalar (huge, negative, non-finite, empty), and
# lists and mappings of them, nested.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**62, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", "nan", "1e12", "-1", "[1", "{a: 1}", "../../x", "\ud800"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
raw_bytes = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace")))


def one_line(exc: UserError) -> None:
    assert "\n" not in str(exc) and str(exc).strip(), repr(str(exc))


def config_like():
    """A config mapping: real section and key names (so values reach validation) with any values,
    plus unknown keys and sections."""
    keys = {name: [f.name for f in __import__("dataclasses").fields(cls)] for name, cls in SECTIONS.items()}
    section = st.sampled_from(sorted(keys)).flatmap(
        lambda name: st.tuples(st.just(name), st.dictionaries(st.sampled_from(keys[name] + ["bogus"]), values,
                                                              max_size=5)))
    return st.lists(section, max_size=4).map(dict) | values


@given(raw=config_like())
def test_any_config_mapping_is_a_config_or_one_line(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("c") / "c.yaml"
    try:
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    except (UnicodeEncodeError, yaml.YAMLError):  # not representable as a file: nothing to read
        return
    try:
        assert isinstance(load_config(path), Config)
    except UserError as exc:
        one_line(exc)


@given(overrides=st.lists(st.tuples(st.sampled_from(["train.seed", "model.vocabulary_size", "run.num_workers",
                                                     "optim.peak_lr", "run.strategy", "train.batch_size",
                                                     "model.preset", "bogus.key", "train", "run.name"]),
                                    st.text(max_size=12)), max_size=3))
def test_any_set_override_is_a_config_or_one_line(overrides):
    try:
        assert isinstance(load_config(None, [f"{k}={v}" for k, v in overrides]), Config)
    except UserError as exc:
        one_line(exc)


@given(content=raw_bytes)
def test_any_stored_yaml_or_search_file_is_data_or_one_line(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("s")
    (folder / runs.SEARCH_FILE).write_bytes(content)
    for read in (lambda: read_stored_yaml(str(folder / runs.SEARCH_FILE), "run config"),
                 lambda: runs.read_search_file(str(folder))):
        try:
            assert isinstance(read(), dict)
        except UserError as exc:
            one_line(exc)


@given(lines=st.lists(st.one_of(values.map(json.dumps), st.text(max_size=40)), max_size=6))
def test_any_metrics_log_is_rows_or_one_line(tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("m")
    (folder / runs.METRICS_FILE).write_text("\n".join(lines), errors="replace")
    try:
        rows = runs.read_log(str(folder))
        assert all(isinstance(r, dict) for r in rows)
        runs.read_metrics(str(folder)), runs.read_steps(str(folder)), runs.read_events(str(folder))
    except UserError as exc:
        one_line(exc)


VALID_MANIFEST = {"format": "raygpt-tokens", "format_version": 1, "tokenizer": "gpt2", "dtype": "uint16",
                  "fingerprint": "f" * 64,
                  "splits": {"train": {"tokens": 10, "shards": [{"file": "train-00000.arrow", "tokens": 10,
                                                                 "bytes": 600}]},
                             "val": {"tokens": 4, "shards": [{"file": "val-00000.arrow", "tokens": 4, "bytes": 600}]}}}


def mutate(document, path, value):
    """`document` with the value at `path` (a list of keys/indices) replaced."""
    if not path:
        return value
    head, *rest = path
    if isinstance(document, dict) and head in document:
        return {**document, head: mutate(document[head], rest, value)}
    if isinstance(document, list) and isinstance(head, int) and 0 <= head < len(document):
        return [mutate(v, rest, value) if i == head else v for i, v in enumerate(document)]
    return document


MANIFEST_PATHS = [[], ["splits"], ["splits", "train"], ["splits", "train", "tokens"], ["splits", "val", "shards"],
                  ["splits", "train", "shards", 0], ["splits", "train", "shards", 0, "file"],
                  ["splits", "train", "shards", 0, "tokens"], ["splits", "val", "shards", 0, "bytes"], ["fingerprint"]]


@given(path=st.sampled_from(MANIFEST_PATHS), value=values)
def test_any_manifest_is_loaded_or_one_line(tmp_path_factory, path, value):
    folder = tmp_path_factory.mktemp("d")
    (folder / "manifest.json").write_text(json.dumps(mutate(VALID_MANIFEST, path, value)))
    try:
        manifest = load_manifest(folder)
        assert manifest["splits"]["train"]["shards"][0]["file"] == "train-00000.arrow" or path
    except UserError as exc:
        one_line(exc)


STATE = {"format_version": 1, "step": 4, "epoch": 0, "batch_in_epoch": 4, "tokens_seen": 64, "elapsed": 1.5,
         "data_fingerprint": None, "config": {"model": {"embedding_dim": 32}}}


@given(key=st.sampled_from(sorted(STATE) + [None]), value=values)
def test_any_checkpoint_state_is_checked_or_one_line(key, value):
    state = value if key is None else {**STATE, key: value}
    try:
        checkpoint.check_state(state, "c")
        checkpoint.check_resumable(state, "c")
    except UserError as exc:
        one_line(exc)


@given(content=st.one_of(values.map(json.dumps), st.text(max_size=60)))
def test_any_lease_file_reads_or_is_none(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("l")
    (folder / runs.LEASE_FILE).write_text(content, errors="replace")
    lease = runs.Lease(str(folder))
    held = lease.holder()
    assert held is None or isinstance(held, dict)
    lease.live_holder()  # never raises


@given(trial=values, metadata=values, wrap=st.booleans())
def test_any_tune_experiment_state_is_trials_or_one_line(tmp_path_factory, trial, metadata, wrap):
    folder = tmp_path_factory.mktemp("e")
    entries = [[json.dumps(trial), json.dumps(metadata)]] if wrap else trial
    (folder / "experiment_state-2026-11-30_12-00-00.json").write_text(json.dumps({"trial_data": entries}))
    try:
        for t in read_trials(str(folder)):
            assert isinstance(t.trial_id, str) and isinstance(t.hp, dict)
            assert t.error_file is None or t.error_file.startswith(str(folder) + "/")
    except UserError as exc:
        one_line(exc)


OWN = ("trials.csv", "best_config.yaml", ".mark")


@given(entries=st.lists(st.tuples(st.sampled_from(list(OWN) + ["notes.txt", "model.pt", "sub"]),
                                  st.sampled_from(["file", "dir", "link"])), max_size=4, unique_by=lambda e: e[0]))
def test_an_output_folder_is_accepted_only_when_nothing_foreign_would_be_touched(tmp_path_factory, entries):
    out = tmp_path_factory.mktemp("o") / "out"
    out.mkdir()
    outside = out.parent / "outside.txt"
    outside.write_text("keep")
    for name, kind in entries:
        if kind == "file":
            (out / name).write_text("x")
        elif kind == "dir":
            (out / name).mkdir()
        else:
            (out / name).symlink_to(outside)
    try:
        storage.check_output_folder(out, OWN, ".mark", "w")
    except UserError as exc:
        one_line(exc)
        return
    names = {p.name for p in out.iterdir()}
    assert not names or (".mark" in names and names <= set(OWN)
                         and all((out / n).is_file() for n in names)), names
    assert outside.read_text() == "keep"



@given(config=st.one_of(values, st.dictionaries(st.sampled_from(["model_type", "n_embd", "n_layer", "n_head",
                                                                  "n_positions", "vocab_size", "tie_word_embeddings"]),
                                                 values, max_size=7)))
def test_any_hugging_face_config_is_read_or_one_line(tmp_path_factory, config):
    from raygpt.hf import read_gpt2_config

    folder = tmp_path_factory.mktemp("hf")
    (folder / "config.json").write_text(json.dumps(config))
    try:
        assert isinstance(read_gpt2_config(folder), dict)
    except UserError as exc:
        one_line(exc)


@given(content=raw_bytes)
def test_any_trials_table_is_statuses_or_unknown(tmp_path_factory, content):
    from raygpt.listing import _ended_trials

    folder = tmp_path_factory.mktemp("t")
    (folder / runs.TRIALS_CSV).write_bytes(content)
    statuses = _ended_trials(str(folder))
    assert statuses is None or all(isinstance(s, str) for s in statuses)
