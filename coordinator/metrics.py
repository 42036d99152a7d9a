"""`GET /metrics`: the scheduler's counters and each stage's KV cache as Prometheus text."""

from __future__ import annotations

from caravan.pipeline.stage import LayerRange

from .scheduler import Scheduler

PROMETHEUS_MEDIA_TYPE = "text/plain; version=0.0.4"  # Prometheus' text exposition format


def kv_per_stage(pipeline) -> list[tuple[str, LayerRange, int]]:
    """(node name, layer range, KV cache bytes, -1 for a node that did not answer) for each
    node; asks remote nodes over gRPC."""
    return [(row.node, row.layers, -1 if row.kv_bytes is None else row.kv_bytes) for row in pipeline.stats()]


def prometheus_text(s: Scheduler, kv_rows: list[tuple[str, LayerRange, int]]) -> str:
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
        "# HELP caravan_steps_total Forward calls through the stages since start.",
        "# TYPE caravan_steps_total counter",
        f"caravan_steps_total {s.steps}",
        "# HELP caravan_kv_cache_bytes KV cache held on each stage.",
        "# TYPE caravan_kv_cache_bytes gauge",
    ]
    for name, layers, held in kv_rows:
        lines.append(f'caravan_kv_cache_bytes{{stage="{name}",layers="{layers.start}-{layers.stop - 1}"}} {held}')
    return "\n".join(lines) + "\n"
