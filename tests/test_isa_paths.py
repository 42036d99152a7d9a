"""The instruction sets pipeline/vector.py chooses from a CPU's features, and the aarch64 paths
(NEON, and the Cortex-A76's dot product) giving the generic path's bits.

The selection is a pure function of the machine and the feature string, so it is tested on any
host, with the feature strings .ci/arm64 gives the emulated boards. The bit-identity tests need
an aarch64 CPU (or its emulation: .ci/arm64 runs them as a Pi 4 and a Pi 5 would compile them)
and skip elsewhere; they compile one small product per format and instruction set: legacy sdot
with and without a zero point, signed Q8_0, the K-quant span loop with 32- and 16-weight
sub-blocks, minima and zero points, and the activations' rounding (.ci/arm64 runs Q4_0 and Q4_K
on both CPUs, Q2_K, Q3_K and Q6_K on the A76).
"""

from __future__ import annotations

import re
from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from caravan.pipeline import vector
from caravan.pipeline.formats import FORMATS, activations, kquants, legacy
from caravan.pipeline.quants import Activations, pack
from caravan.pipeline.speed import random_blocks
from caravan.pipeline.vector import isas_for, parse_cpu_features
from support.products import compiled_quantizer

CI_ARM64 = Path(__file__).resolve().parents[1] / ".ci" / "arm64"
on_arm = pytest.mark.skipif("neon" not in vector.ISAS or numba.config.DISABLE_JIT,
                            reason="the NEON and dot-product paths compile for aarch64 only (.ci/arm64 runs them emulated)")


def ci_features(cpu: str) -> frozenset[str]:
    """The features .ci/arm64 gives Numba for an emulated `cpu` (cortex-a72, cortex-a76)."""
    found = re.search(rf"\[{cpu}\]=(\S+)", CI_ARM64.read_text())
    assert found, f"{CI_ARM64}: no feature string for {cpu}"
    return parse_cpu_features(found.group(1))


def test_isa_selection_follows_the_cpu_features():
    """A Pi 4 (Cortex-A72: NEON, no dot product) never gets the sdot path; a Pi 5 (A76) does;
    features of another architecture never select anything."""
    assert isas_for("aarch64", ci_features("cortex-a72")) == ("neon", "generic")
    assert isas_for("aarch64", ci_features("cortex-a76")) == ("dotprod", "neon", "generic")
    assert isas_for("arm64", ci_features("cortex-a76")) == ("dotprod", "neon", "generic")  # macOS's name
    assert isas_for("aarch64", parse_cpu_features("+neon,-dotprod")) == ("neon", "generic")
    assert isas_for("aarch64", parse_cpu_features("")) == ("neon", "generic")  # NUMBA_CPU_NAME=generic: NEON is AArch64's own
    assert isas_for("x86_64", parse_cpu_features("+avx,+avx2,+fma")) == ("avx2", "generic")
    assert isas_for("x86_64", parse_cpu_features("+sse4.2,-avx2")) == ("generic",)
    assert isas_for("x86_64", ci_features("cortex-a76")) == ("generic",)
    assert isas_for("aarch64", parse_cpu_features("+avx2")) == ("neon", "generic")


def _run_group_product(ttype: QT, isa: str):
    """A compiled loop over every group of 8 weight rows with ttype's products for `isa`: token
    rows 0 .. 3 in the four-token form, the rest one by one. Arguments: the seven arrays (the
    registry's weights, then activations: 3 + 4, or a K-quant's 4 + 3), out."""
    name = ttype.name.lower()
    k_quant = name.endswith("_k")
    intrinsics = kquants.INTRINSICS if k_quant else legacy.GROUP_INTRINSICS
    one, four = intrinsics[(name, 1, isa)], intrinsics[(name, 4, isa)]

    @numba.njit
    def run(a, b, c, d, e, f, h, out):
        for g in range(a.shape[0]):
            n_valid = min(8, out.shape[1] - 8 * g)
            if k_quant:  # the group index follows the weights: four arrays of a K-quant's, three of the others'
                four(a, b, c, d, g, e, f, h, out, 0, n_valid)
                for t in range(4, out.shape[0]):
                    one(a, b, c, d, g, e, f, h, out, t, n_valid)
            else:
                four(a, b, c, g, d, e, f, h, out, 0, n_valid)
                for t in range(4, out.shape[0]):
                    one(a, b, c, g, d, e, f, h, out, t, n_valid)

    return run


def _activation_rows(cols: int) -> np.ndarray:
    """Five rows: random of varied size, one at full scale everywhere (every |q| = 127, the
    bound of the paths' i16 sums), and zeros."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, cols)) * rng.uniform(0.01, 10.0, (5, 1))).astype(np.float32)
    x[3] = np.where(rng.integers(0, 2, cols) == 1, 1.0, -1.0)
    x[4] = 0.0
    return x


@on_arm
@pytest.mark.parametrize("ttype", (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q2_K, QT.Q3_K, QT.Q5_K, QT.Q6_K), ids=lambda t: t.name)
def test_arm_products_give_the_generic_bits(ttype):
    """The NEON and dot-product paths (those this CPU runs) give the generic IR's bits, on 13
    rows (a whole group of 8 and a partial one) of random blocks, every quant byte random; the
    32-weight formats with an odd count of blocks (the dot-product path takes two a pass, then
    the last alone)."""
    cols = 512 if ttype.name.endswith("_K") else 544
    packed = pack(ttype, random_blocks(ttype, 13, cols, np.random.default_rng(0), 0.02), "w")
    weights = tuple(FORMATS[ttype].weights(packed.arrays))
    acts = FORMATS[ttype].activations(Activations(_activation_rows(cols)))
    results = {}
    for isa in vector.ISAS:
        out = np.full((5, 13), np.nan, np.float32)
        _run_group_product(ttype, isa)(*weights, *acts, out)
        results[isa] = out
    assert not np.isnan(results["generic"]).any()
    for isa, out in results.items():
        np.testing.assert_array_equal(out, results["generic"], err_msg=f"{ttype.name}: {isa} against generic")


@on_arm
def test_arm_activation_quantizing_gives_the_generic_bits():
    """fcvtns rounds to nearest-even, saturates and takes NaN to 0, as rint and the saturating
    conversion do: exact ties, zeros, a NaN block and huge values quantize to the same bits."""
    x = _activation_rows(64)
    x[0, :32] = np.arange(32, dtype=np.float32) - 15.5  # x * 127 / amax: ties at the half steps
    x[1, :32] = np.nan
    x[2, :32] = np.float32(3e38)
    got = {}
    for isa, block in activations.QUANTIZE_INTRINSICS.items():
        quantize = compiled_quantizer(block)
        arrays = (np.empty((5, 64), np.int8), np.empty((5, 2), np.float32), np.empty((5, 2), np.float32), np.empty((5, 2), np.int32))
        quantize(x, *arrays)
        got[isa] = arrays
    for isa, arrays in got.items():
        for a, b in zip(arrays, got["generic"]):
            np.testing.assert_array_equal(a, b, err_msg=f"{isa} against generic")
