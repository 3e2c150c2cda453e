"""Shared set-up for tests that train: a small prepared corpus and tiny configs."""

from pathlib import Path

from raygpt.config import Config, load_config
from raygpt.data import prepare

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
    prepare([str(src)], out, val_fraction=0.2, context_len=16, log=lambda *a: None, progress=False)
    return out


def tiny_overrides(data_dir: Path | str, storage: Path | str) -> list[str]:
    """`--set` values for a model small enough for seconds per run: 32 wide, 2 layers, context 16."""
    return [
        "model.preset=null", "model.embedding_dim=32", "model.num_layers=2", "model.num_heads=2",
        "model.context_len=16", "model.dropout=0.0", f"data.dir={data_dir}", "data.source=null",
        f"run.storage_path={storage}", "train.batch_size=8", "train.max_steps=12", "train.eval_freq=4",
        "train.save_freq=4", "train.eval_iter=2", "train.seed=7", "optim.peak_lr=0.01", "optim.initial_lr=0.001",
        "optim.min_lr=0.001", "optim.warmup_steps=2", "run.num_workers=1",
    ]


def tiny_config(data_dir: Path | str, storage: Path | str, *overrides: str) -> Config:
    return load_config(None, tiny_overrides(data_dir, storage) + list(overrides))
