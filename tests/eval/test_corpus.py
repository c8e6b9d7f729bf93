"""Tests for jqtz.eval.corpus."""

import re
from pydoc_data.topics import topics

import pytest

from jqtz.eval import default_corpus, default_sentences, load_text


def test_default_corpus_is_deterministic_and_clean():
    text = default_corpus()
    assert text == default_corpus()
    assert "\n\n\n" not in text
    assert not any(re.fullmatch(r"([*=\-~^])\1{2,}", line) for line in text.splitlines())
    assert all(line == line.rstrip() for line in text.splitlines())
    # pages in sorted key order: each page's title line follows the previous page's
    position = 0
    for key in sorted(topics):
        title = "\n" + topics[key].splitlines()[0].rstrip() + "\n\n"
        position = ("\n" + text).index(title, position) + len(title)
    assert len(text) > 0.9 * sum(len(page) for page in topics.values())


@pytest.mark.parametrize("n", [1, 16, 256])
def test_default_sentences(n):
    sentences = default_sentences(n)
    assert sentences == default_sentences(n)
    assert len(sentences) == len(set(sentences)) == n
    text = " ".join(default_corpus().split())
    positions = [text.index(s) for s in sentences]
    assert positions == sorted(positions)  # corpus order, spread over the corpus
    assert all(6 <= len(s.split()) <= 40 and s[0].isupper() for s in sentences)
    if n == 256:
        assert positions[-1] > 0.9 * len(text)


def test_default_sentences_errors():
    with pytest.raises(ValueError, match="positive integer"):
        default_sentences(0)
    with pytest.raises(ValueError, match="exceeds the"):
        default_sentences(10**6)


def test_load_text(tmp_path):
    assert load_text() == default_corpus()
    path = tmp_path / "t.txt"
    path.write_text("héllo\n\nworld\n", encoding="utf-8")
    assert load_text(path) == "héllo\n\nworld\n"
    assert load_text(str(path)) == "héllo\n\nworld\n"
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("h\xe9llo".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text(tmp_path / "latin1.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty.txt")
