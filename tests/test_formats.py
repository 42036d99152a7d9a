"""Q5_0, Q5_1, the K-quants and BF16 (pipeline/formats/q5.py, kquants.py, floats.py), and what
every format of the registry promises: dequantization, products against float64, batch and
thread-count invariance.

The same layers of trust as test_quants.py: dequantization bit-exact against
`gguf.quants.dequantize` on random blocks (every scale bit pattern), activation rounding exactly
ggml's (tests/support/naive.py), products tight against float64 on the rounded activations, then the
promises (batch, thread count, AVX2 = generic IR), and whole tiny models against float64 and
against llama.cpp.
"""

from __future__ import annotations

import sys

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from caravan.pipeline import vector
from caravan.pipeline.formats import FORMATS, floats, kquants
from caravan.pipeline.quants import Activations, dequantize_rows, matmul, non_finite_part, pack, packed_nbytes
from caravan.pipeline.speed import random_blocks
from support import naive
from support.llama_cpp_taps import LLAMA_CPP_THREADS
from support.products import assert_product_close, random_activations

# Every format of the registry beyond test_quants.py's five: a format added to it is tested here.
TYPES = tuple(t for t in FORMATS if t not in (QT.F32, QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1))
K_QUANTS = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
ROWS = (1, 3, 67)
COLS = (32, 96, 256, 1536)  # each format takes those that are whole blocks of it


def format_cols(cols=COLS) -> list:
    """(format, cols) for every format of the registry and every width that is whole blocks of it."""
    return [pytest.param(t, c, id=f"{t.name}-cols{c}") for t in FORMATS for c in cols if c % FORMATS[t].block[0] == 0]
TOKENS = (1, 5, 17)

def random_raw(ttype: QT, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """(rows, row_bytes) uint8 GGUF data: every byte random (so every quant and sub-block scale
    bit pattern occurs) except the f16 scales, which are finite, of both signs and of varied
    size row by row. Float formats: random finite values."""
    rng = np.random.default_rng(seed)
    block_size, type_size = FORMATS[ttype].block
    if block_size == 1:
        w = rng.standard_normal((rows, cols)) * rng.uniform(0.05, 2.0, (rows, 1)) + rng.uniform(-0.2, 0.2, (rows, 1))
        return quantize(w.astype(np.float32), ttype)
    blocks = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    for offset in FORMATS[ttype].scale_offsets:
        scale = rng.standard_normal(blocks.shape[:2]) * rng.uniform(0.001, 0.05, (rows, 1))
        blocks[:, :, offset : offset + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def minima(ttype: QT, raw: np.ndarray) -> dict:
    """{"w": m (rows, n_blocks)} for Q4_1 (d f16, m f16, qs[16]) and Q5_1 (d f16, m f16, qh[4],
    qs[16]), whose products add an f16 block-sum term (ggml-common.h), else {}."""
    if ttype not in (QT.Q4_1, QT.Q5_1):
        return {}
    block_bytes = FORMATS[ttype].block[1]
    return {"w": np.ascontiguousarray(raw.reshape(raw.shape[0], -1, block_bytes)[:, :, 2:4]).view(np.float16)[..., 0]}


# ---------------------------------------------------------------------------------------------
# Dequantization and activation rounding: exact


@pytest.mark.parametrize("ttype,cols", format_cols((32, 96, 256, 768)))
def test_dequantize_rows_equals_gguf(ttype, cols):
    """Every format of the registry (the list cannot drift from it), one block wide and more."""
    raw = random_raw(ttype, 67, cols)
    expected = dequantize(raw, ttype).reshape(67, cols)
    packed = pack(ttype, raw, "w")
    assert (packed.rows, packed.cols) == (67, cols)
    all_rows = dequantize_rows(packed, np.arange(67))
    assert all_rows.dtype == np.float32
    np.testing.assert_array_equal(all_rows, expected)
    ids = np.random.default_rng(2).integers(0, 67, 23)  # with repeats, out of order
    np.testing.assert_array_equal(dequantize_rows(packed, ids), expected[ids])


def test_bf16_rows_keep_every_bit_pattern():
    """BF16 is a bit-for-bit format: every 16-bit pattern (NaNs, infinities, subnormals) comes
    back as gguf-py widens it."""
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.uint8).reshape(256, 512)
    expected = dequantize(raw, QT.BF16).reshape(256, 256)
    got = dequantize_rows(pack(QT.BF16, raw, "w"), np.arange(256))
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("ttype", TYPES, ids=lambda t: t.name)
def test_random_blocks_have_the_asked_spread(ttype):
    """speed.random_blocks (node benchmarks, synthetic models, the tiny K-quant models below):
    valid blocks whose weights centre on zero with about the asked spread."""
    raw = random_blocks(ttype, 64, 1024, np.random.default_rng(0), std=0.03)
    w = dequantize(raw, ttype)
    assert np.all(np.isfinite(w))
    assert 0.6 * 0.03 < w.std() < 1.5 * 0.03
    assert abs(w.mean()) < 0.2 * 0.03


def test_q8_k_activations_equal_ggml_reference():
    """Q8_K superblocks (the K-quants' activations) as ggml's quantize_row_q8_K_ref makes them:
    the same q, d and block sums, bit for bit, including an all-zero superblock, ties in
    magnitude and values that round to +-127."""
    x = random_activations(9, 1024)
    x[2, 256:512] = 0.0
    x[3, :256] = np.linspace(-1.0, 1.0, 256, dtype=np.float32)  # -1 and 1 tie: the first wins
    x[4, 512:768] = np.float32(0.5)
    for rows in (x[:1], x[:3], x):  # one row, and the parallel path from 8 rows
        got = kquants.quantize_q8_k(rows)
        expected = naive.quantize_q8_k_activations(rows)
        for g, e in zip(got, expected):
            assert g.dtype == e.dtype
            np.testing.assert_array_equal(g, e)
    q, d, _ = kquants.quantize_q8_k(x)
    assert q.min() >= -127 and q.max() <= 127
    assert np.all(d[2, 1] == 0) and not q[2, 256:512].any()


def test_bf16_rounding_equals_gguf():
    """Activations for BF16 weights are rounded as ggml_compute_fp32_to_bf16 (gguf-py's BF16
    quantize copies it), bit for bit, on random bit patterns: NaNs stay NaN, ties go to even."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 1 << 32, 64 * 4096, dtype=np.uint64).astype(np.uint32)
    bits[:64] = [0x3F808000, 0x3F818000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0x7F800001, 0xFFC00001, 0,
                 0x80000000, 0x00008000, 0x00018000, 0x3F80FFFF] + [0x3F800000] * 52
    x = bits.view(np.float32).reshape(64, 4096)
    expected = dequantize(quantize(x, QT.BF16), QT.BF16).reshape(x.shape)
    got = floats.round_bf16(x)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


# ---------------------------------------------------------------------------------------------
# Products


def rounded_reference(ttype: QT, raw: np.ndarray, w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 product with the activations rounded as the kernel rounds them, |x'| @ |W|.T):
    x unchanged for F32, rounded to f16 for F16 and to bf16 for BF16, Q8_K superblocks for the
    K-quants and Q8 blocks for the other block formats (naive.kernel_product)."""
    ref = naive.kernel_product({"w": ttype.name}, minima(ttype, raw))({"w": w}, "w", x)
    if ttype == QT.F32:
        xr = x.astype(np.float64)
    elif ttype == QT.F16:
        xr = naive.round_f16(x)
    elif ttype == QT.BF16:
        xr = naive.round_bf16(x)
    elif ttype in K_QUANTS:
        xr = naive.dequantize_q8_k_activations(*naive.quantize_q8_k_activations(x)[:2])
    else:
        xr = naive.dequantize_q8_activations(*naive.quantize_q8_activations(x)[:2])
    return ref, np.abs(xr) @ np.abs(w).T


@pytest.mark.parametrize("n_tokens", TOKENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("rows", ROWS, ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("ttype,cols", format_cols())
def test_matmul_vs_float64(ttype, rows, cols, n_tokens):
    raw = random_raw(ttype, rows, cols)
    w = dequantize(raw, ttype).astype(np.float64).reshape(rows, cols)
    x = random_activations(n_tokens, cols)
    out = matmul(pack(ttype, raw, "w"), Activations(x))
    assert out.shape == (n_tokens, rows) and out.dtype == np.float32

    # Loose: 8-bit blocks round each activation by amax / 254 at most, f16 by 2**-11 and bf16
    # by 2**-9 relative; relative to |x| @ |W| that stays under 1%.
    ref, scale = rounded_reference(ttype, raw, w, x)
    assert_product_close(out, ref, scale, x, w, loose=1e-6 if ttype == QT.F32 else 1e-2)


def test_bf16_matmul_with_a_tail_of_columns():
    """BF16 rows need not be whole chunks of 32: 100 columns is 3 chunks and a tail of 4."""
    raw = random_raw(QT.BF16, 7, 100)
    w = dequantize(raw, QT.BF16).astype(np.float64).reshape(7, 100)
    x = random_activations(6, 100)
    out = matmul(pack(QT.BF16, raw, "w"), Activations(x))
    ref = naive.round_bf16(x) @ w.T
    assert (np.abs(out - ref) / (np.abs(x) @ np.abs(w).T)).max() < 1e-5


@pytest.mark.parametrize("ttype", tuple(FORMATS), ids=lambda t: t.name)
def test_matmul_zero_activations(ttype):
    """All-zero activations have scale 0: no division by zero and a product of exactly 0 (Q4_1
    and Q5_1 included: their m term reads the block sum, 0)."""
    raw = random_raw(ttype, 5, 512)
    out = matmul(pack(ttype, raw, "w"), Activations(np.zeros((3, 512), np.float32)))
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("ttype", tuple(FORMATS), ids=lambda t: t.name)
def test_matmul_batch_invariant(ttype):
    """T rows at once equal each row alone, bit for bit: a sequence decodes to the same tokens
    whether it is batched with others or not."""
    packed = pack(ttype, random_raw(ttype, 67, 512), "w")
    x = random_activations(17, 512)
    together = matmul(packed, Activations(x))
    for t in range(x.shape[0]):
        np.testing.assert_array_equal(together[t : t + 1], matmul(packed, Activations(x[t : t + 1])))


@pytest.mark.parametrize("ttype", tuple(FORMATS), ids=lambda t: t.name)
def test_matmul_thread_count_invariant(ttype):
    packed = pack(ttype, random_raw(ttype, 67, 1536), "w")
    x = random_activations(5, 1536)
    before = numba.get_num_threads()
    try:
        results = []
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(n)
            results.append(matmul(packed, Activations(x)))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


def activation_arrays(ttype: QT, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """The activation arrays the kernel for ttype reads (its registry record's form)."""
    return FORMATS[ttype].activations(Activations(x))


def _group_dots(kernel1, kernel4, k_quant):
    """A compiled loop over every group of 8 weight rows with the given eight-row intrinsics:
    token rows 0 .. 3 in the four-token form, the rest one by one; arguments: the weight
    arguments (the registry's weights), the three activation arrays, out."""
    if k_quant:

        @numba.njit
        def run(a, b, c, d, xq, xd, xs, out):
            rows = out.shape[1]
            for g in range(a.shape[0]):
                n_valid = min(8, rows - 8 * g)
                kernel4(a, b, c, d, g, xq, xd, xs, out, 0, n_valid)
                for t in range(4, xq.shape[0]):
                    kernel1(a, b, c, d, g, xq, xd, xs, out, t, n_valid)

    else:

        @numba.njit
        def run(a, b, c, xq, xd, xs, out):
            rows = out.shape[1]
            for g in range(a.shape[0]):
                n_valid = min(8, rows - 8 * g)
                kernel4(a, b, c, g, xq, xd, xs, out, 0, n_valid)
                for t in range(4, xq.shape[0]):
                    kernel1(a, b, c, g, xq, xd, xs, out, t, n_valid)

    return run


def _bf16_tiles(tiles):
    """BF16's tiles (floats.BF16_TILES) over 13 weight rows and 10 token rows in every
    shape: whole tiles of tokens over rows 0 .. 11 and row 12 alone, then each remaining token
    row (at least one) over whole tiles of rows and the rest of the rows alone."""
    n_rows, n_tokens, single = floats.BF16_TILE_ROWS, floats.BF16_TILE_TOKENS, floats.BF16_SINGLE_ROWS
    full, one_row, one_token, one = tiles[n_rows, n_tokens], tiles[1, n_tokens], tiles[single, 1], tiles[1, 1]
    assert 12 % n_rows == 0 and 10 % n_tokens and 13 % single

    @numba.njit
    def run(w, x, out):
        tiled = 10 // n_tokens * n_tokens
        for t in range(0, tiled, n_tokens):
            for r in range(0, 12, n_rows):
                full(w, r, x, t, out)
            one_row(w, 12, x, t, out)
        for t in range(tiled, 10):
            for r in range(0, 13 // single * single, single):
                one_token(w, r, x, t, out)
            for r in range(13 // single * single, 13):
                one(w, r, x, t, out)

    return run


def kernel_module(ttype: QT):
    """The file of pipeline/formats/ that holds ttype's kernel (its INTRINSICS and products)."""
    return sys.modules[FORMATS[ttype].kernel.py_func.__module__]


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="compares compiled instruction sequences")
@pytest.mark.parametrize("ttype", TYPES, ids=lambda t: t.name)
def test_kernels_give_the_same_bits_on_every_isa(ttype):
    """q5.py's and kquants.py's AVX2 lanes and its generic IR (what an aarch64 node runs) give the same
    bits, the four-token and one-token forms agree, the plain-numpy twin agrees, and matmul is
    the same sum. 13 rows: a whole group of 8 and a partial one. On a host without AVX2 only
    the generic path and the twin are compared."""
    packed = pack(ttype, random_raw(ttype, 13, 512), "w")
    n_tokens = 10 if ttype == QT.BF16 else 8
    x = random_activations(n_tokens, 512)
    acts = activation_arrays(ttype, x)
    name = ttype.name.lower()
    results = []
    for isa in vector.ISAS:
        out = np.full((n_tokens, 13), np.nan, np.float32)
        if ttype == QT.BF16:  # float IR only: one form for every ISA
            _bf16_tiles(floats.BF16_TILES)(*packed.arrays, *acts, out)
        else:
            intrinsics = kernel_module(ttype).INTRINSICS
            kernels = (intrinsics[(name, 1, isa)], intrinsics[(name, 4, isa)])
            _group_dots(*kernels, ttype in K_QUANTS)(*FORMATS[ttype].weights(packed.arrays), *acts, out)
        results.append(out)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    twin_out = np.full((n_tokens, 13), np.nan, np.float32)
    if ttype == QT.BF16:
        for r in range(13):
            for t in range(n_tokens):
                floats.BF16_PRODUCTS[1, 1](*packed.arrays, r, *acts, t, twin_out)
    else:
        twin = getattr(kernel_module(ttype), f"{name}_x8_tokens1")
        for g in range(2):
            for t in range(8):
                twin(*FORMATS[ttype].weights(packed.arrays), g, *acts, twin_out, t, min(8, 13 - 8 * g))
    if ttype == QT.BF16:  # float steps only, each emulated exactly
        np.testing.assert_array_equal(twin_out, results[0])
    np.testing.assert_allclose(twin_out, results[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(matmul(packed, Activations(x)), results[0])


@pytest.mark.parametrize("ttype", [t for t in TYPES if FORMATS[t].group_rows > 1], ids=lambda t: t.name)
def test_row_slices_of_grouped_formats(ttype):
    """Rows stored eight to a group slice only at group edges (stage.py stacks Q, K and V and
    takes each back as a slice)."""
    packed = pack(ttype, random_raw(ttype, 30, 256), "w")
    assert packed.group_rows == 8
    np.testing.assert_array_equal(dequantize_rows(packed.row_slice(8, 30), np.arange(22)), dequantize_rows(packed, np.arange(8, 30)))
    with pytest.raises(ValueError, match="split a group"):
        packed.row_slice(4, 16)


def test_activations_are_made_once_per_product_input():
    """Q, K and V (gate and up) read one Activations: its Q8_K and bf16 forms are made once and
    shared, and sharing changes no bit."""
    x = random_activations(4, 512)
    acts = Activations(x)
    for ttype in TYPES:
        packed = pack(ttype, random_raw(ttype, 7, 512, seed=5), "w")
        np.testing.assert_array_equal(matmul(packed, acts), matmul(packed, Activations(x.copy())))
    assert acts.form(kquants.quantize_q8_k) is acts.form(kquants.quantize_q8_k)


@pytest.mark.parametrize("ttype", tuple(FORMATS), ids=lambda t: t.name)
def test_packed_nbytes_predicts_pack(ttype):
    for rows, cols in ((1, 256), (67, 1536)):
        assert packed_nbytes(ttype, rows, cols) == pack(ttype, random_raw(ttype, rows, cols), "w").nbytes


@pytest.mark.parametrize("ttype", tuple(FORMATS), ids=lambda t: t.name)
def test_non_finite_part_finds_a_nan_where_the_record_keeps_floats(ttype):
    """A NaN in the last f16 field (a scale or minimum) of a row's last block, or in a float
    format's last value, of row 8 (the second group of eight): non_finite_part names what the
    record says it holds."""
    fmt = FORMATS[ttype]
    raw = random_raw(ttype, 9, 512)
    assert non_finite_part(pack(ttype, raw, "w")) is None
    row = raw.view(np.uint8)[8]
    width = 2 if fmt.scale_offsets else fmt.block[1]
    at = row.size - fmt.block[1] + (fmt.scale_offsets[-1] if fmt.scale_offsets else 0)
    row[at : at + width] = np.frombuffer((fmt.float_exponent | 1).to_bytes(width, "little"), np.uint8)
    assert non_finite_part(pack(ttype, raw, "w")) == fmt.floats_are


@pytest.mark.parametrize("ttype", TYPES, ids=lambda t: t.name)
def test_packed_size_stays_near_the_file_size(ttype):
    """Repacking keeps the quants and f16 scales as they are: only the K-quants' packed 6-bit
    scales grow from 12 to 16 bytes a superblock (under 4%)."""
    rows, cols = 64, 4096
    block_size, type_size = FORMATS[ttype].block
    file_bytes = rows * cols // block_size * type_size
    assert file_bytes <= packed_nbytes(ttype, rows, cols) <= 1.04 * file_bytes


# ---------------------------------------------------------------------------------------------
# Whole tiny models: every matrix in one new format (the output head in Q6_K, as llama.cpp's
# K_M files keep it), and the Q4_K_M and Q5_K_M mixes (V and FFN-down in Q6_K as well)

MODELS = {t.name: (t, None) for t in TYPES} | {"Q4_K_M": (QT.Q4_K, QT.Q6_K), "Q5_K_M": (QT.Q5_K, QT.Q6_K)}
N_PROMPT = 40


def model_types(main: QT, v_and_down: QT | None):
    def type_of(name: str) -> QT:
        if name == "output.weight":
            return QT.Q6_K
        if v_and_down is not None and ("attn_v" in name or "ffn_down" in name):
            return v_and_down
        return main

    return type_of


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """label -> path of a 2-layer model (dim 256 and FFN 512: whole K-quant superblocks)."""
    from support.tiny_models import tiny_llama, with_random_blocks, write_gguf

    folder = tmp_path_factory.mktemp("format_models")
    written = {}

    def path_for(label: str):
        if label not in written:
            metadata, tensors = tiny_llama(n_layers=2, dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2,
                                           weight_type=QT.F32, tied_output=False, seed=7)
            tensors = with_random_blocks(tensors, model_types(*MODELS[label]), seed=7)
            written[label] = write_gguf(folder / f"{label}.gguf", metadata, tensors)
        return written[label]

    return path_for


def caravan_logits(path) -> tuple[np.ndarray, np.ndarray]:
    from caravan.pipeline.loader import load_model
    from caravan.pipeline.stage import Segment

    model = load_model(path)
    pipeline = model.local_pipeline(256)
    ids = np.random.default_rng(4).integers(0, 299, N_PROMPT)  # 299 is <|endoftext|>
    return ids, pipeline.head.logits(pipeline.forward([Segment("s", 0, N_PROMPT)], ids))


@pytest.mark.parametrize("label", list(MODELS))
def test_tiny_model_matches_float64_reference(tiny_model, label):
    """The whole model against float64 on gguf-py's dequantized weights: activation rounding
    through 2 layers and 15 products moves logits by about 2% of their scale (observed at most
    2.3% over these formats and 2 seeds); a layout or wiring error moves them by O(1)."""
    from caravan.pipeline.gguf_file import GGUFFile
    from caravan.pipeline.model import ModelConfig
    from support.tiny_models import dequantized_weights

    path = tiny_model(label)
    gguf = GGUFFile(path)
    main, v_and_down = MODELS[label]
    assert gguf.tensors["blk.1.ffn_up.weight"].type == main
    assert gguf.tensors["blk.1.ffn_down.weight"].type == (v_and_down or main)
    ids, logits = caravan_logits(path)
    config = ModelConfig.from_metadata(gguf.metadata, 300)
    _, expected = naive.forward_model(dequantized_weights(gguf), config, ids)
    err = np.abs(logits - expected).max() / np.abs(expected).max()
    assert err < 5e-2, f"max logit error {err:.2e} of {np.abs(expected).max():.1f}"


@pytest.mark.oracle
@pytest.mark.parametrize("label", list(MODELS))
def test_tiny_model_agrees_with_llama_cpp(tiny_model, label):
    """llama.cpp loads the same file and rounds activations the same way (vec_dot_type): logits
    within 5% of each position's logit spread (observed at most 1.5%) and the same top token
    almost everywhere (near-ties may part)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference engine) is not installed")
    path = tiny_model(label)
    ids, ours = caravan_logits(path)
    llama = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=LLAMA_CPP_THREADS,
                            logits_all=True, verbose=False)
    llama.eval(ids.tolist())
    ref = np.asarray(llama.scores[:N_PROMPT])
    spread = ref.max(axis=1) - ref.min(axis=1)
    assert np.all(np.abs(ours - ref).max(axis=1) < 0.05 * spread)
    assert np.mean(ours.argmax(axis=1) == ref.argmax(axis=1)) >= 0.9


def test_memory_plan_counts_packed_k_quant_layers(tiny_model):
    """The planner's layer size for a Q4_K_M model (Q4_K and Q6_K matrices) is what the loaded
    layers hold, and a node gets only the layers its memory holds."""
    from caravan.coordinator.cluster import layer_bytes, model_cost
    from caravan.coordinator.planner import NodeCapacity, plan_layers
    from caravan.pipeline.loader import load_model
    from caravan.pipeline.model import LayerWeights

    model = load_model(tiny_model("Q4_K_M"))
    loaded = [LayerWeights.load(model.file, model.config, layer).nbytes for layer in range(model.config.n_layers)]
    assert layer_bytes(model) == max(loaded)
    file_bytes = sum(info.n_bytes for name, info in model.file.tensors.items() if name.startswith("blk.0."))
    assert file_bytes < layer_bytes(model) < 1.1 * file_bytes
    cost = model_cost(model, n_ctx=256)
    small = NodeCapacity("small", 0.1, cost.runtime_bytes + cost.per_layer + cost.per_layer // 2)
    plan = plan_layers([small, NodeCapacity("big", 1.0, 1 << 33)], cost)
    assert [len(a.layers) for a in plan.assignments] == [1, 1]


@pytest.mark.parametrize("dim", (256, 320), ids=lambda d: f"dim{d}")
@pytest.mark.parametrize("ttype", TYPES, ids=lambda t: t.name)
def test_node_benchmark_runs_every_format(ttype, dim):
    """A node measures its ms per layer on a synthetic layer of the model's main weight type
    (speed.py) before the planner places layers: every format has one, and at a width that is
    no multiple of 256 (Gemma 3 270M's 640) the K-quants' rows fall back as llama.cpp's do."""
    from caravan.pipeline.model import ModelConfig
    from caravan.pipeline.speed import ms_per_layer
    from support.tiny_models import tiny_llama

    metadata, _ = tiny_llama(n_layers=1, dim=dim, hidden_dim=512, n_heads=4, n_kv_heads=2)
    config = ModelConfig.from_metadata(metadata, 300)
    assert ms_per_layer(config, ttype, repeats=2, context=4) > 0
