"""`GET /metrics`: the scheduler's counters and each stage's KV cache as Prometheus text."""

from __future__ import annotations

from caravan.pipeline.prompt_cache import CacheStats
from caravan.pipeline.stage import LayerRange

from .scheduler import Scheduler

PROMETHEUS_MEDIA_TYPE = "text/plain; version=0.0.4"  # Prometheus' text exposition format


# The prompt cache's per-stage figures: (metric, its help, type, CacheStats field)
PROMPT_CACHE_METRICS = (
    ("caravan_prompt_cache_tokens", "Positions of finished sessions each stage keeps for later requests.", "gauge", "tokens"),
    ("caravan_prompt_cache_bytes", "Bytes of keys and values each stage keeps for later requests.", "gauge", "bytes"),
    ("caravan_prompt_cache_budget_bytes", "Bytes each stage's prompt cache may hold at most.", "gauge", "budget"),
    ("caravan_prompt_cache_sessions", "Finished sessions each stage keeps.", "gauge", "sessions"),
    ("caravan_prompt_cache_stage_hits_total", "Copies each stage made from a kept session.", "counter", "hits"),
    ("caravan_prompt_cache_evictions_total", "Kept sessions each stage dropped for its budget or live sessions.",
     "counter", "evictions"),
)


def kv_per_stage(pipeline) -> list[tuple[str, LayerRange, int, CacheStats]]:
    """(node name, layer range, KV cache bytes, prompt cache figures) for each node; asks remote
    nodes over gRPC (-1 bytes and empty figures for a node that does not answer)."""
    return [(row.node, row.layers, -1 if row.kv_bytes is None else row.kv_bytes, row.prompt_cache or CacheStats())
            for row in pipeline.stats()]


def prometheus_text(s: Scheduler, kv_rows: list[tuple[str, LayerRange, int, CacheStats]]) -> str:
    """The metrics page: `s`'s counters, then `kv_rows` (kv_per_stage's, gathered off the event loop)."""
    lines = [
        "# HELP caravan_requests_in_flight Sequences being decoded or prefilled.",
        "# TYPE caravan_requests_in_flight gauge",
        f"caravan_requests_in_flight {len(s.active)}",
        "# HELP caravan_queue_length Requests waiting for a place in the batch.",
        "# TYPE caravan_queue_length gauge",
        f"caravan_queue_length {s.queue_length}",
        "# HELP caravan_generated_tokens_total Tokens sampled since start.",
        "# TYPE caravan_generated_tokens_total counter",
        f"caravan_generated_tokens_total {s.tokens_generated}",
        "# HELP caravan_prompt_tokens_total Prompt tokens run through the stages (n > 1 samples share one prefill).",
        "# TYPE caravan_prompt_tokens_total counter",
        f"caravan_prompt_tokens_total {s.prompt_tokens_computed}",
        "# HELP caravan_tokens_per_second Generated tokens per second over the last minute.",
        "# TYPE caravan_tokens_per_second gauge",
        f"caravan_tokens_per_second {s.tokens_per_second():.3f}",
        "# HELP caravan_tokens_per_pass Generated tokens per sequence per step since start: above 1 when drafts are kept.",
        "# TYPE caravan_tokens_per_pass gauge",
        f"caravan_tokens_per_pass {s.tokens_generated / max(s.sequence_passes, 1):.3f}",
        "# HELP caravan_sequence_passes_total Passes of a sequence's rows through the stages that gave tokens: "
        "generated tokens over these is tokens per pass.",
        "# TYPE caravan_sequence_passes_total counter",
        f"caravan_sequence_passes_total {s.sequence_passes}",
        "# HELP caravan_passes_sent_ahead_total Verification passes sent while the same sequence's previous one "
        "was in flight (pipelined speculation).",
        "# TYPE caravan_passes_sent_ahead_total counter",
        f"caravan_passes_sent_ahead_total {s.passes_sent_ahead}",
        "# HELP caravan_passes_kept_ahead_total Of the passes sent ahead, the ones that proved valid and gave tokens.",
        "# TYPE caravan_passes_kept_ahead_total counter",
        f"caravan_passes_kept_ahead_total {s.passes_kept_ahead}",
        "# HELP caravan_draft_tokens_total Draft tokens (speculative decoding) checked by the model since start.",
        "# TYPE caravan_draft_tokens_total counter",
        f"caravan_draft_tokens_total {s.draft_tokens}",
        "# HELP caravan_draft_tokens_accepted_total Draft tokens the model kept since start.",
        "# TYPE caravan_draft_tokens_accepted_total counter",
        f"caravan_draft_tokens_accepted_total {s.draft_tokens_accepted}",
        "# HELP caravan_steps_total Forward calls through the stages since start.",
        "# TYPE caravan_steps_total counter",
        f"caravan_steps_total {s.steps}",
        "# HELP caravan_kv_cache_bytes KV cache held on each stage.",
        "# TYPE caravan_kv_cache_bytes gauge",
    ]
    for name, layers, held, _ in kv_rows:
        lines.append(f'caravan_kv_cache_bytes{{{_labels(name, layers)}}} {held}')
    if s.prompt_cache is not None:
        lines += _prompt_cache_lines(s, kv_rows)
    return "\n".join(lines) + "\n"


def _labels(name: str, layers: LayerRange) -> str:
    return f'stage="{name}",layers="{layers.start}-{layers.stop - 1}"'


def _prompt_cache_lines(s: Scheduler, kv_rows: list[tuple[str, LayerRange, int, CacheStats]]) -> list[str]:
    index = s.prompt_cache
    lines = [
        "# HELP caravan_prompt_cache_hits_total Requests that started from a cached prefix.",
        "# TYPE caravan_prompt_cache_hits_total counter",
        f"caravan_prompt_cache_hits_total {index.hits}",
        "# HELP caravan_prompt_cache_misses_total Requests that found no cached prefix (or one a stage had dropped).",
        "# TYPE caravan_prompt_cache_misses_total counter",
        f"caravan_prompt_cache_misses_total {index.misses}",
        "# HELP caravan_prompt_tokens_cached_total Prompt tokens copied from the prompt cache instead of computed.",
        "# TYPE caravan_prompt_tokens_cached_total counter",
        f"caravan_prompt_tokens_cached_total {index.tokens_reused}",
    ]
    for metric, help_text, kind, field in PROMPT_CACHE_METRICS:
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        lines += [f"{metric}{{{_labels(name, layers)}}} {getattr(stats, field)}" for name, layers, _, stats in kv_rows]
    return lines
