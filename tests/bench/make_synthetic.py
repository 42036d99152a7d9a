"""Write a synthetic LLaMA-shaped GGUF model with random weights, for speed and memory at the
sizes people run on Pis. Output quality does not matter: speed and memory do.

    python tests/bench/make_synthetic.py OUT.gguf [--size 1b|7b] [--type Q4_0|Q4_1|Q8_0]

Shapes are TinyLlama-1.1B's (dim 2048, FFN 5632, 22 layers, 32 heads, 4 KV heads) and
Llama-2-7B's (4096, 11008, 32, 32, 32), vocabulary 32000. Weights are random block bytes with
scales chosen so each matrix has about 1/sqrt(fan-in) spread, written as the type's raw
blocks through gguf.GGUFWriter (no quantization pass, so 7B takes seconds, not an hour); norms
are F32 ones. The tokenizer is the tiny byte-level BPE of tests/tiny_models.py padded with
unused tokens up to the vocabulary size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import tiny_vocabulary, write_gguf  # noqa: E402

SIZES = {  # dim, hidden_dim, n_layers, n_heads, n_kv_heads
    "1b": (2048, 5632, 22, 32, 4),
    "7b": (4096, 11008, 32, 32, 32),
}
VOCAB = 32000
# Spread of the stored integer q in each format (uniform over its range), to size the scale d.
_Q_SPREAD = {QT.Q4_0: 4.6, QT.Q4_1: 4.6, QT.Q8_0: 74.0}


def random_blocks(ttype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, row_bytes) uint8 raw GGUF blocks: random quants, d = 1 / (spread * sqrt(cols)),
    and for Q4_1 a minimum m = -7.5 d so values centre on zero (ggml-common.h layouts)."""
    block_size, type_size = GGML_QUANT_SIZES[ttype]
    blocks = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    d = np.float16(1.0 / (_Q_SPREAD[ttype] * np.sqrt(cols)))
    blocks[:, :, 0:2] = np.frombuffer(d.tobytes(), np.uint8)
    if ttype == QT.Q4_1:
        blocks[:, :, 2:4] = np.frombuffer(np.float16(-7.5 * float(d)).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def synthetic_llama(size: str, ttype: QT, seed: int = 0):
    dim, hidden_dim, n_layers, n_heads, n_kv_heads = SIZES[size]
    tokens, merges, types = tiny_vocabulary(300)
    pad = VOCAB - len(tokens)
    tokens = tokens + [f"<|unused_{i}|>" for i in range(pad)]
    types = types + [5] * pad  # gguf TokenType.UNUSED
    metadata = {
        "general.architecture": "llama",
        "general.name": f"synthetic-{size}-{ttype.name.lower()}",
        "llama.block_count": n_layers,
        "llama.context_length": 4096,
        "llama.embedding_length": dim,
        "llama.feed_forward_length": hidden_dim,
        "llama.attention.head_count": n_heads,
        "llama.attention.head_count_kv": n_kv_heads,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 299,
        "tokenizer.ggml.eos_token_id": 299,
    }
    rng = np.random.default_rng(seed)
    head_dim = dim // n_heads
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    ones = (np.ones(dim, np.float32), QT.F32)
    tensors = {"token_embd.weight": (random_blocks(ttype, VOCAB, dim, rng), ttype)}
    for i in range(n_layers):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = ones
        tensors[p + "attn_q.weight"] = (random_blocks(ttype, q_dim, dim, rng), ttype)
        tensors[p + "attn_k.weight"] = (random_blocks(ttype, kv_dim, dim, rng), ttype)
        tensors[p + "attn_v.weight"] = (random_blocks(ttype, kv_dim, dim, rng), ttype)
        tensors[p + "attn_output.weight"] = (random_blocks(ttype, dim, q_dim, rng), ttype)
        tensors[p + "ffn_norm.weight"] = ones
        tensors[p + "ffn_gate.weight"] = (random_blocks(ttype, hidden_dim, dim, rng), ttype)
        tensors[p + "ffn_up.weight"] = (random_blocks(ttype, hidden_dim, dim, rng), ttype)
        tensors[p + "ffn_down.weight"] = (random_blocks(ttype, dim, hidden_dim, rng), ttype)
    tensors["output_norm.weight"] = ones
    tensors["output.weight"] = (random_blocks(ttype, VOCAB, dim, rng), ttype)
    return metadata, tensors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--type", choices=[t.name for t in _Q_SPREAD], default="Q4_0")
    args = parser.parse_args()
    write_gguf(args.out, *synthetic_llama(args.size, QT[args.type]))
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
