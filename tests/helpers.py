"""Shared set-up for tests that train: a small prepared corpus and tiny configs."""

import json
from pathlib import Path

import numpy as np

from raygpt.config import Config, load_config
from raygpt.data.prepare import prepare_local, write_shard

CORPUS = (
    "def add(a, b):\n    return a + b\n\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, item):\n        self.items.append(item)\n\n"
    "    def pop(self):\n        return self.items.pop()\n\n"
    "for i in range(10):\n    print(i, add(i, i))\n"
)


def make_corpus(folder: Path) -> Path:
    """~60 small documents (about 7k train tokens), prepared into folder/data."""
    src = folder / "src"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(60):
        (src / f"doc{i:02d}.txt").write_text(f"# file {i}\n" + CORPUS.replace("10", str(i + 3)))
    out = folder / "data"
    prepare_local([str(src)], out, val_fraction=0.2, context_len=16, log=lambda *a: None, progress=False)
    return out


def tiny_overrides(data_dir: Path | str, storage: Path | str) -> list[str]:
    """`--set` values for a model small enough for seconds per run: 32 wide, 2 layers, context 16;
    evals of 256 tokens per split (1,024 at the last report)."""
    return [
        "model.preset=null", "model.embedding_dim=32", "model.num_layers=2", "model.num_heads=2",
        "model.context_len=16", "model.dropout=0.0", f"data.dir={data_dir}", "data.source=null",
        f"run.storage_path={storage}", "train.batch_size=8", "train.max_steps=12", "train.eval_freq=4",
        "train.save_freq=4", "train.eval_iter=2", "train.eval_tokens=256", "train.final_eval_tokens=1024",
        "train.seed=7", "optim.peak_lr=0.01", "optim.initial_lr=0.001",
        "optim.min_lr=0.001", "optim.warmup_steps=2", "run.num_workers=1",
    ]


def tiny_config(data_dir: Path | str, storage: Path | str, *overrides: str) -> Config:
    return load_config(None, tiny_overrides(data_dir, storage) + list(overrides))


def prose_documents() -> list[str]:
    """English prose: the 79 documents of `pydoc_data.topics` (Python's reference documentation as
    `help()` shows it, ~465 KB), in key order. Always present with Python."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def make_prose_corpus(folder: Path, *, easy_head: str | None = None, val_fraction: float = 0.2) -> Path:
    """A second kind of text beside the code of `make_corpus`: the pydoc topics prepared into
    folder/data (every 1/val_fraction-th document to val: at 0.2, 15 documents, 10k val tokens;
    31k with `easy_head`, which shifts which documents land in val).

    `easy_head`: a document placed first in both splits (the first train and the first val
    document), so the val split starts with text unlike the rest of it."""
    from raygpt.data.prepare import is_val_document

    docs = prose_documents()
    if easy_head is not None:
        first_val = next(i for i in range(len(docs)) if is_val_document(i, val_fraction))
        docs = [easy_head] + docs[:first_val - 1] + [easy_head] + docs[first_val - 1:]
        assert is_val_document(first_val, val_fraction) and not is_val_document(0, val_fraction)
    src = folder / "src"
    src.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (src / f"doc{i:03d}.txt").write_text(text)
    out = folder / "data"
    prepare_local([str(src)], out, val_fraction=val_fraction, context_len=16, log=lambda *a: None, progress=False)
    return out


def search_raw(data_dir: Path | str, storage: Path | str, space: dict | None = None, **tune) -> dict:
    """A search file (as a dict) over the tiny config: by default peak_lr x batch_size, the
    learning rates listed weakest first (0.0001 is below initial_lr: refused before launch)."""
    base = tiny_config(data_dir, storage, "train.eval_freq=2", "train.save_freq=6", "run.num_to_keep=1").to_dict()
    base["run"]["name"] = None
    return {**base, "search": space or {"optim.peak_lr": {"grid": [0.0001, 0.002, 0.005, 0.03]},
                                        "train.batch_size": {"grid": [4, 8]}},
            "tune": {"grace_period": 2, "reduction_factor": 2, "max_concurrent_trials": 2, **tune}}


def one_line_error(run_cli, *args) -> str:
    """The error of a `raygpt` command that must fail on bad input: exit 2, one line, no traceback."""
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    assert err.startswith("raygpt: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err



def folder_with_shards(tmp_path, sizes):
    """A hand-made prepared folder whose train split is 0..N-1 spread over shards of `sizes`."""
    start, shards = 0, []
    for k, n in enumerate(sizes):
        name = f"train-{k:05d}.arrow"
        write_shard(tmp_path / name, np.arange(start, start + n, dtype=np.uint16))
        shards.append({"file": name, "tokens": n})
        start += n
    manifest = {"splits": {"train": {"tokens": start, "shards": shards}, "val": {"tokens": 0, "shards": []}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def checkpoint_folder(folder: Path, weights: int) -> Path:
    """A checkpoint-shaped folder to upload: a sparse model.pt of `weights` bytes, optimizer.pt, state.json."""
    folder.mkdir()
    with open(folder / "model.pt", "wb") as f:
        f.truncate(weights)
    (folder / "optimizer.pt").write_bytes(b"o" * 1000)
    (folder / "state.json").write_text("{}")
    return folder


def kill_upload(src: Path, dest: str, delay: float) -> None:
    """`storage.upload(src, dest)` in another process, SIGKILLed `delay` seconds after it starts."""
    import subprocess
    import sys
    import time

    code = f"from raygpt import storage; print('go', flush=True); storage.upload({str(src)!r}, {dest!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    time.sleep(delay)
    proc.kill()
    proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, overrides, data_dir, run_dir):
    """One rank of a torchrun-like run without Ray (torch.multiprocessing.spawn calls this)."""
    import os

    import torch

    from raygpt.training.local import run_without_ray
    from raygpt.training.recovery import Preempted

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        run_without_ray(load_config(None, overrides), data_dir, run_dir)
    except Preempted:
        pass  # a SIGTERM leg: saved, and left as a preempted worker does
    except RuntimeError as exc:
        # ddp: a SIGTERM stops only the worker that got it; its peer loses the connection (under
        # Ray Train the worker group is stopped as a whole).
        stopping = any(o.startswith("fault.kind=sigterm") for o in overrides)
        if "Connection closed by peer" not in str(exc) or not stopping:
            raise


def run_workers(workers: int, overrides: list[str], data_dir, run_dir) -> None:
    """A run of `workers` processes without Ray, as torchrun starts them (gloo); 1: this process,
    with a process group of its own."""
    import os

    import torch

    overrides = overrides + [f"run.num_workers={workers}"]
    if workers == 1:
        os.environ.pop("WORLD_SIZE", None)
        _rank_main(0, 1, free_port(), overrides, str(data_dir), str(run_dir))
    else:
        torch.multiprocessing.spawn(_rank_main, args=(workers, free_port(), overrides, str(data_dir), str(run_dir)),
                                    nprocs=workers)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)


def plant_pickles(experiment: Path, marker: Path) -> Path:
    """Rewrite an experiment folder's pickled values (every CLOUDPICKLE_FALLBACK in its Tune
    experiment state, and every .pkl file) as pickles that create `marker` when unpickled."""
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Payload())

    def plant(value):
        if isinstance(value, dict):
            if value.get("_type") == "CLOUDPICKLE_FALLBACK":
                return {**value, "value": payload.hex()}
            return {k: plant(v) for k, v in value.items()}
        return [plant(v) for v in value] if isinstance(value, list) else value

    for state in experiment.glob("experiment_state-*.json"):
        data = json.loads(state.read_text())
        data["trial_data"] = [[json.dumps(plant(json.loads(t))), m] for t, m in data["trial_data"]]
        state.write_text(json.dumps(data))
    for pkl in experiment.rglob("*.pkl"):
        pkl.write_bytes(payload)
    return marker


def own_text_items(text: str, seed: int = 0) -> list:
    """A generic eval from training text: at every space inside a line, the text so far is the
    context and the rest of the line the right choice, beside 3 other lines' rests."""
    heads, tails, pos = [], [], 0
    for line in text.splitlines(keepends=True):
        for cut in [i for i, ch in enumerate(line) if ch == " " and line[:i].strip() and line[i + 1:].strip()]:
            heads.append(text[:pos + cut])
            tails.append(line[cut + 1:].rstrip("\n"))
        pos += len(line)
    import random

    from raygpt.multiple_choice import Item

    rng, items = random.Random(seed), []
    for head, tail in zip(heads, tails):
        choices = rng.sample(sorted({t for t in tails if t != tail}), 3) + [tail]
        rng.shuffle(choices)
        items.append(Item(head, tuple(choices), choices.index(tail)))
    return items


def write_choice_files(folder: Path) -> tuple[Path, Path]:
    """The code corpus's first document as a generic eval (own.jsonl, 20 items) and the same
    items in HellaSwag's schema (hellaswag.jsonl)."""
    items = own_text_items("# file 0\n" + CORPUS.replace("10", "3"))
    own, hs = folder / "own.jsonl", folder / "hellaswag.jsonl"
    own.write_text("".join(json.dumps({"context": i.context, "choices": list(i.choices), "label": i.label}) + "\n"
                           for i in items))
    def plain(text: str) -> str:  # HellaSwag's preprocessing drops [...] (WikiHow's headers)
        return text.replace("[", "(").replace("]", ")")

    hs.write_text("".join(json.dumps({"activity_label": "Code", "ctx_a": plain(i.context), "ctx_b": "",
                                      "endings": [plain(c) for c in i.choices], "label": i.label}) + "\n"
                          for i in items))
    return own, hs
