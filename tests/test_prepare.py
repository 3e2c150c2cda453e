import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import one_line_error

from raygpt.data import prepare as prepare_module
from raygpt.data.prepare import (
    is_val_document,
    prepare_local,
    stdlib_files,
)
from raygpt.data.shards import load_manifest, read_shard
from raygpt.data.windows import WindowDataset, num_windows
from raygpt.errors import UserError
from raygpt.tokenizer import EOT_TOKEN, gpt2_encoding

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé text — with em dashes, 東京, and emoji 🎉.",
    "Every effort moves you forward, one token at a time.",
    "import os\nprint(os.getcwd())\n",
]


def quiet(**kw):
    return dict(context_len=8, log=lambda *a: None, progress=False, **kw)


def decoded_documents(folder):
    """All documents of a prepared folder, val and train, decoded back to text, in corpus order."""
    manifest = load_manifest(folder)
    texts = {}
    for split in ("train", "val"):
        shards = [read_shard(folder / s["file"]) for s in manifest["splits"][split]["shards"]]
        ids = np.concatenate(shards) if shards else np.zeros(0, dtype=np.uint16)
        texts[split] = gpt2_encoding().decode(ids.tolist()).split(EOT_TOKEN)[:-1]
    return texts


# ----------------------------------------------------------------------------- pure parts


def test_val_split_is_deterministic_and_exact():
    picks = [i for i in range(1000) if is_val_document(i, 0.1)]
    assert len(picks) == 100 and picks[:3] == [9, 19, 29]
    assert not any(is_val_document(i, 0.0) for i in range(100))
    assert sum(is_val_document(i, 0.25) for i in range(10)) == 2


# ----------------------------------------------------------------------------- prepare round trips


def test_round_trip_txt(tmp_path):
    for i, text in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(text)
    out = tmp_path / "out"
    manifest = prepare_local([str(tmp_path / "*.txt")], out, val_fraction=0.2, **quiet())
    texts = decoded_documents(out)
    assert texts["val"] == [DOCS[4]] and texts["train"] == DOCS[:4]
    assert manifest["splits"]["val"]["documents"] == 1
    total = sum(len(gpt2_encoding().encode_ordinary(d)) + 1 for d in DOCS)
    assert manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"] == total


def test_round_trip_jsonl_across_small_shards(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCS)) + "\n\n")
    out = tmp_path / "out"
    manifest = prepare_local([str(src)], out, val_fraction=0.0, shard_tokens=16, **quiet())
    assert len(manifest["splits"]["train"]["shards"]) > 3
    assert all(s["tokens"] <= 16 for s in manifest["splits"]["train"]["shards"])
    assert decoded_documents(out)["train"] == DOCS


def test_round_trip_parquet_in_batches(tmp_path):
    docs = DOCS * 500  # several row-group batches of 1024
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), tmp_path / "c.parquet", row_group_size=700)
    out = tmp_path / "out"
    prepare_local([str(tmp_path / "c.parquet")], out, val_fraction=0.1, **quiet())
    texts = decoded_documents(out)
    assert len(texts["val"]) == 250 and len(texts["train"]) == 2250
    assert texts["train"][:9] == docs[:9] and texts["val"][0] == docs[9]


def test_folder_input_reads_all_formats_sorted(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "b.txt").write_text(DOCS[1])
    (corpus / "a.jsonl").write_text(json.dumps({"text": DOCS[0]}) + "\n")
    (corpus / "notes.md").write_text("ignored")
    prepare_local([str(corpus)], tmp_path / "out", val_fraction=0.0, **quiet())
    assert decoded_documents(tmp_path / "out")["train"] == DOCS[:2]


def test_stdlib_corpus(tmp_path):
    lines = []
    manifest = prepare_local(source="stdlib", out=tmp_path / "std", context_len=128, log=lines.append, progress=False)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["documents"] > 1000 and train["tokens"] > 5_000_000 and val["documents"] > 100
    assert manifest["inputs"]["files"] == len(stdlib_files())
    assert "site-packages" not in "".join(str(p) for p in stdlib_files())
    assert lines[-1].startswith("prepared ") and "tokens/s" in lines[-1]


# ----------------------------------------------------------------------------- re-runs and atomicity


def test_rerun_is_a_noop_and_changed_input_rebuilds(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text(DOCS[0] * 3)
    out = tmp_path / "out"
    prepare_local([str(src)], out, **quiet())
    stamp = (out / "manifest.json").stat().st_mtime_ns
    lines = []
    prepare_local([str(src)], out, context_len=8, log=lines.append, progress=False)
    assert "up to date" in lines[0] and (out / "manifest.json").stat().st_mtime_ns == stamp

    src.write_text(DOCS[1] * 3)
    prepare_local([str(src)], out, **quiet())
    assert decoded_documents(out)["train"] == [DOCS[1] * 3]

    prepare_local([str(src)], out, **quiet(val_fraction=0.5))  # changed options rebuild too
    assert load_manifest(out)["options"]["val_fraction"] == 0.5


def test_interrupted_prepare_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    src = tmp_path / "a.txt"
    src.write_text(" ".join(DOCS * 50))

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_local([str(src)], tmp_path / "out", shard_tokens=50, **quiet())
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]  # no out/, no temporary folder


def test_interrupted_rebuild_keeps_the_old_complete_folder(tmp_path, monkeypatch):
    src = tmp_path / "a.txt"
    src.write_text(DOCS[0] * 5)
    prepare_local([str(src)], tmp_path / "out", **quiet())
    src.write_text(DOCS[1] * 5)
    monkeypatch.setattr(prepare_module, "write_shard", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prepare_local([str(src)], tmp_path / "out", **quiet())
    assert decoded_documents(tmp_path / "out")["train"] == [DOCS[0] * 5]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0] * 5)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not a raygpt data folder"):
        prepare_local([str(tmp_path / "a.txt")], tmp_path / "mine", **quiet())
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_a_rebuild_never_deletes_what_raygpt_did_not_write(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0] * 5)
    (tmp_path / "b.txt").write_text(DOCS[1] * 5)
    out = tmp_path / "d"
    prepare_local([str(tmp_path / "a.txt")], out, **quiet())
    (out / "NOTES.md").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "x.txt").write_text("mine too")
    with pytest.raises(UserError, match=r"holds files raygpt did not write \(NOTES.md, sub/\).*--force"):
        prepare_local([str(tmp_path / "b.txt")], out, **quiet())
    assert decoded_documents(out)["train"] == [DOCS[0] * 5]  # untouched
    prepare_local([str(tmp_path / "b.txt")], out, **quiet(force=True))  # only raygpt's files replaced
    assert decoded_documents(out)["train"] == [DOCS[1] * 5]
    assert (out / "NOTES.md").read_text() == "mine" and (out / "sub" / "x.txt").read_text() == "mine too"
    own = {"manifest.json"} | {s["file"] for sp in ("train", "val") for s in load_manifest(out)["splits"][sp]["shards"]}
    assert set(os.listdir(out)) == own | {"NOTES.md", "sub"}


def test_force_into_a_folder_of_other_files_writes_beside_them(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0] * 5)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    prepare_local([str(tmp_path / "a.txt")], tmp_path / "mine", **quiet(force=True))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert decoded_documents(tmp_path / "mine")["train"] == [DOCS[0] * 5]


def test_a_symlinked_out_stays_a_link_to_the_rebuilt_folder(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0] * 5)
    prepare_local([str(tmp_path / "a.txt")], tmp_path / "real", **quiet())
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "a.txt").write_text(DOCS[2] * 5)
    prepare_local([str(tmp_path / "a.txt")], tmp_path / "link", **quiet())
    assert (tmp_path / "link").is_symlink() and decoded_documents(tmp_path / "real")["train"] == [DOCS[2] * 5]


def _dead_pid() -> int:
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def test_a_killed_prepares_temporary_folder_is_removed_by_the_next(tmp_path):
    from raygpt import storage

    (tmp_path / "a.txt").write_text(DOCS[0] * 5)
    prefix = storage.temp_prefix("d").replace(str(os.getpid()), str(_dead_pid()))
    abandoned = tmp_path / f"{prefix}x1"
    abandoned.mkdir()
    (abandoned / "train-00000.arrow").write_bytes(b"half a shard")
    prepare_local([str(tmp_path / "a.txt")], tmp_path / "d", **quiet())
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "d"]


def test_a_rebuild_killed_between_its_renames_gets_the_old_folder_back(tmp_path):
    import socket

    (tmp_path / "a.txt").write_text(DOCS[0] * 5)
    prepare_local([str(tmp_path / "a.txt")], tmp_path / "d", **quiet())
    (tmp_path / "d").rename(tmp_path / f".d.old-{socket.gethostname()}-{_dead_pid()}")
    lines = []
    prepare_local([str(tmp_path / "a.txt")], tmp_path / "d", context_len=8, log=lines.append, progress=False)
    assert "restored" in lines[0] and "up to date" in lines[1]
    assert decoded_documents(tmp_path / "d")["train"] == [DOCS[0] * 5]


# ----------------------------------------------------------------------------- bad input, via the CLI


def test_cli_missing_path(run_cli, tmp_path):
    err = one_line_error(run_cli, "prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"))
    assert "input path does not exist" in err and "nope.txt" in err


def test_cli_glob_matching_nothing(run_cli, tmp_path):
    err = one_line_error(run_cli, "prepare", str(tmp_path / "*.jsonl"), "--out", str(tmp_path / "o"))
    assert "glob matches no file" in err


def test_cli_empty_corpus(run_cli, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    err = one_line_error(run_cli, "prepare", str(tmp_path / "empty.txt"), str(tmp_path / "blank.jsonl"),
                          "--out", str(tmp_path / "o"))
    assert "empty corpus" in err
    assert not (tmp_path / "o").exists()


def test_cli_bad_jsonl_line_names_file_and_line(run_cli, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": broken\n')
    err = one_line_error(run_cli, "prepare", str(src), "--out", str(tmp_path / "o"))
    assert f"{src}:3: not valid JSON" in err


def test_cli_jsonl_without_text_field(run_cli, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"content": "x"}\n')
    err = one_line_error(run_cli, "prepare", str(src), "--out", str(tmp_path / "o"))
    assert f"{src}:1: expected a JSON object with a string 'text' field" in err


def test_cli_parquet_without_text_column_names_its_columns(run_cli, tmp_path):
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), tmp_path / "c.parquet")
    err = one_line_error(run_cli, "prepare", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "o"))
    assert "no 'text' column (columns: id, body)" in err


def test_cli_corpus_too_small_for_one_window(run_cli, tmp_path):
    (tmp_path / "a.txt").write_text("just a few tokens")
    err = one_line_error(run_cli, "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"),
                          "--context-len", "64")
    assert "corpus too small" in err and "context_len + 1 = 65" in err
    assert not (tmp_path / "o").exists()


def test_cli_unsupported_file_type(run_cli, tmp_path):
    (tmp_path / "a.csv").write_text("x")
    err = one_line_error(run_cli, "prepare", str(tmp_path / "a.csv"), "--out", str(tmp_path / "o"))
    assert "unsupported input" in err


def test_cli_nothing_to_prepare(run_cli):
    assert "nothing to prepare" in one_line_error(run_cli, "prepare")


def test_undecodable_bytes_are_replaced_and_counted(run_cli, tmp_path):
    (tmp_path / "good.txt").write_text(DOCS[0] * 3)
    (tmp_path / "bad1.txt").write_bytes(b"caf\xe9 latin-1 bytes " * 5)
    (tmp_path / "bad2.txt").write_bytes(b"\xff\xfe broken " * 5)
    code, out, err = run_cli("prepare", str(tmp_path / "*.txt"), "--out", str(tmp_path / "o"),
                             "--context-len", "8", "--val-fraction", "0")
    assert code == 0, err
    assert "undecodable bytes replaced in 2 file(s)" in out
    assert "caf\ufffd latin-1" in decoded_documents(tmp_path / "o")["train"][0]


def test_cli_prepare_with_config_uses_its_data_dir(run_cli, tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(DOCS * 10))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  preset: tiny\ndata:\n  dir: {tmp_path / 'from-config'}\n")
    code, out, err = run_cli("prepare", str(tmp_path / "a.txt"), "--config", str(cfg), "--val-fraction", "0")
    assert code == 0, err
    assert (tmp_path / "from-config" / "manifest.json").is_file()


@pytest.mark.parametrize("option, value, said", [
    ("--shard-tokens", "0", "--shard-tokens must be > 0, got 0"),
    ("--context-len", "0", "--context-len must be > 0, got 0"),
    ("--threads", "-1", "--threads must be >= 1, got -1"),
])
def test_cli_zero_or_negative_sizes_are_refused_not_replaced(run_cli, tmp_path, option, value, said):
    (tmp_path / "a.txt").write_text(DOCS[0] * 5)
    err = one_line_error(run_cli, "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), option, value)
    assert said in err


def test_cli_parquet_text_column_of_numbers(run_cli, tmp_path):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    err = one_line_error(run_cli, "prepare", str(tmp_path / "ints.parquet"), "--out", str(tmp_path / "d"))
    assert "parquet column 'text' holds int64, expected strings" in err


def test_cli_out_that_cannot_be_written(run_cli, tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0] * 5)
    (tmp_path / "file").write_text("not a folder")
    err = one_line_error(run_cli, "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "file" / "d"))
    assert f"cannot write --out {tmp_path / 'file' / 'd'}" in err


def test_without_a_terminal_prepare_prints_progress_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "PROGRESS_LINE_S", 0.0)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS * 20))
    said = []
    prepare_local([str(tmp_path / "a.jsonl")], tmp_path / "out", context_len=4, progress=False, log=said.append)
    lines = [line for line in said if line.startswith("prepare: ")]
    assert len(lines) >= 10 and all(" MB read, " in line and line.endswith(" tokens/s") for line in lines)


def test_windows_over_a_prepared_folder(tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(DOCS * 20))
    prepare_local([str(tmp_path / "a.txt")], tmp_path / "out", val_fraction=0.0, shard_tokens=100, **quiet())
    ds = WindowDataset(tmp_path / "out", "train", context_len=32, stride=16)
    ids = gpt2_encoding().encode_ordinary(" ".join(DOCS * 20))
    assert len(ds) == num_windows(len(ids) + 1, 32, 16)
    x, y = ds[3]
    assert x.tolist() == ids[48:80] and y.tolist() == ids[49:81]


# ----------------------------------------------------------------------------- hostile inputs


@pytest.fixture
def never_read(monkeypatch):
    """Fail at once if prepare gets as far as reading its inputs: a FIFO would block it forever,
    /dev/zero would fill memory. A refused input never gets there."""

    def read(*args, **kw):
        raise AssertionError("prepare went on to read an input that is not a regular file")

    monkeypatch.setattr(prepare_module, "_tokenize_to", read)


def test_cli_a_fifo_input_is_refused_not_waited_on(run_cli, tmp_path, never_read):
    os.mkfifo(tmp_path / "pipe.txt")
    err = one_line_error(run_cli, "prepare", str(tmp_path / "pipe.txt"), "--out", str(tmp_path / "o"))
    assert f"input {tmp_path / 'pipe.txt'} is a FIFO, not a regular file" in err
    assert not (tmp_path / "o").exists()


def test_cli_a_link_to_a_device_is_refused_not_read(run_cli, tmp_path, never_read):
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    err = one_line_error(run_cli, "prepare", str(tmp_path / "zero.txt"), "--out", str(tmp_path / "o"))
    assert f"input {tmp_path / 'zero.txt'} links to a device, not a regular file" in err


def test_a_fifo_or_device_in_a_folder_or_glob_is_skipped(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(DOCS[0])
    os.mkfifo(corpus / "b.txt")
    (corpus / "c.txt").symlink_to("/dev/zero")
    prepare_local([str(corpus)], tmp_path / "o1", val_fraction=0.0, **quiet())
    prepare_local([str(corpus / "*.txt")], tmp_path / "o2", val_fraction=0.0, **quiet())
    assert decoded_documents(tmp_path / "o1")["train"] == decoded_documents(tmp_path / "o2")["train"] == [DOCS[0]]


def test_a_link_to_a_regular_file_is_read(tmp_path):
    (tmp_path / "real.txt").write_text(DOCS[0])
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    prepare_local([str(tmp_path / "link.txt")], tmp_path / "o", val_fraction=0.0, **quiet())
    assert decoded_documents(tmp_path / "o")["train"] == [DOCS[0]]


def test_cli_lone_surrogates_in_jsonl_are_replaced_and_counted(run_cli, tmp_path):
    src = tmp_path / "c.jsonl"
    # JSON escapes: a lone high and a lone low surrogate (no character), and a proper pair (🎉).
    src.write_text('{"text": "lone \\ud800 high, lone \\udfff low"}\n{"text": "a pair \\ud83c\\udf89 is fine"}\n')
    code, out, err = run_cli("prepare", str(src), "--out", str(tmp_path / "o"), "--context-len", "4",
                             "--val-fraction", "0")
    assert code == 0, err
    assert "undecodable bytes replaced in 1 file(s)" in out
    assert decoded_documents(tmp_path / "o")["train"] == ["lone \ufffd high, lone \ufffd low", "a pair 🎉 is fine"]


def test_cli_invalid_utf8_in_a_parquet_text_column_is_replaced_and_counted(run_cli, tmp_path):
    parts = [b"caf\xe9 ok", b"\xed\xa0\x80 surrogate bytes", b"fine text"]  # pyarrow checks none of them
    offsets = np.cumsum([0] + [len(p) for p in parts], dtype=np.int32)
    column = pa.Array.from_buffers(pa.string(), len(parts), [None, pa.py_buffer(offsets.tobytes()),
                                                             pa.py_buffer(b"".join(parts))])
    pq.write_table(pa.table({"text": column}), tmp_path / "c.parquet")
    code, out, err = run_cli("prepare", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "o"),
                             "--context-len", "4", "--val-fraction", "0")
    assert code == 0, err
    assert "undecodable bytes replaced in 1 file(s)" in out
    assert decoded_documents(tmp_path / "o")["train"] == ["caf\ufffd ok", "\ufffd\ufffd\ufffd surrogate bytes",
                                                          "fine text"]


def _damaged_parquets(tmp_path):
    """A parquet file of several row groups, and copies damaged four ways."""
    pq.write_table(pa.table({"text": [f"document number {i}, some words" for i in range(5000)]}),
                   tmp_path / "good.parquet", row_group_size=1000)
    data = (tmp_path / "good.parquet").read_bytes()
    scrambled = bytearray(data)
    for i in range(200, len(data) // 2):
        scrambled[i] = (scrambled[i] * 7 + 13) % 256
    damaged = {
        "truncated": data[:len(data) // 2],
        "random": bytes(range(256)) * 4,
        "scrambled": bytes(scrambled),  # a sound footer over corrupt pages: fails only while reading
        "holed": data[:100] + data[-2000:],  # the footer points at pages that are not there
    }
    for name, content in damaged.items():
        (tmp_path / f"{name}.parquet").write_bytes(content)
    return list(damaged)


def test_cli_a_damaged_parquet_file_is_named_in_one_line(run_cli, tmp_path):
    for name in _damaged_parquets(tmp_path):
        path = tmp_path / f"{name}.parquet"
        err = one_line_error(run_cli, "prepare", str(path), "--out", str(tmp_path / f"o-{name}"))
        assert f"{path}: not a readable parquet file" in err, name
        assert not (tmp_path / f"o-{name}").exists()


def test_cli_out_uri_of_a_file(run_cli, tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0] * 5)
    (tmp_path / "afile").write_text("precious")
    err = one_line_error(run_cli, "prepare", str(tmp_path / "a.txt"), "--out", f"file://{tmp_path / 'afile'}")
    assert "is a file, not a folder" in err
    assert (tmp_path / "afile").read_text() == "precious"


def test_cli_out_path_of_a_file(run_cli, tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0] * 5)
    (tmp_path / "afile").write_text("precious")
    err = one_line_error(run_cli, "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "afile"))
    assert "is a file, not a folder" in err
    assert (tmp_path / "afile").read_text() == "precious"


@pytest.mark.parametrize("name", ["br[1].txt", "star*.txt", "what?.jsonl"])
def test_an_existing_file_named_like_a_glob_is_taken_literally(tmp_path, name):
    (tmp_path / name).write_text(json.dumps({"text": DOCS[0]}) + "\n" if name.endswith(".jsonl") else DOCS[0])
    (tmp_path / "br1.txt").write_text(DOCS[1])  # what the name would match as a glob
    (tmp_path / "star-other.txt").write_text(DOCS[1])
    (tmp_path / "whatX.jsonl").write_text(json.dumps({"text": DOCS[1]}) + "\n")
    prepare_local([str(tmp_path / name)], tmp_path / "o", val_fraction=0.0, **quiet())
    assert decoded_documents(tmp_path / "o")["train"] == [DOCS[0]]


def test_a_missing_path_with_glob_characters_is_still_a_glob(tmp_path):
    (tmp_path / "br1.txt").write_text(DOCS[1])
    prepare_local([str(tmp_path / "br[1].txt")], tmp_path / "o", val_fraction=0.0, **quiet())
    assert decoded_documents(tmp_path / "o")["train"] == [DOCS[1]]


def test_a_jsonl_line_nested_past_the_recursion_limit_is_one_line(run_cli, tmp_path):
    (tmp_path / "deep.jsonl").write_text('{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    err = one_line_error(run_cli, "prepare", str(tmp_path / "deep.jsonl"), "--out", str(tmp_path / "out"))
    assert "deep.jsonl:1: not valid JSON (nested too deeply)" in err
