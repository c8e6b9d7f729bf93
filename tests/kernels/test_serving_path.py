"""The serving path end to end: the reference Llama with quantized weights and a quantized KV
cache reaching the Pallas kernels.

The kernel tests check each kernel alone; these check that the model reaches them, for the
shapes and dtypes the model really produces (dimensions that are not multiples of the tiles):

- lowered for CUDA with the backend checks seeing an H100: every quantized product of prefill
  and decode and the decode attention become kernel launches inside the jitted `generate`;
- run with `use_pallas_kernels(interpret=True)` (the kernels chosen as on an H100, run in the
  Pallas interpreter on this CPU): the real stories260K and a model with 64-wide heads give
  what the XLA path gives.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

import jqtz
from jqtz.models.llama import Llama, LlamaConfig, decode_paths, generate
from jqtz.models.quantized_kv_cache import quantized_cache_factory
from jqtz.ptq import FP8Options, default_spec
from pallas_kernels import common

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CONFIG = LlamaConfig(vocab_size=96, dim=192, n_layers=2, n_heads=3, n_kv_heads=1,
                     hidden_dim=320, max_seq_len=128, tie_embeddings=True,
                     dtype=jnp.bfloat16)  # fmt: skip


def _kernel_calls(text: str, target: str = common.TRITON_CUSTOM_CALL) -> int:
    """Pallas kernel launches (Triton by default) in a lowered program. Each jitted kernel
    wrapper is one function, called once per use: count the call sites of the functions that
    launch one."""
    bodies = re.split(r"\n\s*func\.func ", text)
    launching = {
        re.match(r"(?:private |public )?@([\w.$-]+)", b).group(1) for b in bodies[1:] if target in b
    }
    return sum(len(re.findall(rf"call @{re.escape(f)}\(", text)) for f in launching)


@pytest.fixture
def pretend_h100(monkeypatch):
    """The kernels' backend checks see an H100 (lowering needs no GPU: `lower_for_cuda`)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(common, "gpu_compute_capability", lambda: (9, 0))


#: Weight specs the serving tests run: name -> (method, bits, options).
SPECS = {"rtn": ("rtn", 4, None), "rtn-k-major": ("rtn", 4, None), "nf4": ("nf4", 4, None),
         "rtn-3bit": ("rtn", 3, None),
         "rtn-2bit": ("rtn", 2, None), "smoothquant": ("smoothquant", 8, None),
         "fp8-per-tensor": ("fp8", 8, FP8Options(mode="static-per-tensor"))}  # fmt: skip


def _spec(name):
    method, bits, options = SPECS[name]
    return default_spec(method, bits=bits, options=options)


@pytest.mark.parametrize("method", ["rtn", "nf4", "rtn-3bit", "smoothquant", "fp8-per-tensor"])
def test_generate_lowers_with_a_kernel_for_every_product_and_the_decode_attention(
    pretend_h100, method
):
    prompt = jnp.ones((1, 8), jnp.int32)
    params = Llama(CONFIG).init(jax.random.key(0), prompt)
    qparams = jqtz.quantize_params(params, [jqtz.Rule(r".*/kernel", _spec(method))])
    cache = quantized_cache_factory("int8")
    paths = decode_paths(CONFIG, qparams, cache_factory=cache)
    assert paths.pop("attention") == "kernel"
    kernel = "w8a8" if SPECS[method][1] == 8 else "w4a16"
    assert set(paths.values()) == {kernel} and len(paths) == 7 * CONFIG.n_layers

    def run(p, tokens):
        return generate(CONFIG, p, tokens, 4, cache_factory=cache)

    text = common.lower_for_cuda(run, qparams, prompt)
    # Prefill (8 rows) and the scanned decode step (1 row) each run every product; the decode
    # step also runs the attention of every layer (prefill attends in XLA).
    assert _kernel_calls(text) == 2 * 7 * CONFIG.n_layers + CONFIG.n_layers
    # No weight is dequantized in XLA: no weight-sized float array exists in the program.
    for shape in (f"{CONFIG.dim}x{CONFIG.hidden_dim}", f"{CONFIG.hidden_dim}x{CONFIG.dim}"):
        assert f"tensor<{shape}xbf16>" not in text and f"tensor<{shape}xf32>" not in text


def test_mosaic_preference_reaches_prefill_products_and_decode_attention(pretend_h100):
    """`use_pallas_kernels(lowering="mosaic")`: a 64-token prefill's W4A16 products (aligned
    dims) and the decode attention take Mosaic GPU; the decode step's one-row products keep
    Triton's GEMV, unless the codes are stored K-major, where the two swap."""
    config = LlamaConfig(vocab_size=96, dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                         hidden_dim=512, max_seq_len=128, tie_embeddings=True,
                         dtype=jnp.bfloat16)  # fmt: skip
    prompt = jnp.ones((1, 64), jnp.int32)
    params = Llama(config).init(jax.random.key(0), prompt)
    qparams = jqtz.quantize_params(params, [jqtz.Rule(r".*/kernel", default_spec("rtn"))])
    cache = quantized_cache_factory("int8")
    with jqtz.nn.use_pallas_kernels(lowering="mosaic"):
        text = common.lower_for_cuda(
            lambda p, t: generate(config, p, t, 4, cache_factory=cache), qparams, prompt
        )
    layers = config.n_layers
    assert _kernel_calls(text, common.MOSAIC_GPU_CUSTOM_CALL) == 7 * layers + layers
    assert _kernel_calls(text) == 7 * layers
    # Codes stored K-major: the decode step's products take Mosaic GPU (MosaicDecodeConfig) and
    # the prefill's keep Triton (MosaicConfig reads codes packed along N).
    served = jqtz.nn.serving_layout(qparams, k_major_4bit=True)
    with jqtz.nn.use_pallas_kernels(lowering="mosaic"):
        text = common.lower_for_cuda(
            lambda p, t: generate(config, p, t, 4, cache_factory=cache), served, prompt
        )
    assert _kernel_calls(text, common.MOSAIC_GPU_CUSTOM_CALL) == 7 * layers + layers
    assert _kernel_calls(text) == 7 * layers


def _dequantized_logits(config, params, tokens):
    with jqtz.nn.quantized_ops():
        return jax.jit(Llama(config).apply)(params, tokens).astype(jnp.float32)


@pytest.mark.parametrize("method", ["rtn", "rtn-k-major", "nf4", "rtn-3bit", "rtn-2bit"])
def test_real_model_through_the_interpreted_kernels_matches_the_xla_path(shared_data, method):
    """stories260K (dim 64, FFN 172: K and N off the tiles) in bfloat16 with default-spec
    weights (4-bit, also stored K-major by `serving_layout`, NF4, and the 3- and 2-bit grids):
    logits with every product on the W4A16 kernel (interpreted) against XLA's on the tree as
    quantized."""
    from jqtz.io.llama2c import load_llama2c

    config, params = load_llama2c(shared_data / "stories260K.bin")
    config = dataclasses.replace(config, dtype=jnp.bfloat16)
    qparams = jqtz.quantize_params(params, [jqtz.Rule(r".*/kernel", _spec(method))])
    served = jqtz.nn.serving_layout(qparams, k_major_4bit=method.endswith("k-major"))
    tokens = jnp.asarray([[1, 403, 407, 261, 378, 448, 409, 259, 21, 1, 356, 431]], jnp.int32)
    with jqtz.nn.use_pallas_kernels(interpret=True):
        paths = decode_paths(config, served)
        kernels = _dequantized_logits(config, served, tokens)
    assert paths.pop("attention") == "xla"  # head dim 8: below the kernel's 16
    assert set(paths.values()) == {"w4a16"} and len(paths) == 7 * config.n_layers
    with jqtz.nn.use_pallas_kernels(False):
        xla = _dequantized_logits(config, qparams, tokens)
    # Both round each product's output to bf16 once; XLA also rounds the dequantized weight.
    assert float(jnp.linalg.norm(kernels - xla) / jnp.linalg.norm(xla)) < 2e-2


def test_real_w8a8_model_in_its_serving_layout_matches_the_xla_path(shared_data):
    """stories260K with SmoothQuant-style W8A8 weights stored `[N, K]` by `serving_layout`:
    every product on the W8A8 kernel (interpreted), reading the codes in place, gives the
    logits of XLA's path on the tree as quantized."""
    from jqtz.io.llama2c import load_llama2c

    config, params = load_llama2c(shared_data / "stories260K.bin")
    config = dataclasses.replace(config, dtype=jnp.bfloat16)
    qparams = jqtz.quantize_params(params, [jqtz.Rule(r".*/kernel", default_spec("smoothquant"))])
    served = jqtz.nn.serving_layout(qparams)
    tokens = jnp.asarray([[1, 403, 407, 261, 378, 448, 409, 259, 21, 1, 356, 431]], jnp.int32)
    with jqtz.nn.use_pallas_kernels(interpret=True):
        paths = decode_paths(config, served)
        kernels = _dequantized_logits(config, served, tokens)
    paths.pop("attention")
    assert set(paths.values()) == {"w8a8"} and len(paths) == 7 * config.n_layers
    with jqtz.nn.use_pallas_kernels(False):
        xla = _dequantized_logits(config, qparams, tokens)
    assert float(jnp.linalg.norm(kernels - xla) / jnp.linalg.norm(xla)) < 2e-2


def test_decode_path_through_the_interpreted_kernels_matches_the_xla_path():
    """Decode-path NLL (every token through the int8 cache) of a model with 64-wide heads and
    ragged dims. In float32 the products stay on XLA and only the decode attention runs on its
    kernel (interpreted): the same NLL as XLA's attention. In bfloat16 every product and the
    attention run on the kernels: within bf16 noise of the float32 NLL (the W4A16 kernel does
    not round the dequantized weight to bf16, which XLA's path does)."""
    from jqtz.eval.decode import decode_perplexity

    params = Llama(CONFIG).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    qparams = jqtz.quantize_params(params, [jqtz.Rule(r".*/kernel", default_spec("rtn"))])
    tokens = jax.random.randint(jax.random.key(1), (80,), 0, CONFIG.vocab_size)
    cache = quantized_cache_factory("int8")
    f32 = dataclasses.replace(CONFIG, dtype=jnp.float32)

    def nll(config, **setting):
        with jqtz.nn.use_pallas_kernels(**setting):
            paths = decode_paths(config, qparams, cache_factory=cache)
            result = decode_perplexity(Llama(config), qparams, tokens, cache, ctx=32, windows=2)
        return result.nll, paths

    xla, _ = nll(f32, enabled=False)
    attention_only, paths = nll(f32, interpret=True)
    assert paths.pop("attention") == "kernel" and set(paths.values()) == {"xla"}
    assert abs(attention_only - xla) < 1e-5
    everything, paths = nll(CONFIG, interpret=True)
    assert paths.pop("attention") == "kernel" and set(paths.values()) == {"w4a16"}
    assert abs(everything - xla) < 1e-2  # bf16 activations between layers


@pytest.mark.parametrize("k_major", [False, True], ids=["codes_along_n", "codes_k_major"])
def test_mosaic_kernels_inside_the_model_match_the_xla_path(k_major):
    """`use_pallas_kernels(lowering="mosaic", interpret=True)` in bfloat16 with aligned dims:
    the 64-token prefill's W4A16 products and every decode step's attention run on their Mosaic
    GPU versions (the Mosaic GPU interpreter), the one-row decode products on Triton's; with
    the codes stored K-major, the decode products on Mosaic GPU and the prefill's on Triton.
    The decode-path NLL is XLA's within bf16 noise."""
    from jqtz.eval.decode import decode_perplexity

    config = LlamaConfig(vocab_size=96, dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                         hidden_dim=512, max_seq_len=128, tie_embeddings=True,
                         dtype=jnp.bfloat16)  # fmt: skip
    params = Llama(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    qparams = jqtz.quantize_params(params, [jqtz.Rule(r".*/kernel", default_spec("rtn"))])
    qparams = jqtz.nn.serving_layout(qparams, k_major_4bit=k_major)
    tokens = jax.random.randint(jax.random.key(1), (80,), 0, config.vocab_size)
    cache = quantized_cache_factory("int8")

    def nll(**setting):
        with jqtz.nn.use_pallas_kernels(**setting):
            paths = decode_paths(config, qparams, cache_factory=cache)
            prefill = jqtz.nn.matmul_path(
                jnp.ones((64, config.dim), jnp.bfloat16),
                qparams["params"]["layers_0"]["mlp"]["up_proj"]["kernel"],
            )
            r = decode_perplexity(Llama(config), qparams, tokens, cache, ctx=80, windows=1,
                                  prefix=64)  # fmt: skip
        return r.nll, paths, prefill

    mosaic, paths, prefill = nll(lowering="mosaic", interpret=True)
    decode, prefill_wanted = ("w4a16-mosaic", "w4a16") if k_major else ("w4a16", "w4a16-mosaic")
    assert paths.pop("attention") == "kernel-mosaic" and set(paths.values()) == {decode}
    assert prefill == prefill_wanted
    xla, _, _ = nll(enabled=False)
    assert abs(mosaic - xla) < 1e-2


def test_layers_stacked_by_scan_reach_the_kernel(pretend_h100):
    """A linen model that scans over stacked layers, quantized per layer (`batch_dims=1`):
    inside the scan each layer's QArray is 2-D, and its product is a kernel launch."""
    import flax.linen as nn

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.Dense(256, dtype=jnp.bfloat16)(x), None

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=4)  # fmt: skip
            return stack()(x, None)[0]

    x = jnp.ones((1, 256), jnp.bfloat16)
    params = Scanned().init(jax.random.key(0), x)
    rule = jqtz.Rule(r".*/kernel", default_spec("rtn"), batch_dims=1)
    qparams = jqtz.quantize_params(params, [rule])

    def run(p, x):
        with jqtz.nn.quantized_ops():
            return Scanned().apply(p, x)

    text = common.lower_for_cuda(run, qparams, x)
    assert _kernel_calls(text) == 1  # one launch, in the scan's body, run for every layer
    assert "tensor<256x256xbf16>" not in text and "tensor<256x256xf32>" not in text
