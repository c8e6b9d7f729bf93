"""Calibration data: N samples of L tokens, drawn deterministically from a text or a token array.

As in GPTQ, each sample is a random window of `seq_len` consecutive tokens of the tokenized
corpus (start positions from `numpy.random.default_rng(seed)`), so a long diverse text gives
diverse samples. GPTQ on small models fits its calibration domain (docs/ptq.md, "Choosing
calibration text"): calibrate on text like the text the model will serve, and say which.

Example:
  >>> import numpy as np
  >>> tokens = calibration_tokens(np.arange(10_000), n_samples=4, seq_len=16, seed=0)
  >>> tokens.shape, tokens.dtype
  ((4, 16), dtype('int32'))
"""

from __future__ import annotations

import numpy as np


def calibration_tokens(
    source, tokenizer=None, *, n_samples: int = 128, seq_len: int = 512, seed: int = 0
) -> np.ndarray:
    """`n_samples` windows of `seq_len` tokens from `source`.

    Args:
      source: a text (str), or a 1-D array of token ids.
      tokenizer: encodes a text source (`tokenizer.encode(text) -> list[int]`).
      n_samples: number of windows (default 128, as GPTQ and AWQ use).
      seq_len: tokens per window (default 512).
      seed: the sampling seed; the same arguments always give the same array.

    Returns:
      int32 `[n_samples, seq_len]`.

    Raises:
      ValueError: the source is empty or shorter than one window (the message gives the
        token count and what was asked for), or the sizes are not positive.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"`n_samples` and `seq_len` must be >= 1, got {n_samples}, {seq_len}")
    if isinstance(source, str):
        if tokenizer is None:
            raise ValueError("a text `source` needs a `tokenizer` to encode it")
        tokens = np.asarray(tokenizer.encode(source), dtype=np.int64)
    else:
        tokens = np.asarray(source)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"token `source` must be a 1-D integer array, got {tokens.dtype} {tokens.shape}"
            )
    if tokens.size < seq_len:
        raise ValueError(
            f"calibration data has {tokens.size} tokens, fewer than one window of "
            f"`seq_len`={seq_len}: give more text or a shorter seq_len"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, tokens.size - seq_len + 1, size=n_samples)
    return np.stack([tokens[s : s + seq_len] for s in starts]).astype(np.int32)
