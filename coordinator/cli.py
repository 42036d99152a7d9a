"""The `caravan` command line: verbs a llama.cpp or Ollama user would guess.

    caravan pull [MODEL]            fetch a model into the cache, print its path
    caravan run PROMPT              raw completion, streamed to stdout
    caravan chat                    multi-turn chat with the model's chat template
    caravan tokenize TEXT           token ids, as llama.cpp's llama-tokenize prints them
    caravan perplexity FILE         perplexity over consecutive windows of --ctx tokens

Standard output carries only the result (text, a path, or with --json one JSON object);
progress, logging and errors go to stderr. An expected failure is one line
`caravan: error: ...` and exit status 1; argparse usage errors exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Callable, TextIO

import numba
import numpy as np
from tqdm import tqdm

from caravan.pipeline.catalog import DEFAULT_MODEL, PullError, default_cache_dir, resolve_model
from caravan.pipeline.chat_template import ChatTemplateError
from caravan.pipeline.generate import PREFILL_CHUNK, ContextFullError, Generation, Pipeline
from caravan.pipeline.gguf_file import GGUFError, GGUFFile
from caravan.pipeline.loader import DEFAULT_CTX, LoadedModel, load_model
from caravan.pipeline.model import ModelError
from caravan.pipeline.quants import UnsupportedTypeError
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.stage import Segment, StageError
from caravan.pipeline.tokenizer import StreamDecoder, Tokenizer, TokenizerError

log = logging.getLogger(__name__)

PROG = "caravan"
PERPLEXITY_CTX = 512  # llama-perplexity's default window
_SAMPLING = SamplingParams()  # defaults shown in --help

# Expected failures, most specific first, each with a hint to add after its own message
# (which already names the thing that is wrong). Anything else is a bug and gets a traceback.
EXPECTED_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (PullError, ""),
    (GGUFError, ""),
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log to stderr (-v: info and tracebacks, -vv: debug)")
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="model cache (default: $CARAVAN_HOME, else $XDG_CACHE_HOME/caravan, "
                        "else ~/.cache/caravan)")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", "-m", default=DEFAULT_MODEL, metavar="PATH|NAME",
                       help=f"a .gguf file or a known model name (default: {DEFAULT_MODEL})")
    model.add_argument("--threads", "-t", type=int, default=None, metavar="N",
                       help=f"compute threads (default: all, {numba.config.NUMBA_NUM_THREADS})")
    # Where --nodes HOST:PORT,... and --discover will go: they choose remote stages in
    # _pipeline(); without them every layer runs in this process.

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

    parser = argparse.ArgumentParser(prog=PROG, description="Run a LLaMA-family GGUF model.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("pull", parents=[common], help="fetch a model into the cache, print its path")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"a known model name (default: {DEFAULT_MODEL})")
    p.set_defaults(func=cmd_pull)

    p = verbs.add_parser("run", parents=[common, model, sampling], help="raw completion of PROMPT, streamed")
    p.add_argument("prompt", metavar="PROMPT")
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("chat", parents=[common, model, sampling], help="interactive chat (lines from stdin)")
    p.add_argument("--system", metavar="TEXT", default=None, help="a system message to start the conversation")
    p.set_defaults(func=cmd_chat)

    p = verbs.add_parser("tokenize", parents=[common, model], help="token ids of TEXT, as llama-tokenize")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token even if the model wants it")
    p.set_defaults(func=cmd_tokenize)

    p = verbs.add_parser("perplexity", parents=[common, model], help="perplexity of the model on a text FILE")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--ctx", "-c", type=int, default=PERPLEXITY_CTX, metavar="N",
                   help=f"window size in tokens (default: {PERPLEXITY_CTX})")
    p.add_argument("--max-windows", type=_positive_int, default=None, metavar="K",
                   help="score at most K windows (default: all)")
    p.set_defaults(func=cmd_perplexity)
    return parser


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


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= limit:
        raise ValueError(f"--threads must be between 1 and {limit} (NUMBA_NUM_THREADS), got {threads}")
    numba.set_num_threads(threads)


def _model_path(args: argparse.Namespace) -> Path:
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    return resolve_model(args.model, cache_dir, progress=not args.json)


def _load(args: argparse.Namespace) -> LoadedModel:
    _set_threads(args.threads)
    path = _model_path(args)
    model = load_model(path)
    log.info("model %s: %d layers, dim %d, from %s", model.name, model.config.n_layers, model.config.dim, path)
    return model


def _pipeline(model: LoadedModel, n_ctx: int) -> Pipeline:
    # --nodes / --discover will build remote stages here; for now every layer runs here.
    return model.local_pipeline(n_ctx)


# --- verbs ----------------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace, out: TextIO) -> int:
    path = _model_path(args)
    _emit(out, {"path": str(path)} if args.json else str(path))
    return 0


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    params = _sampling_params(args)
    model = _load(args)
    pipeline = _pipeline(model, args.ctx)
    tokenizer = model.tokenizer
    prompt_ids = tokenizer.encode(args.prompt, special=True)
    generation = Generation(pipeline, prompt_ids, Sampler(params), args.max_tokens, tokenizer.eog_ids)
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
    log.info("stopped by %s; %s", generation.stopped_by, generation.timings.as_dict())
    return 0


def cmd_chat(args: argparse.Namespace, out: TextIO) -> int:
    params = _sampling_params(args)
    model = _load(args)
    pipeline = _pipeline(model, args.ctx)
    tokenizer = model.tokenizer
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
        generation = Generation(pipeline, prompt_ids, sampler, args.max_tokens, tokenizer.eog_ids)
        if args.json:
            for _ in generation:
                pass
        else:
            _stream(generation, tokenizer, out)
        history.append({"role": "assistant", "content": tokenizer.decode(generation.tokens)})
        log.info("stopped by %s; %s", generation.stopped_by, generation.timings.as_dict())
    if args.json:
        _emit(out, {"messages": system + history})
    return 0


def _chat_prompt(model: LoadedModel, system: list[dict], history: list[dict], n_ctx: int) -> list[int]:
    """Token ids of the whole conversation, ready for the reply. When it does not fit the
    context, the oldest turns are dropped (the system message stays), as chat UIs do."""
    tokenizer = model.tokenizer
    bos_text = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    while True:
        text = model.chat_template.render(system + history, add_generation_prompt=True)
        # A template that writes the BOS token itself must not get a second one.
        add_bos = False if bos_text and text.startswith(bos_text) else tokenizer.add_bos
        ids = tokenizer.encode(text, add_bos=add_bos, special=True)
        if len(ids) < n_ctx or len(history) <= 1:
            return ids  # a lone message that does not fit raises ContextFullError in Generation
        log.info("conversation of %d tokens does not fit the context of %d; dropping the oldest turn", len(ids), n_ctx)
        del history[: 2 if history[0]["role"] == "user" and len(history) > 2 else 1]


def cmd_tokenize(args: argparse.Namespace, out: TextIO) -> int:
    path = _model_path(args)
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
    if args.ctx < 2:
        raise ValueError(f"--ctx must be at least 2, got {args.ctx}")
    text = args.file.read_text(encoding="utf-8")
    model = _load(args)
    if args.ctx > model.config.context_length:
        raise ValueError(f"--ctx {args.ctx} is larger than the model's context of {model.config.context_length} tokens")
    tokenizer = model.tokenizer
    # The file is data, not a prompt: special-token text in it stays text, as in
    # llama-perplexity (common_tokenize(..., add_special=true, parse_special=false)).
    ids = tokenizer.encode(text, special=False)
    if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids.insert(0, tokenizer.bos_id)
    n_ctx = args.ctx
    n_windows = len(ids) // n_ctx  # the short tail is dropped
    if n_windows == 0:
        raise ValueError(
            f"{args.file}: {len(ids)} tokens, fewer than --ctx {n_ctx}; give a longer file or a smaller --ctx"
        )
    if args.max_windows is not None:
        n_windows = min(n_windows, args.max_windows)
    pipeline = _pipeline(model, n_ctx)
    tokens = np.asarray(ids[: n_windows * n_ctx], dtype=np.int64).reshape(n_windows, n_ctx)  # (window, position)
    total_nll = 0.0
    n_scored = 0
    with tqdm(total=n_windows, unit="window", file=sys.stderr, disable=args.json, desc="perplexity") as bar:
        for window in tokens:
            nll = window_nll(pipeline, window)
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


def window_nll(pipeline: Pipeline, window: np.ndarray) -> np.ndarray:
    """-log p(token[i] | tokens before it) for i = 1 .. len - 1, in float64, from one fresh
    session that prefills the window in chunks, as Generation does."""
    session_id = uuid.uuid4().hex
    n = window.shape[0]
    nll = np.empty(n - 1, dtype=np.float64)  # (n - 1,)
    try:
        for start in range(0, n, PREFILL_CHUNK):
            chunk = window[start : start + PREFILL_CHUNK]  # (T,)
            hidden = pipeline.forward([Segment(session_id, start, len(chunk))], chunk)  # (T, dim)
            # Row t predicts the token at position start + t + 1; the window's last row predicts nothing.
            rows = min(len(chunk), n - 1 - start)
            if rows <= 0:
                break
            logits = pipeline.head.logits(hidden[:rows]).astype(np.float64)  # (rows, vocab)
            top = logits.max(axis=1)
            log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))  # (rows,)
            targets = window[start + 1 : start + 1 + rows]
            nll[start : start + rows] = log_z - logits[np.arange(rows), targets]
    finally:
        pipeline.end_session(session_id)
    return nll


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
