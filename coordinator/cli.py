"""The `caravan` command line: verbs a llama.cpp or Ollama user would guess.

    caravan pull [MODEL]            fetch a model (a name, URL or Hugging Face path) into the cache
    caravan list / rm MODEL         the models in the cache / remove one
    caravan run PROMPT              raw completion, streamed to stdout
    caravan chat                    multi-turn chat with the model's chat template
    caravan tokenize TEXT           token ids, as llama.cpp's llama-tokenize prints them
    caravan perplexity FILE         perplexity over consecutive windows of --ctx tokens
    caravan node                    run a worker node (caravan.node.cli)
    caravan nodes                   list the nodes this machine can see, with their speed
    caravan plan                    which node would get which layers, and the expected speed
    caravan bench                   prefill and decode tokens/s, first token, hops, memory
    caravan serve                   OpenAI-compatible HTTP API (coordinator.server)
    caravan quantize IN OUT --type  a GGUF model written again in another format (pipeline.quantize)
    caravan token                   the cluster's join token (created if missing), and where it lives
    caravan warmup [-m MODEL]       compile the kernels a model (or every format) needs, ahead of the first run

run, chat and perplexity take --nodes HOST:PORT,... and/or --discover to spread the layers
over worker nodes; without them every layer runs in this process.

Standard output carries only the result (text, a path, or with --json one JSON object);
progress, logging and errors go to stderr. An expected failure is one line
`caravan: error: ...` and exit status 1; a flag's bad value is one line too, and it and
argparse's other usage errors exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import ipaddress
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple, TextIO

import numba
import psutil
from tqdm import tqdm

from caravan.pipeline.catalog import DEFAULT_MODEL, PullError, list_models, remove_model, resolve_model
from caravan.pipeline.chat_template import ChatTemplateError
from caravan.pipeline.generate import ContextFullError, Generation, Pipeline
from caravan.pipeline.gguf_file import GGUFError, GGUFFile
from caravan.pipeline.loader import DEFAULT_CTX, LoadedModel
from caravan.pipeline.lora import LoraError, check_scale
from caravan.pipeline.model import ModelError
from caravan.pipeline import perplexity
from caravan.pipeline.numba_config import WAITING_SPIN, spin_briefly_when_idle
from caravan.pipeline.prompt_cache import CACHE_SHARE_OF_FREE, default_budget
from caravan.pipeline.quantize import QuantizeError, offered as quantize_types, parse_type, quantize_model
from caravan.pipeline.quants import SUPPORTED_TYPES, UnsupportedTypeError
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.speculative import DRAFT_MAX, DrafterFactory
from caravan.pipeline.stage import StageError
from caravan.pipeline.tokenizer import StreamDecoder, Tokenizer, TokenizerError
from caravan.proto import wire
from caravan.proto.auth import TOKEN_ENV, TOKEN_FILE, TokenError, add_auth_flags

from . import bench, from_flags
from .cluster import HEAD_PLACES, LOCAL, close_nodes, describe_plan, head_ms, make_plan, row_share, survey_node
from .discovery import DISCOVER_SECONDS
from .http_guard import MAX_BODY_BYTES, MAX_CONNECTIONS, READ_TIMEOUT_S
from .planner import PlanError, Speculation, check_speculation
from .reference import llama_cpp_comparison
from .remote import NodeError
from .scheduler import Scheduler

log = logging.getLogger(__name__)

PROG = "caravan"
PERPLEXITY_CTX = 512  # llama-perplexity's default window
_SAMPLING = SamplingParams()  # defaults shown in --help

# Expected failures, most specific first, each with a hint to add after its own message
# (which already names the thing that is wrong). Anything else is a bug and gets a traceback.
EXPECTED_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (PullError, ""),
    (NodeError, ""),
    (PlanError, ""),
    (TokenError, ""),
    (GGUFError, ""),
    (QuantizeError, ""),
    (LoraError, ""),
    (UnsupportedTypeError, ""),
    (ModelError, ""),
    (TokenizerError, ""),
    (ChatTemplateError, ""),
    (ContextFullError, "give a larger --ctx or a shorter prompt"),
    (StageError, ""),
    (UnicodeDecodeError, "the file must be UTF-8 text"),
    (ValueError, ""),  # argument validation (SamplingParams, --threads, --ctx, ...)
    (OSError, ""),
)


def error_message(exc: BaseException) -> str | None:
    """The one line to print for an expected failure, or None when `exc` is not one."""
    for error_type, hint in EXPECTED_ERRORS:
        if isinstance(exc, error_type):
            if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
                message = f"{exc.filename}: {exc.strerror}"
            else:
                message = str(exc) or type(exc).__name__
            return f"{message} ({hint})" if hint else message
    return None


# --- arguments ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a flag's bad value is one line that names the flag and what is
    wrong, as the values checked after parsing are; the usage is printed only when the command
    line's shape is wrong (a missing argument, an unknown flag)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, exit_on_error=False, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        try:
            return super().parse_known_args(args, namespace)
        except argparse.ArgumentError as exc:
            if exc.argument_name is None:
                self.error(str(exc))
            self.exit(2, f"{self.prog}: error: {exc}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def _size(text: str) -> int:
    """'4MiB', '4M', '512k', '1048576' -> bytes (the units are powers of 1,024)."""
    match = _SIZE.fullmatch(text.strip())
    value = int(float(match[1]) * _SIZE_UNITS[match[2].lower()]) if match else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 4MiB, 512KiB or 1048576, got {text}")
    return value


def _size_or_zero(text: str) -> int:
    """As _size, and 0 (turns the thing sized off)."""
    return 0 if text.strip() == "0" else _size(text)


class SharedFlags(NamedTuple):
    """The groups of flags several verbs take, as argparse parent parsers."""

    common: argparse.ArgumentParser
    model: argparse.ArgumentParser
    cluster: argparse.ArgumentParser
    lora: argparse.ArgumentParser
    sampling: argparse.ArgumentParser
    speculation: argparse.ArgumentParser


def build_parser() -> argparse.ArgumentParser:
    shared = SharedFlags(_common_flags(), _model_flags(), _cluster_flags(), _lora_flags(), _sampling_flags(),
                         _speculation_flags())
    parser = _Parser(prog=PROG, description="Run a LLaMA-family GGUF model.")  # its verbs' parsers are too
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    # In the order --help lists them.
    _add_model_verbs(verbs, shared)
    _add_cluster_verbs(verbs, shared)
    _add_serve_verb(verbs, shared)
    _add_tool_verbs(verbs, shared)
    return parser


def _common_flags() -> argparse.ArgumentParser:
    """Flags every verb takes: verbosity, --json, the cache directory."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log to stderr (-v: info and tracebacks, -vv: debug)")
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="model cache (default: $CARAVAN_HOME, else $XDG_CACHE_HOME/caravan, "
                        "else ~/.cache/caravan)")
    return common


def _model_flags() -> argparse.ArgumentParser:
    """Which model to run, and on how many threads."""
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", "-m", default=DEFAULT_MODEL, metavar="PATH|NAME",
                       help=f"a .gguf file or a known model name (default: {DEFAULT_MODEL})")
    model.add_argument("--threads", "-t", type=int, default=None, metavar="N",
                       help=f"compute threads (default: all, {numba.config.NUMBA_NUM_THREADS})")
    return model


def _cluster_flags() -> argparse.ArgumentParser:
    """Which worker nodes to spread the layers over, and how to reach them."""
    cluster = argparse.ArgumentParser(add_help=False)
    cluster.add_argument("--nodes", default=None, metavar="HOST:PORT,...",
                         help=f"worker nodes to spread the layers over, in pipeline order; '{LOCAL}' is this process")
    cluster.add_argument("--discover", action="store_true",
                         help="use the nodes that answer on the LAN (zeroconf), after any --nodes")
    cluster.add_argument("--discover-seconds", type=_positive_seconds, default=DISCOVER_SECONDS, metavar="S",
                         help=f"how long to listen for nodes (default: {DISCOVER_SECONDS})")
    add_auth_flags(cluster,
                   token_file="the cluster join token shared with the nodes (default: CACHE_DIR/cluster-token, "
                   "created if missing)",
                   tls_cert="mutual TLS with the nodes: this coordinator's certificate (with --tls-key, --tls-ca)",
                   tls_ca="the CA that signed the nodes' certificates")
    cluster.add_argument("--wire", default="f32", choices=sorted(wire.WIRE_FORMATS),
                         help="hidden states between nodes: f32 (bit-exact, default), f16 or q8_0")
    cluster.add_argument("--head", default="coordinator", choices=sorted(HEAD_PLACES),
                         help="where the output head runs: coordinator (default), node (the last node answers "
                         "greedy requests with token ids) or auto (the planner decides; tests/bench/RESULTS.md)")
    return cluster


def _lora_flags() -> argparse.ArgumentParser:
    """LoRA adapters to apply (run, chat) or offer (serve)."""
    lora = argparse.ArgumentParser(add_help=False)
    lora.add_argument("--lora", action="append", type=_lora_flag, default=[], metavar="FILE[:SCALE]",
                      help="a LoRA adapter in llama.cpp's GGUF format, scaled by SCALE (default 1); repeat for "
                      "more. run and chat apply them all; serve offers each as the model MODEL:ADAPTER")
    return lora


def _sampling_flags() -> argparse.ArgumentParser:
    """Context size, answer length and sampling settings of run and chat."""
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--ctx", "-c", type=int, default=DEFAULT_CTX, metavar="N",
                          help=f"context size in tokens (default: {DEFAULT_CTX}, at most the model's)")
    sampling.add_argument("--max-tokens", "-n", type=int, default=256, metavar="N",
                          help="stop after N generated tokens (default: 256)")
    sampling.add_argument("--temperature", "--temp", type=float, default=_SAMPLING.temperature, metavar="T",
                          help=f"0 = greedy (default: {_SAMPLING.temperature})")
    sampling.add_argument("--top-k", type=int, default=_SAMPLING.top_k, metavar="K",
                          help=f"0 = off (default: {_SAMPLING.top_k})")
    sampling.add_argument("--top-p", type=float, default=_SAMPLING.top_p, metavar="P",
                          help=f"1 = off (default: {_SAMPLING.top_p})")
    sampling.add_argument("--min-p", type=float, default=_SAMPLING.min_p, metavar="P",
                          help=f"0 = off (default: {_SAMPLING.min_p})")
    sampling.add_argument("--repeat-penalty", type=float, default=_SAMPLING.repeat_penalty, metavar="X",
                          help=f"1 = off (default: {_SAMPLING.repeat_penalty})")
    sampling.add_argument("--seed", "-s", type=int, default=None, metavar="S",
                          help="seed for sampling (default: random)")
    return sampling


def _speculation_flags() -> argparse.ArgumentParser:
    """Speculative decoding with prompt lookup (pipeline/speculative.py), on by default, or with a
    draft model (pipeline/draft_model.py)."""
    speculation = argparse.ArgumentParser(add_help=False)
    speculation.add_argument("--draft", default=None, metavar="PATH|NAME",
                             help="draft with this smaller model of the same vocabulary (a .gguf file or a known "
                             "model name), run in this process, instead of prompt lookup")
    speculation.add_argument("--draft-max", type=_positive_int, default=DRAFT_MAX, metavar="N",
                             help="draft at most N tokens a pass (prompt lookup or --draft; prompt lookup up to 2N "
                             "while the answer copies a long passage); the model checks them in one pass "
                             f"(default: {DRAFT_MAX})")
    speculation.add_argument("--no-speculate", dest="speculate", action="store_false",
                             help="decode one token a pass, without drafts (neither prompt lookup nor --draft)")
    speculation.add_argument("--drafts-in-flight", type=_positive_int, default=0, metavar="N",
                             help="through a chain of nodes, send up to N drafts at once, each on the guess that "
                             "the one before is kept whole (default: one per node; 1: one at a time)")
    return speculation


def _add_model_verbs(verbs, shared: SharedFlags) -> None:
    """pull, run, chat, tokenize and perplexity: a model in this process or over nodes."""
    p = verbs.add_parser("pull", parents=[shared.common], help="fetch a model into the cache, print its path")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"a known model name (default: {DEFAULT_MODEL}), the URL of a .gguf file, or a Hugging "
                   "Face path OWNER/REPO/FILE.gguf[@REVISION] (endpoint: $CARAVAN_HF_ENDPOINT)")
    p.set_defaults(func=cmd_pull)
    verbs.add_parser("list", parents=[shared.common], help="the models in the cache").set_defaults(func=cmd_list)
    p = verbs.add_parser("rm", parents=[shared.common], help="remove a model from the cache")
    p.add_argument("model", metavar="MODEL", help="as `caravan list` names it, or as given to pull")
    p.set_defaults(func=cmd_rm)

    p = verbs.add_parser("run", parents=[shared.common, shared.model, shared.cluster, shared.lora, shared.sampling,
                                                 shared.speculation],
                         help="raw completion of PROMPT, streamed")
    p.add_argument("prompt", metavar="PROMPT")
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("chat", parents=[shared.common, shared.model, shared.cluster, shared.lora, shared.sampling,
                                                 shared.speculation],
                         help="interactive chat (lines from stdin)")
    p.add_argument("--system", metavar="TEXT", default=None, help="a system message to start the conversation")
    p.set_defaults(func=cmd_chat)

    p = verbs.add_parser("tokenize", parents=[shared.common, shared.model], help="token ids of TEXT, as llama-tokenize")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token even if the model wants it")
    p.set_defaults(func=cmd_tokenize)

    p = verbs.add_parser("perplexity", parents=[shared.common, shared.model, shared.cluster],
                         help="perplexity of the model on a text FILE")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--ctx", "-c", type=int, default=PERPLEXITY_CTX, metavar="N",
                   help=f"window size in tokens; its second half is scored, as llama-perplexity does (default: {PERPLEXITY_CTX})")
    p.add_argument("--max-windows", type=_positive_int, default=None, metavar="K",
                   help="score at most K windows (default: all)")
    p.set_defaults(func=cmd_perplexity)


def _add_cluster_verbs(verbs, shared: SharedFlags) -> None:
    """node, nodes and plan: the worker nodes."""
    # Parsed by caravan.node.cli itself (see main); listed here for --help.
    verbs.add_parser("node", add_help=False, help="run a worker node (caravan node --help)")

    p = verbs.add_parser("nodes", parents=[shared.common, shared.model, shared.cluster],
                         help="list the nodes this machine can see: memory, cores, measured speed")
    p.set_defaults(func=cmd_nodes)

    p = verbs.add_parser("plan", parents=[shared.common, shared.model, shared.cluster],
                         help="which node would get which layers, and the expected tokens/s")
    p.add_argument("--ctx", "-c", type=int, default=DEFAULT_CTX, metavar="N",
                   help=f"context size in tokens (default: {DEFAULT_CTX}, at most the model's)")
    p.add_argument("--acceptance", default=None, metavar="A",
                   help="also the expected tokens/s with speculative decoding, each draft token kept with chance A (0..1)")
    p.add_argument("--draft-max", type=_positive_int, default=DRAFT_MAX, metavar="K",
                   help=f"with --acceptance: draft tokens a pass (default: {DRAFT_MAX})")
    p.set_defaults(func=cmd_plan)


def _add_serve_verb(verbs, shared: SharedFlags) -> None:
    """serve: the HTTP API and its limits on each client."""
    p = verbs.add_parser("serve", parents=[shared.common, shared.model, shared.cluster, shared.lora,
                                           shared.speculation],
                         help="OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; give --api-key before opening it)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", default=None, metavar="KEY",
                      help="require `Authorization: Bearer KEY` on every request (the key shows in the process "
                           "list: prefer --api-key-file or the environment variable CARAVAN_API_KEY)")
    keys.add_argument("--api-key-file", type=Path, default=None, metavar="PATH",
                      help="as --api-key, with the key read from the file PATH (keep it mode 0600)")
    p.add_argument("--ctx", "-c", type=int, default=DEFAULT_CTX, metavar="N",
                   help=f"context size in tokens, shared by prompt and answer (default: {DEFAULT_CTX})")
    p.add_argument("--max-batch", type=_positive_int, default=32, metavar="N",
                   help="sequences decoded together; more requests wait (default: 32)")
    p.add_argument("--max-body", type=_size, default=MAX_BODY_BYTES, metavar="SIZE",
                   help=f"largest request body, e.g. 16MiB; larger ones get a 413 (default: {MAX_BODY_BYTES // 2**20}MiB)")
    p.add_argument("--read-timeout", type=_positive_seconds, default=READ_TIMEOUT_S, metavar="S",
                   help="seconds a client has to send a request's headers, and then its body; slower "
                        f"connections are closed (default: {READ_TIMEOUT_S:g})")
    p.add_argument("--max-connections", type=_positive_int, default=MAX_CONNECTIONS, metavar="N",
                   help="open connections past which requests get a 503; the process needs about N + 1024 "
                        f"file descriptors (default: {MAX_CONNECTIONS})")
    p.add_argument("--cache-budget", type=_size_or_zero, default=None, metavar="SIZE",
                   help="keep finished requests' KV caches, up to SIZE per stage, so that a request beginning "
                        "alike (the next turn of a chat) computes only what follows; 0 turns the prompt cache off "
                        f"(default: {CACHE_SHARE_OF_FREE * 100:g}%% of the memory free once the model is loaded; "
                        "in front of nodes each node's own --cache-budget applies)")
    p.set_defaults(func=cmd_serve)


def _add_tool_verbs(verbs, shared: SharedFlags) -> None:
    """quantize, bench and token."""
    p = verbs.add_parser("quantize", parents=[shared.common],
                         help="write a GGUF model again with its matrices in another format, as llama-quantize")
    p.add_argument("input", metavar="IN", help="the model: a .gguf file (F32, F16, BF16, or quantized) or a known name")
    p.add_argument("output", type=Path, metavar="OUT", help="the .gguf file to write (must not exist)")
    p.add_argument("--type", required=True, metavar="TYPE", help=f"the matrices' format: {quantize_types()}")
    p.set_defaults(func=cmd_quantize)

    p = verbs.add_parser("bench", parents=[shared.common, shared.model, shared.cluster, shared.speculation],
                         help="prefill and decode tokens/s, time to first token, per-hop latency, memory")
    p.add_argument("--ctx", "-c", type=int, default=1024, metavar="N", help="context size (default: 1024)")
    p.add_argument("--prompt-tokens", type=_positive_int, default=256, metavar="N",
                   help="prefill length (default: 256)")
    p.add_argument("--decode-tokens", type=_positive_int, default=64, metavar="N",
                   help="tokens generated after it, at least 2 (default: 64)")
    p.add_argument("--runs", type=_positive_int, default=3, metavar="N", help="report medians of N runs (default: 3)")
    p.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false",
                   help="skip the same run through llama.cpp (done when llama-cpp-python is installed)")
    p.set_defaults(func=cmd_bench)

    p = verbs.add_parser("warmup", parents=[shared.common],
                         help="compile the kernels of a model's formats (default: every format) ahead of the first run")
    p.add_argument("--model", "-m", default=None, metavar="PATH|NAME", help="the model whose formats to compile")
    p.add_argument("--types", type=_weight_types, default=None, metavar="TYPE,...",
                   help=f"these formats instead ({', '.join(t.name for t in SUPPORTED_TYPES)})")
    p.set_defaults(func=cmd_warmup)

    p = verbs.add_parser("token", parents=[shared.common],
                         help="print the cluster's join token (created if missing); stderr says where it lives")
    p.add_argument("--token-file", type=Path, default=None, metavar="PATH",
                   help="the token file (default: CACHE_DIR/cluster-token)")
    p.set_defaults(func=cmd_token)


def _weight_types(text: str) -> list:
    names = {t.name: t for t in SUPPORTED_TYPES}
    wrong = [name for name in text.upper().split(",") if name not in names]
    if wrong:
        raise argparse.ArgumentTypeError(f"unknown format {wrong[0]} (known: {', '.join(names)})")
    return [names[name] for name in text.upper().split(",")]


def _lora_flag(text: str) -> tuple[Path, float]:
    """`FILE` or `FILE:SCALE` (as llama.cpp's --lora and --lora-scaled FILE SCALE)."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return Path(path), check_scale(float(scale))
        except (ValueError, LoraError):
            pass  # a ':' in the file name, not a scale
    return Path(text), 1.0


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.ctx < 2:
        raise ValueError(f"--ctx must be at least 2, got {args.ctx}")
    try:
        return SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repeat_penalty=args.repeat_penalty,
            seed=args.seed,
        )
    except ValueError as exc:
        raise ValueError(f"invalid sampling option: {exc}") from exc


# --- verbs ----------------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace, out: TextIO) -> int:
    path = resolve_model(args.model, from_flags.cache_dir(args), progress=not args.json, fetch=True)
    _emit(out, {"path": str(path)} if args.json else str(path))
    return 0


def cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    rows = list_models(from_flags.cache_dir(args))
    if args.json:
        _emit(out, {"models": [{"name": r.name, "size": r.size, "type": r.file_type, "path": str(r.path),
                                "source": r.source} for r in rows]})
        return 0
    width = max([len(r.name) for r in rows] + [4])
    _emit(out, f"{'NAME':<{width}} {'SIZE':>9} {'TYPE':<6} PATH")
    for r in rows:
        _emit(out, f"{r.name:<{width}} {r.size / 2**20:>5.0f} MiB {r.file_type:<6} {r.path}")
    return 0


def cmd_rm(args: argparse.Namespace, out: TextIO) -> int:
    removed = remove_model(args.model, from_flags.cache_dir(args))
    _emit(out, {"removed": [str(p) for p in removed]} if args.json else f"removed {removed[0]}")
    return 0


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    params = _sampling_params(args)
    model = from_flags.loaded_model(args)
    draft = from_flags.draft_model(args, model)
    with from_flags.pipeline(args, model, args.ctx) as pipeline, \
            from_flags.drafters(args, draft, pipeline.n_ctx) as new_drafter:
        tokenizer = model.tokenizer
        adapters = from_flags.adapters(args, model, pipeline)
        prompt_ids = tokenizer.encode(args.prompt, special=True)
        generation = Generation(pipeline, prompt_ids, Sampler(params), args.max_tokens, tokenizer.eog_ids, adapters,
                                new_drafter(params), in_flight=args.drafts_in_flight)
        if args.json:
            for _ in generation:
                pass
            _emit(out, {
                "prompt_tokens": list(prompt_ids),
                "tokens": generation.tokens,
                "text": tokenizer.decode(generation.tokens),
                "timings": generation.timings.as_dict(),
            })
        else:
            _stream(generation, tokenizer, out)
    log.info("finished: %s; %s", generation.finish_reason, generation.timings.as_dict())
    return 0


def cmd_chat(args: argparse.Namespace, out: TextIO) -> int:
    params = _sampling_params(args)
    model = from_flags.loaded_model(args)
    model.check_chat_template()
    draft = from_flags.draft_model(args, model)
    # Over nodes, the watcher lets one that comes back, or a new one, join between turns.
    with from_flags.pipeline(args, model, args.ctx) as pipeline, from_flags.watched(args, pipeline), \
            from_flags.drafters(args, draft, pipeline.n_ctx) as new_drafter:
        return _chat_loop(args, out, model, pipeline, params, new_drafter)


def _chat_loop(args: argparse.Namespace, out: TextIO, model: LoadedModel, pipeline: Pipeline,
               params: SamplingParams, new_drafter: DrafterFactory) -> int:
    tokenizer = model.tokenizer
    adapters = from_flags.adapters(args, model, pipeline)
    sampler = Sampler(params)  # one generator for the whole conversation: a seed fixes it all
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # not on every platform; input() works without it
            pass
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history.clear()
            if interactive:
                print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        prompt_ids = _chat_prompt(model, system, history, pipeline.n_ctx)
        generation = Generation(pipeline, prompt_ids, sampler, args.max_tokens, tokenizer.eog_ids, adapters,
                                new_drafter(params), in_flight=args.drafts_in_flight)
        if args.json:
            for _ in generation:
                pass
        else:
            _stream(generation, tokenizer, out)
        history.append({"role": "assistant", "content": tokenizer.decode(generation.tokens)})
        log.info("finished: %s; %s", generation.finish_reason, generation.timings.as_dict())
    if args.json:
        _emit(out, {"messages": system + history})
    return 0


def _chat_prompt(model: LoadedModel, system: list[dict], history: list[dict], n_ctx: int) -> list[int]:
    """Token ids of the whole conversation, ready for the reply. When it does not fit the
    context, the oldest turns are dropped (the system message stays), as chat UIs do."""
    while True:
        text = model.chat_template.render(system + history, add_generation_prompt=True)
        ids = model.tokenizer.encode_rendered(text)
        if len(ids) < n_ctx or len(history) <= 1:
            return ids  # a lone message that does not fit raises ContextFullError in Generation
        log.info("conversation of %d tokens does not fit the context of %d; dropping the oldest turn", len(ids), n_ctx)
        del history[: 2 if history[0]["role"] == "user" and len(history) > 2 else 1]


def cmd_tokenize(args: argparse.Namespace, out: TextIO) -> int:
    path = from_flags.model_path(args)
    tokenizer = Tokenizer.from_metadata(GGUFFile(path).metadata)
    ids = tokenizer.encode(args.text, add_bos=False if args.no_bos else None, special=True)
    if args.json:
        _emit(out, {"tokens": ids})
        return 0
    for token_id in ids:
        # llama-tokenize prints common_token_to_piece(special=true): the decoded text, and the
        # token's own text for control tokens, which decode to nothing.
        piece = tokenizer.decode([token_id]) or tokenizer.token_text(token_id)
        out.write(f"{token_id:6d} -> '{piece}'\n")
    return 0


def cmd_perplexity(args: argparse.Namespace, out: TextIO) -> int:
    if args.ctx < 3:
        raise ValueError(f"--ctx must be at least 3 (the second half of each window is scored), got {args.ctx}")
    text = args.file.read_text(encoding="utf-8")
    model = from_flags.loaded_model(args)
    if args.ctx > model.config.context_length:
        raise ValueError(f"--ctx {args.ctx} is larger than the model's context of {model.config.context_length} tokens")
    tokens = perplexity.windows(model.tokenizer, text, args.ctx)  # (window, position)
    if len(tokens) == 0:
        raise ValueError(f"{args.file}: fewer than --ctx {args.ctx} tokens; give a longer file or a smaller --ctx")
    if args.max_windows is not None:
        tokens = tokens[: args.max_windows]
    n_windows, n_ctx = tokens.shape
    total_nll = 0.0
    n_scored = 0
    with from_flags.pipeline(args, model, n_ctx) as pipeline, \
            tqdm(total=n_windows, unit="window", file=sys.stderr, disable=args.json, desc="perplexity") as bar:
        for window in tokens:
            nll = perplexity.window_nll(pipeline, window)
            total_nll += float(nll.sum())
            n_scored += nll.size
            bar.set_postfix(ppl=f"{math.exp(total_nll / n_scored):.4f}")
            bar.update(1)
    ppl = math.exp(total_nll / n_scored)
    if args.json:
        _emit(out, {"ppl": ppl, "n_scored": n_scored})
    else:
        _emit(out, f"perplexity: {ppl:.4f} over {n_scored} tokens ({n_windows} windows of {n_ctx})")
    return 0


def cmd_token(args: argparse.Namespace, out: TextIO) -> int:
    """The cluster's join token on stdout, created when missing; on stderr, where it lives and
    where a node wants it."""
    token = from_flags.token(args)
    path = token.path.absolute()
    _emit(out, {"token": str(token), "path": str(path)} if args.json else str(token))
    print(f"the cluster token is in {path}: copy that file to each node's cache directory "
          f"(as {TOKEN_FILE}) or start the node with --token-file PATH, or give the node the token in {TOKEN_ENV}",
          file=sys.stderr)
    return 0


def cmd_nodes(args: argparse.Namespace, out: TextIO) -> int:
    """Every node --nodes names or --discover finds (discovery by default), each asked for its
    details and timed on the model's layer shape; an unreachable one is listed as such."""
    if not args.nodes:
        args.discover = True
    model = from_flags.loaded_model(args)
    token = from_flags.token(args)
    rows = [survey_node(address, token, from_flags.tls(args), model)
            for address in from_flags.addresses(args) if address != LOCAL]
    if args.json:
        _emit(out, {"model": model.name, "nodes": rows})
        return 0
    if not rows:
        _emit(out, "no nodes found")
        return 0
    _emit(out, f"{'NAME':<20} {'ADDRESS':<22} {'ARCH':<8} {'CORES':>5} {'MEM FREE/TOTAL':>16} {'STATE':<8} "
               f"{'MS/LAYER':>8} {'RTT MS':>7}")
    for r in rows:
        if "error" in r:
            _emit(out, f"{'?':<20} {r['address']:<22} {r['state']}: {r['error']}")
            continue
        memory = f"{r['memory_available'] / 2**30:.1f}/{r['memory_total'] / 2**30:.1f} GiB"
        _emit(out, f"{r['name']:<20} {r['address']:<22} {r['architecture']:<8} {r['cores']:>5} {memory:>16} "
                   f"{r['state']:<8} {r['ms_per_layer']:>8.3f} {r['rtt_ms']:>7.3f}")
    return 0


def cmd_plan(args: argparse.Namespace, out: TextIO) -> int:
    if not (args.nodes or args.discover):
        raise ValueError("plan needs --nodes HOST:PORT,... or --discover")
    acceptance = None if args.acceptance is None else _acceptance(args.acceptance, args.draft_max)
    model = from_flags.loaded_model(args)
    n_ctx = model.context_size(args.ctx)
    nodes = from_flags.measured_nodes(args, model)
    try:
        plan = make_plan(model, nodes, n_ctx, HEAD_PLACES[args.head])
        speculation = None
        if acceptance is not None:
            speculation = Speculation(acceptance, args.draft_max, row_share(model, args.draft_max))
        result = describe_plan(plan, nodes, model, n_ctx, head_ms(model), speculation)
    finally:
        close_nodes(nodes)
    if args.json:
        _emit(out, result)
        return 0
    _emit(out, f"{result['model']}: {result['n_layers']} layers, context {n_ctx}")
    _emit(out, f"{'NODE':<20} {'LAYERS':<10} {'MS/LAYER':>8} {'RTT MS':>7} {'STAGE MS':>8} {'MEMORY':>10}")
    for st in result["stages"]:
        layers = f"{st['layers'][0]}-{st['layers'][1] - 1}"
        _emit(out, f"{st['node']:<20} {layers:<10} {st['ms_per_layer']:>8.3f} {st['rtt_ms']:>7.3f} "
                   f"{st['stage_ms']:>8.2f} {st['memory_bytes'] / 2**20:>6.0f} MiB")
    for u in result["unused"]:
        _emit(out, f"{u['node']:<20} unused: {u['why']}")
    _emit(out, f"expected: {result['expected_tokens_per_s']:.1f} tokens/s for one stream "
               f"(head {result['head_ms']:.2f} ms{' on the last node' if result['head_on_node'] else ''}), "
               f"{result['pipelined_tokens_per_s']:.1f} tokens/s with every stage busy")
    if "speculation" in result:
        sp = result["speculation"]
        _emit(out, f"with speculation (acceptance {sp['acceptance']:g}, {sp['draft_max']} draft tokens a pass): "
                   f"{sp['tokens_per_pass']:.2f} tokens a pass of {sp['pass_ms']:.2f} ms (each extra row "
                   f"{sp['row_share'] * 100:.0f}% of a row's compute), {sp['tokens_per_s']:.1f} tokens/s for one stream")
    return 0


def _acceptance(text: str, draft_max: int) -> float:
    """--acceptance as a number, checked before anything is loaded."""
    try:
        value = float(text)
    except ValueError:
        raise PlanError(f"--acceptance must be a number between 0 and 1, got {text!r}") from None
    check_speculation(value, draft_max)
    return value


def cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    if args.decode_tokens < 2:  # decode is timed from the second token: the first ends the prefill
        raise ValueError("--decode-tokens must be at least 2: the first token comes with the prompt's prefill")
    model = from_flags.loaded_model(args)
    n_ctx = model.context_size(args.ctx)
    if args.prompt_tokens + args.decode_tokens > n_ctx:
        raise ValueError(f"--prompt-tokens plus --decode-tokens must fit the context of {n_ctx}")
    prompt = bench.bench_prompt(model.tokenizer, args.prompt_tokens)
    draft = from_flags.draft_model(args, model)
    with from_flags.pipeline(args, model, n_ctx) as pipeline, \
            from_flags.drafters(args, draft, pipeline.n_ctx) as new_drafter:
        timings, tokens = bench.timed_runs(pipeline, prompt, args.decode_tokens, args.runs, new_drafter,
                                           args.drafts_in_flight)
        stages = bench.stage_rows(pipeline)
    result = bench.summary(model.name, prompt, args.decode_tokens, timings, stages)
    # Memory first: llama.cpp would add its own to this process's resident size.
    result.update(llama_cpp_comparison(result, model.file.path, prompt, tokens, n_ctx, args.llama_cpp))
    if args.json:
        _emit(out, result)
        return 0
    for line in bench.report_lines(result):
        _emit(out, line)
    return 0


def cmd_quantize(args: argparse.Namespace, out: TextIO) -> int:
    target = parse_type(args.type)  # before any download: a wrong type fails at once
    source = resolve_model(args.input, from_flags.cache_dir(args), progress=not args.json)
    report = quantize_model(source, args.output, target, progress=not args.json)
    if args.json:
        _emit(out, {"path": str(args.output), **report.as_dict()})
        return 0
    _emit(out, f"{args.output}: {report.n_converted} of {report.n_tensors} tensors to {report.file_type} "
               f"({len(report.notes)} with another type, {report.n_kept} kept), "
               f"{report.bytes_in / 2**20:.1f} MiB -> {report.bytes_out / 2**20:.1f} MiB in {report.seconds:.1f} s")
    return 0


def cmd_warmup(args: argparse.Namespace, out: TextIO) -> int:
    """Each format's kernels compiled (or found cached), a line per format with its time."""
    from caravan.pipeline import warmup
    from caravan.pipeline.loader import load_model

    model = load_model(from_flags.model_path(args)) if args.model else None
    config = model.config if model else warmup.GENERIC
    formats = args.types or (warmup.model_formats(model.file) if model else list(SUPPORTED_TYPES))
    announce = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    done = warmup.warm(config, formats, announce)
    if model:
        warmup.warm_head(model.head, config)
    if args.json:
        _emit(out, {"formats": [dataclasses.asdict(w) for w in done], "cache": os.environ.get("NUMBA_CACHE_DIR")})
        return 0
    for w in done:
        _emit(out, f"{w.format:<5} {'compiled' if w.compiled else 'cached':<8} {w.seconds:6.1f} s")
    _emit(out, f"{sum(w.compiled for w in done)} of {len(done)} formats compiled, kernels in "
               f"{os.environ.get('NUMBA_CACHE_DIR') or 'the source folders'}")
    return 0


API_KEY_ENV = "CARAVAN_API_KEY"


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else the first line of --api-key-file, else $CARAVAN_API_KEY, else none."""
    if args.api_key is not None:
        return args.api_key
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--api-key-file {args.api_key_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: empty; put the API key in it")
        if args.api_key_file.stat().st_mode & 0o077:
            log.warning("%s can be read by other users: chmod 600 it", args.api_key_file)
        return key
    return os.environ.get(API_KEY_ENV) or None


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    import socket

    from .http_guard import ServeLimits, run_http
    from .server import API

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    api_key = _api_key(args)
    limits = ServeLimits(max_body=args.max_body, read_timeout=args.read_timeout, max_connections=args.max_connections)
    model = from_flags.loaded_model(args)
    model.check_chat_template()
    draft = from_flags.draft_model(args, model)
    model_id = args.model if not args.model.endswith(".gguf") else Path(args.model).stem
    sock = socket.create_server((args.host, args.port))
    with from_flags.pipeline(args, model, args.ctx) as pipeline, from_flags.watched(args, pipeline) as watcher, \
            from_flags.drafters(args, draft, pipeline.n_ctx) as new_drafter:
        chosen = from_flags.adapters(args, model, pipeline)
        adapters = {f"{model_id}:{name}": ((name, scale),) for name, scale in chosen}
        # One lane per node when there are nodes: each node works on one lane's batch while the
        # next node works on another's. In one process a lane would only wait for the other. A
        # --nodes entry down at the start counts too: it joins the plan once it answers.
        nodes = pipeline.stats(ask_nodes=False)
        lanes = len(nodes) if any(row.address is not None for row in nodes) else 1
        if watcher is not None:
            lanes = max(lanes, len(watcher.configured))
        scheduler = Scheduler(pipeline, max_batch=args.max_batch, threads=args.threads, lanes=lanes,
                              draft_max=args.draft_max if args.speculate else 0, drafter=new_drafter,
                              in_flight=args.drafts_in_flight,
                              prompt_cache=_prompt_cache(args, pipeline))
        try:
            host, port = sock.getsockname()[:2]
            loopback = ipaddress.ip_address(host).is_loopback
            api = API(model, scheduler, model_id, api_key, loopback_only=loopback, adapters=adapters, limits=limits,
                      cache_dir=from_flags.cache_dir(args))
            if watcher is not None:
                api.missing_nodes = watcher.missing
            if api_key is None and not loopback:
                log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
            _emit(out, f"caravan serving {model_id} on http://{host}:{port}/v1")
            run_http(api, sock, limits)
        finally:
            scheduler.close()
    log.info("caravan serve stopped")
    return 0


def _prompt_cache(args: argparse.Namespace, pipeline: Pipeline) -> bool:
    """Give the stages in this process their prompt cache budget (nodes have their own);
    whether the prompt cache is on."""
    if args.cache_budget == 0:
        return False
    if all(row.address is None for row in pipeline.stats(ask_nodes=False)):  # stages in this process
        budget = args.cache_budget if args.cache_budget is not None else default_budget(psutil.virtual_memory().available)
        for stage in pipeline.stages:
            stage.prompt_cache.set_budget(budget)
        log.info("prompt cache: %d MiB per stage", budget >> 20)
    return True


def _stream(generation: Generation, tokenizer: Tokenizer, out: TextIO) -> None:
    decoder = StreamDecoder(tokenizer)
    for token in generation:
        piece = decoder.push(token)
        if piece:
            out.write(piece)
            out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()


def _emit(out: TextIO, result: dict | str) -> None:
    out.write((json.dumps(result, ensure_ascii=False) if isinstance(result, dict) else result) + "\n")
    out.flush()


# --- entry point ----------------------------------------------------------------------------


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("caravan").setLevel(level)
    # Nodes joining and leaving a running server, and its re-plans, are worth a line without -v.
    logging.getLogger("caravan.coordinator.heal").setLevel(min(level, logging.INFO))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["node"]:
        # The worker is its own program (node/ and coordinator/ never import each other):
        # `caravan node` only hands it the rest of the command line.
        return importlib.import_module("caravan.node.cli").main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "nodes", None) or getattr(args, "discover", False):
        # This process mostly waits while the nodes work. Before anything starts Numba's
        # threads (--threads does), as libgomp reads the setting once.
        spin_briefly_when_idle(WAITING_SPIN)
    _setup_logging(args.verbose)
    command: Callable[[argparse.Namespace, TextIO], int] = args.func
    try:
        return command(args, sys.stdout)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`caravan run ... | head`); stop quietly, as other tools do.
        _silence_stdout()
        return 1
    except Exception as exc:
        message = error_message(exc)
        if message is None:
            raise
        log.info("traceback of the error below", exc_info=True)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
