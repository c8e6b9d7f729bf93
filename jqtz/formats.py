"""Numeric formats: the value sets that quantized codes take, and how to encode and decode them.

A format maps *scaled* real values (already divided by their block's scale and shifted by its zero
point) to stored codes and back. It knows nothing of scales, blocks or trees: `QArray` does.

| name      | codes                                  | container     | `max_abs` |
|-----------|----------------------------------------|---------------|-----------|
| int8      | -128..127 (symmetric ranges use ±127)  | int8          | 127       |
| uint8     | 0..255, with zero points               | uint8         | 255       |
| int4/3/2  | two's complement, ±(2^(b-1)-1)         | packed uint8  | 7 / 3 / 1 |
| uint4/3/2 | 0..2^b-1, with zero points             | packed uint8  | 15 / 7 / 3|
| fp8_e4m3  | float8_e4m3fn, saturating              | float8_e4m3fn | 448       |
| fp8_e5m2  | float8_e5m2, saturating                | float8_e5m2   | 57344     |
| nf4       | index into the 16 QLoRA levels         | packed uint8  | 1.0       |

Symmetric scales are range / `max_abs`; unsigned formats span (max - min) / `max_abs`.
Sub-byte codes are packed along the last axis; `docs/formats.md` gives the layout bit by bit.

Example:
  >>> import jax.numpy as jnp
  >>> from jqtz import formats
  >>> fmt = formats.get("fp8_e4m3")
  >>> fmt.decode(fmt.encode(jnp.array([500.0, -1e6, 1.0]))).tolist()  # saturates, never NaN
  [448.0, -448.0, 1.0]
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

__all__ = ["NF4_LEVELS", "FloatFormat", "Format", "IntFormat", "LookupFormat", "get", "names"]

# The 16 NormalFloat-4 levels of QLoRA (Dettmers et al. 2023), as bitsandbytes stores them.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclasses.dataclass(frozen=True)
class Format:
    """Base class of numeric formats. Subclasses are frozen and hashable (static under jit)."""

    name: str
    bits: int

    kind: ClassVar[str] = "abstract"

    @property
    def packed(self) -> bool:
        """Whether codes are packed several to a byte (sub-byte formats)."""
        return self.bits < 8

    @property
    def container_dtype(self) -> np.dtype:
        """Dtype of one unpacked code."""
        raise NotImplementedError

    @property
    def storage_dtype(self) -> np.dtype:
        """Dtype of the stored `qvalue` array (uint8 for packed formats)."""
        return np.dtype(np.uint8) if self.packed else self.container_dtype

    @property
    def max_abs(self) -> float:
        """The largest scaled magnitude the symmetric scale maps the range onto."""
        raise NotImplementedError

    @property
    def has_zero_point(self) -> bool:
        return False

    def encode(self, scaled: jnp.ndarray) -> jnp.ndarray:
        """Scaled real values (float32) -> unpacked codes in `container_dtype`."""
        raise NotImplementedError

    def decode(self, codes: jnp.ndarray) -> jnp.ndarray:
        """Unpacked codes -> scaled real values in float32."""
        raise NotImplementedError

    def levels(self) -> np.ndarray:
        """Every representable scaled value, ascending (float32; for fp8 the finite values)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class IntFormat(Format):
    """Integers of `bits` bits: signed two's complement (symmetric) or unsigned (zero points)."""

    signed: bool = True
    kind: ClassVar[str] = "int"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def container_dtype(self) -> np.dtype:
        return np.dtype(np.int8 if self.signed else np.uint8)

    @property
    def max_abs(self) -> float:
        # Symmetric ranges use ±qmax (GPTQ/AWQ convention) and leave -2^(b-1) unused, so that
        # the code grid is symmetric around zero.
        return float(self.qmax)

    @property
    def has_zero_point(self) -> bool:
        return not self.signed

    def encode(self, scaled):
        codes = jnp.clip(jnp.round(scaled), self.qmin, self.qmax)
        return codes.astype(self.container_dtype)

    def decode(self, codes):
        return codes.astype(jnp.float32)

    def levels(self):
        return np.arange(self.qmin, self.qmax + 1, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class FloatFormat(Format):
    """8-bit floats. Encoding saturates to ±max first: a plain cast of 500 to e4m3fn is NaN."""

    dtype_name: str = "float8_e4m3fn"
    kind: ClassVar[str] = "float"

    @property
    def container_dtype(self) -> np.dtype:
        return np.dtype(getattr(jnp, self.dtype_name))

    @property
    def max_abs(self) -> float:
        return float(jnp.finfo(self.container_dtype).max)

    def encode(self, scaled):
        return jnp.clip(scaled, -self.max_abs, self.max_abs).astype(self.container_dtype)

    def decode(self, codes):
        return codes.astype(jnp.float32)

    def levels(self):
        bits = np.arange(256, dtype=np.uint8).view(self.container_dtype).astype(np.float32)
        return np.unique(bits[np.isfinite(bits)])


@dataclasses.dataclass(frozen=True)
class LookupFormat(Format):
    """A table of levels in [-1, 1] (NF4); codes are indices, encoding picks the nearest level."""

    table: tuple[float, ...] = NF4_LEVELS
    kind: ClassVar[str] = "lookup"

    @property
    def container_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def max_abs(self) -> float:
        return float(max(abs(v) for v in self.table))

    def encode(self, scaled):
        levels = np.asarray(self.table, np.float32)
        midpoints = jnp.asarray((levels[1:] + levels[:-1]) / 2)
        # The number of midpoints at or below x is its level index, so values exactly on a
        # midpoint go to the upper level. (A compare-and-count rather than searchsorted, which
        # jax rejects on inputs with explicit sharding.)
        x = scaled.astype(jnp.float32)[..., None]
        return jnp.sum(x >= midpoints, axis=-1, dtype=jnp.int32).astype(jnp.uint8)

    def decode(self, codes):
        # A select over the 16 levels rather than a gather, for the same sharding reason.
        levels = jnp.asarray(self.table, jnp.float32)
        onehot = codes.astype(jnp.int32)[..., None] == jnp.arange(len(self.table))
        return jnp.sum(jnp.where(onehot, levels, 0.0), axis=-1)

    def levels(self):
        return np.asarray(self.table, np.float32)


_REGISTRY: dict[str, Format] = {
    **{f"int{b}": IntFormat(f"int{b}", b, signed=True) for b in (2, 3, 4, 8)},
    **{f"uint{b}": IntFormat(f"uint{b}", b, signed=False) for b in (2, 3, 4, 8)},
    "fp8_e4m3": FloatFormat("fp8_e4m3", 8, dtype_name="float8_e4m3fn"),
    "fp8_e5m2": FloatFormat("fp8_e5m2", 8, dtype_name="float8_e5m2"),
    "nf4": LookupFormat("nf4", 4, table=NF4_LEVELS),
}


def names() -> tuple[str, ...]:
    """The names of every registered format."""
    return tuple(_REGISTRY)


def get(name: str | Format) -> Format:
    """Look a format up by name (`"int4"`, `"fp8_e4m3"`, `"nf4"`, ...); formats pass through.

    Raises:
      ValueError: the name is unknown; the message lists the known names.
    """
    if isinstance(name, Format):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown quantization format {name!r}; expected one of {', '.join(_REGISTRY)}"
        ) from None


def unsigned_of(fmt: Format) -> Format:
    """The unsigned twin of a signed integer format (int4 -> uint4), used for asymmetric ranges."""
    if isinstance(fmt, IntFormat) and fmt.signed:
        return _REGISTRY[f"uint{fmt.bits}"]
    raise NotImplementedError(f"asymmetric (zero-point) quantization of format {fmt.name!r}")
