"""Tiny seeded models, written as GGUF with gguf-py's GGUFWriter.

`tiny_llama(...)` returns the model as plain dicts (metadata, tensors) so a test can break one
thing and write the result with `write_gguf`; `write_tiny_llama(path, ...)` does both steps.
The tokenizer is GPT-2 byte-level BPE: the 256 byte characters, a few merges, and
`<|endoftext|>` as a control token used for BOS and EOS.

`tiny_model(arch, ...)` does the same for every architecture caravan runs, with the block
tensors llama.cpp loads for it (src/models/<arch>.cpp, load_arch_tensors); Gemma and Phi-3
models get a SentencePiece ("llama") vocabulary, as the real ones have.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

# Merge pieces, in rank order: a space joined to common letters, then common English bigrams
# ("Ġ" is GPT-2's stand-in for the space byte).
_SPACE = "\u0120"
_MERGE_PAIRS = [(_SPACE, c) for c in "etaoinsrhldcumfpgwybvkxjqz"] + [
    (a, b)
    for a, b in (
        "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co me de "
        "hi ri ro ic ne ea ra ce li ch ll be ma si om ur"
    ).split()
]
EOT_TEXT = "<|endoftext|>"


def byte_level_alphabet() -> list[str]:
    """GPT-2's 256 stand-in characters, in byte order (OpenAI's encoder.py, bytes_to_unicode)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(0x100 + shifted))
            shifted += 1
    return chars


def tiny_vocabulary(vocab_size: int) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types): 256 bytes, vocab_size - 257 merges, then <|endoftext|>."""
    n_merges = vocab_size - 257
    if not 0 <= n_merges <= len(_MERGE_PAIRS):
        raise ValueError(f"vocab_size must be in [257, {257 + len(_MERGE_PAIRS)}], got {vocab_size}")
    tokens = byte_level_alphabet()
    merges = []
    for a, b in _MERGE_PAIRS[:n_merges]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    tokens.append(EOT_TEXT)
    types = [1] * (len(tokens) - 1) + [3]  # gguf TokenType: NORMAL, CONTROL
    return tokens, merges, types


def llama_metadata(name: str, *, n_layers: int, dim: int, hidden_dim: int, n_heads: int, n_kv_heads: int, ctx: int,
                   n_rot: int, tokens: list[str], merges: list[str], types: list[int]) -> dict[str, Any]:
    """GGUF metadata of a `llama` model with a GPT-2 byte-level vocabulary whose last token is
    both BOS and EOS (as tiny_vocabulary makes it)."""
    eot = len(tokens) - 1
    return {
        "general.architecture": "llama",
        "general.name": name,
        "llama.context_length": ctx,
        "llama.embedding_length": dim,
        "llama.block_count": n_layers,
        "llama.feed_forward_length": hidden_dim,
        "llama.rope.dimension_count": n_rot,
        "llama.attention.head_count": n_heads,
        "llama.attention.head_count_kv": n_kv_heads,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": eot,
        "tokenizer.ggml.eos_token_id": eot,
    }


def tiny_llama(
    *,
    n_layers: int = 3,
    dim: int = 64,
    hidden_dim: int = 96,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = 300,
    ctx: int = 256,
    weight_type: QT = QT.Q8_0,
    tied_output: bool = True,
    n_rot: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, QT]]]:
    """(metadata, tensors) of a random LLaMA model; tensors map GGUF name -> (float32 array
    (rows, cols) or (n,), type to store it as): tiny_model's llama tensors, with llama_metadata's
    keys. Matrices are N(0, 1/fan_in), the embedding N(0, 1), norm weights 1 + N(0, 0.1**2)
    stored as F32 (as llama.cpp's converter does)."""
    tokens, merges, types = tiny_vocabulary(vocab_size)
    head_dim = dim // n_heads
    metadata = llama_metadata(f"tiny-llama-{weight_type.name.lower()}", n_layers=n_layers, dim=dim,
                              hidden_dim=hidden_dim, n_heads=n_heads, n_kv_heads=n_kv_heads, ctx=ctx,
                              n_rot=head_dim if n_rot is None else n_rot, tokens=tokens, merges=merges, types=types)
    _, tensors = tiny_model("llama", n_layers=n_layers, dim=dim, hidden_dim=hidden_dim, n_heads=n_heads,
                            n_kv_heads=n_kv_heads, vocab_size=vocab_size, ctx=ctx, weight_type=weight_type,
                            tied_output=tied_output, n_rot=n_rot, seed=seed)
    return metadata, tensors


def _add_metadata(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        writer.add_uint32(key, int(value))
    elif isinstance(value, (float, np.floating)):
        writer.add_float32(key, float(value))
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, np.ndarray):
        sub = {np.dtype(np.int32): GGUFValueType.INT32, np.dtype(np.float32): GGUFValueType.FLOAT32,
               np.dtype(np.bool_): GGUFValueType.BOOL}[value.dtype]
        writer.add_key_value(key, value.tolist(), GGUFValueType.ARRAY, sub_type=sub)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"{key}: cannot write a {type(value).__name__}")


def write_gguf(
    path: str | os.PathLike[str], metadata: dict[str, Any], tensors: dict[str, tuple[np.ndarray, QT]]
) -> Path:
    """Write a GGUF file. metadata must hold general.architecture; ints are written as UINT32,
    floats as FLOAT32, lists of str as string arrays, int32/float32 numpy arrays as such.
    Tensors: float arrays are quantized to their type with gguf.quants.quantize; a uint8 array
    is taken as the type's raw blocks (rows, row_bytes)."""
    path = Path(path)
    metadata = dict(metadata)
    writer = GGUFWriter(path, arch=metadata.pop("general.architecture"))
    for key, value in metadata.items():
        _add_metadata(writer, key, value)
    for name, (array, ttype) in tensors.items():
        if array.dtype == np.uint8:
            writer.add_tensor(name, array, raw_dtype=ttype)
        elif ttype in (QT.F32, QT.F16):
            writer.add_tensor(name, quantize(array.astype(np.float32), ttype))
        else:
            writer.add_tensor(name, quantize(array.astype(np.float32), ttype), raw_dtype=ttype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def with_block_scale(tensors: dict[str, tuple[np.ndarray, QT]], name: str, value: float, row: int = 0,
                     block: int = 0) -> dict[str, tuple[np.ndarray, QT]]:
    """tensors with one block scale d of matrix `name` (Q8_0, Q4_0 or Q4_1: d is the f16 in each
    block's first two bytes, ggml-common.h) set to value, as a damaged file would hold it."""
    array, ttype = tensors[name]
    block_bytes = {QT.Q8_0: 34, QT.Q4_0: 18, QT.Q4_1: 20}[ttype]
    raw = quantize(array.astype(np.float32), ttype)
    blocks = raw.reshape(raw.shape[0], -1, block_bytes).copy()
    blocks[row, block, :2] = np.array([value], np.float16).view(np.uint8)
    return {**tensors, name: (blocks.reshape(raw.shape), ttype)}


def write_tiny_llama(path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write `tiny_llama(**kwargs)` to path; returns the path."""
    return write_gguf(path, *tiny_llama(**kwargs))


def dequantized_weights(gguf_file) -> dict[str, np.ndarray]:
    """Every tensor of a GGUFFile as float64 via gguf.quants.dequantize: matrices (rows, cols),
    vectors (n,)."""
    weights = {}
    for name, info in gguf_file.tensors.items():
        values = dequantize(np.asarray(gguf_file.tensor_data(name)), info.type).astype(np.float64)
        weights[name] = values.reshape(info.shape[::-1]) if len(info.shape) > 1 else values
    return weights


def q4_1_minima(gguf_file) -> dict[str, np.ndarray]:
    """m (rows, n_blocks) f32 of every Q4_1 and Q5_1 matrix; block layouts d f16, m f16, then
    qs[16] (Q4_1, 20 bytes) or qh[4] qs[16] (Q5_1, 24 bytes) (ggml-common.h)."""
    minima = {}
    for name, info in gguf_file.tensors.items():
        if info.type in (QT.Q4_1, QT.Q5_1):
            raw = np.asarray(gguf_file.tensor_data(name))
            block_bytes = 20 if info.type == QT.Q4_1 else 24
            minima[name] = np.ascontiguousarray(raw.reshape(raw.shape[0], -1, block_bytes)[:, :, 2:4]).view(np.float16)[..., 0]
    return minima



def tiny_lora(
    *,
    n_layers: int = 3,
    dim: int = 64,
    hidden_dim: int = 96,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    rank: int = 8,
    alpha: float | None = 16.0,
    targets: tuple[str, ...] = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
    layers: tuple[int, ...] | None = None,
    weight_type: QT = QT.F32,
    arch: str = "llama",
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, QT]]]:
    """(metadata, tensors) of a random LoRA adapter for `tiny_llama` of the same shape, in
    llama.cpp's GGUF adapter format (convert_lora_to_gguf.py): per adapted matrix W of numpy
    shape (n_out, n_in), "<W>.lora_a" (rank, n_in) and "<W>.lora_b" (n_out, rank). A is
    N(0, 1/n_in) and B N(0, 1/rank), so with alpha = rank a delta is as large as W's own product
    (a trained adapter's is smaller; here a missed delta must show). alpha None: no key.
    Fused matrices as `tiny_model` writes them: attn_qkv (Q, K, V rows), and for phi3 an ffn_up
    of gate then up rows."""
    head_dim = dim // n_heads
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    shapes = {  # (n_out, n_in)
        "attn_q": (q_dim, dim), "attn_k": (kv_dim, dim), "attn_v": (kv_dim, dim), "attn_qkv": (q_dim + 2 * kv_dim, dim),
        "attn_output": (dim, q_dim), "ffn_gate": (hidden_dim, dim),
        "ffn_up": ((2 if arch == "phi3" else 1) * hidden_dim, dim), "ffn_down": (dim, hidden_dim),
    }
    metadata: dict[str, Any] = {"general.architecture": arch, "general.type": "adapter", "adapter.type": "lora"}
    if alpha is not None:
        metadata["adapter.lora.alpha"] = float(alpha)
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[np.ndarray, QT]] = {}
    for i in range(n_layers) if layers is None else layers:
        for name in targets:
            n_out, n_in = shapes[name]
            base = f"blk.{i}.{name}.weight"
            tensors[base + ".lora_a"] = ((rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32), weight_type)
            tensors[base + ".lora_b"] = ((rng.standard_normal((n_out, rank)) / np.sqrt(rank)).astype(np.float32), weight_type)
    return metadata, tensors


def with_random_blocks(tensors: dict[str, tuple[np.ndarray, QT]], type_of, seed: int = 0) -> dict[str, tuple[np.ndarray, QT]]:
    """tensors with every matrix for which type_of(name) gives a type replaced by random blocks of
    that type with the matrix's spread (speed.random_blocks): the K-quants, which gguf-py can
    dequantize but not quantize. Other tensors are kept."""
    from caravan.pipeline.speed import random_blocks

    rng = np.random.default_rng(seed)
    out = {}
    for name, (array, ttype) in tensors.items():
        new_type = type_of(name) if array.ndim == 2 else None
        if new_type is None:
            out[name] = (array, ttype)
        else:
            out[name] = (random_blocks(new_type, array.shape[0], array.shape[1], rng, float(array.std())), new_type)
    return out


# --- every architecture -------------------------------------------------------------------------

_SPM_LETTERS = "etaoinsrhldcumfpgwybvkxjqz"


def tiny_spm_vocabulary(vocab_size: int, turn_tokens: tuple[str, ...] = ("<start_of_turn>", "<end_of_turn>")
                        ) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a SentencePiece vocabulary: <pad>, </s> (EOS), <s> (BOS),
    <unk> as Gemma numbers them, the 256 <0xNN> byte tokens, then "▁" + letter and letter pieces,
    two chat tokens last (llama.cpp looks Phi-3's <|end|> up by text)."""
    tokens = ["<pad>", "</s>", "<s>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["\u2581"] + [f"\u2581{c}" for c in _SPM_LETTERS] + list(_SPM_LETTERS)
    n_pieces = vocab_size - len(tokens) - len(turn_tokens)
    if not 0 < n_pieces <= len(pieces):
        raise ValueError(f"vocab_size must be in [{len(tokens) + 3}, {len(tokens) + 2 + len(pieces)}], got {vocab_size}")
    tokens += pieces[:n_pieces] + list(turn_tokens)
    scores = [0.0] * 260 + [-float(i) for i in range(n_pieces)] + [0.0] * len(turn_tokens)
    types = [3, 3, 3, 2] + [6] * 256 + [1] * n_pieces + [4] * len(turn_tokens)
    return tokens, scores, types


def _arch_metadata(arch: str, name: str, *, n_layers: int, dim: int, hidden_dim: int, n_heads: int, n_kv_heads: int,
                   head_dim: int, ctx: int, n_rot: int, vocab_size: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": name,
        f"{arch}.context_length": ctx,
        f"{arch}.embedding_length": dim,
        f"{arch}.block_count": n_layers,
        f"{arch}.feed_forward_length": hidden_dim,
        f"{arch}.rope.dimension_count": n_rot,
        f"{arch}.attention.head_count": n_heads,
        f"{arch}.attention.head_count_kv": n_kv_heads,
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6 if arch.startswith("gemma") else 1e-5,
        f"{arch}.rope.freq_base": 10000.0,
    }
    if arch.startswith("gemma") or arch == "phi3":
        tokens, scores, types = tiny_spm_vocabulary(
            vocab_size, ("<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>") if arch == "phi3" else ("<start_of_turn>", "<end_of_turn>"))
        metadata.update({
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
            "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
            "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_space_prefix": False,
        })
    else:
        tokens, merges, types = tiny_vocabulary(vocab_size)
        pre = {"qwen2": "qwen2"}.get(arch, "llama-bpe" if arch == "llama" else "default")
        metadata.update({
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": len(tokens) - 1,
            "tokenizer.ggml.eos_token_id": len(tokens) - 1,
        })
    return metadata


def tiny_model(
    arch: str = "llama",
    *,
    n_layers: int = 3,
    dim: int = 64,
    hidden_dim: int = 96,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 300,
    ctx: int = 256,
    weight_type: QT = QT.Q8_0,
    tied_output: bool = True,
    n_rot: int | None = None,
    fused: bool = False,
    rope_freqs: bool = False,
    metadata: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, QT]]]:
    """(metadata, tensors) of a random model of `arch` (llama, qwen2, phi3, gemma, gemma2,
    gemma3), as tiny_llama; `metadata` adds or overrides keys. fused: attn_qkv instead of
    attn_q/k/v (always a fused gate+up for phi3, as llama.cpp requires). rope_freqs: a Llama 3.1
    style rope_freqs.weight with factors from 1 to 8. Q/K/V biases (qwen2) are N(0, 0.1**2)."""
    if hidden_dim % 32 or dim % 32:
        raise ValueError("dim and hidden_dim must be multiples of 32 (the block size)")
    head_dim = head_dim or dim // n_heads
    n_rot = head_dim if n_rot is None else n_rot
    meta = _arch_metadata(arch, f"tiny-{arch}-{weight_type.name.lower()}", n_layers=n_layers, dim=dim,
                          hidden_dim=hidden_dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, ctx=ctx,
                          n_rot=n_rot, vocab_size=vocab_size)
    meta.update(metadata or {})
    w = _RandomWeights(np.random.default_rng(seed), weight_type)
    # Gemma multiplies embeddings by sqrt(dim): keep its hidden states near unit scale too
    embedding = w.rng.standard_normal((vocab_size, dim)) / (np.sqrt(dim) if arch.startswith("gemma") else 1.0)
    tensors: dict[str, tuple[np.ndarray, QT]] = {"token_embd.weight": (embedding.astype(np.float32), weight_type)}
    if rope_freqs:
        tensors["rope_freqs.weight"] = (np.linspace(1.0, 8.0, n_rot // 2, dtype=np.float32), QT.F32)
    for i in range(n_layers):  # each tensor drawn in the order it is listed, so a seed gives the same model
        tensors.update(_attention_tensors(w, arch, f"blk.{i}.", dim, n_heads, n_kv_heads, head_dim, fused))
        tensors.update(_ffn_tensors(w, arch, f"blk.{i}.", dim, hidden_dim))
    tensors["output_norm.weight"] = w.norm(dim)
    if not tied_output:
        tensors["output.weight"] = w.matrix(vocab_size, dim)
    return meta, tensors


class _RandomWeights:
    """A model's random weights, drawn from one generator in the order they are asked for."""

    def __init__(self, rng: np.random.Generator, weight_type: QT):
        self.rng, self.weight_type = rng, weight_type

    def matrix(self, rows: int, cols: int) -> tuple[np.ndarray, QT]:
        return (self.rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32), self.weight_type

    def norm(self, n: int) -> tuple[np.ndarray, QT]:
        return (1.0 + 0.1 * self.rng.standard_normal(n)).astype(np.float32), QT.F32

    def bias(self, n: int) -> tuple[np.ndarray, QT]:
        return (0.1 * self.rng.standard_normal(n)).astype(np.float32), QT.F32


def _attention_tensors(w: _RandomWeights, arch: str, p: str, dim: int, n_heads: int, n_kv_heads: int,
                       head_dim: int, fused: bool) -> dict[str, tuple[np.ndarray, QT]]:
    """One layer's attention block of `arch`, its names prefixed with `p` (blk.N.)."""
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    tensors = {p + "attn_norm.weight": w.norm(dim)}
    if fused:
        tensors[p + "attn_qkv.weight"] = w.matrix(q_dim + 2 * kv_dim, dim)
    else:
        tensors[p + "attn_q.weight"] = w.matrix(q_dim, dim)
        tensors[p + "attn_k.weight"] = w.matrix(kv_dim, dim)
        tensors[p + "attn_v.weight"] = w.matrix(kv_dim, dim)
    if arch == "qwen2":
        tensors[p + "attn_q.bias"] = w.bias(q_dim)
        tensors[p + "attn_k.bias"] = w.bias(kv_dim)
        tensors[p + "attn_v.bias"] = w.bias(kv_dim)
    if arch == "gemma3":
        tensors[p + "attn_q_norm.weight"] = w.norm(head_dim)
        tensors[p + "attn_k_norm.weight"] = w.norm(head_dim)
    tensors[p + "attn_output.weight"] = w.matrix(dim, q_dim)
    if arch in ("gemma2", "gemma3"):
        tensors[p + "post_attention_norm.weight"] = w.norm(dim)
    return tensors


def _ffn_tensors(w: _RandomWeights, arch: str, p: str, dim: int, hidden_dim: int) -> dict[str, tuple[np.ndarray, QT]]:
    """One layer's feed-forward block of `arch`, its names prefixed with `p` (blk.N.)."""
    tensors = {p + "ffn_norm.weight": w.norm(dim)}
    if arch == "phi3":
        tensors[p + "ffn_up.weight"] = w.matrix(2 * hidden_dim, dim)
    else:
        tensors[p + "ffn_gate.weight"] = w.matrix(hidden_dim, dim)
        tensors[p + "ffn_up.weight"] = w.matrix(hidden_dim, dim)
    tensors[p + "ffn_down.weight"] = w.matrix(dim, hidden_dim)
    if arch in ("gemma2", "gemma3"):
        tensors[p + "post_ffw_norm.weight"] = w.norm(dim)
    return tensors


def write_tiny_model(path: str | os.PathLike[str], arch: str = "llama", **kwargs: Any) -> Path:
    """Write `tiny_model(arch, **kwargs)` to path; returns the path."""
    return write_gguf(path, *tiny_model(arch, **kwargs))
