"""Raspberry Pi figures on paper (issues 25 and 26): no Pi here to time on, so decode speed is
estimated from the bytes a token reads over a board's sustained read bandwidth, beside the
figures llama.cpp, Ollama and distributed-llama publish for the same boards.

    python tests/bench/pi_model.py [--acceptance 0.7] [--draft-max 4] [--json]

(a) Tokens/s of SmolLM2 (bytes per token from the real GGUF file in the cache) and of a
    Llama-3-8B-shaped Q4_0 model, on a Pi 4 and a Pi 5: an upper bound, since a decode step
    reads every weight once and does little else.
(b) Four Pi 5 running Llama 3 8B Q4_0 as a 4-stage pipeline (8 layers a stage, the head on the
    last stage, a Llama 3.2 1B Q4_0 draft model on the first board): one stream without
    speculation, with speculation (draft, then one pass of 1 + K rows), and with pipelined
    verification batches (a batch enters the pipeline every bottleneck-stage time, built on the
    assumption that the batch before it is kept whole; a batch cut short cancels the ones behind
    it and the next one starts after the whole pipeline's latency), beside distributed-llama's
    4.08 tok/s on four Pi 5.

Every assumption is a named constant below with its source. Not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GB = 1e9

# --- boards -------------------------------------------------------------------------------------
# Sustained read bandwidth. tinymembench's "C copy" counts each byte once though it is read and
# written, so the memory moves twice its figure; a decode step only reads, from all four cores.
# Pi 5 (8 GB): C copy 5557.4 MB/s (ThomasKaiser in raspberrypi/firmware#1876; Jeff Geerling's
# sbc-reviews#21 has 4870-5688 MB/s for the copy variants). Check: llama.cpp decodes TinyLlama
# 1.1B Q8_0 (1.17 GB) at 9 tok/s on a Pi 5 (the "LLaMA Now Goes Faster on CPUs" table), 10.5 GB/s.
PI5_READ_BYTES_S = 2 * 5.557 * GB
# Pi 4: STREAM copy 5527 MB/s (sci-pi.org.uk/bench/stream.html; STREAM counts the read and the
# write). Check: llama.cpp decodes TinyLlama 1.1B Q8_0 at 3 tok/s on a Pi 4 (same table), 3.5 GB/s:
# the Pi 4, without dot-product instructions, is bound by compute before memory.
PI4_READ_BYTES_S = 5.527 * GB
BOARDS = {"Pi 4": PI4_READ_BYTES_S, "Pi 5": PI5_READ_BYTES_S}

# A row beyond the first in one pass costs compute, not another read of the weights: the time
# per prompt token of prefill. llama.cpp PR #6928 (b4rtaz, a Pi 5 8GB, Llama 2 7B Q4_0): prompt
# eval 8.10 tok/s, 123.48 ms a token, over Llama 2 7B's 6.61e9 matrix weights (32 layers of
# 202e6 and a head of 131e6).
PI5_ROW_S_PER_WEIGHT = 0.12348 / 6.61e9

HOP_S = 0.3e-3  # one hidden state from one Pi to the next on gigabit Ethernet (issue 26's figure)

# Acceptance of a Llama 3.2 1B draft for Llama 3 8B, per draft token given the ones before it.
# No figure for this exact pair was found; same-family drafts a few times smaller are reported
# at 0.6-0.8 (e.g. llama.cpp's llama-speculative: 58.7% of 8-token drafts of Llama 3 8B Q4_K_M
# kept by Llama 3 70B, devquasar.com's "Speculative decoding tradeoffs"; lossless drafters for
# Llama 3.2 1B itself keep 62-84% at the first position, vllm-project/speculators#1135).
# An assumption: 0.7, and the table sweeps it.
DRAFT_ACCEPTANCE = 0.7
DRAFT_MAX = 4  # draft tokens a pass in the model: the Pi's per-row compute makes longer drafts pay less

# --- peers' published figures (tokens/s) --------------------------------------------------------
PEERS = [
    ("distributed-llama", "1 x Pi 5 8GB", "Llama 3 8B Q40", 1.77, "its PR #64 / README"),
    ("distributed-llama", "2 x Pi 5 8GB", "Llama 3 8B Q40", 3.07, "PR #64"),
    ("distributed-llama", "4 x Pi 5 8GB", "Llama 3 8B Q40", 4.08, "PR #64 (169 ms inference + 75 ms transfer a token)"),
    ("Ollama (llama.cpp)", "1 x Pi 5 16GB", "llama3.1:8b Q4_K_M", 2.17, "geerlingguy/sbc-reviews#21"),
    ("llama.cpp", "1 x Pi 5", "Llama 3.2 3B Q4_K_M", 6.07, "tg128, REFERENCE.md"),
    ("llama.cpp", "1 x Pi 5", "TinyLlama 1.1B Q8_0", 9.0, "'LLaMA Now Goes Faster on CPUs' table"),
    ("llama.cpp", "1 x Pi 4", "TinyLlama 1.1B Q8_0", 3.0, "same table"),
    ("distributed-llama", "1 x Pi 4B 8GB", "Llama 2 7B Q40", 1 / 1.3125, "1312 ms a token, its issue #8"),
]

Q4_0_BYTES_PER_WEIGHT = 18 / 32  # ggml's block_q4_0: an f16 scale and 32 4-bit weights


@dataclass(frozen=True)
class LlamaShape:
    """The matrices a decode step reads, as in llama.cpp's llama.cpp/src/llama-model.cpp."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int

    @property
    def layer_weights(self) -> int:
        kv_dim = self.dim * self.n_kv_heads // self.n_heads
        return 2 * self.dim * self.dim + 2 * self.dim * kv_dim + 3 * self.dim * self.hidden_dim

    @property
    def head_weights(self) -> int:
        return self.vocab_size * self.dim


LLAMA3_8B = LlamaShape(dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256)
LLAMA32_1B = LlamaShape(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256)


def q4_0_bytes(weights: int) -> float:
    return weights * Q4_0_BYTES_PER_WEIGHT


def smollm2_bytes_per_token() -> tuple[str, float]:
    """Every tensor of the real file is read once a token: the layers, and the embedding table
    again as the output head (SmolLM2 ties them); one embedding row besides is negligible."""
    from caravan.pipeline.catalog import DEFAULT_MODEL, default_cache_dir, pull
    from caravan.pipeline.gguf_file import GGUFFile

    path = pull(DEFAULT_MODEL, default_cache_dir(), progress=False)
    tensors = GGUFFile(path).tensors
    return path.name, float(sum(t.n_bytes for t in tensors.values()))


def single_board(smollm2: tuple[str, float]) -> list[dict]:
    llama_bytes = q4_0_bytes(LLAMA3_8B.n_layers * LLAMA3_8B.layer_weights + LLAMA3_8B.head_weights)
    rows = []
    for model, nbytes in ((smollm2[0], smollm2[1]), ("Llama-3-8B-shaped Q4_0", llama_bytes)):
        for board, bandwidth in BOARDS.items():
            rows.append({"model": model, "board": board, "bytes_per_token": round(nbytes),
                         "tokens_per_s_bound": round(bandwidth / nbytes, 2)})
    return rows


DRAFTERS = ("1B on board 1", "1B on a 5th Pi 5", "prompt lookup")  # where the draft tokens come from


def pipeline_of_pi5(acceptance: float, draft_max: int, drafter: str = DRAFTERS[0], stages: int = 4) -> dict:
    """Llama 3 8B Q4_0 over `stages` Pi 5: one stream's tokens/s three ways. The draft model runs
    on board 1 beside its stage, or on a board of its own; prompt lookup costs no board time."""
    k = draft_max
    per_stage = LLAMA3_8B.n_layers // stages
    stage_read = q4_0_bytes(per_stage * LLAMA3_8B.layer_weights) / PI5_READ_BYTES_S  # one row
    head_read = q4_0_bytes(LLAMA3_8B.head_weights) / PI5_READ_BYTES_S
    stage_row = per_stage * LLAMA3_8B.layer_weights * PI5_ROW_S_PER_WEIGHT  # each extra row
    head_row = LLAMA3_8B.head_weights * PI5_ROW_S_PER_WEIGHT
    draft_token = q4_0_bytes(LLAMA32_1B.n_layers * LLAMA32_1B.layer_weights + LLAMA32_1B.head_weights) / PI5_READ_BYTES_S
    hops = stages * HOP_S  # a ring: board 1 -> 2 -> ... -> last -> board 1, which holds the tokens

    plain_s = stages * stage_read + head_read + hops
    # A pass of 1 + k rows: each stage reads its weights once and computes k more rows.
    stage_pass = stage_read + k * stage_row
    last_pass = stage_pass + head_read + k * head_row
    pass_s = (stages - 1) * stage_pass + last_pass + hops
    e = expected_tokens(acceptance, k)
    drafting = 0.0 if drafter == "prompt lookup" else k * draft_token  # before the pass
    speculative = e / (drafting + pass_s)

    # Pipelined: the next batch is drafted while the stages verify; a batch enters every cycle,
    # the slowest board's time for one batch.
    board_1 = stage_pass + (drafting if drafter == DRAFTERS[0] else 0.0)
    cycle = max(board_1, last_pass, drafting) + HOP_S
    whole = acceptance ** k  # a batch kept whole: the batches behind it stand
    batches = 1 / (1 - whole)  # batches in a chain, the last one cut short
    cut = sum(j * acceptance ** j * (1 - acceptance) for j in range(k)) / (1 - whole)  # kept of the cut one
    tokens = (batches - 1) * k + cut + 1
    chain_s = drafting + pass_s + (batches - 1) * cycle
    return {
        "stages": stages, "drafter": drafter, "acceptance": acceptance, "draft_max": k,
        "stage_ms_one_row": round(stage_read * 1e3, 1), "head_ms": round(head_read * 1e3, 1),
        "extra_row_ms_per_stage": round(stage_row * 1e3, 1), "draft_ms_per_token": round(draft_token * 1e3, 1),
        "hops_ms": round(hops * 1e3, 2), "tokens_per_pass": round(e, 3),
        "plain_tokens_per_s": round(1 / plain_s, 2),
        "speculative_tokens_per_s": round(speculative, 2),
        "pipelined_tokens_per_s": round(tokens / chain_s, 2),
        "distributed_llama_tokens_per_s": 4.08,
    }


def expected_tokens(acceptance: float, k: int) -> float:
    """(1 - A^(k+1)) / (1 - A): the kept prefix of k draft tokens and the model's own token."""
    from caravan.coordinator.planner import tokens_per_pass

    return tokens_per_pass(acceptance, k)


def report(result: dict) -> list[str]:
    lines = ["(a) decode tokens/s bound: bytes a token reads / sustained read bandwidth",
             f"{'model':<36} {'board':<6} {'MB/token':>9} {'tok/s':>7}"]
    for r in result["single_board"]:
        lines.append(f"{r['model']:<36} {r['board']:<6} {r['bytes_per_token'] / 1e6:>9.1f} {r['tokens_per_s_bound']:>7.2f}")
    lines.append("published figures on the same boards:")
    for system, setup, model, rate, source in PEERS:
        lines.append(f"  {system:<20} {setup:<15} {model:<22} {rate:>5.2f} tok/s  ({source})")
    lines.append("(b) 4 x Pi 5, Llama 3 8B Q4_0, 8 layers a stage, head on the last, 0.3 ms hops")
    lines.append(f"{'drafter':<17} {'A':>4} {'K':>2} {'E':>5} {'plain':>6} {'spec':>6} {'pipelined':>9}  "
                 "(tokens/s; distributed-llama 4.08)")
    for r in result["pipeline"]:
        lines.append(f"{r['drafter']:<17} {r['acceptance']:>4} {r['draft_max']:>2} {r['tokens_per_pass']:>5.2f} "
                     f"{r['plain_tokens_per_s']:>6.2f} {r['speculative_tokens_per_s']:>6.2f} {r['pipelined_tokens_per_s']:>9.2f}")
    r = result["pipeline"][0]
    lines.append(f"stage {r['stage_ms_one_row']} ms a row (+{r['extra_row_ms_per_stage']} ms each extra row), head "
                 f"{r['head_ms']} ms, draft {r['draft_ms_per_token']} ms a token, hops {r['hops_ms']} ms")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acceptance", type=float, default=DRAFT_ACCEPTANCE)
    parser.add_argument("--draft-max", type=int, default=DRAFT_MAX)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cases = [(args.acceptance, args.draft_max)] + [(a, args.draft_max) for a in (0.5, 0.6, 0.8) if a != args.acceptance]
    cases += [(args.acceptance, k) for k in (1, 2, 8) if k != args.draft_max]
    result = {"single_board": single_board(smollm2_bytes_per_token()),
              "pipeline": [pipeline_of_pi5(a, k, d) for d in DRAFTERS for a, k in cases]}
    print(json.dumps(result, indent=1) if args.json else "\n".join(report(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
