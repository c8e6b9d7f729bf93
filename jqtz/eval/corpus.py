"""Text sources for evaluation and calibration: a file, or the built-in default corpus.

The default corpus is Python's own documentation as shipped in the standard library
(`pydoc_data.topics.topics`: 79 pages, about 490 K characters on Python 3.12), so that a command
works on a fresh machine with no download. Its construction is deterministic:

1. pages in sorted order of their topic key (`"assert"`, `"assignment"`, ...);
2. in each page, trailing whitespace is stripped from every line, reStructuredText title
   underlines (a line of one repeated `*`, `=`, `-`, `~` or `^`, three or more) are dropped, and
   runs of blank lines collapse to one;
3. pages are joined by one blank line.

Code and grammar blocks (indented lines) are kept: the text is English prose with some Python, a
deliberately different domain from the stories or Shakespeare that models are often evaluated on.
The pages change between Python versions, so numbers measured on it should name the version
(`sys.version_info[:2]`); within one version the text is fixed.

Example:
    >>> text = default_corpus()
    >>> text.startswith('The "assert" statement')
    True
    >>> len(default_sentences(8))
    8
"""

from __future__ import annotations

import os
import pathlib
import re

__all__ = ["default_corpus", "default_sentences", "load_text"]

_UNDERLINE = re.compile(r"([*=\-~^])\1{2,}")
# A sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by whitespace
# and an upper-case letter, an opening quote or bracket.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[A-Z\"“(])")


def _clean_page(page: str) -> str:
    lines = []
    for line in page.splitlines():
        line = line.rstrip()
        if _UNDERLINE.fullmatch(line):
            continue
        if not line and (not lines or not lines[-1]):
            continue
        lines.append(line)
    return "\n".join(lines).strip("\n")


def default_corpus() -> str:
    """The default English corpus: Python's documentation pages from `pydoc_data`, cleaned.

    Returns:
        One string, the same on every call and machine for a given Python minor version (see the
        module docstring for the order and cleaning).

    Example:
        >>> "\\n\\n\\n" in default_corpus()
        False
    """
    from pydoc_data.topics import topics

    return "\n\n".join(_clean_page(topics[key]) for key in sorted(topics))


def load_text(source: str | os.PathLike | None = None) -> str:
    """Text from a UTF-8 file, or the default corpus when `source` is None.

    Args:
        source: a path to a text file, or None for :func:`default_corpus`.

    Returns:
        The file's text, unchanged (so that perplexity is measured on exactly what was given).

    Raises:
        FileNotFoundError: `source` is not a file.
        ValueError: the file is not UTF-8 or is empty.

    Example:
        >>> load_text() == default_corpus()
        True
    """
    if source is None:
        return default_corpus()
    path = pathlib.Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"`source` {str(path)!r} is not a file; pass a text file or None.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"`source` {str(path)!r} is not UTF-8 text ({err}); convert it to UTF-8."
        ) from err
    if not text.strip():
        raise ValueError(f"`source` {str(path)!r} is empty.")
    return text


def _prose_sentences(text: str, *, min_words: int, max_words: int) -> list[str]:
    """Sentences of the unindented paragraphs of `text`, in order, first occurrence only."""
    seen: set[str] = set()
    sentences = []
    for paragraph in text.split("\n\n"):
        lines = paragraph.splitlines()
        if not lines or any(line[:1].isspace() for line in lines):
            continue  # code, grammar and indented examples
        prose = " ".join(line.strip() for line in lines)
        for sentence in _SENTENCE_END.split(prose):
            sentence = " ".join(sentence.split())
            n_words = len(sentence.split())
            if (
                min_words <= n_words <= max_words
                and sentence[:1].isupper()
                and sentence[-1:] in ".!?"
                and sentence not in seen
            ):
                seen.add(sentence)
                sentences.append(sentence)
    return sentences


def default_sentences(n: int = 256, *, min_words: int = 6, max_words: int = 40) -> list[str]:
    """`n` English sentences spread evenly over the default corpus, deterministically.

    Sentences come from the prose paragraphs of :func:`default_corpus` (indented code and grammar
    blocks are skipped), keep only those of `min_words` to `max_words` words that start with a
    capital and end with `.`, `!` or `?`, drop repeats, and take `n` of them at evenly spaced
    positions, so that every part of the documentation is represented.

    Args:
        n: how many sentences; at most the number of candidates (about 1,200 on Python 3.12).
        min_words, max_words: inclusive word-count bounds.

    Returns:
        `n` distinct sentences, in corpus order.

    Raises:
        ValueError: `n` is not a positive integer or exceeds the number of candidates.

    Example:
        >>> s = default_sentences(4)
        >>> len(set(s)), all(x.endswith((".", "!", "?")) for x in s)
        (4, True)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n!r}.")
    candidates = _prose_sentences(default_corpus(), min_words=min_words, max_words=max_words)
    if n > len(candidates):
        raise ValueError(
            f"`n`={n} exceeds the {len(candidates)} sentences of {min_words}-{max_words} words in "
            "the default corpus; ask for fewer or widen `min_words`/`max_words`."
        )
    return [candidates[i * len(candidates) // n] for i in range(n)]
