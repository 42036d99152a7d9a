"""`GET /metrics`: the scheduler's counters and each stage's KV cache as Prometheus text."""

from __future__ import annotations

from .remote import placement
from .scheduler import Scheduler

PROMETHEUS_MEDIA_TYPE = "text/plain; version=0.0.4"  # Prometheus' text exposition format


def kv_per_stage(pipeline) -> list[tuple[str, object, int]]:
    """(node name, layer range, KV cache bytes) for each node; asks remote nodes over gRPC."""
    rows = []
    for name, layers, client, stage in placement(list(pipeline.stages)):
        if client is None:
            rows.append(("local", layers, sum(c.nbytes for c in list(stage.sessions.values()))))
            continue
        try:
            rows.append((name, layers, client.info().kv_cache_bytes))
        except Exception:  # noqa: BLE001  (a node gone: failover reports it; metrics go on)
            rows.append((name, layers, -1))
    return rows


def prometheus_text(s: Scheduler, kv_rows: list[tuple[str, object, int]]) -> str:
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
    for name, layers, held in kv_rows:
        lines.append(f'caravan_kv_cache_bytes{{stage="{name}",layers="{layers.start}-{layers.stop - 1}"}} {held}')
    return "\n".join(lines) + "\n"
