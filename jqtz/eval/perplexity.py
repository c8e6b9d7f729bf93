"""Perplexity of a causal language model over a token stream, with a stated protocol.

Perplexity depends on how the text is cut into windows, so the protocol is fixed and returned
with every result (:attr:`PerplexityResult.protocol`):

1. **Tokens.** The whole text is tokenized once, with no BOS anywhere inside it
   (`tokenizer.encode(text, bos=False)`): N tokens.
2. **Windows.** The model always sees `ctx` tokens. With `bos=False` (default) a window is `ctx`
   consecutive text tokens; with `bos=True` it is one BOS followed by `ctx - 1` text tokens, so
   the model never runs past `ctx` positions. Let `L` be the text tokens per window (`ctx` or
   `ctx - 1`). Window `w` covers text tokens `[w * stride, w * stride + L)`; `stride` defaults to
   `L` (non-overlapping windows) and must be in `[1, L]`. Only whole windows are used: the text
   tail shorter than a window is not scored. `windows=k` keeps the first `k` windows.
3. **Scored tokens.** Each position predicts the next token. In the first window every
   predicted text token is scored: `L - 1` tokens without BOS (the first token has no context),
   `L` with BOS (the BOS predicts the first). In every later window only the tokens not scored
   before are: the last `stride` of its text tokens (at most `ctx - 1` without BOS), as in
   Hugging Face's sliding-window recipe. So every scored token is scored exactly once, and with
   `stride < L` each has at least `L - stride` tokens of context.
4. **Numerics.** Logits are cast to float32; NLL = logsumexp(logits) - logit[target]; per-window
   sums (float32) are accumulated in float64 on the host. Perplexity = exp(mean NLL over scored
   tokens).

Windows are evaluated `batch_size` at a time by one jitted function of the batch shape
`(batch_size, ctx)`; the last batch is padded with copies of a real window whose tokens are not
scored. Only per-window sums leave the device. The result is deterministic and, up to float32
rounding of the model itself, independent of `batch_size`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> uniform = lambda params, tokens: jnp.zeros(tokens.shape + (50,))  # (B, T, V=50)
    >>> r = perplexity(uniform, None, list(range(40)), ctx=8)
    >>> round(r.ppl, 4), r.n_windows, r.n_tokens
    (50.0, 5, 35)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PerplexityResult", "perplexity", "text_perplexity", "tokenize"]

ApplyFn = Callable[[Any, jax.Array], jax.Array]


class TextTokenizer(Protocol):
    """What :func:`text_perplexity` needs of a tokenizer (those of `jqtz.io` all qualify)."""

    bos_id: int | None

    def encode(self, text: str, *, bos: bool = False) -> list[int]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    """Perplexity and the protocol that produced it.

    Attributes:
        ppl: exp(nll).
        nll: mean next-token negative log-likelihood over scored tokens, in nats.
        n_tokens: number of scored tokens.
        n_windows: number of windows evaluated.
        ctx: tokens the model sees per window (BOS included when `bos`).
        stride: text tokens between the starts of consecutive windows.
        bos: whether each window starts with a BOS token.
        n_text_tokens: tokens in the whole text (scored or not).
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    ctx: int
    stride: int
    bos: bool
    n_text_tokens: int

    @property
    def protocol(self) -> str:
        """One line stating how the number was measured."""
        window = f"BOS + {self.ctx - 1} text tokens" if self.bos else f"{self.ctx} tokens"
        return (
            f"{self.n_windows} windows of {window}, stride {self.stride}, "
            f"{self.n_tokens} of {self.n_text_tokens} tokens scored once each, "
            "float32 next-token NLL, ppl = exp(mean NLL)"
        )

    @classmethod
    def from_sums(cls, total: float, count: int, w: _Windows) -> PerplexityResult:
        """The result of summed NLL `total` over `count` scored tokens of the windows `w`."""
        nll = total / count
        return cls(
            ppl=math.exp(nll),
            nll=nll,
            n_tokens=count,
            n_windows=len(w.inputs),
            ctx=w.ctx,
            stride=w.stride,
            bos=w.bos,
            n_text_tokens=w.n_text_tokens,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields and `protocol` as a JSON-ready dict."""
        return {**dataclasses.asdict(self), "protocol": self.protocol}


@dataclasses.dataclass(frozen=True)
class _Windows:
    inputs: np.ndarray  # (W, ctx) int32: what the model sees
    first: np.ndarray  # (W,) int32: the first scored position of each window (target index)
    starts: np.ndarray  # (W,) int: offset of each window's first text token
    ctx: int
    stride: int
    bos: bool
    n_text_tokens: int


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _as_tokens(tokens: Any) -> np.ndarray:
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(
            f"`tokens` must be one 1-D sequence of token ids (the whole text), got shape "
            f"{array.shape}; concatenate or flatten it first."
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"`tokens` must hold integer ids, got dtype {array.dtype}.")
    if array.size and array.min() < 0:
        raise ValueError(f"`tokens` must be non-negative ids, got {int(array.min())}.")
    return array.astype(np.int32)


def _make_windows(
    tokens: Any,
    *,
    ctx: int,
    stride: int | None,
    windows: int | None,
    bos: bool,
    bos_id: int | None,
) -> _Windows:
    """Cuts a token stream into the windows of the protocol in the module docstring."""
    tokens = _as_tokens(tokens)
    ctx = _check_int("ctx", ctx, 2)
    if bos and bos_id is None:
        raise ValueError("`bos=True` needs `bos_id` (the tokenizer's BOS id); got None.")
    if bos:
        bos_id = _check_int("bos_id", bos_id, 0)
    span = ctx - int(bos)  # text tokens per window
    stride = span if stride is None else _check_int("stride", stride, 1)
    if stride > span:
        raise ValueError(
            f"`stride` must be at most the {span} text tokens of a window (ctx={ctx}"
            f"{', one taken by BOS' if bos else ''}), got {stride}: a larger stride would skip "
            "tokens."
        )
    n = len(tokens)
    if n < span:
        raise ValueError(
            f"The text has {n} tokens, fewer than one window: ctx={ctx} needs {span} text tokens"
            f"{' after the BOS' if bos else ''}. Use a longer text or a smaller `ctx`."
        )
    available = (n - span) // stride + 1
    if windows is None:
        count = available
    else:
        count = _check_int("windows", windows, 1)
        if count > available:
            raise ValueError(
                f"`windows`={count} but the text's {n} tokens hold only {available} windows "
                f"(ctx={ctx}, stride={stride}, bos={bos}); pass windows={available} or None, or "
                "a longer text."
            )
    starts = np.arange(count) * stride
    inputs = tokens[starts[:, None] + np.arange(span)[None, :]]  # (W, span)
    if bos:
        inputs = np.concatenate([np.full((count, 1), bos_id, np.int32), inputs], axis=1)
    # Target position t (1 <= t < ctx) is predicted from position t - 1. Later windows score
    # their last `stride` targets only, never position 0.
    first = np.full(count, max(1, ctx - stride), np.int32)
    first[0] = 1
    return _Windows(inputs, first, starts, ctx, stride, bos, n)


def _batches(w: _Windows, batch_size: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(offset, real rows, inputs (B, ctx), first (B,)); padding rows copy a real window and
    score nothing (first = ctx)."""
    n = len(w.inputs)
    for offset in range(0, n, batch_size):
        inputs = w.inputs[offset : offset + batch_size]
        first = w.first[offset : offset + batch_size]
        real = len(inputs)
        if real < batch_size:
            pad = batch_size - real
            inputs = np.concatenate([inputs, np.repeat(inputs[-1:], pad, axis=0)])
            first = np.concatenate([first, np.full(pad, w.ctx, np.int32)])
        yield offset, real, inputs, first


def _logits(apply_fn: ApplyFn, params: Any, inputs: jax.Array) -> jax.Array:
    """apply_fn's float32 logits (B, T, V), after checking their shape (at trace time)."""
    logits = apply_fn(params, inputs)
    if getattr(logits, "ndim", None) != 3 or tuple(logits.shape[:2]) != tuple(inputs.shape):
        raise ValueError(
            f"`apply_fn(params, tokens)` must return logits (batch, seq_len, vocab) = "
            f"({inputs.shape[0]}, {inputs.shape[1]}, V) for tokens {tuple(inputs.shape)}, got "
            f"{getattr(logits, 'shape', type(logits).__name__)}."
        )
    return logits.astype(jnp.float32)


def _scored_mask(inputs: jax.Array, first: jax.Array) -> jax.Array:
    """(B, T-1) bool: prediction at position p (of target p + 1) is scored."""
    targets = jnp.arange(1, inputs.shape[1])
    return targets[None, :] >= first[:, None]


def _token_nll(logits: jax.Array, inputs: jax.Array) -> jax.Array:
    """(B, T-1) next-token NLL from float32 logits (B, T, V)."""
    logits = logits[:, :-1]
    target_logit = jnp.take_along_axis(logits, inputs[:, 1:, None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def _check_vocab(w: _Windows, vocab: int) -> None:
    """Token ids must index the logits; out of range, `take_along_axis` would give garbage."""
    top = int(w.inputs.max())
    if top >= vocab:
        raise ValueError(
            f"`tokens` hold id {top} but `apply_fn` returns logits over {vocab} tokens; the "
            "tokenizer does not match the model."
        )


def _bad_logits(logits: jax.Array) -> jax.Array:
    """(B,) bool: the window has a NaN or +inf logit (-inf is a legal masked logit)."""
    return jnp.any(jnp.isnan(logits) | jnp.isposinf(logits), axis=(1, 2))


@functools.partial(jax.jit, static_argnums=0)
def _nll_batch(
    apply_fn: ApplyFn, params: Any, inputs: jax.Array, first: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Per window (B,): sum of scored NLL, scored count, ok; and the vocabulary size V."""
    logits = _logits(apply_fn, params, inputs)  # (B, T, V)
    nll = _token_nll(logits, inputs)  # (B, T-1)
    mask = _scored_mask(inputs, first)  # (B, T-1)
    ok = ~_bad_logits(logits) & jnp.all(jnp.isfinite(nll) | ~mask, axis=1)
    return jnp.where(mask, nll, 0.0).sum(axis=1), mask.sum(axis=1), ok, logits.shape[-1]


def _check_apply_fn(apply_fn: Any) -> None:
    if not callable(apply_fn):
        raise TypeError(f"`apply_fn` must be callable, got {type(apply_fn).__name__}.")
    try:
        hash(apply_fn)
    except TypeError as err:
        raise TypeError(
            "`apply_fn` must be hashable (it is a static argument of the jitted step): pass a "
            "function, a bound method such as `model.apply`, or a functools.partial."
        ) from err


def _window_label(w: _Windows, index: int) -> str:
    start = int(w.starts[index])
    span = w.ctx - int(w.bos)
    return f"window {index} (text tokens [{start}, {start + span}))"


def perplexity(
    apply_fn: ApplyFn,
    params: Any,
    tokens: Sequence[int] | np.ndarray,
    *,
    ctx: int = 512,
    stride: int | None = None,
    windows: int | None = None,
    batch_size: int = 8,
    bos: bool = False,
    bos_id: int | None = None,
) -> PerplexityResult:
    """Perplexity of `apply_fn` on a token stream, by the protocol of the module docstring.

    Args:
        apply_fn: `apply_fn(params, tokens) -> logits`, int32 tokens (B, T) to logits (B, T, V).
            It is a static argument of `jax.jit`, so it must be hashable; reuse the same object
            across calls (e.g. one `model.apply`) to reuse the compiled function.
        params: the parameter tree, possibly holding `jqtz.QArray` leaves.
        tokens: the whole text's token ids, 1-D, with no BOS.
        ctx: tokens per window seen by the model (BOS included when `bos`).
        stride: text tokens between window starts; default: non-overlapping.
        windows: evaluate only the first this many windows; default: all whole windows.
        batch_size: windows per jitted call.
        bos: put `bos_id` at the start of every window (taking one of the `ctx` positions).
        bos_id: the BOS token id; required when `bos`.

    Returns:
        A :class:`PerplexityResult`.

    Raises:
        ValueError: bad arguments, a text shorter than one window (the message gives the token
            count and `ctx`), logits of the wrong shape, or non-finite logits or NLL (the
            message names the window).

    Example:
        >>> import jax.numpy as jnp
        >>> perfect = lambda p, t: 30.0 * jax.nn.one_hot(t + 1, 64)  # always right: t -> t+1
        >>> perplexity(perfect, None, jnp.arange(63), ctx=16, batch_size=2).ppl < 1.0001
        True
    """
    _check_apply_fn(apply_fn)
    batch_size = _check_int("batch_size", batch_size, 1)
    w = _make_windows(tokens, ctx=ctx, stride=stride, windows=windows, bos=bos, bos_id=bos_id)
    params = jax.device_put(params)
    total, count = 0.0, 0
    for offset, real, inputs, first in _batches(w, batch_size):
        sums, counts, ok, vocab = jax.device_get(_nll_batch(apply_fn, params, inputs, first))
        if offset == 0:
            _check_vocab(w, int(vocab))
        bad = np.flatnonzero(~ok[:real])
        if bad.size:
            raise ValueError(
                f"Non-finite logits or NLL in {_window_label(w, offset + int(bad[0]))}: the model "
                "produced NaN or inf; check the parameters (e.g. a quantization scale of 0 or "
                "inf) and the compute dtype."
            )
        total += float(np.sum(sums[:real], dtype=np.float64))
        count += int(np.sum(counts[:real]))
    return PerplexityResult.from_sums(total, count, w)


def tokenize(text: str, tokenizer: TextTokenizer) -> np.ndarray:
    """The whole `text` as one int32 token stream with no BOS (step 1 of the protocol).

    Example:
        >>> class Bytes:
        ...     bos_id = 256
        ...     def encode(self, text, *, bos=False):
        ...         return [self.bos_id] * bos + list(text.encode())
        >>> tokenize("hi", Bytes()).tolist()
        [104, 105]
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}.")
    return np.asarray(tokenizer.encode(text, bos=False), np.int32)


def text_perplexity(
    apply_fn: ApplyFn,
    params: Any,
    text: str,
    tokenizer: TextTokenizer,
    *,
    ctx: int = 512,
    stride: int | None = None,
    windows: int | None = None,
    batch_size: int = 8,
    bos: bool = False,
) -> PerplexityResult:
    """:func:`perplexity` of `text`, tokenized once by `tokenizer` (BOS from `tokenizer.bos_id`).

    Example:
        >>> from jqtz.io.llama2c import load_llama2c, SentencePieceTokenizer  # doctest: +SKIP
        >>> config, params = load_llama2c("stories260K.bin")  # doctest: +SKIP
        >>> model = Llama(config)  # doctest: +SKIP
        >>> r = text_perplexity(model.apply, params, text, SentencePieceTokenizer("tok512.model"),
        ...                     ctx=512)  # doctest: +SKIP
        >>> r.protocol  # doctest: +SKIP
    """
    tokens = tokenize(text, tokenizer)
    bos_id = getattr(tokenizer, "bos_id", None) if bos else None
    if bos and bos_id is None:
        raise ValueError("`bos=True` but the tokenizer has no `bos_id`; use bos=False.")
    return perplexity(
        apply_fn,
        params,
        tokens,
        ctx=ctx,
        stride=stride,
        windows=windows,
        batch_size=batch_size,
        bos=bos,
        bos_id=bos_id,
    )
