"""The scheduler on its own, over real LocalStages of a tiny model: lanes that pipeline
batches through the stages, prefills shared by samples of one prompt, and the events of each
step handed on together (with the server's EventHandoff that takes them)."""

from __future__ import annotations

import asyncio
import threading
import time

from caravan.coordinator.scheduler import Event, Request, Scheduler
from caravan.coordinator.handoff import EventHandoff, kernels_fill_the_cores
from caravan.pipeline.generate import Generation
from support.stages import build, greedy, prompt
from support.wait import wait_for



class Timed:
    """A stage that records when each of its forward calls ran."""

    def __init__(self, stage):
        self.stage = stage
        self.layers = stage.layers
        self.depth = stage.depth
        self.calls: list[tuple[float, float]] = []

    def forward(self, batch):
        start = time.perf_counter()
        try:
            return self.stage.forward(batch)
        finally:
            self.calls.append((start, time.perf_counter()))

    def end_session(self, session_id):
        self.stage.end_session(session_id)

    def copy_session(self, source, target, length):
        self.stage.copy_session(source, target, length)


def run_all(scheduler: Scheduler, requests: list[Request]) -> None:
    done = threading.Semaphore(0)
    for request in requests:
        on_event = request.on_event
        request.on_event = lambda e, f=on_event: (f(e), done.release() if e.kind != "token" else None)
        scheduler.submit(request)
    for _ in requests:
        assert done.acquire(timeout=120)


def collecting() -> tuple[list[int], callable]:
    tokens: list[int] = []
    return tokens, lambda e: tokens.append(e.token) if e.kind == "token" else None


def test_lanes_pipeline_batches_through_the_stages_and_change_no_token(tiny_q8_path):
    """Two lanes over two stages: while one lane's batch is in the second stage the other's is
    in the first (their forward calls overlap in time), and every sequence gets the tokens it
    gets alone."""
    prompts = [prompt(5 + i, seed=i) for i in range(6)]
    alone = [list(Generation(build(tiny_q8_path), p, greedy(), 24, frozenset())) for p in prompts]
    pipeline = build(tiny_q8_path, splits=[1, 2])
    pipeline.stages = [Timed(stage) for stage in pipeline.stages]
    scheduler = Scheduler(pipeline, lanes=2)
    try:
        outputs = []
        requests = []
        for p in prompts:
            tokens, on_event = collecting()
            outputs.append(tokens)
            requests.append(Request(list(p), greedy(), 24, frozenset(), on_event))
        run_all(scheduler, requests)
    finally:
        scheduler.close()
    assert outputs == alone
    first, second = (stage.calls for stage in pipeline.stages)
    overlapping = sum(1 for a0, a1 in first for b0, b1 in second if a0 < b1 and b0 < a1)
    assert overlapping > 0, "no batch was in the first stage while another was in the second"


def test_followers_share_the_leaders_prefill(tiny_q8_path):
    """n samples of one prompt: the prompt runs once; greedy followers get the leader's text; a
    follower cancelled before the prefill ends is told so and never runs."""
    pipeline = build(tiny_q8_path)
    scheduler = Scheduler(pipeline)
    ids = list(prompt(9, seed=3))
    try:
        leader_tokens, leader_events = collecting()
        follower_tokens, follower_events = collecting()
        cancelled: list[Event] = []
        leader = Request(ids, greedy(), 12, frozenset(), leader_events)
        follower = Request(ids, greedy(), 12, frozenset(), follower_events)
        gone = Request(ids, greedy(), 12, frozenset(), cancelled.append)
        gone.cancel()
        leader.followers = [follower, gone]
        run_all(scheduler, [leader])
        wait_for(lambda: len(follower_tokens) >= 12 and cancelled, 30, "the follower's 12 tokens and the cancellation")
    finally:
        scheduler.close()
    assert follower_tokens == leader_tokens == list(Generation(build(tiny_q8_path), ids, greedy(), 12, frozenset()))
    assert scheduler.prompt_tokens_computed == len(ids)
    assert [e.finish_reason for e in cancelled] == ["cancelled"]


class Recording(Timed):
    """A stage that also keeps each batch's segments."""

    def __init__(self, stage):
        super().__init__(stage)
        self.batches: list[tuple] = []

    def forward(self, batch):
        self.batches.append(batch.segments)
        return super().forward(batch)


def run_together(scheduler: Scheduler, prompts: list, max_tokens: int) -> tuple[list[Request], list[list[int]]]:
    """A greedy request per prompt, all submitted together; returns them and their tokens once
    all are done."""
    done = threading.Semaphore(0)
    outputs, requests = [], []
    for p in prompts:
        tokens, on_event = collecting()
        outputs.append(tokens)
        requests.append(Request(list(p), greedy(), max_tokens, frozenset(),
                                lambda e, f=on_event: (f(e), done.release() if e.kind != "token" else None)))
    submit_together(scheduler, requests, done)
    return requests, outputs


def submit_together(scheduler: Scheduler, requests: list[Request], done: threading.Semaphore) -> None:
    """Submit the requests before the lane's next step (the scheduler's condition holds a
    reentrant lock), wait for `done` to be released once for each, and close the scheduler."""
    try:
        with scheduler._wake:
            for request in requests:
                scheduler.submit(request)
        for _ in requests:
            assert done.acquire(timeout=120)
    finally:
        scheduler.close()


def test_short_prompts_share_prefill_steps(tiny_q8_path):
    """Prompts that come together are prefilled together, up to step_prompt_tokens tokens a step
    (a prompt longer than what is left goes on in the next step); every prompt token runs
    once, and each sequence gets the tokens it gets alone."""
    prompts = [prompt(5 + 2 * i, seed=10 + i) for i in range(5)]  # 5, 7, 9, 11, 13 tokens
    alone = [list(Generation(build(tiny_q8_path), p, greedy(), 8, frozenset())) for p in prompts]
    pipeline = build(tiny_q8_path)
    pipeline.stages = [Recording(pipeline.stages[0])]
    scheduler = Scheduler(pipeline, step_prompt_tokens=16)
    requests, outputs = run_together(scheduler, prompts, 8)
    assert outputs == alone
    assert scheduler.prompt_tokens_computed == sum(len(p) for p in prompts)
    prompt_length = {r.session_id: len(r.prompt_ids) for r in requests}
    batches = pipeline.stages[0].batches
    # 5 + 7 tokens, then 4 of the 9-token prompt's: three sessions' prompts in the first step
    assert [(s.start, s.length) for s in batches[0]] == [(0, 5), (0, 7), (0, 4)]
    for batch in batches:
        assert sum(s.length for s in batch if s.start < prompt_length[s.session_id]) <= 16


def test_prompts_that_begin_alike_share_the_beginning(tiny_q8_path):
    """Requests whose prompts open with the same 20 tokens (a system prompt): the first computes
    them, the others wait for it and copy them, computing only their own ends; a prompt that
    shares fewer than MIN_SHARED_PREFIX tokens computes all of its own. Every sequence gets the
    tokens it gets alone."""
    system = list(prompt(20, seed=30))
    prompts = [system + list(prompt(3 + 2 * i, seed=40 + i)) for i in range(4)] + [system[:10] + list(prompt(6, seed=50))]
    alone = [list(Generation(build(tiny_q8_path), p, greedy(), 8, frozenset())) for p in prompts]
    pipeline = build(tiny_q8_path)
    scheduler = Scheduler(pipeline, step_prompt_tokens=64)
    _, outputs = run_together(scheduler, prompts, 8)
    assert outputs == alone
    shared = 20 * 3  # the 2nd, 3rd and 4th copy the first's 20 tokens; the 5th shares only 10
    assert scheduler.prompt_tokens_computed == sum(len(p) for p in prompts) - shared


def test_a_steps_events_go_out_together_at_the_flush_after_it(tiny_q8_path):
    """The scheduler calls flush once after each step: what the requests' on_event got during
    the step is then one token for each request that decodes (the server sends them to its
    event loop together there), and nothing is left unflushed at the end."""
    pipeline = build(tiny_q8_path)
    pipeline.stages = [Recording(pipeline.stages[0])]
    scheduler = Scheduler(pipeline)
    lock = threading.Lock()
    held: list[tuple[int, Event]] = []
    flushed: list[list[tuple[int, Event]]] = []
    ended = threading.Semaphore(0)

    def flush():
        with lock:
            batch, held[:] = list(held), []
        if batch:
            flushed.append(batch)
        for _ in (e for _, e in batch if e.kind != "token"):
            ended.release()

    scheduler.flush = flush
    requests = [Request(list(prompt(5 + 2 * i, seed=20 + i)), greedy(), 6, frozenset(),
                        lambda e, i=i: held.append((i, e))) for i in range(3)]
    submit_together(scheduler, requests, ended)
    assert held == []
    steps = pipeline.stages[0].batches
    tokens = [[i for i, e in batch if e.kind == "token"] for batch in flushed]
    assert len(tokens) == len(steps) == 6  # one prefill step, then five of three decode rows
    assert all(sorted(t) == [0, 1, 2] for t in tokens)
    assert sorted(i for i, e in flushed[-1] if e.kind == "done") == [0, 1, 2]


def test_the_servers_handoff_delivers_at_flush_and_waits_for_the_streams():
    """EventHandoff (coordinator/handoff.py) on a real event loop: put() only collects; flush()
    returns once the streams it woke have run (a stream writes its chunk there); a loop that is
    stuck makes flush() give up after its timeout, and a closed one returns at once."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    handoff = EventHandoff()
    written: list[tuple[int, int]] = []

    async def stream(queue: asyncio.Queue, index: int) -> None:
        while (event := await queue.get()).kind == "token":
            written.append((index, event.token))  # where the server writes a chunk

    queues = [asyncio.Queue(), asyncio.Queue()]
    streams = [asyncio.run_coroutine_threadsafe(stream(q, i), loop) for i, q in enumerate(queues)]
    try:
        for token in range(3):
            handoff.put(loop, queues[0], Event("token", token=token))
            handoff.put(loop, queues[1], Event("token", token=10 + token))
            time.sleep(0.02)
            assert len(written) == 2 * token, "events went out before the flush"
            handoff.flush()
            assert sorted(written[-2:]) == [(0, token), (1, 10 + token)]
        loop.call_soon_threadsafe(time.sleep, 1.0)  # the loop's thread busy for a second
        handoff.put(loop, queues[0], Event("token", token=3))
        start = time.perf_counter()
        handoff.flush(timeout=0.1)
        assert time.perf_counter() - start < 0.5
        for queue in queues:
            handoff.put(loop, queue, Event("done", finish_reason="stop"))
        handoff.flush(timeout=5)
        for future in streams:
            future.result(timeout=5)
        assert written[-1] == (0, 3)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
    handoff.put(loop, queues[0], Event("token", token=4))
    start = time.perf_counter()
    handoff.flush(timeout=5)
    assert time.perf_counter() - start < 0.5


def test_the_handoff_does_not_wait_when_a_core_is_spare():
    """With fewer kernel threads than cores the loop writes on a core of its own while the next
    step runs: flush() only hands the events over."""
    assert kernels_fill_the_cores(None) and kernels_fill_the_cores(4, cores=4) and not kernels_fill_the_cores(1, cores=2)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    handoff = EventHandoff(wait=False)
    queue: asyncio.Queue = asyncio.Queue()
    try:
        loop.call_soon_threadsafe(time.sleep, 0.5)  # the loop's thread busy
        handoff.put(loop, queue, Event("token", token=1))
        start = time.perf_counter()
        handoff.flush(timeout=5)
        assert time.perf_counter() - start < 0.2
        event = asyncio.run_coroutine_threadsafe(queue.get(), loop).result(timeout=5)
        assert event.token == 1
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
