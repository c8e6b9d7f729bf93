"""`QuantSpec`: validation of unsupported combinations, and the block shape of each granularity."""

import doctest

import jax
import jax.numpy as jnp
import pytest

import jqtz
from jqtz import spec as spec_lib
from jqtz.spec import QuantSpec


def test_docstring_examples():
    assert doctest.testmod(spec_lib).failed == 0


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "nf4"])
def test_asymmetric_non_integer_format_is_not_implemented(fmt):
    with pytest.raises(NotImplementedError, match=rf"asymmetric.*{fmt}"):
        QuantSpec(format=fmt, symmetric=False)


def test_unknown_format_names_it():
    with pytest.raises(ValueError, match="'int5'"):
        QuantSpec(format="int5")


@pytest.mark.parametrize("fmt", ["uint4", "uint8"])
def test_unsigned_format_name_points_to_symmetric_false(fmt):
    with pytest.raises(ValueError, match=rf"'{fmt}'.*'{fmt[1:]}'.*symmetric=False"):
        QuantSpec(format=fmt)


@pytest.mark.parametrize("dtype", ["int8", "float64", "uint8"])
def test_unsupported_scale_dtype_names_it(dtype):
    with pytest.raises(NotImplementedError, match=rf"scale_dtype.*'{dtype}'"):
        QuantSpec(scale_dtype=dtype)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(granularity="row"), "granularity"),
        (dict(granularity="group"), "group_size"),
        (dict(granularity="group", group_size=0), "group_size"),
        (dict(granularity="channel", group_size=64), "group_size"),
        (dict(granularity="block"), "block_shape"),
        (dict(granularity="block", block_shape=(0, 4)), "block_shape"),
        (dict(block_shape=(4, 4)), "block_shape"),
        (dict(clipping="minmax"), "clipping"),
        (dict(percentile=0.0), "percentile"),
        (dict(percentile=101.0), "percentile"),
        (dict(mse_grid=0), "mse_grid"),
        (dict(mse_max_shrink=1.0), "mse_max_shrink"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_invalid_fields_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_group_over_several_axes_is_not_implemented():
    with pytest.raises(NotImplementedError, match="several contraction axes"):
        QuantSpec(granularity="group", group_size=4, axis=(0, 1))


def test_spec_is_hashable_static_data_and_normalised():
    a = QuantSpec(format="int4", granularity="group", group_size=8, scale_dtype=jnp.bfloat16)
    b = QuantSpec(
        format=jqtz.formats.get("int4"), granularity="group", group_size=8, scale_dtype="bfloat16"
    )
    assert a == b and hash(a) == hash(b)
    assert a.scale_dtype == "bfloat16" and a.format == "int4"
    assert QuantSpec(axis=[0, 1]).axis == (0, 1)
    out = jax.jit(lambda x, s: x * 2, static_argnums=1)(jnp.ones(2), a)
    assert out.tolist() == [2.0, 2.0]
    with pytest.raises(TypeError):
        QuantSpec("int8")  # keyword-only


def test_storage_format_is_the_unsigned_twin_when_asymmetric():
    assert QuantSpec(format="int4").storage_format.name == "int4"
    assert QuantSpec(format="int4", symmetric=False).storage_format.name == "uint4"
    assert QuantSpec(format="nf4").storage_format.name == "nf4"


ROWS, COLS = 10, 6
BLOCK_CASES = {
    "tensor": (QuantSpec(granularity="tensor"), (ROWS, COLS)),
    "channel-axis0": (QuantSpec(granularity="channel", axis=0), (ROWS, 1)),
    "channel-axis-1": (QuantSpec(granularity="channel", axis=-1), (1, COLS)),
    "channel-both-axes": (QuantSpec(granularity="channel", axis=(0, 1)), (ROWS, COLS)),
    "g4-axis0": (QuantSpec(granularity="group", group_size=4), (4, 1)),
    "g4-axis1": (QuantSpec(granularity="group", group_size=4, axis=1), (1, 4)),
    "g64-larger-than-dim": (QuantSpec(granularity="group", group_size=64), (ROWS, 1)),
    "block4x4": (QuantSpec(granularity="block", block_shape=(4, 4)), (4, 4)),
    "block32x2-clipped": (QuantSpec(granularity="block", block_shape=(32, 2)), (ROWS, 2)),
}


@pytest.mark.parametrize("spec, want", BLOCK_CASES.values(), ids=BLOCK_CASES.keys())
def test_block_shape_of_each_granularity(spec, want):
    assert spec.block_shape_for((ROWS, COLS)) == want


def test_block_shapes_of_higher_rank_arrays():
    shape = (3, 8, 6)
    assert QuantSpec(granularity="tensor").block_shape_for(shape) == shape
    assert QuantSpec(granularity="channel", axis=1).block_shape_for(shape) == (1, 8, 1)
    blocked = QuantSpec(granularity="block", block_shape=(4, 4))
    assert blocked.block_shape_for(shape) == (1, 4, 4)
    assert QuantSpec(granularity="tensor").block_shape_for(()) == ()


def test_partial_groups_refused_names_path_and_sizes():
    spec = QuantSpec(format="int4", granularity="group", group_size=4, allow_partial_groups=False)
    with pytest.raises(ValueError, match=r"layer/kernel.*dimension 10.*group/block size 4"):
        spec.block_shape_for((10, 3), path="layer/kernel")
    assert spec.block_shape_for((12, 3)) == (4, 1)


def test_partial_blocks_refused_names_path_and_sizes():
    spec = QuantSpec(granularity="block", block_shape=(4, 4), allow_partial_groups=False)
    with pytest.raises(ValueError, match=r"w.*dimension 6.*size 4"):
        spec.block_shape_for((8, 6), path="w")


@pytest.mark.parametrize(
    "spec, shape, message",
    [
        (QuantSpec(axis=2), (4, 4), "out of range"),
        (QuantSpec(granularity="channel"), (), "scalar"),
        (QuantSpec(granularity="block", block_shape=(2, 2)), (8,), "rank >= 2"),
    ],
    ids=["axis-out-of-range", "channel-of-scalar", "block-of-1d"],
)
def test_shapes_that_do_not_fit_raise(spec, shape, message):
    with pytest.raises(ValueError, match=message):
        spec.block_shape_for(shape)
