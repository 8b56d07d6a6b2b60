"""Each transform beside its inverse: element-wise meaning and exact round trips."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from ckpt_cli import transforms as T

rng = np.random.default_rng(0)


def test_linear_is_head_major_transpose():
    N, D, E = 3, 4, 5
    q = rng.standard_normal((N * D, E)).astype(np.float32)
    mt = T.Linear().to_maxtext(q, (E, N, D))
    for e in range(E):
        for h in range(N):
            for d in range(D):
                assert mt[e, h, d] == q[h * D + d, e]
    assert np.array_equal(T.Linear().to_hf(mt, (N * D, E)), q)


def test_linear_out_kernel():
    N, D, E = 3, 4, 5
    o = rng.standard_normal((E, N * D)).astype(np.float32)
    mt = T.Linear().to_maxtext(o, (N, D, E))
    assert all(mt[h, d, e] == o[e, h * D + d] for h in range(N) for d in range(D) for e in range(E))
    assert np.array_equal(T.Linear().to_hf(mt, (E, N * D)), o)


def test_rope_interleave_pairs():
    D = 8
    x = np.arange(2 * D, dtype=np.float32).reshape(2, D)
    y = T.RopeInterleave().to_maxtext(x, x.shape)
    for i in range(D // 2):
        assert np.array_equal(y[:, 2 * i], x[:, i]) and np.array_equal(y[:, 2 * i + 1], x[:, D // 2 + i])
    assert np.array_equal(T.RopeInterleave().to_hf(y, x.shape), x)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32, ml_dtypes.float8_e4m3fn, np.float64])
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 700), (513, 257), (1024, 64), (300, 1028), (77, 4098)])
def test_transpose2d_matches_numpy(rows, cols, dtype):
    """Bit-exact for every element size, on the word-wise path (cols a multiple of 8 bytes) and off it."""
    x = rng.standard_normal((rows, cols)).astype(dtype)
    bits = np.dtype(f"u{np.dtype(dtype).itemsize}")
    got = T.transpose2d(x)
    assert got.dtype == x.dtype and got.flags.c_contiguous
    assert np.array_equal(got.view(bits), np.ascontiguousarray(x.T).view(bits))
    assert np.array_equal(T.transpose2d(x[:, ::-1]).view(bits), np.ascontiguousarray(x[:, ::-1].T).view(bits))


def test_scale_in_float32_and_within_one_bf16_ulp_back():
    D = 128
    s = T.query_scale(D)
    x = rng.standard_normal(4096).astype(ml_dtypes.bfloat16)
    y = s.to_maxtext(x, x.shape)
    assert y.dtype == np.float32
    assert np.array_equal(y, x.astype(np.float32) * np.float32(1 / math.sqrt(D)))
    back = s.to_hf(y.astype(ml_dtypes.bfloat16), x.shape).astype(ml_dtypes.bfloat16)
    ulp = np.abs(x.astype(np.float32)) * 2.0**-7
    assert np.all(np.abs(back.astype(np.float32) - x.astype(np.float32)) <= ulp)
    x32 = rng.standard_normal(4096).astype(np.float32)
    assert np.allclose(s.to_hf(s.to_maxtext(x32, x32.shape), x32.shape), x32, rtol=2e-7, atol=0)


def test_offset_round_trip_f32():
    x = rng.standard_normal(100).astype(np.float32)
    o = T.Offset(1.0)
    assert np.array_equal(o.to_maxtext(x, x.shape), x + 1)
    assert np.allclose(o.to_hf(o.to_maxtext(x, x.shape), x.shape), x, atol=1e-7)


def test_chain_inverse_order_and_exactness_flag():
    c = T.chain(T.Linear(), T.RopeInterleave(), T.query_scale(8))
    assert not c.exact and T.chain(T.Linear(), T.RopeInterleave()).exact
    q = rng.standard_normal((2 * 8, 6)).astype(np.float32)
    mt = c.to_maxtext(q, (6, 2, 8))
    assert np.allclose(c.to_hf(mt, (16, 6)), q, rtol=1e-6)
    assert c.describe() == "transpose > rope-interleave > scale(1/sqrt(8))"


def test_rope_interleave_on_flat_heads_permutes_each_head_alike():
    """A LoRA B kernel `(r, N*D)`: the RoPE permutation of each head of D on the flat axis, as on `(r, N, D)`."""
    x = np.arange(3 * 4 * 8, dtype=np.float32).reshape(3, 32)
    flat = T.RopeInterleave(head=8)
    y = flat.to_maxtext(x, x.shape)
    per_head = T.RopeInterleave().to_maxtext(x.reshape(3, 4, 8), (3, 4, 8)).reshape(3, 32)
    assert np.array_equal(y, per_head) and not np.array_equal(y, x)
    assert np.array_equal(flat.to_hf(y, x.shape), x)
    assert T.chain(T.Linear(), flat).exact
