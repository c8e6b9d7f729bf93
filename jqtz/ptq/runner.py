"""Sequential, block-by-block calibration: the loop every PTQ algorithm runs in.

For block i: the calibration tokens' activations at its input `X_i` (computed once from the
embedding, then carried forward) are run through the block while an interceptor records the
input of each linear group and reduces it, inside `jit`, to what algorithms need
(`InputStats`: X^T X in float32, per-channel max |x| and mean |x|). The method quantizes the
block (possibly group by group in true-sequential order, recapturing after each group), and
`X_{i+1}` is recomputed **through the quantized block** (`propagate=False` uses the
full-precision block instead).

Memory: the block input `X_i` and output `X_{i+1}` (2 x samples x seq_len x dim float32), one
group's X^T X (`in x in` float32) and one batch's intermediate activations; never the whole
model's activations. For SmolLM2-135M with 128 x 512 tokens: 2 x 151 MB + at most 9 MB.

Example (RTN through the runner; calibration-based methods use the same call):
  >>> import jax, jax.numpy as jnp, jqtz
  >>> from jqtz.models.llama import Llama, LlamaConfig
  >>> from jqtz.ptq import Recipe, llama_layout, quantize_model
  >>> config = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
  ...                      hidden_dim=64, max_seq_len=64, tie_embeddings=True)
  >>> params = Llama(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  >>> tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
  >>> q, report = quantize_model(params, llama_layout(config), tokens, Recipe(method="rtn"))
  >>> q["params"]["layers_1"]["mlp"]["down_proj"]["kernel"]
  QArray(uint4, shape=(64, 32), channel, scale=float16, dtype=float32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jqtz.nn import quantized_ops
from jqtz.ptq.layout import LinearGroup, ModelLayout


@dataclasses.dataclass(frozen=True)
class InputStats:
    """What calibration saw at the input of one linear group (float32).

    Attributes:
      xtx: `[in, in]` sum of x^T x over tokens (None unless asked for).
      absmax: `[in]` max |x| per input channel.
      abssum: `[in]` sum |x| per input channel.
      n_tokens: tokens seen.
      sample: `[n, in]` input tokens kept for methods that need raw inputs (or None).
    """

    xtx: jax.Array | None
    absmax: jax.Array
    abssum: jax.Array
    n_tokens: int
    sample: jax.Array | None = None

    @property
    def hessian(self) -> jax.Array:
        """GPTQ's H = 2/n * sum x^T x."""
        return self.xtx * (2.0 / self.n_tokens)

    @property
    def mean_abs(self) -> jax.Array:
        return self.abssum / self.n_tokens


@dataclasses.dataclass
class LayerRecord:
    """One quantized linear in the report."""

    path: str
    method: str
    spec: str
    seconds: float
    loss: float | None = None
    note: str = ""


def _batches(data, batch_size):
    n = jax.tree.leaves(data)[0].shape[0]
    for start in range(0, n, batch_size):
        yield jax.tree.map(lambda a, s=start: a[s : s + batch_size], data)


def _get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree, path, value):
    """A copy of nested dict `tree` with `path` replaced (siblings are shared, not copied)."""
    key, _, rest = path.partition("/")
    out = dict(tree)
    out[key] = _set(tree[key], rest, value) if rest else value
    return out


class BlockContext:
    """What a method sees of one block: its parameters, capture, scoring and reporting."""

    def __init__(self, runner: _Runner, index: int, path: str, block_params):
        self._runner = runner
        self.index = index
        self.path = path  # e.g. "layers_3"
        self.fp_params = block_params
        self.params = block_params
        self.layout = runner.layout
        self._notes: dict[str, tuple[str, float]] = {}

    # -- parameters ------------------------------------------------------------------------
    def kernel(self, linear: str):
        return _get(self.params, f"{linear}/kernel")

    def params_at(self, rel_path: str):
        return _get(self.params, rel_path)

    @staticmethod
    def with_leaf(block_params, rel_path: str, value):
        """`block_params` with one leaf replaced (for candidates that are scored, not kept)."""
        return _set(block_params, rel_path, value)

    def set(self, rel_path: str, value) -> None:
        """Replace a leaf of the block (`"mlp/up_proj/kernel"`, `"input_layernorm/scale"`)."""
        self.params = _set(self.params, rel_path, value)

    def has(self, rel_path: str) -> bool:
        try:
            _get(self.params, rel_path)
        except (KeyError, TypeError):
            return False
        return True

    def spec(self, linear: str):
        """The `QuantSpec` the recipe's rules give this linear, or None to keep it."""
        return self._runner.specs.get(f"params/{self.path}/{linear}/kernel")

    # -- calibration data --------------------------------------------------------------------
    def capture(
        self, groups: tuple[LinearGroup, ...], *, xtx: bool = False, sample: int = 0
    ) -> dict:
        """Run the block's current parameters on the calibration inputs; return the
        `InputStats` of each group's input, keyed by the group's first linear. `sample` keeps
        that many input tokens (spread evenly over the calibration data)."""
        return self._runner.capture(self, groups, xtx=xtx, sample=sample)

    def score_batches(self) -> list:
        """`[(x, aux), ...]`: the first calibration batches at this block's input, covering at
        least `n_score` samples, for methods that score candidates on block outputs."""
        return self._runner.score_batches()

    def run(self, block_params, x, aux):
        """The block's output for `block_params` (jitted, under `quantized_ops()`)."""
        return self._runner.run_block(block_params, x, aux)

    # -- reporting ---------------------------------------------------------------------------
    def note(self, linears, text: str, seconds: float = 0.0) -> None:
        """Attach `text` (and time) to the report rows of `linears`, written by `record`."""
        for name in linears:
            self._notes[name] = (text, seconds)

    def pop_note(self, linear: str) -> str:
        return self._notes.pop(linear, ("", 0.0))[0]

    def record(self, linear, method, seconds, loss=None, note=""):
        spec = self.spec(linear)
        desc = "keep" if spec is None else f"{spec.storage_format.name} {spec.granularity}"
        rec = LayerRecord(f"params/{self.path}/{linear}/kernel", method, desc, seconds, loss, note)
        self._runner.records.append(rec)
        if self._runner.progress is not None:
            self._runner.progress(self.index, len(self.layout.block_paths), rec)


@dataclasses.dataclass
class PTQReport:
    """Per-linear results of a calibrated quantization, and the run's totals."""

    layers: list[LayerRecord]
    seconds: float
    n_samples: int
    seq_len: int

    def __str__(self):
        from jqtz.report import format_table

        rows = [
            [
                r.path,
                r.method,
                r.spec,
                "-" if r.loss is None else f"{r.loss:.4g}",
                f"{r.seconds:.2f}",
                r.note,
            ]
            for r in self.layers
        ]
        table = format_table(
            ["layer", "method", "quantized", "loss", "seconds", "note"], rows, {3, 4}
        )
        return (
            f"{table}\n\n{len(self.layers)} layers in {self.seconds:.1f} s "
            f"({self.n_samples} x {self.seq_len} calibration tokens)"
        )

    def to_dict(self):
        return {
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "seconds": self.seconds,
            "n_samples": self.n_samples,
            "seq_len": self.seq_len,
        }


class _Runner:
    def __init__(self, params, layout: ModelLayout, data, specs, *, batch_size, n_score, progress):
        self.params = params
        self.layout = layout
        self.specs = specs
        self.batch_size = batch_size
        self.n_score = n_score
        self.progress = progress
        self.records: list[LayerRecord] = []
        self._run = jax.jit(self._run_block_impl)
        self._capture_fns: dict = {}
        xs, auxes = [], []
        for batch in _batches(data, batch_size):
            x, aux = layout.embed(params, batch)
            xs.append(x)
            auxes.append(aux)
        self.x = xs  # per batch: (B, T, D) float32 at the current block's input
        self.aux = auxes

    def _run_block_impl(self, block_params, x, aux):
        with quantized_ops():
            return self.layout.run_block(block_params, x, aux)

    def run_block(self, block_params, x, aux):
        return self._run(block_params, x, aux)

    def score_batches(self):
        """The first calibration batches, covering at least `n_score` samples."""
        out, n = [], 0
        for x, aux in zip(self.x, self.aux, strict=True):
            if n >= self.n_score:
                break
            out.append((x, aux))
            n += x.shape[0]
        return out

    def _capture_fn(self, names: tuple[str, ...], xtx: bool, per_batch: int):
        key = (names, xtx, per_batch)
        if key not in self._capture_fns:
            layout = self.layout

            def fn(block_params, x, aux):
                seen = {}

                def interceptor(next_fun, args, kwargs, context):
                    if context.method_name == "__call__" and isinstance(
                        context.module, (nn.Dense, nn.DenseGeneral)
                    ):
                        path = "/".join(context.module.scope.path)
                        if path in names and path not in seen:
                            seen[path] = args[0]
                    return next_fun(*args, **kwargs)

                # Outermost, so it sees layers that quantized_ops() then handles itself.
                with nn.intercept_methods(interceptor), quantized_ops():
                    layout.run_block(block_params, x, aux)
                out = {}
                for path, a in seen.items():
                    a = a.astype(jnp.float32).reshape(-1, a.shape[-1])  # (tokens, in)
                    out[path] = {
                        "xtx": jnp.dot(a.T, a, precision=jax.lax.Precision.HIGHEST)
                        if xtx
                        else None,
                        "absmax": jnp.max(jnp.abs(a), axis=0),
                        "abssum": jnp.sum(jnp.abs(a), axis=0),
                        "n": a.shape[0],
                        "sample": a[:: max(1, a.shape[0] // per_batch)][:per_batch]
                        if per_batch
                        else None,
                    }
                return out

            self._capture_fns[key] = jax.jit(fn)
        return self._capture_fns[key]

    def capture(self, ctx: BlockContext, groups, *, xtx, sample=0):
        names = tuple(g.linears[0] for g in groups)
        per_batch = -(-sample // len(self.x)) if sample else 0
        fn = self._capture_fn(names, xtx, per_batch)
        acc: dict[str, dict] = {}
        for x, aux in zip(self.x, self.aux, strict=True):
            for path, s in fn(ctx.params, x, aux).items():
                if path not in acc:
                    acc[path] = dict(s)
                    continue
                a = acc[path]
                a["absmax"] = jnp.maximum(a["absmax"], s["absmax"])
                a["abssum"] = a["abssum"] + s["abssum"]
                a["n"] = a["n"] + s["n"]
                if xtx:
                    a["xtx"] = a["xtx"] + s["xtx"]
                if per_batch:
                    a["sample"] = jnp.concatenate([a["sample"], s["sample"]])
        out = {}
        for name in names:
            if name not in acc:
                raise ValueError(
                    f"params/{ctx.path}/{name}/kernel received no calibration tokens: the layout "
                    "names a linear the block does not run (check the ModelLayout), or it is not "
                    "an nn.Dense"
                )
            a = acc[name]
            if not bool(jnp.all(jnp.isfinite(a["absmax"]))):
                raise ValueError(
                    f"non-finite activations at the input of params/{ctx.path}/{name}/kernel "
                    "during calibration: the model or the previous quantized blocks produce "
                    "NaN/Inf on this data"
                )
            smp = None if a["sample"] is None else a["sample"][:sample]
            out[name] = InputStats(a["xtx"], a["absmax"], a["abssum"], int(a["n"]), smp)
        return out

    def advance(self, block_params):
        self.x = [self._run(block_params, x, aux) for x, aux in zip(self.x, self.aux, strict=True)]


def run_blocks(
    params,
    layout: ModelLayout,
    data,
    specs: dict,
    quantize_block: Callable,
    *,
    batch_size: int = 8,
    n_score: int = 8,
    propagate: bool = True,
    progress: Callable | None = None,
):
    """Drive `quantize_block(ctx: BlockContext) -> block_params` over every block in order.

    Args:
      params: `{"params": ...}` of the model.
      layout: its `ModelLayout`.
      data: calibration inputs for `layout.embed` (e.g. int tokens `(N, T)`), batched along
        axis 0 by `batch_size`.
      specs: full kernel path -> `QuantSpec` (None: keep), from the recipe's rules.
      quantize_block: the method's per-block procedure.
      n_score: samples used where a method scores candidates on block outputs (AWQ).
      propagate: compute the next block's input through the quantized block (else through
        the full-precision one).
      progress: `progress(block_index, n_blocks, LayerRecord)` after each layer.

    Returns:
      (quantized params, list of `LayerRecord`).
    """
    n = jax.tree.leaves(data)[0].shape[0] if jax.tree.leaves(data) else 0
    if n == 0:
        raise ValueError("calibration data is empty: give at least one sample")
    runner = _Runner(
        params, layout, data, specs, batch_size=batch_size, n_score=n_score, progress=progress
    )
    out = params
    for i, bpath in enumerate(layout.block_paths):
        if bpath not in params["params"]:
            raise ValueError(f"the layout names block {bpath!r}, which params do not have")
        block = params["params"][bpath]
        ctx = BlockContext(runner, i, bpath, block)
        qblock = quantize_block(ctx)
        out = _set(out, f"params/{bpath}", qblock)
        runner.advance(qblock if propagate else block)
    return out, runner.records
