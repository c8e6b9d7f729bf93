"""Shared real-data fixture for the PTQ tests."""

import pytest


@pytest.fixture(scope="module")
def stories260k(shared_data):
    """`(config, params, ids)`: stories260K and its first 2048 TinyStories tokens (BOS per
    paragraph) from `tinystories_train_head.txt`."""
    from jqtz.io.llama2c import SentencePieceTokenizer, load_llama2c

    config, params = load_llama2c(shared_data / "stories260K.bin")
    tok = SentencePieceTokenizer(shared_data / "tok512.model")
    ids = []
    for para in (shared_data / "tinystories_train_head.txt").read_text().split("\n\n"):
        ids += tok.encode(para.strip(), bos=True)
        if len(ids) >= 2048:
            break
    return config, params, ids[:2048]
