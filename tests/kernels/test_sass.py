"""`pallas_kernels.sass`: the compiled kernel's instruction mix, without a GPU."""

import importlib.util
import re

import pytest

from pallas_kernels import sass

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Pallas Triton lowering

HAS_TRITON = importlib.util.find_spec("triton") is not None

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDGSTS.E.64 [R89], desc[UR10][R8.64], !P0 ;
        /*0020*/              @!P0 BRA 0x50 ;
        /*0030*/                   LDS R4, [R2] ;
        /*0040*/                   HMMA.16816.F32.BF16 R56, R24, R56, RZ ;
        /*0050*/                   LDS R5, [R2+0x4] ;
        /*0060*/                   LOP3.LUT R6, R5, 0xf, RZ, 0xc0, !PT ;
        /*0070*/               @P0 BRA 0x30 ;
        /*0080*/                   EXIT ;
"""


def test_loop_mix_reads_the_innermost_loop():
    """The body from the backward branch's target to the branch; a forward branch is not a
    loop."""
    count, mix = sass.loop_mix(SASS)
    assert count == 5 and mix == {"LDS": 2, "HMMA": 1, "LOP3": 1, "BRA": 1}
    assert sass.loop_mix("  /*0000*/  EXIT ;") == (0, {})


@pytest.mark.skipif(HAS_TRITON, reason="triton is installed")
def test_without_triton_the_command_says_what_to_install(capsys):
    assert sass.main(["w4a16"]) == 0
    assert "pip install triton" in capsys.readouterr().out


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package (not a jqtz dependency)")
def test_an_unrolled_kernel_is_read_whole(capsys):
    """A short static loop (8 K steps) that ptxas unrolls has no backward branch: the tool says
    so and counts the whole kernel instead of printing an empty loop."""
    args = ["w8a8", "--kind", "fp8", "--m", "256", "--n", "256", "--k", "1024", "--k-major"]
    assert sass.main(args) == 0
    out = capsys.readouterr().out
    assert "no loop (unrolled, or no steps): whole kernel" in out and "QGMMA" in out, out


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package (not a jqtz dependency)")
def test_decode_gemv_compiles_for_sm90(capsys):
    cfg = "TuningConfig(block_n=128, split_k=1, fold_zero=True)"  # a loop of 8 K steps
    assert sass.main(["w4a16", "--n", "1024", "--k", "1024", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "registers per thread" in out and "HMMA" in out
    # Scale and zero-point rows: one load each per step, issued a step ahead (not one strided
    # load per plane that the step waits for).
    waits = re.search(r"\bLDG (\d+)", out)
    assert waits is None or int(waits.group(1)) <= 2, out


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package (not a jqtz dependency)")
def test_fp8_product_runs_on_fp8_tensor_cores(capsys):
    """From 64-row tiles the fp8 W8A8 step is fp8 `wgmma` (QGMMA), not codes converted to
    float16 for `mma.sync` (F2FP, HMMA); int8 sums stay int32 (no I2FP in the loop)."""
    for kind, want, unwanted in (("fp8", "QGMMA", ("HMMA", "F2FP")), ("int8", "IGMMA", ("I2FP",))):
        args = ["w8a8", "--kind", kind, "--m", "256", "--n", "256", "--k", "4096", "--k-major"]
        assert sass.main(args) == 0
        out = capsys.readouterr().out
        loop = out.split("innermost loop body:")[1]  # 32 K steps: a loop
        assert want in loop and not any(f" {op} " in loop for op in unwanted), out
