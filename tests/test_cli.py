"""The `raygpt` command's own words: what its help promises is what it does."""

import subprocess
import sys

from raygpt.config import load_config


def test_train_help_names_the_config_used_without_one():
    out = subprocess.run([sys.executable, "-m", "raygpt", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    said = " ".join(out.split())
    assert "jobs/pretrain.yaml's defaults" not in said  # it never loaded that file
    cfg = load_config(None, [])
    assert (cfg.model.embedding_dim, cfg.model.num_layers, cfg.data.dir) == (768, 12, "data/stdlib")
    assert "the built-in defaults, GPT-2 small on data.dir data/stdlib" in said
