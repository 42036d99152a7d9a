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

from caravan.pipeline.model import ModelConfig, layer_tensor_shapes  # noqa: E402
from tiny_models import llama_metadata, tiny_vocabulary, write_gguf  # noqa: E402

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
    eot = tokens.pop()  # the tiny vocabulary ends with its BOS/EOS token: keep it last
    pad = VOCAB - len(tokens) - 1
    tokens = tokens + [f"<|unused_{i}|>" for i in range(pad)] + [eot]
    types = types[:-1] + [5] * pad + types[-1:]  # gguf TokenType.UNUSED, then CONTROL
    metadata = llama_metadata(f"synthetic-{size}-{ttype.name.lower()}", n_layers=n_layers, dim=dim,
                              hidden_dim=hidden_dim, n_heads=n_heads, n_kv_heads=n_kv_heads, ctx=4096,
                              n_rot=dim // n_heads, tokens=tokens, merges=merges, types=types)
    config = ModelConfig.from_metadata(metadata, VOCAB)
    rng = np.random.default_rng(seed)
    tensors = {"token_embd.weight": (random_blocks(ttype, VOCAB, dim, rng), ttype)}
    for layer in range(n_layers):
        # Names and shapes as the engine defines them (GGUF order: row length first).
        for name, shape in layer_tensor_shapes(config, layer).items():
            if len(shape) == 1:
                tensors[name] = (np.ones(shape, np.float32), QT.F32)
            else:
                tensors[name] = (random_blocks(ttype, shape[1], shape[0], rng), ttype)
    tensors["output_norm.weight"] = (np.ones(dim, np.float32), QT.F32)
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
