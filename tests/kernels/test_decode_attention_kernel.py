"""Decode attention over quantized KV pages: interpret mode vs the reference, edge lengths,
paging, GQA, CUDA lowering, can_use, and the jqtz cache's choice between kernel and XLA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqtz.models.quantized_kv_cache import KVQuantSpec, QuantizedKVCache
from pallas_kernels import common
from pallas_kernels import decode_attention as da

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _kivi_keys(x, page):
    """KIVI keys: uint4 per channel over groups of `page` tokens, offsets; packed along D."""
    b, s, hkv, d = x.shape
    g = x.reshape(b, s // page, page, hkv, d)
    lo, hi = g.min(axis=2), g.max(axis=2)
    scale = jnp.maximum((hi - lo) / 15, 1e-6).astype(jnp.float16)
    lo = lo.astype(jnp.float16)
    codes = jnp.round((g - lo[:, :, None]) / scale[:, :, None].astype(jnp.float32))
    codes = jnp.clip(codes, 0, 15).astype(jnp.uint8).reshape(b, s, hkv, d)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale, lo


def make(kind, *, b=2, s=128, hkv=2, d=64, page=32, seed=0, kivi=False, groups=(None, None)):
    """Random keys/values quantized per token (or KIVI keys), as contiguous pages; `groups`:
    channels per key and per value scale (None: the whole head)."""
    kv = jax.random.normal(jax.random.key(seed), (2, b, s, hkv, d))
    if kivi:
        k, tables = da.contiguous_tables(
            *_kivi_keys(kv[0], page), "int4", page=page, per_channel=True
        )
    else:
        k, tables = da.contiguous_tables(*da.quantize_tokens(kv[0], kind, groups[0]), page=page)
    v, _ = da.contiguous_tables(*da.quantize_tokens(kv[1], kind, groups[1]), page=page)
    return k, v, tables, kv


def _max_err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


# name: (kind, KIVI keys, query heads, KV heads, head dim, lengths)
CASES = {
    "int8_gqa4": ("int8", False, 8, 2, 64, [128, 37]),
    "fp8_gqa4": ("fp8", False, 8, 2, 64, [1, 96]),
    "int4_token": ("int4", False, 8, 2, 64, [65, 128]),
    "int4_kivi": ("int4", True, 8, 2, 64, [31, 32]),
    "float_mha": ("float", False, 2, 2, 128, [100, 17]),
    "int8_gqa24": ("int8", False, 48, 2, 32, [3, 64]),  # 24 heads: a 32-row tile
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
    kind, kivi, h, hkv, d, lengths = CASES[name]
    k, v, tables, _ = make(kind, hkv=hkv, d=d, kivi=kivi)
    q = jax.random.normal(jax.random.key(9), (2, h, d))
    lengths = jnp.array(lengths, jnp.int32)
    out, lse = da.decode_attention(q, k, v, lengths, tables, interpret=True)
    ref, ref_lse = da.reference(q, k, v, lengths, tables)
    assert out.shape == (2, h, d) and lse.shape == (2, h)
    # float32 throughout (products with precision HIGHEST): only the summation order differs.
    assert _max_err(out, ref) < 2e-5
    assert _max_err(lse, ref_lse) < 2e-5


# name: (kind, KIVI keys, channels per key scale, channels per value scale)
GROUP_CASES = {
    "int8_k32_v16": ("int8", False, 32, 16),
    "fp8_k16_v64": ("fp8", False, 16, None),
    "int4_k32_v32": ("int4", False, 32, 32),
    "int4_kivi_v32": ("int4", True, None, 32),
}


@pytest.mark.parametrize("name", list(GROUP_CASES))
def test_channel_groups_match_reference(name):
    """Per-token scales over groups of channels (llama.cpp's q8_0/q4_0 cache layout): one
    product per group, scaled by the group's per-token scale."""
    kind, kivi, kg, vg = GROUP_CASES[name]
    k, v, tables, kv = make(kind, kivi=kivi, groups=(kg, vg))
    assert k.groups == (1 if kg is None else 64 // kg) and v.groups == (
        1 if vg is None else 64 // vg
    )
    q = jax.random.normal(jax.random.key(3), (2, 8, 64))
    lengths = jnp.array([128, 45], jnp.int32)
    out, lse = da.decode_attention(q, k, v, lengths, tables, interpret=True)
    ref, ref_lse = da.reference(q, k, v, lengths, tables)
    assert _max_err(out, ref) < 2e-5 and _max_err(lse, ref_lse) < 2e-5
    # The grouped codes round-trip: finer groups than the whole head, no larger error.
    for pages, x, g in ((k, kv[0], kg), (v, kv[1], vg)):
        if g is None:
            continue
        err = jnp.abs(da.dequantize(pages).reshape(x.shape) - x).max()
        whole, _ = da.contiguous_tables(*da.quantize_tokens(x, kind), page=32)
        assert err <= jnp.abs(da.dequantize(whole).reshape(x.shape) - x).max()


@pytest.mark.parametrize(
    "splits, per_step", [(1, 1), (3, 1), (16, 1), (1, 3), (2, 2), (3, None), (1, 8)]
)
def test_split_counts_and_pages_per_step_agree(splits, per_step):
    """One, an uneven number, and more splits than steps (empty splits are merged away); one
    page a step, several (the default: four of 16 tokens), a number that leaves the last step
    part past the table (3), and all eight pages in one step."""
    k, v, tables, _ = make("int8", page=16)  # 8 pages per sequence
    q = jax.random.normal(jax.random.key(1), (2, 8, 64))
    lengths = jnp.array([128, 50], jnp.int32)
    cfg = da.TuningConfig(num_splits=splits, pages_per_step=per_step)
    out, _ = da.decode_attention(q, k, v, lengths, tables, config=cfg, interpret=True)
    ref, _ = da.reference(q, k, v, lengths, tables)
    assert _max_err(out, ref) < 2e-5


def test_paged_tables_in_any_order():
    """Pages shuffled across one pool: the same attention as the contiguous layout."""
    k, v, tables, _ = make("fp8", page=16)
    perm = jax.random.permutation(jax.random.key(3), k.codes.shape[0])
    inv = jnp.argsort(perm)
    shuffle = lambda p: jax.tree.map(lambda a: a[perm], p)  # pool page j = old page perm[j]
    k2, v2, tables2 = shuffle(k), shuffle(v), inv[tables]
    q = jax.random.normal(jax.random.key(4), (2, 8, 64))
    lengths = jnp.array([77, 128], jnp.int32)
    out, _ = da.decode_attention(q, k, v, lengths, tables, interpret=True)
    out2, _ = da.decode_attention(q, k2, v2, lengths, tables2, interpret=True)
    np.testing.assert_allclose(out2, out, atol=1e-6)
    # Table entries past a sequence's last page are never read: garbage there changes nothing,
    # with one page a loop step or several (the last step's pages past the sequence).
    tables3 = tables2.at[0, 5:].set(10_000)  # 77 tokens: pages 0..4
    for cfg in (da.TuningConfig(pages_per_step=1), da.TuningConfig()):
        out3, _ = da.decode_attention(q, k2, v2, lengths, tables3, config=cfg, interpret=True)
        np.testing.assert_allclose(out3[0], out[0], atol=1e-6)


def test_zero_length_gives_zeros_and_merges_away():
    k, v, tables, _ = make("int8")
    q = jax.random.normal(jax.random.key(5), (2, 8, 64))
    out, lse = da.decode_attention(q, k, v, jnp.array([0, 5]), tables, interpret=True)
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.asarray(lse[0]) == da.MASK_VALUE)
    # Merging with another key set: the empty one has weight zero.
    other = jax.random.normal(jax.random.key(6), (2, 8, 64))
    merged, _ = da.merge([out, other], [lse, jnp.zeros((2, 8))])
    np.testing.assert_allclose(merged[0], other[0], atol=1e-6)


def test_quantized_attention_is_close_to_float():
    """Against attention on the unquantized keys/values: int8 ~1%, fp8 ~5%, int4 ~10%."""
    q = jax.random.normal(jax.random.key(7), (2, 8, 64))
    lengths = jnp.array([128, 90], jnp.int32)
    f, fv, tables, _ = make("float")
    exact, _ = da.reference(q, f, fv, lengths, tables)
    for kind, kivi, bound in (("int8", False, 0.02), ("fp8", False, 0.08), ("int4", True, 0.2)):
        k, v, tables, _ = make(kind, kivi=kivi)
        out, _ = da.decode_attention(q, k, v, lengths, tables, interpret=True)
        rel = float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact))
        assert rel < bound, (kind, rel)


def test_bf16_queries():
    k, v, tables, _ = make("int8")
    q = jax.random.normal(jax.random.key(8), (2, 8, 64), jnp.bfloat16)
    lengths = jnp.array([128, 40], jnp.int32)
    out, _ = da.decode_attention(q, k, v, lengths, tables, interpret=True)
    ref, _ = da.reference(q.astype(jnp.float32), k, v, lengths, tables)
    assert out.dtype == jnp.bfloat16
    # bf16 queries and probabilities on the tensor cores: a few bf16 roundings (2^-9 each).
    assert _max_err(out, ref) < 2e-2


@pytest.mark.parametrize(
    "kind, kivi, q_dtype",
    [("int8", False, jnp.bfloat16), ("fp8", False, jnp.bfloat16), ("int4", True, jnp.float16),
     ("float", False, jnp.bfloat16)],
    ids=["int8", "fp8", "int4_kivi", "float"],
)  # fmt: skip
def test_lowers_for_cuda(kind, kivi, q_dtype):
    k, v, tables, _ = make(kind, kivi=kivi)
    if kind == "float":
        k, v = (dataclasses.replace(p, codes=p.codes.astype(jnp.bfloat16)) for p in (k, v))
    q = jnp.ones((2, 8, 64), q_dtype)
    text = common.lower_for_cuda(
        lambda *a: da.decode_attention(*a), q, k, v, jnp.array([5, 9]), tables
    )
    assert common.TRITON_CUSTOM_CALL in text


def test_channel_groups_lower_for_cuda():
    k, v, tables, _ = make("int4", groups=(32, 64))
    q = jnp.ones((2, 8, 64), jnp.bfloat16)
    text = common.lower_for_cuda(
        lambda *a: da.decode_attention(*a), q, k, v, jnp.array([5, 9]), tables
    )
    assert common.TRITON_CUSTOM_CALL in text


def test_can_use():
    k, v, _, _ = make("int8")
    q = jnp.ones((2, 8, 64), jnp.bfloat16)
    h100 = dict(backend="gpu", compute_capability=(9, 0))
    assert da.can_use(q, k, v, **h100)
    assert not da.can_use(q, k, v)  # this machine: CPU
    assert not da.can_use(q, k, v, backend="gpu", compute_capability=(7, 5))
    f8k, f8v, _, _ = make("fp8")
    assert not da.can_use(q, f8k, f8v, backend="gpu", compute_capability=(8, 0))  # no fp8
    assert da.can_use(q, f8k, f8v, backend="gpu", compute_capability=(8, 9))
    small, sv, _, _ = make("int8", d=8, page=16)  # head dim 8: below a tensor-core tile
    assert not da.can_use(jnp.ones((2, 8, 8), jnp.bfloat16), small, sv, **h100)
    odd, ov, _, _ = make("int8", s=96, page=12 * 8)  # 96-token pages: not a power of two
    assert not da.can_use(q, odd, ov, **h100)
    gk, gv, _, _ = make("int8", groups=(16, 32))
    assert da.can_use(q, gk, gv, **h100)
    gk, gv, _, _ = make("int8", groups=(8, None))  # 8-channel groups: below a tensor-core tile
    assert not da.can_use(q, gk, gv, **h100)
    gk, gv, _, _ = make("int4", groups=(16, None))  # int4: 8 channels per part
    assert not da.can_use(q, gk, gv, **h100)


def test_bad_input_names_the_argument():
    k, v, tables, _ = make("int8")
    q = jnp.ones((2, 8, 64))
    with pytest.raises(ValueError, match="`q`"):
        da.decode_attention(q[0], k, v, jnp.array([1, 1]), tables, interpret=True)
    with pytest.raises(ValueError, match="query heads"):
        da.decode_attention(q[:, :3], k, v, jnp.array([1, 1]), tables, interpret=True)
    with pytest.raises(ValueError, match="`lengths`"):
        da.decode_attention(q, k, v, jnp.array([1]), tables, interpret=True)
    bad = dataclasses.replace(k, scale=None)
    with pytest.raises(ValueError, match=r"`k\.scale`"):
        da.decode_attention(q, bad, v, jnp.array([1, 1]), tables, interpret=True)
    with pytest.raises(ValueError, match=r"`v\.codes`"):
        da.decode_attention(q, k, dataclasses.replace(v, kind="fp8"), jnp.array([1, 1]), tables)
    three = dataclasses.replace(k, scale=jnp.ones((*k.scale.shape, 3)))  # 3 groups of D = 64
    with pytest.raises(ValueError, match=r"`k\.scale`.*3 channel groups must divide"):
        da.decode_attention(q, three, v, jnp.array([1, 1]), tables, interpret=True)
    i4k, i4v, i4t, _ = make("int4")
    odd = dataclasses.replace(i4k, scale=jnp.ones((*i4k.scale.shape, 64)),
                              offset=jnp.ones((*i4k.offset.shape, 64)))  # fmt: skip
    with pytest.raises(ValueError, match="even size for int4"):  # groups of one channel
        da.decode_attention(q, odd, i4v, jnp.array([1, 1]), i4t, interpret=True)
    with pytest.raises(ValueError, match="num_splits"):
        da.TuningConfig(num_splits=0)
    with pytest.raises(ValueError, match="pages_per_step"):
        da.TuningConfig(pages_per_step=0)
    with pytest.raises(ValueError, match="multiple of `page`"):
        da.contiguous_tables(k.codes.reshape(2, 128, 2, 64)[:, :100], None, None, "float", page=32)


# -- the Mosaic GPU path ---------------------------------------------------------------------
# name: (kind, query heads, KV heads, head dim, page, lengths, query dtype, MosaicConfig)
MOSAIC_CASES = {
    "int8_gqa4": ("int8", 8, 2, 64, 64, [200, 7], jnp.bfloat16, da.MosaicConfig()),
    "fp8_gqa4_f16": ("fp8", 8, 2, 64, 64, [1, 256], jnp.float16,
                     da.MosaicConfig(max_concurrent_steps=3)),
    "fp8_bf16": ("fp8", 4, 4, 64, 64, [129, 64], jnp.bfloat16, da.MosaicConfig(num_splits=1)),
    "float_mha_d128": ("float", 2, 2, 128, 64, [100, 250], jnp.bfloat16,
                       da.MosaicConfig(num_splits=3)),
    "int8_page128_gqa64": ("int8", 128, 2, 64, 128, [255, 0], jnp.bfloat16,
                           da.MosaicConfig(num_splits=1)),
    # several pages per step: vLLM's 16-token pages (four a step), and wider steps
    "int8_page16": ("int8", 8, 2, 64, 16, [200, 37], jnp.bfloat16, da.MosaicConfig()),
    "fp8_page32_block128": ("fp8", 8, 2, 64, 32, [129, 256], jnp.bfloat16,
                            da.MosaicConfig(block_tokens=128, num_splits=1)),
    "float_page64_block128": ("float", 4, 2, 64, 64, [200, 65], jnp.float16,
                              da.MosaicConfig(block_tokens=128, num_splits=2)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MOSAIC_CASES))
def test_mosaic_interpret_matches_reference(name):
    """The Mosaic GPU path in the Mosaic GPU interpreter (TMA pages through barriers, wgmma
    from shared memory): a partial last page, an empty sequence, one and several splits, a
    split with no pages, 64 query heads per KV head, f16 and bf16 queries, several pages per
    step (a step past the last page reloads it, masked)."""
    kind, h, hkv, d, page, lengths, dtype, cfg = MOSAIC_CASES[name]
    k, v, tables, _ = make(kind, s=256, hkv=hkv, d=d, page=page)
    if kind == "float":
        k, v = (dataclasses.replace(p, codes=p.codes.astype(dtype)) for p in (k, v))
    q = jax.random.normal(jax.random.key(9), (2, h, d), dtype)
    lengths = jnp.array(lengths, jnp.int32)
    out, lse = da.decode_attention(q, k, v, lengths, tables, config=cfg, interpret=True)
    ref, ref_lse = da.reference(q, k, v, lengths, tables)
    assert out.dtype == dtype and out.shape == (2, h, d) and lse.shape == (2, h)
    # 16-bit queries and probabilities on the tensor cores, as the Triton kernel with 16-bit
    # queries; 8-bit codes widen to 16 bits exactly and the scales apply in float32.
    assert common.relative_error(out, ref) < 5e-3
    valid = np.asarray(lengths > 0)
    assert _max_err(lse[valid], ref_lse[valid]) < 2e-3
    if not valid.all():  # an empty sequence: zeros and lse = MASK_VALUE, as the Triton kernel
        assert np.all(np.asarray(out[~valid]) == 0)
        assert np.all(np.asarray(lse[~valid]) == da.MASK_VALUE)


def test_mosaic_agrees_with_triton_on_shuffled_pages():
    """Pages in any order in the pool, and garbage table entries past a sequence's last page:
    the Mosaic GPU path reads pages through the table exactly as the Triton kernel does."""
    for page, garbage_from in ((64, 2), (16, 7)):  # 100 tokens: 2 pages of 64, 7 of 16
        k, v, tables, _ = make("int8", s=256, page=page)
        perm = jax.random.permutation(jax.random.key(3), k.codes.shape[0])
        shuffle = lambda p, perm=perm: jax.tree.map(lambda a: a[perm], p)
        k, v, tables = shuffle(k), shuffle(v), jnp.argsort(perm)[tables]
        tables = tables.at[0, garbage_from:].set(10_000)
        q = jax.random.normal(jax.random.key(4), (2, 8, 64), jnp.bfloat16)
        lengths = jnp.array([100, 256], jnp.int32)
        cfg = da.MosaicConfig(num_splits=2)
        out, lse = da.decode_attention(q, k, v, lengths, tables, config=cfg, interpret=True)
        tri, tri_lse = da.decode_attention(q, k, v, lengths, tables, interpret=True)
        assert _max_err(out, tri) < 1e-2 and _max_err(lse, tri_lse) < 1e-3, page


@pytest.mark.parametrize(
    "kind, q_dtype, page, d, block", [("int8", jnp.bfloat16, 64, 128, None),
                                      ("fp8", jnp.bfloat16, 128, 64, None),
                                      ("fp8", jnp.float16, 64, 256, None),
                                      ("float", jnp.bfloat16, 64, 128, None),
                                      ("int8", jnp.bfloat16, 16, 128, None),
                                      ("fp8", jnp.bfloat16, 32, 64, 128)],
    ids=["int8", "fp8_page128", "fp8_f16_d256", "float", "int8_page16", "fp8_page32_block128"],
)  # fmt: skip
def test_mosaic_lowers_for_cuda(kind, q_dtype, page, d, block):
    """Lowering runs Mosaic GPU's own checks (layouts, conversions the hardware has, shared
    memory, TMA into a slot's rows for several pages a step), so these would fail here rather
    than on the first H100 call."""
    k, v, tables, _ = make(kind, s=256, d=d, page=page)
    if kind == "float":
        k, v = (dataclasses.replace(p, codes=p.codes.astype(q_dtype)) for p in (k, v))
    q = jnp.ones((2, 8, d), q_dtype)
    text = common.lower_for_cuda(
        lambda *a: da.decode_attention(*a, config=da.MosaicConfig(block_tokens=block)), q, k, v,
        jnp.array([5, 9]), tables,
    )  # fmt: skip
    assert common.MOSAIC_GPU_CUSTOM_CALL in text and common.TRITON_CUSTOM_CALL not in text


def test_mosaic_benchmark_configs_fit_in_shared_memory():
    """Every Mosaic GPU config the decode benchmark sweeps lowers at its shapes (B = 8, 32
    query / 8 KV heads, D = 128, 64-token pages, 16k tokens), without a device minute."""
    b, s, hkv, d, page = 8, 16384, 8, 128, 64
    q = jax.ShapeDtypeStruct((b, 32, d), jnp.bfloat16)
    tables = jax.ShapeDtypeStruct((b, s // page), jnp.int32)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
    for kind, dtype in (("int8", jnp.int8), ("fp8", jnp.float8_e4m3fn)):
        codes = jax.ShapeDtypeStruct((b * s // page, page, hkv, d), dtype)
        scale = jax.ShapeDtypeStruct((b * s // page, page, hkv), jnp.float32)
        pages = da.Pages(codes, scale, None, kind)
        for cfg in da.tune_candidates(b, hkv, s // page):
            if isinstance(cfg, da.MosaicConfig):
                fn = lambda *a, cfg=cfg: da.decode_attention(*a, config=cfg)
                common.lower_for_cuda(fn, q, pages, pages, lengths, tables)


def test_tune_candidates_try_both_lowerings_and_the_default_split_first():
    cands = da.tune_candidates(8, 8, 256)  # the benchmark: 8 x 8 (sequence, KV head) pairs
    assert cands[:2] == [da.TuningConfig(), da.MosaicConfig()]
    auto = da._splits(da.TuningConfig(), 8, 8, 256)
    # early: a short sweep still tries the int8 options
    assert cands[2] == da.TuningConfig(int8_via_f16=True)
    assert cands[3] == da.TuningConfig(int8_queries=True, int8_via_f16=True)
    assert {c.num_splits for c in cands[6:11]} == {auto}
    assert len(set(cands)) == len(cands) and all(c.num_splits <= 256 for c in cands[6:])
    assert any(isinstance(c, da.MosaicConfig) and c.block_tokens == 128 for c in cands)
    assert any(isinstance(c, da.TuningConfig) and c.pages_per_step == 2 for c in cands)


def test_mosaic_refuses_what_it_does_not_cover(monkeypatch):
    q = jnp.ones((2, 8, 64), jnp.bfloat16)
    lengths = jnp.array([5, 9])
    cfg = da.MosaicConfig()
    for kind, options, reason in (
        ("int4", {}, "int8, fp8 or float pages"),
        ("int8", dict(groups=(32, None)), "one scale per token"),
        ("int8", dict(page=8), "power of two >= 16 tokens"),
        ("int8", dict(d=32), "multiple of 64"),
    ):
        k, v, tables, _ = make(kind, **options)
        qq = jnp.ones((2, 8, k.head_dim), jnp.bfloat16)
        assert da.mosaic_unsupported(qq, k, v) is not None
        with pytest.raises(ValueError, match=f"MosaicConfig: .*{reason}.*TuningConfig"):
            da.decode_attention(qq, k, v, lengths, tables, config=cfg, interpret=True)
    k, v, tables, _ = make("int8", s=256, page=64)
    assert da.mosaic_unsupported(q, k, v) is None
    wide, wv, _, _ = make("int8", s=256, page=128)
    assert "dividing the step of 64" in da.mosaic_unsupported(q, wide, wv, da.MosaicConfig(
        block_tokens=64))  # fmt: skip
    with pytest.raises(ValueError, match="bf16 or f16"):
        da.decode_attention(q.astype(jnp.float32), k, v, lengths, tables, config=cfg)
    big, bv, bt, _ = make("int8", s=512, d=128, page=128)  # 4 pages per sequence
    too_deep = da.MosaicConfig(num_splits=1, max_concurrent_steps=4)  # 4 x 2 x 16 KiB stages
    with pytest.raises(ValueError, match=r"max_concurrent_steps=4 needs .* shared memory"):
        da.decode_attention(jnp.ones((2, 8, 128), jnp.bfloat16), big, bv, lengths, bt,
                            config=too_deep, interpret=True)  # fmt: skip
    for bad in (dict(num_splits=0), dict(max_concurrent_steps=1), dict(block_tokens=32)):
        with pytest.raises(ValueError, match="MosaicConfig"):
            da.MosaicConfig(**bad)
    monkeypatch.setattr(common, "gpu_compute_capability", lambda: (8, 0))  # an A100
    with pytest.raises(ValueError, match="compute capability 9"):
        da.decode_attention(q, k, v, lengths, tables, config=cfg)


def test_bench_without_gpu_exits_cleanly(capsys):
    assert da.main(["--bench"]) == 0
    assert "no GPU present" in capsys.readouterr().out


# -- the jqtz cache: kernel path vs its XLA path ---------------------------------------------
def _filled_cache(kind, length, **options):
    b, hkv, d = 2, 2, 64
    spec = KVQuantSpec(kind=kind, **options)
    cache = QuantizedKVCache.init(spec, batch=b, max_len=150, n_kv_heads=hkv, head_dim=d)
    kv = jax.random.normal(jax.random.key(length), (2, b, length, hkv, d))
    return cache.update(kv[0], kv[1])


@pytest.mark.parametrize(
    "kind, length, options",
    [
        ("int8", 70, {}),
        ("fp8", 1, {}),
        ("int4", 100, dict(residual=32)),
        ("int4", 20, {}),
        ("int8", 90, dict(key_group_size=32, value_group_size=16)),
        ("int4", 100, dict(residual=32, value_group_size=32)),
    ],
    ids=[
        "int8",
        "fp8_one_token",
        "int4_window",
        "int4_window_only",
        "int8_channel_groups",
        "int4_kivi_value_groups",
    ],
)
def test_cache_kernel_path_matches_xla(kind, length, options):
    cache = _filled_cache(kind, length, **options)
    q = jax.random.normal(jax.random.key(0), (2, 1, 8, 64))
    kernel = cache._attend_kernel(q, interpret=True)
    xla = cache._attend_xla(q)
    assert kernel.shape == xla.shape == (2, 1, 8, 64)
    assert _max_err(kernel, xla) < 2e-5


@pytest.mark.parametrize("kind, length", [("int8", 37), ("int8", 128), ("fp8", 128), ("int4", 100)])
def test_bf16_cache_kernel_is_at_least_as_accurate_as_the_xla_path(kind, length):
    """A bf16 model's cache (bf16 queries, bf16 window): against the float32 attention over the
    same codes, the kernel's roundings (bf16 queries and `p * scale` into the tensor cores)
    cost no more than the XLA path's (keys and values dequantized to bf16)."""
    b, hkv, d = 1, 3, 64
    cache = QuantizedKVCache.init(
        KVQuantSpec(kind=kind), batch=b, max_len=256, n_kv_heads=hkv, head_dim=d,
        dtype=jnp.bfloat16,
    )  # fmt: skip
    kv = jax.random.normal(jax.random.key(length), (2, b, length, hkv, d), jnp.bfloat16)
    cache = cache.update(kv[0] * 2, kv[1])
    q = (2 * jax.random.normal(jax.random.key(3), (b, 1, 9, d))).astype(jnp.bfloat16)
    exact = dataclasses.replace(cache, k_recent=cache.k_recent.astype(jnp.float32),
                                v_recent=cache.v_recent.astype(jnp.float32))  # fmt: skip
    # float32 throughout (float32 queries: HIGHEST-precision products, equal to the XLA path
    # to 2e-5 in test_cache_kernel_path_matches_xla).
    ref = exact._attend_kernel(q.astype(jnp.float32), interpret=True)
    kernel = cache._attend_kernel(q, interpret=True)
    xla = cache._attend_xla(q)
    assert kernel.dtype == xla.dtype == jnp.bfloat16
    err_kernel = common.relative_error(kernel, ref)
    err_xla = common.relative_error(xla, ref)
    assert 0 < err_kernel <= err_xla < 1e-2, (err_kernel, err_xla)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_cache_mosaic_kernel_path_matches_xla(kind):
    """The cache's Mosaic GPU path (`use_pallas_kernels(lowering="mosaic")`), in the Mosaic GPU
    interpreter, against its XLA path: bf16 queries (the Mosaic path takes 16-bit queries)."""
    cache = _filled_cache(kind, 70)
    q = jax.random.normal(jax.random.key(0), (2, 1, 8, 64), jnp.bfloat16)
    mosaic = cache._attend_kernel(q, mosaic=True, interpret=True)
    xla = cache._attend_xla(q)
    assert mosaic.dtype == jnp.bfloat16 and mosaic.shape == xla.shape == (2, 1, 8, 64)
    assert common.relative_error(mosaic, xla) < 1e-2  # bf16 queries and probabilities


def test_cache_chooses_kernel_only_where_it_applies():
    h100 = dict(backend="gpu", compute_capability=(9, 0))
    cache = _filled_cache("int4", 40)
    q1, q4 = jnp.ones((2, 1, 8, 64), jnp.bfloat16), jnp.ones((2, 4, 8, 64), jnp.bfloat16)
    assert cache.attention_path(q1, **h100) == "kernel"
    assert cache.attention_path(q4, **h100) == "xla"  # prefill: several tokens
    assert cache.attention_path(q1) == "xla"  # this machine: CPU
    grouped = _filled_cache("int8", 10, value_group_size=32)  # channel groups per token
    assert grouped.attention_path(q1, **h100) == "kernel"
    narrow = _filled_cache("int8", 10, key_group_size=8)  # 8 channels: too few for the kernel
    assert narrow.attention_path(q1, **h100) == "xla"
    # On the CPU, attend is the XLA path.
    np.testing.assert_array_equal(cache.attend(q1), cache._attend_xla(q1))


@pytest.mark.parametrize("q_dtype", [jnp.bfloat16, jnp.float16])
def test_int8_pages_via_float16_codes(q_dtype):
    """`int8_via_f16`: int8 codes made float16 by an add and a bit cast (exact for every code),
    products in float16: within the bound of the reference, and lowered for CUDA."""
    codes = jnp.arange(-128, 128, dtype=jnp.int8)
    np.testing.assert_array_equal(
        np.asarray(da._int8_as_f16(codes), np.float32), np.arange(-128, 128)
    )
    q = jax.random.normal(jax.random.key(0), (2, 8, 128), q_dtype)
    kv = jax.random.normal(jax.random.key(1), (2, 2, 256, 2, 128))
    k, tables = da.contiguous_tables(*da.quantize_tokens(kv[0], "int8"), page=64)
    v, _ = da.contiguous_tables(*da.quantize_tokens(kv[1], "int8"), page=64)
    lengths = jnp.array([200, 7])
    ref, _ = da.reference(q, k, v, lengths, tables)
    cfg = da.TuningConfig(int8_via_f16=True)
    out, _ = da.decode_attention(q, k, v, lengths, tables, config=cfg, interpret=True)
    err = float(
        jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32))
    )
    assert err < 5e-3, err
    text = common.lower_for_cuda(
        lambda *a: da.decode_attention(*a, config=cfg), q, k, v, lengths, tables
    )
    assert common.TRITON_CUSTOM_CALL in text


@pytest.mark.parametrize("q_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("via_f16", [False, True], ids=["values-q", "values-f16"])
def test_int8_queries(q_dtype, via_f16):
    """`int8_queries`: the scores are exact int32 products of int8 query rows and the key
    codes. Against the reference given the same rounded queries, the kernel keeps its usual
    bound; against the unrounded queries it adds the queries' rounding (a few 1e-3)."""
    q = jax.random.normal(jax.random.key(0), (2, 8, 128), q_dtype)
    kv = jax.random.normal(jax.random.key(1), (2, 2, 256, 2, 128))
    k, tables = da.contiguous_tables(*da.quantize_tokens(kv[0], "int8"), page=64)
    v, _ = da.contiguous_tables(*da.quantize_tokens(kv[1], "int8"), page=64)
    lengths = jnp.array([200, 7])
    cfg = da.TuningConfig(int8_queries=True, int8_via_f16=via_f16)
    out, _ = da.decode_attention(q, k, v, lengths, tables, config=cfg, interpret=True)

    def rel(a, b):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    # The queries the kernel multiplies: q / sqrt(D) in q's dtype, rounded to int8 per head.
    ref_rounded, _ = da.reference(da.rounded_queries(q), k, v, lengths, tables)
    ref, _ = da.reference(q.astype(jnp.float32), k, v, lengths, tables)
    assert rel(out, ref_rounded) < 5e-3
    assert rel(out, ref) < 1e-2
    assert rel(ref_rounded, ref) > 1e-4  # the rounding is real: the first bound is the tighter
    text = common.lower_for_cuda(
        lambda *a: da.decode_attention(*a, config=cfg), q, k, v, lengths, tables
    )
    assert common.TRITON_CUSTOM_CALL in text


def test_int8_queries_leave_other_keys_alone():
    """fp8 keys and per-channel-group int8 scales ignore `int8_queries`."""
    cfg = da.TuningConfig(int8_queries=True)
    for kind, groups in (("fp8", (None, None)), ("int8", (32, None))):
        k, v, tables, _ = make(kind, groups=groups)
        q = jax.random.normal(jax.random.key(3), (2, 8, 64), jnp.bfloat16)
        lengths = jnp.array([128, 40], jnp.int32)
        got, _ = da.decode_attention(q, k, v, lengths, tables, config=cfg, interpret=True)
        want, _ = da.decode_attention(q, k, v, lengths, tables, interpret=True)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("q_dtype, bound", [(jnp.float32, 2e-5), (jnp.bfloat16, 5e-3)])
def test_cache_int8_queries_kernel_path_matches_xla(q_dtype, bound):
    """`KVQuantSpec(int8_queries=True)`: both paths round the queries to int8 the same way, so
    the kernel (int8 scores) agrees with the XLA path as without the option; the option changes
    the result (the rounding is not a no-op) and keeps the Triton kernel under `"mosaic"`."""
    cache = _filled_cache("int8", 70, int8_queries=True)
    plain = _filled_cache("int8", 70)
    q = jax.random.normal(jax.random.key(0), (2, 1, 8, 64)).astype(q_dtype)
    kernel = cache._attend_kernel(q, interpret=True)
    xla = cache._attend_xla(q)
    assert kernel.dtype == xla.dtype == q_dtype
    assert common.relative_error(kernel, xla) < bound
    assert common.relative_error(xla, plain._attend_xla(q)) > 1e-4
    h100 = dict(backend="gpu", compute_capability=(9, 0))
    from jqtz.nn import use_pallas_kernels

    with use_pallas_kernels(lowering="mosaic"):
        assert cache.attention_path(q.astype(jnp.bfloat16), **h100) == "kernel"
        assert plain.attention_path(q.astype(jnp.bfloat16), **h100) == "kernel-mosaic"


@pytest.mark.parametrize(
    "options",
    [dict(kind="fp8"), dict(kind="int4"), dict(kind="int8", key_group_size=32),
     dict(kind="int8", residual=16)],
    ids=["fp8", "int4", "key-groups", "window"],
)  # fmt: skip
def test_int8_queries_spec_refuses_other_keys(options):
    with pytest.raises(ValueError, match="int8_queries"):
        KVQuantSpec(int8_queries=True, **options)
