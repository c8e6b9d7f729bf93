"""Sub-byte packing (`jqtz._packing`) and the bytes a `QArray` really stores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqtz
from jqtz import _packing

from . import _reference as ref

BITS = (2, 3, 4)
# Jitted once per shape: far quicker to compile than op-by-op dispatch of every new shape.
pack = jax.jit(_packing.pack, static_argnums=1)
unpack = jax.jit(_packing.unpack, static_argnums=(1, 2), static_argnames="signed")
SIZES = (1, 2, 3, 7, 8, 9, 63, 129)


def _code_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _random_codes(bits, signed, shape, seed):
    lo, hi = _code_range(bits, signed)
    rng = np.random.default_rng(seed)
    return rng.integers(lo, hi + 1, size=shape).astype(np.int8 if signed else np.uint8)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_pack_matches_documented_layout_and_round_trips(n, bits, signed):
    codes = _random_codes(bits, signed, (3, n), seed=1000 * bits + n)
    packed = np.asarray(pack(jnp.asarray(codes), bits))
    assert packed.dtype == np.uint8
    assert packed.shape == (3, _packing.packed_length(n, bits))
    np.testing.assert_array_equal(packed, ref.pack(codes, bits))
    back = np.asarray(unpack(jnp.asarray(packed), bits, n, signed=signed))
    assert back.dtype == codes.dtype
    np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_every_code_value_survives_packing(bits):
    for signed in (True, False):
        lo, hi = _code_range(bits, signed)
        codes = np.arange(lo, hi + 1).astype(np.int8 if signed else np.uint8)
        packed = pack(jnp.asarray(codes), bits)
        np.testing.assert_array_equal(
            np.asarray(unpack(packed, bits, codes.size, signed=signed)), codes
        )


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("n", (1, 7, 8, 9, 129), ids=lambda n: f"n{n}")
def test_packed_length_is_whole_words(n, bits):
    per_word, word_bytes = ref.word_layout(bits)
    assert _packing.packed_length(n, bits) == -(-n // per_word) * word_bytes
    assert _packing.packed_length(n, bits) * 8 >= n * bits


def test_int4_byte_layout_low_nibble_first():
    packed = np.asarray(pack(jnp.asarray(np.array([1, -2], np.int8)), 4))
    assert packed.tolist() == [(1 & 0xF) | ((-2 & 0xF) << 4)]


def test_int2_byte_layout_lowest_bits_first():
    codes = [1, -2, -1, 0]
    packed = np.asarray(pack(jnp.asarray(np.array(codes, np.int8)), 2))
    want = sum((c & 0b11) << (2 * k) for k, c in enumerate(codes))
    assert packed.tolist() == [want]


def test_int3_eight_codes_in_three_little_endian_bytes():
    codes = [1, -2, 3, -4, 0, 2, -1, -3]
    packed = np.asarray(pack(jnp.asarray(np.array(codes, np.int8)), 3))
    word = sum((c & 0b111) << (3 * k) for k, c in enumerate(codes))
    assert packed.tolist() == list(word.to_bytes(3, "little"))


def test_partial_word_is_padded_with_zero_codes():
    # 3 int3 codes use one 3-byte word; the 5 missing codes are zeros.
    packed = np.asarray(pack(jnp.asarray(np.array([-1, -1, -1], np.int8)), 3))
    assert packed.tolist() == list((0b111_111_111).to_bytes(3, "little"))


def test_packing_works_over_leading_dims():
    codes = _random_codes(4, True, (2, 3, 5), seed=0)
    packed = pack(jnp.asarray(codes), 4)
    assert packed.shape == (2, 3, 3)
    np.testing.assert_array_equal(np.asarray(packed), ref.pack(codes, 4))


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_unsupported_bit_width_raises(bits):
    with pytest.raises(NotImplementedError, match=f"{bits}-bit"):
        _packing.pack(jnp.zeros((4,), jnp.int8), bits)


NBYTES_SPECS = {
    "int8-channel": jqtz.QuantSpec(format="int8"),
    "int4-g16-asym-bf16": jqtz.QuantSpec(
        format="int4", granularity="group", group_size=16, symmetric=False, scale_dtype="bfloat16"
    ),
    "int3-tensor-f16": jqtz.QuantSpec(format="int3", granularity="tensor", scale_dtype="float16"),
    "int2-block8x4": jqtz.QuantSpec(format="int2", granularity="block", block_shape=(8, 4)),
    "nf4-g16-dq": jqtz.QuantSpec(
        format="nf4", granularity="group", group_size=16, double_quant=True
    ),
    "fp8_e4m3-channel": jqtz.QuantSpec(format="fp8_e4m3"),
}


@pytest.mark.parametrize("spec", NBYTES_SPECS.values(), ids=NBYTES_SPECS.keys())
def test_qarray_nbytes_equals_bytes_of_its_arrays(spec):
    w = jax.random.normal(jax.random.key(0), (40, 37))  # odd sizes: ragged groups and words
    q = jqtz.quantize(w, spec)
    assert q.nbytes == ref.real_nbytes(q)
    assert q.bits_per_value == pytest.approx(8 * ref.real_nbytes(q) / w.size)


def test_int4_g128_bf16_on_4096x4096_is_4_125_bits():
    rows = cols = 4096
    group, scale_bits, code_bits = 128, 16, 4
    spec = jqtz.QuantSpec(
        format="int4", granularity="group", group_size=group, scale_dtype="bfloat16"
    )
    q = jqtz.quantize(jnp.ones((rows, cols)) * jnp.arange(cols), spec)
    want_bits = code_bits + scale_bits / group
    assert want_bits == 4.125
    assert q.bits_per_value == want_bits
    assert q.nbytes == ref.real_nbytes(q) == rows * cols * want_bits / 8
