"""GPT-2 BPE tokenizer, offline.

tiktoken's `get_encoding("gpt2")` downloads its ranks on first use; raygpt ships them instead.
`assets/gpt2.tiktoken` is `whisper/assets/gpt2.tiktoken` from the openai-whisper sdist
(MIT, see `assets/gpt2.tiktoken.LICENSE`); it holds the same ranks as tiktoken's r50k_base.
"""

from __future__ import annotations

import base64
import functools
from importlib import resources
from typing import Iterator

import tiktoken

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
# The pre-tokenization regex of GPT-2, as in tiktoken_ext/openai_public.py.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Longest text handed to tiktoken at once. Its BPE holds ~45 bytes per character of one
# pre-tokenizer piece, so a 60 MB line with no spaces (minified code, base64) took ~3 GB.
MAX_ENCODE_CHARS = 1 << 18


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


def text_chunks(text: str, max_chars: int = MAX_ENCODE_CHARS) -> Iterator[str]:
    """`text` in consecutive chunks of at most `max_chars` characters, each cut just before a
    space that sits between two non-space characters ("x| y").

    The pattern always starts a piece at such a space (" y" matches ` ?\\p{L}+`, ` ?\\p{N}+` or
    ` ?[^\\s\\p{L}\\p{N}]+`) and no piece runs across it, so encoding the chunks one by one gives
    exactly the ids of encoding the whole text. A stretch of `max_chars` with no such space is cut
    where the limit falls; only the ids at that cut may differ from encoding it whole.
    """
    start = 0
    while len(text) - start > max_chars:
        limit = start + max_chars
        cut = limit + 1
        while True:  # the last word-start space at or before the limit
            cut = text.rfind(" ", start + 1, cut)
            if cut == -1:
                cut = limit
                break
            if not text[cut - 1].isspace() and cut + 1 < len(text) and not text[cut + 1].isspace():
                break
        yield text[start:cut]
        start = cut
    yield text[start:]
