"""Weight-times-activation products checked against float64: the random activations both the
quant and the format tests feed the kernels, and the two bounds every product is held to."""

from __future__ import annotations

import numba
import numpy as np

from caravan.pipeline.formats.base import QK

# Against the same rounded activations only f32 accumulation differs: a few ulps of the row scale.
TIGHT = 1e-5


def random_activations(n_rows: int, cols: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_rows, cols)) * rng.uniform(0.01, 10.0, (n_rows, 1))).astype(np.float32)


def assert_product_close(out: np.ndarray, ref: np.ndarray, scale: np.ndarray, x: np.ndarray, w: np.ndarray,
                         loose: float) -> None:
    """out within TIGHT of `ref` (the float64 product on the activations rounded as the kernel
    rounds them) relative to `scale`, and within `loose` of the float64 product on the unrounded
    activations relative to |x| @ |W|.T."""
    err = np.abs(out - ref) / scale
    assert err.max() < TIGHT, f"max error {err.max():.2e} of the row scale"
    exact = x.astype(np.float64) @ w.T
    err = np.abs(out - exact) / (np.abs(x.astype(np.float64)) @ np.abs(w).T)
    assert err.max() < loose, f"max error {err.max():.2e} against the unrounded activations"


def compiled_quantizer(block):
    """A compiled loop quantizing every block of every row of x (T, K) with `block`, one of
    activations.QUANTIZE_INTRINSICS (an intrinsic runs only inside compiled code), into qs, d, s
    and n as activations.quantize_block_q8 fills them."""
    @numba.njit
    def quantize(x, qs, d, s, n):
        for t in range(x.shape[0]):
            for b in range(x.shape[1] // QK):
                block(x, qs, d, s, n, t, b)

    return quantize
