"""A pipeline over nodes that keeps going when nodes die or hang (DESIGN.md, "Failure is normal").

The coordinator keeps every session's tokens. When a stage is lost mid-batch (its node is
gone, or stops answering past the batch's deadline), ClusterPipeline re-plans over the nodes
that still answer (and any that came back or were found since), loads the layers each now
needs, refills every session's KV cache from its tokens, and runs the batch again. The
kernels are deterministic, so the refilled caches hold the same bits and the generation goes
on exactly as it would have: the client sees a delay, not an error. Every plan, the first one
included, is made the same way: a node that does not answer is left out, and one lost while it
is measured, loaded, connected to or refilled is dropped and the plan made again. When no node
answers at all after the first plan, this process carries the whole model if its memory allows,
rather than ending the conversation; the nodes take the layers back once they answer again
(coordinator/heal.py offers their plan with `adopt`, at the next call boundary).

Finished sessions the stages keep in their prompt caches (retire_session) are not refilled: a
re-plan drops them, and a later copy from one fails as an unknown session, which the scheduler
counts as a miss and answers by computing the prompt. Refilling them would spend the re-plan's
time on sessions that may never be used again.

The scheduler's lanes call it from several threads at once. Calls share the current plan; a
recovery waits until no call is using it, and of the lanes that failed on the same lost node
the first re-plans and the others run their batches again on the new plan. Whatever loads layers
onto nodes (a re-plan, or load_ahead before a move the watcher offers) takes its turn, so that
two never give one node different layers at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import grpc
import numpy as np

from caravan.pipeline.catalog import file_sha256
from caravan.pipeline.generate import Pipeline
from caravan.pipeline.loader import LoadedModel
from caravan.pipeline.lora import LoraAdapter
from caravan.pipeline.stage import Segment, StageError, StageStats
from caravan.proto import auth
from caravan.proto import caravan_pb2 as pb

from .cluster import Cluster, Node, close_nodes, connect, deploy, load_layers, local_node, make_plan, measure
from .planner import Plan, PlanError
from .remote import FORWARD_TIMEOUT_S, NodeError

log = logging.getLogger(__name__)

MAX_RECOVERIES = 3  # re-plans per batch, and nodes lost per plan: past this, the error goes to the caller


class Router:
    """Routing: which nodes answer now, how fast they are, which layers each gets; `deploy` loads a
    plan and gives its pipeline. It keeps no sessions (Replay does)."""

    def __init__(self, model: LoadedModel, addresses: Callable[[], list[str]], n_ctx: int, cache_dir: Path,
                 wire_format: int = pb.WIRE_FORMAT_F32, progress: bool = True,
                 forward_timeout_s: float = FORWARD_TIMEOUT_S, token: str | None = None,
                 optional: Callable[[str], bool] = lambda address: False, tls: auth.TLSFiles | None = None,
                 head_on_node: bool | None = False):
        self.model = model
        self.head_on_node = head_on_node  # the output head on the last node (make_plan): None, where it pays
        self.addresses = addresses  # called at every (re-)plan: --nodes, plus what --discover finds then
        self.optional = optional  # addresses that may be left out even on the first plan (discovered ones)
        self.n_ctx = n_ctx
        self.cache_dir = cache_dir
        self.wire_format = wire_format
        self.progress = progress
        self.forward_timeout_s = forward_timeout_s
        self.token = token
        self.tls = tls

    def deploy(self, first: bool, lost: Sequence[str]) -> Cluster:
        """One plan over the nodes that answer now: ask who they are, measure, place, load.
        A node that does not answer is left out; on the first plan, an explicit node that
        refuses the cluster token or speaks another protocol is an error (a setup mistake).
        `lost`: why each earlier plan was dropped, for the error when none fits."""
        try:
            addresses = self.addresses()
        except NodeError:  # --discover found no node: after the first plan, this process may carry on alone
            if first:
                raise
            addresses = []
        optional = [a for a in addresses if self.optional(a)] if first else addresses
        left_out: list[NodeError] = []
        nodes = connect(addresses, self.token, optional, self.tls, left_out)
        alone = not first and not nodes
        if alone:  # every node is gone: this process carries the model, if its memory allows
            nodes = [local_node()]
        try:
            measure(nodes, self.model)
            plan = make_plan(self.model, nodes, self.n_ctx, self.head_on_node)
        except PlanError as exc:
            close_nodes(nodes)
            if alone:
                raise PlanError(f"every node is gone ({'; '.join(map(str, left_out)) or 'none listed'}) and this "
                                f"process cannot carry the model alone: {exc}") from None
            raise _no_plan(nodes, left_out, lost, exc) from None
        except BaseException:
            close_nodes(nodes)
            raise
        for exc in left_out:
            log.warning("leaving out %s", exc)
        if alone:
            log.warning("every node is gone: this process carries all %d layers until nodes answer again",
                        self.model.config.n_layers)
        return deploy(self.model, nodes, plan, self.n_ctx, self.cache_dir, self.wire_format, self.progress,
                      self.forward_timeout_s)


def _no_plan(nodes: list[Node], left_out: list[NodeError], lost: Sequence[str], error: PlanError) -> PlanError:
    """The one line to say why the nodes that answer cannot run the model."""
    if not nodes and left_out:
        return PlanError(f"no node answered: {'; '.join(map(str, left_out))}")
    lost = list(lost[-1:]) or [str(exc) for exc in left_out]
    if not lost:
        return error  # nothing was lost: the nodes given are too small
    alive = ", ".join(node.name for node in nodes) or "none"
    return PlanError(f"no plan fits the nodes still alive ({alive}) after {'; '.join(lost)}: {error}")


class Replay:
    """Every session's tokens so far and its adapters: what refills a new plan's KV caches."""

    def __init__(self):
        self.history: dict[str, list[int]] = {}  # session -> its tokens at positions 0 .. len - 1
        self.adapters: dict[str, tuple] = {}  # session -> its Segment.adapters
        self.retired: set[str] = set()  # sessions kept only in prompt caches: dropped, never refilled

    def remember(self, segments: Sequence[Segment], token_ids: np.ndarray) -> None:
        row = 0
        for seg in segments:
            tokens = self.history.setdefault(seg.session_id, [])
            self.adapters[seg.session_id] = seg.adapters
            del tokens[seg.start :]
            tokens.extend(int(t) for t in token_ids[row : row + seg.length])
            row += seg.length

    def check_copy(self, source: str) -> None:
        if source not in self.history:  # retired before a re-plan (maybe this call's), which dropped it
            raise StageError(f"session {source} is unknown here (a re-plan dropped the cached sessions)")

    def copy(self, source: str, target: str, length: int) -> None:
        self.history[target] = self.history[source][:length]
        self.adapters[target] = self.adapters.get(source, ())

    def retire(self, session_id: str, length: int) -> None:
        if session_id in self.history:
            del self.history[session_id][length:]  # what later copies of it start from
            self.retired.add(session_id)

    def forget(self, session_id: str) -> None:
        self.history.pop(session_id, None)
        self.adapters.pop(session_id, None)
        self.retired.discard(session_id)

    def refill(self, pipeline: Pipeline) -> None:
        """Run every live session's tokens so far through `pipeline`, rebuilding their KV caches;
        the retired ones are dropped (see the module's docstring)."""
        if self.retired:
            log.warning("re-plan: dropped %d cached sessions", len(self.retired))
        for session_id in list(self.retired):
            self.forget(session_id)
        for session_id, tokens in self.history.items():
            pipeline.prefill(session_id, tokens, self.adapters.get(session_id, ()))


class ClusterPipeline:
    """A Pipeline over nodes that survives their loss: the pipeline of the current plan (a Cluster,
    rebuilt at every re-plan by the Router), the sessions' tokens (Replay), and the recovery
    that joins them. It offers what the scheduler, CLI, server and bench use of a Pipeline."""

    def __init__(self, model: LoadedModel, addresses: Callable[[], list[str]], n_ctx: int, cache_dir: Path,
                 wire_format: int = pb.WIRE_FORMAT_F32, progress: bool = True,
                 forward_timeout_s: float = FORWARD_TIMEOUT_S, token: str | None = None,
                 optional: Callable[[str], bool] = lambda address: False, tls: auth.TLSFiles | None = None,
                 head_on_node: bool | None = False):
        self.router = Router(model, addresses, n_ctx, cache_dir, wire_format, progress, forward_timeout_s, token,
                             optional, tls, head_on_node)
        self.replay = Replay()
        self.greedy: set[str] = set()  # Pipeline.choose_greedily's sessions, shared with every plan's pipeline
        self.head = model.head
        self.n_ctx = n_ctx
        self.adapters: dict[str, LoraAdapter] = {}  # sent again to the stages of every new plan
        self.recoveries: list[str] = []  # why each re-plan happened
        self.cluster: Cluster | None = None  # the current plan, its nodes and its pipeline
        self._gate = threading.Condition()  # guards the three below
        self._in_flight = 0  # calls using the current plan
        self._recovering = False  # a re-plan is waiting for them or running
        self._generation = 0  # plans made so far
        self._loading = threading.Lock()  # held by whatever loads layers onto nodes: a re-plan, or load_ahead
        self._replan(first=True)

    @property
    def plan(self) -> Plan:
        if self.cluster is None:
            raise PlanError("no plan: the last re-plan failed")
        return self.cluster.plan

    @property
    def generation(self) -> int:
        """Plans made so far: what `adopt` is given, so that a plan offered on an older one is refused."""
        return self._generation

    @property
    def replanning(self) -> bool:
        """A re-plan is waiting for the calls in flight, or running."""
        return self._recovering

    @property
    def prefill_depth(self) -> int:
        cluster = self.cluster
        return cluster.pipeline.prefill_depth if cluster is not None else 1

    def stats(self, ask_nodes: bool = True) -> list[StageStats]:
        """The current plan's stages' (Pipeline.stats); none between plans."""
        cluster = self.cluster
        return cluster.pipeline.stats(ask_nodes) if cluster is not None else []

    def forward(self, segments: Sequence[Segment], token_ids: np.ndarray) -> np.ndarray:
        def call(pipeline: Pipeline) -> np.ndarray:
            hidden = pipeline.forward(segments, token_ids)
            self.replay.remember(segments, token_ids)  # before any re-plan can read the history
            return hidden

        return self._with_recovery(call)

    def submit(self, segments: Sequence[Segment], token_ids: np.ndarray) -> Callable[[], np.ndarray]:
        """Pipeline.submit on the current plan, without recovery: batches sent after this one
        may be in flight on the same plan, so a lost node is the caller's to handle (its
        function raises the NodeError; forward then re-plans). Answers must be collected in
        the order sent: each one's tokens are remembered then, as the caches took them, unless
        another call re-planned meanwhile (the new plan's caches were refilled without them)."""
        try:
            with self._plan_in_use() as generation:
                if self.cluster is None:
                    raise PlanError("no plan: the last re-plan failed")
                wait = self.cluster.pipeline.submit(segments, token_ids)
        except (NodeError, PlanError) as exc:
            error = exc

            def wait() -> np.ndarray:
                raise error

        def result() -> np.ndarray:
            hidden = wait()
            with self._plan_in_use() as now:
                if now != generation:
                    raise NodeError("re-plan", "the batch ran on a plan replaced since; run it again",
                                    grpc.StatusCode.UNAVAILABLE)
                self.replay.remember(segments, token_ids)
            return hidden

        return result

    def choose_greedily(self, session_id: str) -> None:
        self.greedy.add(session_id)  # Pipeline.choose_greedily: a re-plan's pipeline shares the set

    def prefill(self, session_id: str, prompt_ids: Sequence[int], adapters: tuple = (), start: int = 0) -> np.ndarray:
        ids = np.asarray(prompt_ids, dtype=np.int64)

        def call(pipeline: Pipeline) -> np.ndarray:
            # a lost node mid-prompt: the new plan's stages, refilled, take it from `start` again
            hidden = pipeline.prefill(session_id, ids, adapters, start)
            self.replay.remember([Segment(session_id, start, len(ids) - start, adapters)], ids[start:])
            return hidden

        return self._with_recovery(call)

    def copy_session(self, source: str, target: str, length: int) -> None:
        def call(pipeline: Pipeline) -> None:
            self.replay.check_copy(source)
            pipeline.end_session(target)  # what a failed earlier attempt left
            pipeline.copy_session(source, target, length)
            self.replay.copy(source, target, length)

        self._with_recovery(call)

    def add_adapter(self, adapter: LoraAdapter) -> None:
        self.adapters[adapter.name] = adapter  # before any re-plan, which sends it to the new stages
        self._with_recovery(lambda pipeline: pipeline.add_adapter(adapter))

    def end_session(self, session_id: str) -> None:
        self.greedy.discard(session_id)
        with self._plan_in_use():
            self.replay.forget(session_id)
            if self.cluster is not None:
                self.cluster.pipeline.end_session(session_id)

    def retire_session(self, session_id: str, length: int) -> None:
        with self._plan_in_use():
            self.replay.retire(session_id, length)
            if self.cluster is not None:
                self.cluster.pipeline.retire_session(session_id, length)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()

    @contextlib.contextmanager
    def _plan_in_use(self) -> Iterator[int]:
        """Hold the current plan for one call (many calls may); yields its generation."""
        with self._gate:
            while self._recovering:
                self._gate.wait()
            self._in_flight += 1
            generation = self._generation
        try:
            yield generation
        finally:
            with self._gate:
                self._in_flight -= 1
                self._gate.notify_all()

    def _with_recovery(self, call: Callable[[Pipeline], object]):
        """call(the current plan's pipeline); when a node is lost, re-plan and call again."""
        for attempt in range(MAX_RECOVERIES + 1):
            error = None
            with self._plan_in_use() as generation:
                if self.cluster is not None:
                    try:
                        return call(self.cluster.pipeline)
                    except NodeError as exc:
                        if not exc.lost or attempt == MAX_RECOVERIES:
                            raise
                        error = exc
            self._recover(error, generation)
        raise PlanError(f"gave up after {MAX_RECOVERIES} re-plans: {self.recoveries[-1] if self.recoveries else 'no plan'}")

    def load_ahead(self, nodes: list[Node], plan: Plan, generation: int, stale: Sequence[str] = ()) -> list[str]:
        """Load the layers `plan` gives each of `nodes` that serves no stage of the current plan
        (a new node, one that came back, or a `stale` one that lost its layers), pushing the weights
        it lacks, while calls go on over the current plan; `adopt` then finds them loaded, and the
        move waits only for the nodes of the current plan and the refill. The current plan's
        nodes are left alone: loading them would change their layers under the calls. Stops,
        returning [], once a re-plan has come first; else the addresses loaded. The lock keeps
        a failover's re-plan from loading the same node at once (it waits for this load)."""
        cluster, router = self.cluster, self.router
        serving = {a.node.name for a in cluster.plan.assignments} - set(stale) if cluster else set()
        by_address = {node.address: node for node in nodes}
        ahead = [a for a in plan.assignments if by_address[a.node.name].client is not None
                 and a.node.name not in serving]
        sha = file_sha256(router.model.file.path, router.cache_dir) if ahead else ""
        for assignment in ahead:
            with self._loading:
                if self._recovering or self._generation != generation:
                    return []
                load_layers(router.model, by_address[assignment.node.name], assignment.layers, sha, router.n_ctx,
                            router.progress, head=plan.head and assignment.layers.stop == router.model.config.n_layers)
        return [a.node.name for a in ahead]

    def adopt(self, nodes: list[Node], plan: Plan, generation: int) -> bool:
        """Move to `plan` over `nodes` (connected and measured; this call owns them) at the next
        call boundary: no call is using the current plan then, and every session's caches are
        refilled on the new one, so the text goes on unchanged. False, with the nodes closed, when
        the plan has changed since `generation` (a failure re-planned first). A node lost while
        moving is routed around as in any re-plan."""
        with self._gate:
            if self._generation != generation or self._recovering:
                close_nodes(nodes)
                return False
            self._recovering = True
            while self._in_flight:
                self._gate.wait()
        try:
            if self.cluster is not None:
                self.cluster.close()
                self.cluster = None
            router = self.router
            self._replan(offered=lambda: deploy(router.model, nodes, plan, router.n_ctx, router.cache_dir,
                                                router.wire_format, router.progress, router.forward_timeout_s))
            return True
        finally:
            self._next_generation()

    def layout(self) -> str:
        """The current plan in a few words: each stage's node and layers."""
        cluster = self.cluster
        if cluster is None:
            return "no plan"
        names = {node.address: node.name for node in cluster.nodes}
        return ", ".join(f"{names.get(a.node.name, a.node.name)} {a.layers}" for a in cluster.plan.assignments)

    def _recover(self, error: NodeError | None, generation: int) -> None:
        """Drop the plan `error` was met on and make a new one, unless another call did already."""
        with self._gate:
            if self._generation != generation:
                return
            self._recovering = True
            while self._in_flight:
                self._gate.wait()
        try:
            was = self.layout()
            t0 = time.perf_counter()
            if error is not None:
                self._drop(error)
            self._replan()
            log.warning("re-planned in %.1f s: was %s; now %s", time.perf_counter() - t0, was, self.layout())
        finally:
            self._next_generation()

    def _next_generation(self) -> None:
        with self._gate:
            self._generation += 1
            self._recovering = False
            self._gate.notify_all()

    def _drop(self, exc: NodeError) -> None:
        """Give up the current plan: a stage's node is gone or stuck."""
        log.warning("%s; re-planning over the nodes that still answer", exc)
        self.recoveries.append(str(exc))
        if self.cluster is not None:
            self.cluster.close()
        self.cluster = None

    def _replan(self, first: bool = False, offered: Callable[[], Cluster] | None = None) -> None:
        """Place the layers on the nodes that answer now (or deploy the plan `offered`) and refill
        every session's caches; a node lost on the way (connecting, loading, opening streams,
        refilling) is dropped and the plan made again, up to MAX_RECOVERIES times."""
        with self._loading:
            for attempt in range(MAX_RECOVERIES + 1):
                try:
                    self.cluster = offered() if offered is not None else self.router.deploy(first, self.recoveries)
                    self.cluster.pipeline.greedy = self.greedy
                    for adapter in self.adapters.values():
                        self.cluster.pipeline.add_adapter(adapter)
                    self.replay.refill(self.cluster.pipeline)
                    break
                except NodeError as exc:
                    offered = None  # once more from the nodes that answer now
                    if not exc.lost or attempt == MAX_RECOVERIES:
                        raise
                    self._drop(exc)
