import hashlib
import socket
import subprocess
import sys
from importlib import resources

import pytest

from raygpt import tokenizer
from raygpt.tokenizer import EOT_ID, gpt2_encoding


def test_recipe_vectors():
    enc = gpt2_encoding()
    assert enc.encode("every effort moves") == [16833, 3626, 6100]
    assert enc.encode("I really like") == [40, 1107, 588]


def test_vocabulary_and_end_of_text():
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_ID == 50256
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    # Ordinary encoding treats the marker as text, never as the special id.
    assert 50256 not in enc.encode_ordinary("a <|endoftext|> b")


def test_round_trip_of_code_and_unicode():
    enc = gpt2_encoding()
    text = "def f(x):\n    return x ** 2  # café ✓ 東京\n\n\tprint('héllo')\r\n"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_vendored_ranks_are_the_whisper_gpt2_file():
    data = resources.files("raygpt").joinpath("assets/gpt2.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def test_builds_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    tokenizer.gpt2_encoding.cache_clear()
    try:
        assert gpt2_encoding().encode("every effort moves") == [16833, 3626, 6100]
    finally:
        tokenizer.gpt2_encoding.cache_clear()


@pytest.mark.parametrize("text", ["", " ", "hello world", "x" * 5000, "<|endoftext|>"])
def test_numpy_encoding_matches_encode_ordinary(text):
    from raygpt.data.prepare import encode_document

    ids = encode_document(text)
    assert ids.tolist() == gpt2_encoding().encode_ordinary(text) + [EOT_ID]


# Texts of every kind of piece boundary the GPT-2 pattern has: words, numbers, punctuation,
# contractions, runs of spaces/newlines/tabs, non-Latin letters, and text with no spaces at all.
SPLIT_TEXTS = [
    "The quick brown fox, named Zoë, doesn't jump over 13 lazy dogs;  def f(x):\n\treturn x**2 \n\n  end",
    "def main():\n    for i in range(10):\n        print(i, 'it''s')   # comment  \n\n\n",
    "中文没有空格，标点把它分开。日本語も同じです！" * 7,
    "a" * 300 + " b" + " " * 40 + "c\n \n d" + "9" * 200 + " 3.14 ..." + "'ll 've 're " * 5,
]


@pytest.mark.parametrize("max_chars", [7, 16, 50, 1000])
@pytest.mark.parametrize("text", SPLIT_TEXTS)
def test_long_documents_are_encoded_in_pieces_with_the_same_ids(text, max_chars):
    from raygpt.data.prepare import encode_document
    from raygpt.tokenizer import text_chunks

    ids = encode_document(text, max_chars=max_chars).tolist()
    assert gpt2_encoding().decode(ids) == text + "<|endoftext|>"
    chunks = list(text_chunks(text, max_chars))
    if all(c.startswith(" ") and not c[1:2].isspace() for c in chunks[1:]):  # cut only at word starts
        assert ids == gpt2_encoding().encode_ordinary(text) + [EOT_ID]
    # prose and code always find a word start within 50 characters
    assert len(chunks) == 1 or max_chars < 50 or text not in SPLIT_TEXTS[:2] or chunks[1][0] == " "


def test_split_points_fall_only_where_the_pattern_splits():
    from raygpt.tokenizer import text_chunks

    text = SPLIT_TEXTS[0] * 20
    chunks = list(text_chunks(text, 40))
    assert "".join(chunks) == text
    assert all(0 < len(c) <= 40 for c in chunks)
    # each cut is before a space that starts a piece (" word", " 13", " (")
    assert all(c.startswith(" ") for c in chunks[1:])


def test_a_huge_document_with_no_spaces_is_tokenized_in_bounded_memory():
    # A 6M-character run of letters is one pre-tokenizer piece: tiktoken's BPE on it took ~45 bytes
    # per character (~270 MB here, ~2.7 GB for a 60 MB minified/base64 line). Pieces are now capped.
    code = (
        "import resource\n"
        "from raygpt.data.prepare import encode_document\n"
        "text = 'qwertyuiopasdfghjklzxcvbnm' * 240_000\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "ids = encode_document(text)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, len(ids))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    grown_mb, n_ids = map(int, out.split())
    assert n_ids > 1_000_000
    assert grown_mb < 80, f"peak memory grew {grown_mb} MB tokenizing a 6.2M-character run"
