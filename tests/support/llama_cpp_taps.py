"""llama.cpp's intermediate tensors, read while it evaluates a prompt, by the names its graph
gives them ("attn_norm-0", "Vcur-3", "ffn_out-17", ...): the inputs and outputs of its ops, so
that each of caravan's ops can run on exactly llama.cpp's inputs and be compared with its output.

    tensors = record(model_path, token_ids, {"attn_norm-0", "Vcur-0"})
    tensors["Vcur-0"]  # [array, ...]: one flat f32 array per node of that name, in graph order

They come through the scheduler's eval callback (llama_context_params.cb_eval, what llama.cpp's
own eval-callback example uses) and ggml's accessors, so nothing depends on the layout of
ggml's structs. Only contiguous f32 tensors are kept (a graph names some views too).
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import numpy as np

# llama.cpp's compute threads wherever the tests run it: one, as caravan's kernels in pytest's own
# process (tests/conftest.py), since the processes the tests start share the cores and a thread
# barrier waits on whichever thread is descheduled.
LLAMA_CPP_THREADS = 1


def _ggml():
    from llama_cpp import _ggml

    lib = _ggml.libggml
    lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    lib.ggml_nelements.restype, lib.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    lib.ggml_element_size.restype, lib.ggml_element_size.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.ggml_is_contiguous.restype, lib.ggml_is_contiguous.argtypes = ctypes.c_bool, [ctypes.c_void_p]
    lib.ggml_get_data.restype, lib.ggml_get_data.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    return lib


@contextlib.contextmanager
def _contexts_calling(callback):
    """Llama() takes its context parameters from llama_context_default_params: while this is
    open, those carry the callback."""
    import llama_cpp.llama as llama_module

    default = llama_module.llama_cpp.llama_context_default_params

    def with_callback():
        params = default()
        params.cb_eval = callback
        return params

    llama_module.llama_cpp.llama_context_default_params = with_callback
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_context_default_params = default


def record(model_path: str | Path, ids: list[int], names: set[str],
           n_threads: int = LLAMA_CPP_THREADS) -> dict[str, list[np.ndarray]]:
    """Evaluate ids with llama.cpp (one batch) and keep the f32 tensors named in `names`."""
    import llama_cpp

    lib = _ggml()
    tensors: dict[str, list[np.ndarray]] = {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def observe(tensor, ask, _user_data):
        name = lib.ggml_get_name(tensor).decode()
        if ask:  # asked before the node runs: True stops the graph there to show it to us
            return name in names
        if lib.ggml_is_contiguous(tensor) and lib.ggml_element_size(tensor) == 4:
            n = lib.ggml_nelements(tensor)
            data = ctypes.cast(lib.ggml_get_data(tensor), ctypes.POINTER(ctypes.c_float))
            tensors.setdefault(name, []).append(np.ctypeslib.as_array(data, (n,)).copy())
        return True

    with _contexts_calling(observe):
        llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=max(512, len(ids)), n_batch=max(512, len(ids)),
                              n_threads=n_threads, verbose=False)
    try:
        llm.eval(ids)
    finally:
        llm.close()
    return tensors
