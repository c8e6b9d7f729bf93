"""The serving path end to end on a pretend H100: the reference Llama's `generate` with
quantized weights and a quantized KV cache, lowered for CUDA on this CPU machine.

The kernel tests check each kernel alone; this checks that the model reaches them: every
quantized product of prefill and decode and the decode attention become Pallas kernels inside
the jitted `generate` (its `lax.scan` included), for the shapes and dtypes the model really
produces. The weights have SmolLM2-like dimensions that are not multiples of the tiles.
"""

import re

import jax
import jax.numpy as jnp
import pytest

import jqtz
from jqtz.models.llama import Llama, LlamaConfig, decode_paths, generate
from jqtz.models.quantized_kv_cache import quantized_cache_factory
from jqtz.ptq import default_spec
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


@pytest.mark.parametrize("method", ["rtn", "nf4", "smoothquant"])
def test_generate_lowers_with_a_kernel_for_every_product_and_the_decode_attention(
    pretend_h100, method
):
    prompt = jnp.ones((1, 8), jnp.int32)
    params = Llama(CONFIG).init(jax.random.key(0), prompt)
    qparams = jqtz.quantize_params(params, [jqtz.Rule(r".*/kernel", default_spec(method))])
    cache = quantized_cache_factory("int8")
    paths = decode_paths(CONFIG, qparams, cache_factory=cache)
    assert paths.pop("attention") == "kernel"
    kernel = "w8a8" if method == "smoothquant" else "w4a16"
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
    Triton's GEMV."""
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
