"""GPT-2 BPE tokenizer, offline.

tiktoken's `get_encoding("gpt2")` downloads its ranks on first use; raygpt ships them instead.
`assets/gpt2.tiktoken` is `whisper/assets/gpt2.tiktoken` from the openai-whisper sdist
(MIT, see `assets/gpt2.tiktoken.LICENSE`); it holds the same ranks as tiktoken's r50k_base.
"""

from __future__ import annotations

import base64
import functools
from importlib import resources

import tiktoken

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
# The pre-tokenization regex of GPT-2, as in tiktoken_ext/openai_public.py.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _load_ranks() -> dict[bytes, int]:
    data = resources.files("raygpt").joinpath("assets/gpt2.tiktoken").read_bytes()
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding (n_vocab 50257, `<|endoftext|>` = 50256), built from package data."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=_load_ranks(),
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=50257,
    )
