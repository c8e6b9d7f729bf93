"""The jqtz output folder: a quantized model, its configuration and its tokenizer, on disk.

A folder written by `save_quantized` holds three files:

- `params.safetensors`: every array of the parameter tree. A plain leaf is stored under its
  `/`-joined path (`"params/layers_0/mlp/up_proj/kernel"`); a `QArray` leaf under its path plus
  the name of each data field: `<path>::qvalue`, `<path>::scale`, `<path>::zero_point`,
  `<path>::act_scale`, and for a quantized scale (double quantization) `<path>::scale::qvalue`,
  `<path>::scale::scale`, ... Dtypes the `safetensors.numpy` API cannot hold (bfloat16, the
  float8 types) are stored as their raw bits (uint16 / uint8) and restored from the manifest, so
  a round trip is bit exact.
- `jqtz.json`, the manifest: `format_version`, the model `kind` (`llama` or `bert`), the fields
  of its config dataclass, the static metadata of every `QArray` (format name, shape,
  block_shape, dtype, activation spec), the dtype and shape of every stored array, the tokenizer
  entry, and optionally the quantization report.
- the tokenizer: `tokenizer.json` for `tokenizers`-based tokenizers, `tokenizer.model` (the
  SentencePiece model bytes) for SentencePiece ones.

`load_quantized` checks the manifest against the arrays and validates every `QArray`; a missing
or corrupt file or any disagreement is a `ValueError` that names the file and key.

Example:
    >>> save_quantized(tmp, kind="llama", config=config, params=qparams,
    ...                tokenizer=tokenizer)  # doctest: +SKIP
    >>> kind, config, qparams, tokenizer = load_quantized(tmp)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers

from jqtz import formats
from jqtz.io._common import Tokenizer
from jqtz.io.hf_bert import BertTokenizer
from jqtz.io.llama2c import SentencePieceTokenizer
from jqtz.models.bert import BertConfig
from jqtz.models.llama import LlamaConfig
from jqtz.qarray import QArray
from jqtz.spec import QuantSpec

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "PARAMS",
    "is_quantized_folder",
    "load_quantized",
    "read_manifest",
    "save_quantized",
]

FORMAT_VERSION = 1
MANIFEST = "jqtz.json"
PARAMS = "params.safetensors"
_SEP = "::"
_CONFIGS = {"llama": LlamaConfig, "bert": BertConfig}
# Dtypes `safetensors.numpy` cannot write, stored as raw bits of the same width.
_RAW_BITS = {1: np.uint8, 2: np.uint16}
_NATIVE = {"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
           "float16", "float32", "float64"}  # fmt: skip
_QFIELDS = ("qvalue", "scale", "zero_point", "act_scale", "perm")


def is_quantized_folder(path: os.PathLike | str) -> bool:
    """Whether `path` is a folder holding a `jqtz.json` manifest."""
    return (pathlib.Path(path) / MANIFEST).is_file()


# -- saving ----------------------------------------------------------------------------------


def save_quantized(
    folder: os.PathLike | str,
    *,
    kind: str,
    config: Any,
    params: Any,
    tokenizer: Any,
    report: Any = None,
    source: str | None = None,
) -> pathlib.Path:
    """Writes a model, possibly holding `QArray` leaves, to `folder` (created if needed).

    Args:
        folder: the output folder; it must be new, empty, or an earlier jqtz folder (whose
            files are replaced).
        kind: `"llama"` or `"bert"`.
        config: the `LlamaConfig` / `BertConfig` of the model.
        params: a tree of nested dicts (string keys) whose leaves are arrays or `QArray`s,
            usually flax variables `{"params": ...}` as the loaders return them; stored as
            given, and `load_quantized` returns the same tree.
        tokenizer: a `jqtz.io` tokenizer (`Tokenizer`, `BertTokenizer`,
            `SentencePieceTokenizer`) or None.
        report: a `QuantReport` (or its `to_dict()`), kept in the manifest; optional.
        source: where the full-precision model came from (a path or a packaged model name), kept
            in the manifest so that evaluation can compare with it; optional.

    Returns:
        The folder's path.

    Raises:
        ValueError: unknown `kind`, a config of the wrong type, a non-jqtz non-empty folder, or
            a key holding `/` or `::`.
        TypeError: a tree node that is not a dict, or a tokenizer of an unknown type.
    """
    folder = pathlib.Path(folder)
    if kind not in _CONFIGS:
        raise ValueError(f"`kind` must be one of {sorted(_CONFIGS)}, got {kind!r}")
    if not isinstance(config, _CONFIGS[kind]):
        raise TypeError(
            f"`config` must be a {_CONFIGS[kind].__name__} for kind={kind!r}, "
            f"got {type(config).__name__}"
        )
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder; choose another `--out`")
    if folder.is_dir() and any(folder.iterdir()) and not is_quantized_folder(folder):
        raise ValueError(
            f"{folder}: the folder is not empty and holds no {MANIFEST}; write to a new or empty "
            "folder so that no file of yours is overwritten"
        )
    arrays: dict[str, np.ndarray] = {}
    qmeta: dict[str, dict] = {}
    for path, leaf in _flatten(params):
        if isinstance(leaf, QArray):
            qmeta[path] = _put_qarray(arrays, path, leaf)
        else:
            arrays[path] = np.asarray(leaf)
    stored, array_meta = {}, {}
    for key, value in arrays.items():
        array_meta[key] = {"dtype": value.dtype.name, "shape": list(value.shape)}
        if value.dtype.name not in _NATIVE:
            value = value.view(_RAW_BITS[value.dtype.itemsize])
        stored[key] = np.ascontiguousarray(value)
    if report is not None and not isinstance(report, Mapping):
        report = report.to_dict()
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": _config_to_dict(config),
        "tokenizer": None,
        "qarrays": qmeta,
        "arrays": array_meta,
        "report": report,
        "source": source,
    }
    folder.mkdir(parents=True, exist_ok=True)
    manifest["tokenizer"] = _save_tokenizer(folder, tokenizer)
    safetensors.numpy.save_file(stored, folder / PARAMS, metadata={"format": "jqtz"})
    # The manifest goes last: a folder with one is complete.
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, default=_json_default))
    tmp.replace(folder / MANIFEST)
    return folder


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in {MANIFEST}")


def _flatten(tree, prefix: str = ""):
    """Yields (`/`-joined path, leaf) for a tree of nested string-keyed dicts."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            if not isinstance(key, str) or "/" in key or _SEP in key or not key:
                raise ValueError(
                    f"parameter key {key!r} under {prefix or 'the root'!r}: keys must be "
                    f"non-empty strings without '/' or '{_SEP}'"
                )
            yield from _flatten(value, f"{prefix}/{key}" if prefix else key)
    elif isinstance(tree, QArray) or hasattr(tree, "shape"):
        if not prefix:
            raise TypeError("`params` must be a dict of parameters, got a single array")
        yield prefix, tree
    else:
        raise TypeError(
            f"parameter {prefix or 'root'!r}: expected a dict, an array or a QArray, got "
            f"{type(tree).__name__}; save_quantized stores trees of nested dicts"
        )


def _put_qarray(arrays: dict, key: str, q: QArray) -> dict:
    q = q.with_transposed_codes(False)  # a serving layout is saved in the logical one
    for field in _QFIELDS:
        value = getattr(q, field)
        if field == "scale" and isinstance(value, QArray):
            continue
        if value is not None:
            arrays[f"{key}{_SEP}{field}"] = np.asarray(value)
    scale = q.scale
    return {
        "format": q.format.name,
        "shape": list(q.shape),
        "block_shape": list(q.block_shape),
        "dtype": np.dtype(q.dtype).name,
        "act": None if q.act is None else _spec_to_dict(q.act),
        "scale": _put_qarray(arrays, f"{key}{_SEP}scale", scale)
        if isinstance(scale, QArray)
        else None,
    }


def _spec_to_dict(spec: QuantSpec) -> dict:
    out = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, QuantSpec):
            value = _spec_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _config_to_dict(config) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = np.dtype(value).name if f.name == "dtype" else value
    return out


def _save_tokenizer(folder: pathlib.Path, tokenizer) -> dict | None:
    if tokenizer is None:
        return None
    if isinstance(tokenizer, SentencePieceTokenizer):
        (folder / "tokenizer.model").write_bytes(tokenizer.model_proto())
        return {"kind": "sentencepiece", "file": "tokenizer.model"}
    if isinstance(tokenizer, BertTokenizer):
        (folder / "tokenizer.json").write_text(tokenizer.to_json())
        return {
            "kind": "bert",
            "file": "tokenizer.json",
            "max_length": tokenizer.max_length,
            "pad_id": tokenizer.pad_id,
        }
    if isinstance(tokenizer, Tokenizer):
        (folder / "tokenizer.json").write_text(tokenizer.backend.to_str())
        return {
            "kind": "tokenizers",
            "file": "tokenizer.json",
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
        }
    raise TypeError(
        "`tokenizer` must be a jqtz.io Tokenizer, BertTokenizer, SentencePieceTokenizer or None, "
        f"got {type(tokenizer).__name__}"
    )


# -- loading ---------------------------------------------------------------------------------


def read_manifest(folder: os.PathLike | str) -> dict:
    """The parsed `jqtz.json` of `folder` (source, report, ...), unchecked beyond being JSON.

    Raises:
        ValueError: the manifest is missing or not a JSON object.
    """
    mpath = pathlib.Path(folder) / MANIFEST
    if not mpath.is_file():
        raise ValueError(
            f"{mpath}: missing; {mpath.parent} is not a jqtz folder (`jqtz quantize ... --out DIR` "
            "writes one)"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{mpath}: not valid JSON ({err}); the file is corrupt") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{mpath}: must hold a JSON object, got {type(manifest).__name__}")
    return manifest


def load_quantized(folder: os.PathLike | str) -> tuple[str, Any, dict, Any]:
    """Reads a folder written by `save_quantized`.

    Returns:
        `(kind, config, params, tokenizer)`: `params` holds jax arrays and validated `QArray`s,
        bit-identical to what was saved; `tokenizer` is None when none was saved.

    Raises:
        ValueError: the folder, the manifest, the arrays file or the tokenizer is missing or
            corrupt, or the manifest and the arrays disagree (the message names file and key).
    """
    folder = pathlib.Path(folder)
    mpath = folder / MANIFEST
    manifest = read_manifest(folder)
    m = _Manifest(mpath, manifest)
    version = m.get(manifest, "format_version", int)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{mpath}: `format_version` is {version}, this jqtz reads version {FORMAT_VERSION}"
        )
    kind = m.get(manifest, "kind", str)
    if kind not in _CONFIGS:
        raise ValueError(f"{mpath}: `kind` must be one of {sorted(_CONFIGS)}, got {kind!r}")
    config = m.config(_CONFIGS[kind], m.get(manifest, "config", dict))
    arrays = _load_arrays(folder / PARAMS, m, m.get(manifest, "arrays", dict))
    qmeta = m.get(manifest, "qarrays", dict)
    flat: dict[str, Any] = {}
    for key in arrays:
        if _SEP not in key:
            flat[key] = jnp.asarray(arrays[key])
    for path, meta in qmeta.items():
        flat[path] = _get_qarray(arrays, path, meta, m)
    used = set()
    for path, meta in qmeta.items():
        used |= _qarray_keys(path, meta)
    unused = sorted(k for k in arrays if _SEP in k and k not in used)
    if unused:
        raise ValueError(
            f"{folder / PARAMS}: key `{unused[0]}` belongs to no QArray of {mpath}; the files "
            "come from different saves"
        )
    tokenizer = _load_tokenizer(folder, m, manifest.get("tokenizer"))
    return kind, config, _unflatten(flat), tokenizer


class _Manifest:
    """Typed reads from the manifest, with errors naming the file and key."""

    def __init__(self, path: pathlib.Path, data: dict):
        self.path = path

    def get(self, node: dict, key: str, typ, where: str = ""):
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"{self.path}: `{where}{key}` is missing; the manifest is corrupt")
        value = node[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(
                f"{self.path}: `{where}{key}` must be {getattr(typ, '__name__', typ)}, got "
                f"{value!r}; the manifest is corrupt"
            )
        return value

    def config(self, cls, fields: dict):
        try:
            return cls(**{k: (jnp.dtype(v) if k == "dtype" else v) for k, v in fields.items()})
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{self.path}: `config` is not a valid {cls.__name__}: {err}"
            ) from None


def _load_arrays(path: pathlib.Path, m: _Manifest, meta: dict) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"{path}: missing; the jqtz folder is incomplete")
    try:
        raw = safetensors.numpy.load_file(path)
    except Exception as err:  # safetensors raises its own error types on a corrupt file
        raise ValueError(
            f"{path}: not a readable safetensors file ({err}); it is corrupt"
        ) from None
    missing = sorted(set(meta) - set(raw))
    extra = sorted(set(raw) - set(meta))
    if missing or extra:
        key = missing[0] if missing else extra[0]
        problem = (
            f"is in {m.path.name} but not in {path.name}"
            if missing
            else (f"is in {path.name} but not in {m.path.name}")
        )
        raise ValueError(f"{path}: key `{key}` {problem}; the files come from different saves")
    out = {}
    for key, value in raw.items():
        info = meta[key]
        dtype_name = m.get(info, "dtype", str, f"arrays/{key}/")
        shape = tuple(m.get(info, "shape", list, f"arrays/{key}/"))
        try:
            dtype = np.dtype(jnp.dtype(dtype_name))
        except TypeError:
            raise ValueError(f"{m.path}: `arrays/{key}/dtype` {dtype_name!r} is unknown") from None
        if dtype.name not in _NATIVE:
            want = _RAW_BITS.get(dtype.itemsize)
            if want is None or value.dtype != want:
                raise ValueError(
                    f"{path}: key `{key}` holds {value.dtype}, expected the raw bits of "
                    f"{dtype_name}"
                )
            value = value.view(dtype)
        if value.dtype != dtype or value.shape != shape:
            raise ValueError(
                f"{path}: key `{key}` is {value.dtype}{list(value.shape)}, {m.path.name} says "
                f"{dtype_name}{list(shape)}"
            )
        out[key] = value
    return out


def _qarray_keys(key: str, meta: dict) -> set[str]:
    keys = {f"{key}{_SEP}{f}" for f in _QFIELDS}
    if isinstance(meta, dict) and isinstance(meta.get("scale"), dict):
        keys |= _qarray_keys(f"{key}{_SEP}scale", meta["scale"])
    return keys


def _get_qarray(arrays: dict, key: str, meta: dict, m: _Manifest) -> QArray:
    where = f"qarrays/{key}/"
    try:
        fmt = formats.get(m.get(meta, "format", str, where))
    except (ValueError, KeyError) as err:
        raise ValueError(f"{m.path}: `{where}format`: {err}") from None
    try:
        dtype = np.dtype(jnp.dtype(m.get(meta, "dtype", str, where)))
    except TypeError:
        raise ValueError(f"{m.path}: `{where}dtype` {meta['dtype']!r} is unknown") from None
    act = meta.get("act")
    try:
        act = None if act is None else _spec_from_dict(act)
    except (TypeError, ValueError, NotImplementedError) as err:
        raise ValueError(f"{m.path}: `{where}act` is not a valid QuantSpec: {err}") from None
    nested = meta.get("scale")

    def field(name):
        value = arrays.get(f"{key}{_SEP}{name}")
        return None if value is None else jnp.asarray(value)

    if nested is not None:
        scale = _get_qarray(arrays, f"{key}{_SEP}scale", nested, m)
    else:
        scale = field("scale")
        if scale is None:
            raise ValueError(f"{m.path}: `{key}{_SEP}scale` is missing from {PARAMS}")
    if f"{key}{_SEP}qvalue" not in arrays:
        raise ValueError(f"{m.path}: `{key}{_SEP}qvalue` is missing from {PARAMS}")
    q = QArray(
        qvalue=field("qvalue"),
        scale=scale,
        zero_point=field("zero_point"),
        format=fmt,
        shape=tuple(m.get(meta, "shape", list, where)),
        block_shape=tuple(m.get(meta, "block_shape", list, where)),
        dtype=dtype,
        act=act,
        act_scale=field("act_scale"),
        perm=field("perm"),
    )
    try:
        return q.validate()
    except ValueError as err:
        raise ValueError(
            f"{m.path.parent / PARAMS}: QArray `{key}` is inconsistent: {err}"
        ) from None


def _spec_from_dict(d: dict) -> QuantSpec:
    if not isinstance(d, dict):
        raise TypeError(f"expected an object, got {d!r}")
    d = dict(d)
    if isinstance(d.get("axis"), list):
        d["axis"] = tuple(d["axis"])
    if isinstance(d.get("block_shape"), list):
        d["block_shape"] = tuple(d["block_shape"])
    if d.get("activation") is not None:
        d["activation"] = _spec_from_dict(d["activation"])
    return QuantSpec(**d)


def _unflatten(flat: dict[str, Any]) -> dict:
    root: dict = {}
    for path in sorted(flat):
        *parents, leaf = path.split("/")
        node = root
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = flat[path]
    return root


def _load_tokenizer(folder: pathlib.Path, m: _Manifest, entry) -> Any:
    if entry is None:
        return None
    kind = m.get(entry, "kind", str, "tokenizer/")
    path = folder / m.get(entry, "file", str, "tokenizer/")
    if not path.is_file():
        raise ValueError(f"{path}: missing; {m.path} names it as the tokenizer")
    if kind == "sentencepiece":
        try:
            return SentencePieceTokenizer(path)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{path}: not a readable SentencePiece model ({err})") from None
    if kind not in ("bert", "tokenizers"):
        raise ValueError(f"{m.path}: `tokenizer/kind` {kind!r} is unknown")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{path}: not a readable tokenizer.json ({err})") from None
    if kind == "bert":
        return BertTokenizer(
            backend,
            max_length=m.get(entry, "max_length", int, "tokenizer/"),
            pad_id=m.get(entry, "pad_id", int, "tokenizer/"),
        )
    return Tokenizer(backend, bos_id=entry.get("bos_id"), eos_id=entry.get("eos_id"))
