"""Quantizing sharded weights on 8 (fake CPU) devices: same bytes, shardings that line up.

XLA reads `--xla_force_host_platform_device_count` only when it starts, so the checks run in a
fresh Python process; it prints one JSON line per case and the tests below read them.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

CASES = {
    # name: (mesh shape, mesh axes, weight sharding, spec keywords[, mesh axis type]). Weights
    # are [in, out] (contraction axis 0). `jax.make_mesh` axes are Explicit unless "auto".
    "int8-channel-out-axis": ((2, 4), ("data", "model"), (None, "model"), dict(format="int8")),
    "int4-g32-asym-bf16-out-axis": (
        (2, 4), ("data", "model"), (None, "model"),
        dict(format="int4", granularity="group", group_size=32, symmetric=False,
             scale_dtype="bfloat16"),
    ),
    "int4-g32-in-axis": (
        (2, 4), ("data", "model"), ("model", None),
        dict(format="int4", granularity="group", group_size=32),
    ),
    "int4-g32-both-axes": (
        (2, 4), ("data", "model"), ("data", "model"),
        dict(format="int4", granularity="group", group_size=32),
    ),
    "int3-g32-8dev-out-axis": (
        (8,), ("x",), (None, "x"), dict(format="int3", granularity="group", group_size=32),
    ),
    "nf4-g32-8dev-out-axis": (
        (8,), ("x",), (None, "x"), dict(format="nf4", granularity="group", group_size=32),
    ),
    "fp8_e4m3-block32x16-8dev-in-axis": (
        (8,), ("x",), ("x", None),
        dict(format="fp8_e4m3", granularity="block", block_shape=(32, 16)),
    ),
    "nf4-g32-8dev-out-axis-auto": (
        (8,), ("x",), (None, "x"), dict(format="nf4", granularity="group", group_size=32), "auto",
    ),
    "fp8_e4m3-block32x16-8dev-in-axis-auto": (
        (8,), ("x",), ("x", None),
        dict(format="fp8_e4m3", granularity="block", block_shape=(32, 16)), "auto",
    ),
}  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jqtz

    assert jax.device_count() == 8, jax.devices()
    cases = json.loads(sys.argv[1])

    def spec_of(x):
        s = tuple(x.sharding.spec)
        return list(s + (None,) * (x.ndim - len(s)))

    def same(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()

    w = jax.random.normal(jax.random.key(0), (256, 128)) * jnp.linspace(0.5, 2.0, 128)
    def check(mesh_shape, axes, pspec, kw, axis_type="explicit"):
        types = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[axis_type]
        mesh = jax.make_mesh(tuple(mesh_shape), tuple(axes), axis_types=(types,) * len(axes))
        spec = jqtz.QuantSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
        ws = jax.device_put(w, NamedSharding(mesh, P(*pspec)))
        q = jax.jit(lambda x: jqtz.quantize(x, spec))(ws)
        ref = jqtz.quantize(w, spec)
        leaves = {"qvalue": q.qvalue, "scale": q.scale}
        if q.zero_point is not None:
            leaves["zero_point"] = q.zero_point
        deq = q.dequantize()
        deq_jit = jax.jit(lambda q: q.dequantize())(q)
        return {
            "weight": spec_of(ws),
            "bytes_equal": all(
                same(a, b) for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(ref), strict=True)
            ),
            "specs": {k: spec_of(v) for k, v in leaves.items()},
            "devices": {k: len(v.sharding.device_set) for k, v in leaves.items()},
            "shard_shapes": {
                k: list(v.addressable_shards[0].data.shape) for k, v in leaves.items()
            },
            "shapes": {k: list(v.shape) for k, v in leaves.items()},
            "deq_equal": same(deq, ref.dequantize()) and same(deq_jit, ref.dequantize()),
            "deq_spec": spec_of(deq_jit),
        }

    for name, case in cases.items():
        try:
            out = check(*case)
        except Exception as e:  # reported per case by the tests
            out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        print(json.dumps({"case": name, **out}), flush=True)
    """
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    script = tmp_path_factory.mktemp("sharding") / "check_sharding.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(CASES)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in lines}


@pytest.mark.parametrize("case", CASES)
def test_sharded_quantize_equals_unsharded_bit_for_bit(results, case):
    r = results[case]
    assert "error" not in r, r["error"]
    assert r["bytes_equal"]
    assert r["deq_equal"]


@pytest.mark.parametrize("case", CASES)
def test_codes_and_scales_are_sharded_along_the_weights_axis(results, case):
    r = results[case]
    assert "error" not in r, r["error"]
    pspec = list(CASES[case][2])
    assert r["weight"] == pspec
    for leaf in r["specs"]:
        # Same mesh axis on the same logical dimension as the weight: no gather was needed.
        assert r["specs"][leaf] == pspec, (leaf, r["specs"][leaf])
        assert r["devices"][leaf] == 8
        mesh = dict(zip(CASES[case][1], CASES[case][0], strict=True))
        want = [s // (mesh[a] if a else 1) for s, a in zip(r["shapes"][leaf], pspec, strict=True)]
        assert r["shard_shapes"][leaf] == want, leaf
    assert r["deq_spec"] == pspec
