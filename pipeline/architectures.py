"""What differs between the model families caravan runs, written down as data.

One `Architecture` per `general.architecture` value, each as llama.cpp builds it
(src/models/<arch>.cpp: its load_arch_hparams, load_arch_tensors and graph). The layer code
(stage.py) reads these fields; it never asks which family a model is.

Block tensors keep their GGUF names (`blk.N.<name>`), as gguf-py's tensor map has them.
"""

from __future__ import annotations

from dataclasses import dataclass

# The tensors outside the blocks: the embedding, the final norm, the output head (absent when
# tied to the embedding) and Llama 3.1's RoPE frequency factors.
GLOBAL_TENSORS = ("token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight")

# Every block tensor caravan knows, in the order a node receives them (GGUF names after blk.N.).
BLOCK_TENSORS = (
    "attn_norm.weight",
    "attn_qkv.weight",  # Q, K and V stacked in one matrix (Phi-3)
    "attn_q.weight",
    "attn_q.bias",
    "attn_k.weight",
    "attn_k.bias",
    "attn_v.weight",
    "attn_v.bias",
    "attn_q_norm.weight",  # RMSNorm of each query head (Gemma 3)
    "attn_k_norm.weight",
    "attn_output.weight",
    "attn_output.bias",
    "post_attention_norm.weight",  # RMSNorm of the attention output before the residual add (Gemma 2, 3)
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",  # (Phi-3: gate and up stacked, 2 * hidden_dim rows)
    "ffn_down.weight",
    "post_ffw_norm.weight",  # RMSNorm of the FFN output before the residual add (Gemma 2, 3)
)

_QKV = ("attn_q.weight", "attn_k.weight", "attn_v.weight")
_QKV_BIAS = ("attn_q.bias", "attn_k.bias", "attn_v.bias")
_LLAMA_BLOCK = ("attn_norm.weight", *_QKV, "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight",
                "ffn_up.weight", "ffn_down.weight")
_POST_NORMS = ("post_attention_norm.weight", "post_ffw_norm.weight")


@dataclass(frozen=True)
class Architecture:
    name: str  # general.architecture
    required: tuple[str, ...]  # block tensors every block must have
    optional: tuple[str, ...] = ()  # block tensors used where the file has them
    fused_qkv: bool = False  # attn_qkv may stand for attn_q, attn_k and attn_v (create_tensor_qkv)
    fused_gate_up: bool = False  # ffn_up holds gate then up rows, no ffn_gate (Phi-3's LLM_FFN_SWIGLU)
    rope_freqs: bool = False  # a rope_freqs.weight tensor divides each pair's angle (Llama 3.1's scaling)
    rope_neox: bool = False  # RoPE pairs dimension i with i + n_rot/2 (llama_model_rope_type NEOX), not 2i with 2i+1
    gelu: bool = False  # FFN gate activation: GELU, tanh form (LLM_FFN_GELU); else SiLU
    scale_embeddings: bool = False  # token embeddings times sqrt(dim) (Gemma's inp_scaled)
    scale_q: bool = False  # Q is multiplied by the attention scale before attention, kq_scale 1 (Gemma, Phi-3)
    attn_softcap: float = 0.0  # attention scores capped at this, unless {arch}.attn_logit_softcapping; 0: never
    final_softcap: float = 0.0  # logits capped at this, unless {arch}.final_logit_softcapping (read if reads_final_softcap)
    reads_final_softcap: bool = False
    sliding_window: int = 0  # default window when {arch}.attention.sliding_window is absent (Gemma 2: 4096)
    reads_sliding_window: bool = False  # {arch}.attention.sliding_window is honoured
    swa_period: int = 0  # default sliding_window_pattern: layer il slides iff il % period < period - 1; 0: all
    rope_theta_swa: float = 0.0  # RoPE base of sliding layers unless {arch}.rope.freq_base_swa; 0: rope_theta
    swa_rope_unscaled: bool = False  # sliding layers ignore rope.scaling.factor (Gemma 3: freq_scale_swa 1)
    big_attention_scale_layers: tuple[int, ...] = ()  # block counts of the 27B models, whose scale is 1/sqrt(dim/heads)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        # Llama 2/3, TinyLlama, SmolLM, Mistral (llama.cpp's converter writes Mistral as `llama`).
        # Where the file sets llama.attention.sliding_window (Mistral 7B v0.1 was trained with 4096), every layer
        # attends to that many positions, as Mistral's reference code does; llama.cpp ignores the key.
        Architecture("llama", _LLAMA_BLOCK, optional=(*_QKV_BIAS, "attn_output.bias"), fused_qkv=True, rope_freqs=True,
                     reads_sliding_window=True),
        # Qwen2 / Qwen2.5: Q, K and V biases; NeoX RoPE.
        Architecture("qwen2", (*_LLAMA_BLOCK, *_QKV_BIAS), optional=("attn_output.bias",), rope_neox=True),
        # Phi-3: fused QKV (or separate), gate and up stacked in ffn_up, NeoX RoPE; llama.cpp
        # disables Phi's sliding window (llama_model_phi3::load_arch_hparams), so does caravan.
        Architecture("phi3", ("attn_norm.weight", *_QKV, "attn_output.weight", "ffn_norm.weight", "ffn_up.weight",
                              "ffn_down.weight"),
                     optional=("attn_output.bias",), fused_qkv=True, fused_gate_up=True, rope_neox=True,
                     scale_q=True),
        # Gemma: GeGLU, embeddings times sqrt(dim), NeoX RoPE. The converter already added 1 to
        # the norm weights (Gemma's (1 + w)), so the norms are plain RMSNorm.
        Architecture("gemma", _LLAMA_BLOCK, fused_qkv=True, rope_neox=True, gelu=True, scale_embeddings=True,
                     scale_q=True),
        # Gemma 2: post-attention and post-FFN norms, soft-capped attention and final logits,
        # every other layer a 4096-token sliding window.
        Architecture("gemma2", (*_LLAMA_BLOCK, *_POST_NORMS), fused_qkv=True, rope_neox=True, gelu=True,
                     scale_embeddings=True, scale_q=True, attn_softcap=50.0, final_softcap=30.0, reads_final_softcap=True,
                     sliding_window=4096, reads_sliding_window=True, swa_period=2, big_attention_scale_layers=(46,)),
        # Gemma 3: Q/K norms, 5 sliding layers (RoPE base 10000, unscaled) to 1 global layer.
        Architecture("gemma3", (*_LLAMA_BLOCK[:4], "attn_q_norm.weight", "attn_k_norm.weight",
                                *_LLAMA_BLOCK[4:], *_POST_NORMS),
                     rope_neox=True, gelu=True, scale_embeddings=True, scale_q=True, reads_final_softcap=True,
                     reads_sliding_window=True, swa_period=6, rope_theta_swa=10000.0, swa_rope_unscaled=True,
                     big_attention_scale_layers=(62,)),
    )
}

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
