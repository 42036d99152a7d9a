"""F32, F16, Q8_0, Q4_0 and Q4_1 (pipeline/formats/legacy.py, floats.py) and the activations
they take: the f16 table, Q8 activation blocks bit for bit against ggml's rounding
(tests/support/naive.py), the eight-row products of every ISA against their numpy twins, and
unsupported types refused. What every format promises (dequantization exact against gguf-py,
products against float64, batch and thread-count invariance) is tested for the whole registry
in test_formats.py.
"""

from __future__ import annotations

import subprocess
import sys

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from caravan.pipeline import vector
from caravan.pipeline.formats import activations, legacy
from caravan.pipeline.quants import (
    F16_TO_F32,
    FORMATS,
    SUPPORTED_TYPES,
    Activations,
    UnsupportedTypeError,
    dequantize_rows,
    matmul,
    pack,
)
from support import naive
from support.products import compiled_quantizer, random_activations

TYPES = (QT.F32, QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1)


def random_weights(rows: int, cols: int, ttype: QT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF data as GGUFFile.tensor_data gives it, dequantized float64 (rows, cols)).

    Rows get different scales (and Q4_1 an offset) so per-block scales and minima vary."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * rng.uniform(0.05, 2.0, (rows, 1)) + rng.uniform(-0.2, 0.2, (rows, 1))
    raw = quantize(w.astype(np.float32), ttype)
    return raw, dequantize(raw, ttype).astype(np.float64).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# Dequantization: exact


def test_f16_table_is_every_bit_pattern_by_its_fields():
    """All 65,536 entries bit for bit, NaN payloads and quiet bits included (numpy's cast leaves
    x86's 1,022 signalling NaNs signalling, and on ARM quiets them with a warning)."""
    expected = np.array([naive.f16_to_f32_bits(h) for h in range(1 << 16)], np.uint32)
    np.testing.assert_array_equal(F16_TO_F32.view(np.uint32), expected)
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = ~np.isnan(F16_TO_F32)
    np.testing.assert_array_equal(F16_TO_F32[finite], bits.view(np.float16)[finite].astype(np.float32))


def test_f16_table_is_ggmls():
    """Against ggml's own conversion (ggml_fp16_to_fp32_row in llama-cpp-python's libggml-base,
    F16C on x86), where it is installed."""
    import ctypes
    from pathlib import Path

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    base = next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"), None)
    if base is None:
        pytest.skip("llama-cpp-python has no libggml-base library")
    convert = ctypes.CDLL(str(base)).ggml_fp16_to_fp32_row
    convert.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ggml = np.empty(1 << 16, np.float32)
    convert(bits.ctypes.data, ggml.ctypes.data, bits.size)
    np.testing.assert_array_equal(F16_TO_F32.view(np.uint32), ggml.view(np.uint32))


@pytest.mark.slow
def test_the_f16_tables_are_built_without_a_floating_point_warning():
    """`python -W error` turns any RuntimeWarning into an error: importing the kernels and
    building the GELU table (the f16 tables) must not raise one, on any machine."""
    code = "import caravan.pipeline.quants, caravan.pipeline.ops as ops; ops._gelu_table()"
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def test_f16_rounding_equals_numpy_cast():
    """The compiled f32 -> f16 -> f32 rounding (used on F16 products' activations) against
    numpy's cast, bit for bit, on random bit patterns and the edges: subnormals, ties, the
    largest finite f16, overflow, signed zeros, inf and NaN."""
    rng = np.random.default_rng(3)
    random_bits = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    f16_range = rng.uniform(-70000, 70000, 50_000).astype(np.float32)
    subnormal = (rng.uniform(-1, 1, 50_000) * 2.0**-13).astype(np.float32)
    tiny = 2.0**-24
    edges = np.array(
        [0.0, -0.0, tiny, tiny / 2, tiny * 0.5000001, tiny * 1.5, tiny * 2.5, 2.0**-14, 2.0**-14 - tiny / 2,
         1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 65504.0, 65519.0, 65519.996, 65520.0, 65536.0, 1e30,
         np.inf, -np.inf, np.nan, -65520.0, -tiny / 2, 1e-45, -1e-45],
        dtype=np.float32,
    )
    x = np.concatenate([random_bits, f16_range, subnormal, edges, -edges])
    x = x[: x.size // 64 * 64].reshape(-1, 64)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).astype(np.float32)
    got = Activations(x).f16()
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    mismatch = got[~nan].view(np.uint32) != expected[~nan].view(np.uint32)
    assert not mismatch.any(), f"{mismatch.sum()} values differ, e.g. {x[~nan][mismatch][:5]}"


# ---------------------------------------------------------------------------------------------
# Products


def _group_products(kernel1, kernel4):
    """A compiled loop over every (row group, token row) with the given legacy.py intrinsics."""

    @numba.njit
    def run(wq, wd, wm, xq, xd, xs, xn, out):
        rows = out.shape[1]
        for g in range(wq.shape[0]):
            n_valid = min(legacy.GROUP_ROWS, rows - g * legacy.GROUP_ROWS)
            kernel4(wq, wd, wm, g, xq, xd, xs, xn, out, 0, n_valid)
            for t in range(4, xq.shape[0]):
                kernel1(wq, wd, wm, g, xq, xd, xs, xn, out, t, n_valid)

    return run


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="compares compiled instruction sequences")
@pytest.mark.parametrize("ttype", (QT.Q8_0, QT.Q4_0, QT.Q4_1), ids=lambda t: t.name)
def test_group_products_give_the_same_bits_on_every_isa(ttype):
    """legacy.py's AVX2 integers (vpmaddubsw/vpmaddwd) and its generic IR (what an aarch64 node
    runs) give the same bits, equal to the plain-numpy twin's; the four-token and one-token
    forms agree; a last group of 5 rows (13 = 8 + 5) has its missing rows never written."""
    raw, _ = random_weights(13, 256, ttype)
    packed = pack(ttype, raw, "w")
    wq, wd = packed.arrays[:2]
    wm = packed.arrays[2] if ttype == QT.Q4_1 else wd
    acts = Activations(random_activations(8, 256))
    args = (wq, wd, wm, *acts.q8(), acts.q8_sums())
    name = ttype.name.lower()
    results = []
    for isa in vector.ISAS:
        out = np.full((8, 13), np.nan, np.float32)
        _group_products(legacy.GROUP_INTRINSICS[(name, 1, isa)], legacy.GROUP_INTRINSICS[(name, 4, isa)])(*args, out)
        results.append(out)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    twin = np.full((8, 13), np.nan, np.float32)
    for g in range(2):
        for t in range(8):
            getattr(legacy, f"{name}_group_tokens1")(*args[:3], g, *args[3:], twin, t, min(8, 13 - 8 * g))
    np.testing.assert_array_equal(twin, results[0])
    np.testing.assert_array_equal(matmul(packed, acts), results[0])


def awkward_activations() -> np.ndarray:
    """Rows of 64 whose blocks are awkward to quantize: all zeros, -0.0, subnormals, values whose
    scaled form is an exact tie (x * 127 / amax = k + 0.5), magnitudes from 1e-30 to 2e4."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal((8, 64)) * scale for scale in (1e-30, 1e-3, 1.0, 2e4)]).astype(np.float32)
    x[0, :32] = 0.0
    x[1, :32] = -0.0
    x[2, :32] = np.float32(1e-45) * np.arange(32, dtype=np.float32)
    x[3, :32] = np.arange(32, dtype=np.float32) - np.float32(15.5)
    x[3, 0] = 127.0  # amax 127: every other value of the block is a tie
    return x


AWKWARD_AND_RANDOM = pytest.mark.parametrize("rows", (awkward_activations(), random_activations(40, 1536)),
                                             ids=("awkward", "random"))


@AWKWARD_AND_RANDOM
def test_activation_quantizing_is_ggml_x86_and_its_twin(rows):
    """Activations.q8 (a thread per row from Q8_PARALLEL_ROWS rows, serial below) gives ggml's x86
    quantize_row_q8_1 integers and f16 scales (tests/support/naive.py) and its block sums, and so does
    activations.quantize_block_q8's plain-numpy twin."""
    acts = Activations(rows)
    qs, d, s = acts.q8()
    for a, b in zip(naive.quantize_q8_activations(rows), (qs, d, s)):
        np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(acts.q8_sums(), qs.reshape(len(rows), -1, 32).astype(np.int32).sum(axis=2))
    for a, b in zip(Activations(rows[:3]).q8(), (qs[:3], d[:3], s[:3])):
        np.testing.assert_array_equal(a, b)
    twin = tuple(np.empty_like(a) for a in (qs, d, s, acts.q8_sums()))
    for t in range(len(rows)):
        for b in range(rows.shape[1] // 32):
            activations.quantize_block_q8(rows, *twin, t, b)
    for a, b in zip((qs, d, s, acts.q8_sums()), twin):
        np.testing.assert_array_equal(b, a)


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="compares compiled instruction sequences")
@AWKWARD_AND_RANDOM
def test_activation_quantizing_gives_the_same_bits_on_every_isa(rows):
    """activations.py's AVX2 rounding (vcvtps2dq) and its generic IR (rint and a saturating conversion,
    what an aarch64 node runs) quantize to the same bits."""
    expected = (*Activations(rows).q8(), Activations(rows).q8_sums())
    for isa, block in activations.QUANTIZE_INTRINSICS.items():
        quantize = compiled_quantizer(block)
        got = tuple(np.empty_like(a) for a in expected)
        quantize(rows, *got)
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(b, a, err_msg=isa)


@pytest.mark.parametrize("ttype", (QT.Q8_0, QT.Q4_0, QT.Q4_1), ids=lambda t: t.name)
def test_row_slices_need_whole_groups(ttype):
    raw, _ = random_weights(24, 64, ttype)
    packed = pack(ttype, raw, "w")
    np.testing.assert_array_equal(dequantize_rows(packed.row_slice(8, 24), np.arange(16)), dequantize_rows(packed, np.arange(8, 24)))
    with pytest.raises(ValueError, match="split a group of 8"):
        packed.row_slice(4, 24)


def test_matmul_writes_into_out():
    raw, _ = random_weights(3, 64, QT.Q8_0)
    packed = pack(QT.Q8_0, raw, "w")
    x = random_activations(2, 64)
    out = np.full((2, 3), np.nan, np.float32)
    result = matmul(packed, Activations(x), out=out)
    assert result is out
    np.testing.assert_array_equal(out, matmul(packed, Activations(x)))


def test_shared_activations_give_the_same_products():
    """One Activations object serves several products (Q, K, V): reusing it changes nothing."""
    x = random_activations(4, 96)
    acts = Activations(x)
    for ttype in TYPES:
        raw, _ = random_weights(7, 96, ttype, seed=5)
        packed = pack(ttype, raw, "w")
        np.testing.assert_array_equal(matmul(packed, acts), matmul(packed, Activations(x.copy())))


# ---------------------------------------------------------------------------------------------
# Unsupported formats


def test_supported_types():
    """The registry's formats, these five here and the rest in tests/test_formats.py."""
    assert SUPPORTED_TYPES == tuple(FORMATS)
    assert set(TYPES) <= set(FORMATS)


@pytest.mark.parametrize("ttype", (QT.IQ2_XS, QT.IQ4_NL, QT.TQ1_0), ids=lambda t: t.name)
def test_unsupported_type_names_tensor_type_and_supported(ttype):
    raw = np.zeros((2, 210), np.uint8)
    with pytest.raises(UnsupportedTypeError) as info:
        pack(ttype, raw, "blk.3.ffn_down.weight")
    message = str(info.value)
    assert "blk.3.ffn_down.weight" in message
    assert ttype.name in message
    for supported in SUPPORTED_TYPES:
        assert supported.name in message


@numba.njit(cache=True)
def _f16_conversions(x, rounded, bits):
    for i in range(x.shape[0]):
        rounded[i] = vector.round_f16(x[i])
        bits[i] = vector.f16_bits(x[i])


@pytest.mark.slow  # a sweep over f32's range
def test_f16_conversions_match_numpy():
    """The compiled f32 -> f16 roundings (activation scales, f16 activations, the KV cache) are
    numpy's astype(np.float16), to nearest with ties to even: on every f32 from f16's subnormals
    to past its largest value (ties, subnormal steps, the overflow edge at 65520), both signs."""
    lo, hi = np.float32(2.0**-26).view(np.uint32), np.float32(70000.0).view(np.uint32)
    positive = np.arange(lo, hi, 7, dtype=np.uint32).view(np.float32)  # every 7th: all residues mod 2**13
    x = np.concatenate([positive, -positive, np.float32([0.0, -0.0, 65519.996, 65520.0, np.inf, -np.inf])])
    rounded, bits = np.empty_like(x), np.empty(x.shape, np.uint16)
    _f16_conversions(x, rounded, bits)
    with np.errstate(over="ignore"):  # past 65520 is inf, as intended
        expected = x.astype(np.float16)
    np.testing.assert_array_equal(bits, expected.view(np.uint16))
    np.testing.assert_array_equal(rounded.view(np.uint32), expected.astype(np.float32).view(np.uint32))
