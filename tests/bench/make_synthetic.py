"""Write a synthetic LLaMA-shaped GGUF model with random weights, for speed and memory at the
sizes people run on Pis. Output quality does not matter: speed and memory do.

    python tests/bench/make_synthetic.py OUT.gguf [--size 0.4b|1b|7b] [--type Q4_0|Q4_K|BF16|...]

Shapes are TinyLlama-1.1B's (dim 2048, FFN 5632, 22 layers, 32 heads, 4 KV heads) and
Llama-2-7B's (4096, 11008, 32, 32, 32), vocabulary 32000. Every matrix is in the one --type
(any block format caravan runs, or BF16): random blocks from speed.random_blocks, with scales
(and the K-quants' 6-bit sub-block scales) chosen so each matrix has about 1/sqrt(fan-in)
spread, written as raw blocks through gguf.GGUFWriter (no quantization pass, so 7B takes
seconds, not an hour); norms are F32 ones. The tokenizer is the tiny byte-level BPE of
tests/support/tiny_models.py padded with unused tokens up to the vocabulary size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caravan.pipeline.model import ModelConfig, layer_tensor_shapes  # noqa: E402
from caravan.pipeline.quants import SUPPORTED_TYPES  # noqa: E402
from caravan.pipeline.speed import random_blocks  # noqa: E402
from support.tiny_models import llama_metadata, tiny_vocabulary, write_gguf  # noqa: E402

SIZES = {  # dim, hidden_dim, n_layers, n_heads, n_kv_heads
    "0.4b": (2048, 5632, 6, 32, 4),  # 1b's layers, fewer: file pages a test can see, written in seconds
    "1b": (2048, 5632, 22, 32, 4),
    "7b": (4096, 11008, 32, 32, 32),
}
VOCAB = 32000
TYPES = [t for t in SUPPORTED_TYPES if t not in (QT.F32, QT.F16)]  # what random_blocks writes


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
    tensors = {"token_embd.weight": (random_blocks(ttype, VOCAB, dim, rng, dim**-0.5), ttype)}
    for layer in range(n_layers):
        # Names and shapes as the engine defines them (GGUF order: row length first).
        for name, shape in layer_tensor_shapes(config, layer).items():
            if len(shape) == 1:
                tensors[name] = (np.ones(shape, np.float32), QT.F32)
            else:
                tensors[name] = (random_blocks(ttype, shape[1], shape[0], rng, shape[0] ** -0.5), ttype)
    tensors["output_norm.weight"] = (np.ones(dim, np.float32), QT.F32)
    tensors["output.weight"] = (random_blocks(ttype, VOCAB, dim, rng, dim**-0.5), ttype)
    return metadata, tensors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--type", choices=[t.name for t in TYPES], default="Q4_0")
    args = parser.parse_args()
    write_gguf(args.out, *synthetic_llama(args.size, QT[args.type]))
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
