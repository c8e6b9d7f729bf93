"""`pallas_kernels.sass`: the compiled kernel's instruction mix, without a GPU."""

import importlib.util
import re

import pytest

from pallas_kernels import sass

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
def test_decode_gemv_compiles_for_sm90(capsys):
    cfg = "TuningConfig(block_n=128, split_k=1, fold_zero=True)"  # a loop of 8 K steps
    assert sass.main(["w4a16", "--n", "1024", "--k", "1024", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "registers per thread" in out and "HMMA" in out
    # Scale and zero-point rows: one load each per step, issued a step ahead (not one strided
    # load per plane that the step waits for).
    waits = re.search(r"\bLDG (\d+)", out)
    assert waits is None or int(waits.group(1)) <= 2, out
