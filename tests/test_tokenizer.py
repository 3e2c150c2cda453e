import hashlib
import socket
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
    from raygpt.data import encode_document

    ids = encode_document(text)
    assert ids.tolist() == gpt2_encoding().encode_ordinary(text) + [EOT_ID]
