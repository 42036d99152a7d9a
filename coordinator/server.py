"""`caravan serve`: the OpenAI-compatible HTTP API in front of the scheduler.

    POST /v1/chat/completions   messages rendered with the model's chat template
    POST /v1/completions        a raw prompt
    GET  /v1/models             the model served, and MODEL:ADAPTER for each --lora adapter
    GET  /v1/models/{id}        one of them (a JSON 404 for any other id)
    GET  /                      a web chat page (coordinator/chat.html), under a strict CSP
    GET  /health                200 "ok", or "degraded" with the --nodes missing; 503 while no plan
                                of nodes works; the stages
    GET  /metrics               Prometheus text: requests, queue, tokens, KV cache per stage
    /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version
                                Ollama's API, on the same model (coordinator/ollama.py)

Both completion endpoints take max_tokens, temperature, top_p, seed, stop, n, logprobs,
frequency_penalty, presence_penalty, logit_bias, llama-server's top_k, min_p, repeat_penalty and
repeat_last_n, and stream (Server-Sent Events: `data: {chunk}` lines, usage in the last chunk,
then `data: [DONE]`). Sampling settings a request leaves out are llama-server's and Ollama's
defaults (SamplingParams'), so a client that sends none gets sensible answers. Structured output:
OpenAI's response_format (json_object, json_schema) and llama-server's json_schema and grammar
(GBNF) hold the answer to a grammar, token by token (pipeline/grammar.py); a schema the library
refuses is a 400 saying what. Tool calls (tools, tool_choice, parallel_tool_calls) are
coordinator/tools.py's. A field caravan does not implement (functions, echo, ...) or does not
know is a 400 naming it, never silently dropped. max_tokens past the room left in the context is
cut to it (finish_reason "length"), as llama-server does. Errors are OpenAI-style JSON,
`{"error": {"message", "type", "param", "code"}}`, with the right status.

A request's "model" chooses the LoRA adapter: MODEL:ADAPTER (serve --lora) runs the base model
with that adapter's low-rank products added, in the same batches as the others; the base model's
own id runs it without. A client that goes away mid-stream has its sequence cancelled, which frees its
KV cache on every stage.

Bound to loopback (the default), it answers only requests whose Host names loopback and whose
Origin, if any, is a loopback page; bound elsewhere, an Origin must be the server's own page.
`Origin: null` (sandboxed frames, local files) is refused, and a POST's body must be sent as
`Content-Type: application/json`, which a browser never sends cross-site without a CORS
preflight this server does not answer: a web page elsewhere cannot reach it through the browser
(DNS rebinding, cross-site POSTs). It sends no CORS headers.

No one client can stall it for the others: a body is bounded (--max-body, 413 past it) and must
arrive within --read-timeout, as must a request's headers; parsing, tokenizing and the chat
template run on worker threads, never on the event loop; a prompt that cannot fit the context is
refused before it is tokenized; past --max-connections new requests get a 503. A non-streamed
request whose client leaves is cancelled like a stream, and SIGTERM ends the server within
SHUTDOWN_GRACE_S of letting requests finish, then cancels the rest.

Here: the routes, and running a completion (its streams and answers). Elsewhere: which fields a
request may set and the shapes of answers (openai_api.py), the guards, limits and uvicorn
server (http_guard.py), the hand-off of tokens to the event loop (handoff.py), the Prometheus
text (metrics.py) and Ollama's API (ollama.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import logging
import re
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from caravan.pipeline.chat_template import ChatTemplateError
from caravan.pipeline.grammar import GrammarError
from caravan.pipeline.loader import LoadedModel
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.tokenizer import StreamDecoder

from .handoff import EventHandoff, kernels_fill_the_cores
from .http_guard import CLOSE, SHUTDOWN_GRACE_S, BodyLimits, BrowserGuard, ServeLimits, describe_peer
from .metrics import PROMETHEUS_MEDIA_TYPE, kv_per_stage, prometheus_text
from .openai_api import (CHAT_FIELDS, COMPLETION_FIELDS, STREAM_END, APIError, Completion, chat_messages, choice_object,
                         completion_request, finish_reason_of, first_stop, logprobs_object, parse_json_object,
                         prompt_field, refuse_fields, speaks_ollama, stream_chunk, stream_error, structured_output,
                         token_text, tool_calls_chunk, usage_object)
from .scheduler import Event, Request, Scheduler
from .tools import CallStream, ToolUse, parse_tool_calls, render_chat, tool_grammar, tool_use

log = logging.getLogger(__name__)

# On SIGTERM, how long a non-streamed answer may still take before it is a 503 instead: less than
# SHUTDOWN_GRACE_S, so that the 503 is written before the server cancels what is left.
ANSWER_GRACE_S = SHUTDOWN_GRACE_S - 1.0
# A chat's messages may be this many times longer than a prompt that fits before they are
# refused unrendered: a template may leave some of a conversation out.
CHAT_TEXT_SLACK = 4


class API:
    def __init__(self, model: LoadedModel, scheduler: Scheduler, model_id: str, api_key: str | None = None,
                 loopback_only: bool = True, adapters: dict[str, tuple[tuple[str, float], ...]] | None = None,
                 limits: ServeLimits = ServeLimits(), cache_dir: Path | None = None):
        from .ollama import OllamaAPI  # it builds on this module's pieces

        self.model = model
        self.limits = limits
        # Every token stands for at most this many bytes of text (its vocabulary entry, for a
        # special token), so a text of N characters is at least N / this many tokens.
        tokenizer = model.tokenizer
        self.max_token_bytes = max((max(len(tokenizer.token_bytes(i)), len(tokenizer.token_text(i).encode()))
                                    for i in range(tokenizer.vocab_size)), default=1)
        self.scheduler = scheduler
        self.model_id = model_id
        # Model ids that stand for the base model with LoRA adapters ("MODEL:ADAPTER" -> (name,
        # scale) pairs), chosen per request by the request's "model" field.
        self.adapters = dict(adapters or {})
        self.api_key = api_key
        self.created = int(time.time())
        self.chat_page = (Path(__file__).parent / "chat.html").read_text(encoding="utf-8")
        self.chat_page_headers = page_headers(self.chat_page)
        # Waiting for the writes pays where this process runs every layer on every core; in front
        # of nodes it would only hold the lane's next batch back from them.
        in_process = all(row.address is None for row in scheduler.pipeline.stats(ask_nodes=False))
        self._handoff = EventHandoff(wait=in_process and kernels_fill_the_cores(scheduler.threads))
        scheduler.flush = self._handoff.flush
        self._stopping = asyncio.Event()  # set on SIGTERM: answers still running are cut short
        self._loop: asyncio.AbstractEventLoop | None = None  # the requests' loop, once there is one
        self.missing_nodes: Callable[[], list[dict]] = list  # --nodes not in the pool, for /health (serve sets it)
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model_info, methods=["GET"]),
            Route("/", self.page, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            *OllamaAPI(self, cache_dir).routes(),
        ], middleware=[
            Middleware(BodyLimits, max_body=limits.max_body, read_timeout=limits.read_timeout),
            Middleware(BrowserGuard, loopback_only=loopback_only),
        ], exception_handlers={HTTPException: _http_error, Exception: _internal_error})

    # --- requests --------------------------------------------------------------------------------

    def _authorize(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # Header values arrive as latin-1 text: back to the bytes the client sent.
        sent = key.strip().encode("latin-1", errors="replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key",
                           kind="authentication_error")

    async def _body(self, request: HTTPRequest) -> dict:
        body = await self._json_body(request)
        model = body.get("model")
        if model is not None and model != self.model_id and model not in self.adapters:
            served = ", ".join(repr(m) for m in (self.model_id, *self.adapters))
            raise APIError(404, f"the model {model!r} does not exist; this server runs {served}",
                           "model", "model_not_found")
        return body

    async def _json_body(self, request: HTTPRequest) -> dict:
        """The request's JSON object, once its API key and Content-Type are right (parsed on a
        worker thread)."""
        self._authorize(request)
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise APIError(415, f"the request body must be JSON sent with Content-Type: application/json, "
                           f"got {media or 'no Content-Type'}", code="unsupported_media_type", headers=CLOSE)
        return await run_in_threadpool(parse_json_object, await request.body())

    def _refuse_past_context(self, chars: int, param: str, slack: int = 1) -> None:
        """Refuse a text of `chars` characters, untokenized, when it cannot fit the context (a
        character is at least a byte, a token at most max_token_bytes of them)."""
        n_ctx = self.scheduler.pipeline.n_ctx
        least = chars // (self.max_token_bytes * slack)
        if least >= n_ctx:
            raise APIError(400, f"the prompt is at least {least} tokens ({chars} characters); this server's "
                           f"context is {n_ctx}", param, "context_length_exceeded")

    def _prompt_ids(self, body: dict) -> list[int]:
        """The prompt of a completion request, tokenized (on a worker thread)."""
        prompt = prompt_field(body)
        if isinstance(prompt, str):
            self._refuse_past_context(len(prompt), "prompt")
            return self.model.tokenizer.encode(prompt, special=True)
        if len(prompt) < self.scheduler.pipeline.n_ctx and not all(0 <= t < self.model.tokenizer.vocab_size
                                                                    for t in prompt):
            raise APIError(400, "prompt token ids must be within the vocabulary", "prompt")
        return list(prompt)

    def _chat_ids(self, body: dict, tools: ToolUse | None = None) -> list[int]:
        """The prompt of a chat request: its messages (and tools) rendered and tokenized (on a worker
        thread). A template that takes no tools gets them, and the calls and results in the
        history, as text (coordinator/tools.py)."""
        rendered = chat_messages(body)
        self._refuse_past_context(sum(len(m["content"]) for m in rendered), "messages", CHAT_TEXT_SLACK)
        tokenizer = self.model.tokenizer
        try:
            text = render_chat(self.model.chat_template, rendered, tools)
        except ChatTemplateError as exc:
            raise APIError(400, f"the chat template failed on these messages: {exc}", "messages") from None
        self._refuse_past_context(len(text), "messages")
        return tokenizer.encode_rendered(text)

    # --- endpoints -------------------------------------------------------------------------------

    def _job(self, body: dict, chat: bool) -> Completion:
        """A request's fields checked and its prompt tokenized (on a worker thread: a long
        logit_bias or prompt takes a while)."""
        refuse_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS,
                       "/v1/chat/completions" if chat else "/v1/completions")
        tools = tool_use(body) if chat else None
        prompt_ids = self._chat_ids(body, tools) if chat else self._prompt_ids(body)
        return completion_request(body, prompt_ids, chat, self.scheduler.pipeline.n_ctx,
                                  self.model.tokenizer.vocab_size, self.model_id, self.adapters,
                                  self._grammar(body, tools), tools)

    def _grammar(self, body: dict, tools: ToolUse | None) -> str:
        """What the answer is held to: the response format asked for, or with tool_choice required
        or a named function the call format ("" for free text)."""
        grammar = structured_output(body, self.model.grammars)
        if tools is None or tools.choice == "auto":
            return grammar
        if grammar:
            raise APIError(400, f"tool_choice {tools.choice!r} and a response format both constrain the answer; "
                           "send one of them", "tool_choice")
        try:
            return tool_grammar(tools, self.model.grammars)
        except GrammarError as exc:
            raise APIError(400, f"tools: a function's parameters are refused by the constrained-decoding library: "
                           f"{exc}; change or remove that part", "tools", "invalid_schema") from None

    async def chat_completions(self, request: HTTPRequest) -> Response:
        try:
            job = await run_in_threadpool(self._job, await self._body(request), True)
        except APIError as exc:
            return exc.response()
        return await self._respond(job, True, request)

    async def completions(self, request: HTTPRequest) -> Response:
        try:
            job = await run_in_threadpool(self._job, await self._body(request), False)
        except APIError as exc:
            return exc.response()
        return await self._respond(job, False, request)

    def _model_object(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "caravan"}

    async def models(self, request: HTTPRequest) -> Response:
        try:
            self._authorize(request)
        except APIError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": [self._model_object(m) for m in (self.model_id, *self.adapters)]})

    async def model_info(self, request: HTTPRequest) -> Response:
        """GET /v1/models/{id}: one model object, or OpenAI's 404 for an id this server does not run."""
        model_id = request.path_params["model_id"]
        try:
            self._authorize(request)
            if model_id != self.model_id and model_id not in self.adapters:
                served = ", ".join(repr(m) for m in (self.model_id, *self.adapters))
                raise APIError(404, f"the model {model_id!r} does not exist; this server runs {served}", "model",
                               "model_not_found")
        except APIError as exc:
            return exc.response()
        return JSONResponse(self._model_object(model_id))

    async def page(self, request: HTTPRequest) -> Response:
        return HTMLResponse(self.chat_page, headers=self.chat_page_headers)

    async def health(self, request: HTTPRequest) -> Response:
        rows = self.scheduler.pipeline.stats(ask_nodes=False)
        missing = self.missing_nodes()
        if not rows:  # a ClusterPipeline between plans
            return JSONResponse({"status": "no plan of nodes fits; waiting for nodes", "model": self.model_id,
                                 "missing": missing}, status_code=503)
        stages = [{"node": row.node, "layers": [row.layers.start, row.layers.stop]} for row in rows]
        # Degraded still answers every request: 200, so that a load balancer keeps sending them.
        return JSONResponse({"status": "degraded" if missing else "ok", "model": self.model_id, "stages": stages,
                             **({"missing": missing} if missing else {})})

    async def metrics(self, request: HTTPRequest) -> Response:
        try:
            self._authorize(request)
        except APIError as exc:
            return exc.response()
        rows = await run_in_threadpool(kv_per_stage, self.scheduler.pipeline)
        return Response(prometheus_text(self.scheduler, rows), media_type=PROMETHEUS_MEDIA_TYPE)

    # --- running a completion --------------------------------------------------------------------

    def stop(self) -> None:
        """Cut short the non-streamed answers still running (any thread, or a signal handler)."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing left to cut
                self._loop.call_soon_threadsafe(self._stopping.set)

    def _start(self, job: Completion, loop: asyncio.AbstractEventLoop) -> list[tuple[Request, asyncio.Queue]]:
        self._loop = loop
        handoff = self._handoff
        runs = []
        for i in range(job.n):
            events: asyncio.Queue[Event] = asyncio.Queue()
            params = job.params if job.params.seed is None else SamplingParams(**{**job.params.__dict__,
                                                                                "seed": job.params.seed + i})
            constraint = self.model.grammars.constraint(job.grammar) if job.grammar else None
            request = Request(job.prompt_ids, Sampler(params, constraint), job.max_tokens, self.model.tokenizer.eog_ids,
                              lambda e, q=events: handoff.put(loop, q, e), job.adapters,
                              job.top_logprobs)
            runs.append((request, events))
        leader = runs[0][0]
        leader.followers = [request for request, _ in runs[1:]]  # they share its prompt's prefill
        self.scheduler.submit(leader)
        return runs

    async def _respond(self, job: Completion, chat: bool, http_request: HTTPRequest) -> Response:
        loop = asyncio.get_running_loop()
        runs = self._start(job, loop)
        kind = "chat.completion" if chat else "text_completion"
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": job.model}
        if job.stream:
            return StreamingResponse(self._stream(job, runs, chat, {**base, "object": kind + ("" if not chat else ".chunk")}),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            choices, generated = await self._await_answer(self._answer(job, runs, chat), runs, http_request)
        except APIError as exc:
            return exc.response()
        usage = usage_object(len(job.prompt_ids), generated)
        return JSONResponse({**base, "object": kind, "choices": choices, "usage": usage})

    async def _await_answer(self, answer_coro, runs, http_request: HTTPRequest):
        """What `answer_coro` returns, a non-streamed answer of `runs`, or an APIError: a 400 if
        the client left first, a 503 if the server stopped first."""
        # The answer is written at the end: watch the connection meanwhile, so that a client
        # that leaves has its sequences cancelled (and their KV caches freed) at once.
        answer = asyncio.ensure_future(answer_coro)
        gone = asyncio.ensure_future(_client_gone(http_request))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({answer, gone, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done() and not answer.done():
                await asyncio.wait({answer, gone}, timeout=ANSWER_GRACE_S)
        finally:
            for task in (gone, stopping, answer):
                task.cancel()
            for request, _ in runs:
                request.cancel()
        if not answer.done() or answer.cancelled():
            if gone.done() and not gone.cancelled():
                log.info("%s left before its answer: %d sequence(s) cancelled", describe_peer(http_request.client),
                         len(runs))
                raise APIError(400, "the client closed the connection", code="client_closed")
            raise APIError(503, "the server is shutting down; ask again once it is back", code="shutting_down",
                           kind="server_error")
        return answer.result()

    async def _answer(self, job: Completion, runs, chat: bool) -> tuple[list[dict], int]:
        """The choices of a non-streamed answer, once every sequence is done, and the tokens they
        generated (as _pieces counts them)."""
        choices, generated = [], 0
        for index, (request, events) in enumerate(runs):
            text, reason, tokens = await self._whole(job, request, events)
            generated += len(tokens)
            logprobs = logprobs_object(self.model.tokenizer, job, tokens, chat, 0)
            content, calls = parse_tool_calls(text, job.tools) if job.tools else (text, [])
            choices.append(choice_object(index, content, "tool_calls" if calls else reason, logprobs, chat, calls))
        return choices, generated

    async def _whole(self, job: Completion, request: Request, events: asyncio.Queue) -> tuple[str, str, list[Event]]:
        """(text, finish_reason, token events) of one sequence, once it is done."""
        text, reason, tokens = "", "length", []
        async for piece, finish, piece_tokens in self._pieces(job, request, events):
            text += piece
            reason = finish or reason
            tokens += piece_tokens
        return text, reason, tokens

    async def _pieces(self, job: Completion, request: Request,
                      events: asyncio.Queue) -> AsyncIterator[tuple[str, str, list[Event]]]:
        """(text, finish_reason, the token events behind it) as the tokens come; finish_reason is
        set on the last one. Stop strings are held back until it is clear they are not a stop,
        then cut. The events end with the token that completed a stop string: the ones the
        sequence made past it before it saw its cancel are not its answer's, and llama-server's
        completion_tokens counts the same way."""
        decoder = StreamDecoder(self.model.tokenizer)
        pending, tokens = "", []
        hold = max((len(s) for s in job.stop), default=0)
        while True:
            event: Event = await events.get()
            if event.kind == "error":
                raise APIError(500, event.message, kind="server_error")
            if event.kind == "done":
                tail = pending + decoder.flush()
                cut = first_stop(tail, job.stop)
                reason = "stop" if cut is not None else finish_reason_of(event)
                yield (tail if cut is None else tail[:cut]), reason, tokens
                return
            tokens.append(event)
            pending += decoder.push(event.token)
            cut = first_stop(pending, job.stop)
            if cut is not None:
                request.cancel()
                yield pending[:cut], "stop", tokens
                return
            if len(pending) > hold:
                ready, pending = pending[: len(pending) - hold], pending[len(pending) - hold :] if hold else ""
                yield ready, "", tokens
                tokens = []

    async def _stream(self, job: Completion, runs, chat: bool, base: dict) -> AsyncIterator[str]:
        chunk = functools.partial(stream_chunk, base, chat)
        tokenizer = self.model.tokenizer
        generated = 0  # tokens of the answers so far, as _pieces counts them
        try:
            for index, (request, events) in enumerate(runs):
                if chat:
                    yield chunk(index, None, None)
                finish, offset, calls, held = "length", 0, CallStream() if job.tools else None, []
                try:
                    async for piece, reason, tokens in self._pieces(job, request, events):
                        held += tokens
                        generated += len(tokens)
                        piece = calls.push(piece) if calls else piece
                        if piece or (held and not calls):
                            logprobs = logprobs_object(tokenizer, job, held, chat, offset)
                            yield chunk(index, piece, None, logprobs=logprobs)
                            offset += sum(len(token_text(tokenizer, e.token)) for e in held)
                            held = []
                        finish = reason or finish
                except APIError as exc:
                    yield stream_error(exc)
                    return
                if calls:  # what was held back: the rest of the content, and the calls
                    tail, found = calls.finish(job.tools)
                    if tail or held:
                        yield chunk(index, tail, None, logprobs=logprobs_object(tokenizer, job, held, chat, offset))
                    if found:
                        yield tool_calls_chunk(base, index, found)
                        finish = "tool_calls"
                last = index == len(runs) - 1
                usage = usage_object(len(job.prompt_ids), generated) if last else None
                yield chunk(index, "" if not chat else None, finish, usage)
            yield STREAM_END
        finally:  # the client may be gone: free every sequence's caches
            for request, _ in runs:
                request.cancel()


def page_headers(page: str) -> dict[str, str]:
    """The chat page's headers: a Content-Security-Policy under which only the page's own script
    and style run and it talks only to this server, so that not even a fault in its markdown
    renderer could run what an answer holds; no referrer for the links in answers; no framing."""
    def hashes(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL))

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}


async def _client_gone(request: HTTPRequest) -> None:
    """Returns once the client has closed its connection (its body read, the server's receive
    waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


ROUTES = ("/v1/chat/completions, /v1/completions, /v1/models, /v1/models/{id}, Ollama's /api/chat, /api/generate, "
          "/api/tags, /api/show, /api/ps and /api/version, /health, /metrics and /")


async def _http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such route, wrong method) as OpenAI-style JSON."""
    if exc.status_code == 404:
        message = f"no route {request.url.path}; this server answers {ROUTES}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path} (allowed: {(exc.headers or {}).get('Allow')})"
    else:
        message = exc.detail
    return APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                    headers=exc.headers).response(speaks_ollama(request.scope))


async def _internal_error(request: HTTPRequest, exc: Exception) -> Response:
    return APIError(500, "internal error in the server (its log has the details)",
                    kind="server_error").response(speaks_ollama(request.scope))
