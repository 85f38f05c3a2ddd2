"""Codecs: round trips, unbiasedness, exact byte counts, error feedback, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedflat.comm import codecs as C
from fedflat.rng import stream
from fedflat.scenario.comm import CodecConfig, CommConfig


def gen(i: int = 0) -> torch.Generator:
    return stream(1234, "codec", i)


def vec(d: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # Test data from numpy so that it does not depend on the codecs' torch draws.
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(d)).to(dtype)


# ------------------------------------------------------------------------- round trips


def test_fp32_round_trip_is_exact():
    x = vec(1000)
    codec = C.fp32()
    y = codec.decode(codec.encode(x, gen()))
    assert torch.equal(x, y)
    assert y.dtype == torch.float32


def test_fp16_equals_numpy_half_rounding():
    x = vec(1000) * 10
    codec = C.fp16()
    y = codec.decode(codec.encode(x, gen()))
    expected = x.numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(y.numpy(), expected)
    # Round to nearest: relative error at most half an ulp, 2^-11.
    assert torch.all((y - x).abs() <= 2.0**-11 * x.abs())


def test_bf16_within_half_ulp():
    x = vec(1000) * 1e3
    codec = C.bf16()
    y = codec.decode(codec.encode(x, gen()))
    # 8 significant bits: round to nearest gives relative error <= 2^-8.
    assert torch.all((y - x).abs() <= 2.0**-8 * x.abs())
    assert not torch.equal(x, y)  # it did lose precision


def test_decode_keeps_input_dtype():
    x = vec(50, dtype=torch.float64)
    for codec in (C.fp16(), C.qsgd(levels=4), C.top_k(k=3), C.sign()):
        assert codec.decode(codec.encode(x, gen())).dtype == torch.float64


def test_top_k_keeps_the_k_largest_magnitudes():
    d, k = 200, 17
    x = vec(d, seed=3)
    for enc_kind in ("int32", "packed"):
        codec = C.top_k(k=k, index_encoding=enc_kind)
        y = codec.decode(codec.encode(x, gen()))
        top = np.argsort(-np.abs(x.numpy()))[:k]
        expected = np.zeros(d, dtype=np.float32)
        expected[top] = x.numpy()[top]
        np.testing.assert_array_equal(y.numpy(), expected)


def test_top_k_ratio_rounds_up():
    codec = C.top_k(ratio=0.1)
    enc = codec.encode(vec(95), gen())
    assert enc.payload["values"].numel() == 10  # ceil(9.5)
    assert C.top_k(ratio=1e-6).encode(vec(95), gen()).payload["values"].numel() == 1
    assert (
        C.top_k(k=500).encode(vec(95), gen()).payload["values"].numel() == 95
    )  # capped


def test_sign_keeps_signs_and_mean_abs_scale():
    x = vec(101, seed=5)
    codec = C.sign()
    y = codec.decode(codec.encode(x, gen()))
    scale = np.abs(x.numpy()).mean()
    np.testing.assert_allclose(y.numpy(), scale * np.sign(x.numpy()), rtol=1e-6)
    zero = C.sign().decode(C.sign().encode(torch.zeros(9), gen()))
    assert torch.equal(zero, torch.zeros(9))


def test_random_k_biased_keeps_values_on_support():
    d, k = 60, 7
    x = vec(d, seed=2)
    codec = C.random_k(k=k, unbiased=False)
    y = codec.decode(codec.encode(x, gen()))
    support = y != 0
    assert int(support.sum()) == k
    assert torch.equal(y[support], x[support])


def test_random_k_seed_encoding_matches_sent_indices():
    x = vec(80, seed=4)
    a = C.random_k(k=9, index_encoding="seed")
    y = a.decode(a.encode(x, gen(7)))
    support = y != 0
    assert int(support.sum()) == 9
    torch.testing.assert_close(y[support], x[support] * 80 / 9)
    # Same generator -> same message; another stream -> (almost surely) another support.
    assert torch.equal(y, a.decode(a.encode(x, gen(7))))
    assert not torch.equal(y != 0, a.decode(a.encode(x, gen(8))) != 0)


def test_decode_rejects_foreign_message():
    enc = C.fp16().encode(vec(4), gen())
    with pytest.raises(ValueError, match="fp32"):
        C.fp32().decode(enc)


# ------------------------------------------------------------------------- unbiasedness


def test_qsgd_unbiased_and_on_grid():
    d, s, n = 20, 2, 4000
    x = vec(d, seed=9)
    codec = C.qsgd(levels=s)
    g = gen(1)
    samples = torch.stack([codec.decode(codec.encode(x, g)) for _ in range(n)]).double()
    norm = float(torch.linalg.vector_norm(x.double()))
    # Every value is norm * l / s with l the floor or the ceil of s|x_i|/norm.
    levels = samples.abs() * s / norm
    r = (x.double().abs() * s / norm).expand_as(levels)
    on_floor = (levels - r.floor()).abs() < 1e-4
    on_ceil = (levels - r.floor() - 1).abs() < 1e-4
    assert torch.all(on_floor | on_ceil)
    assert on_floor.any()
    assert on_ceil.any()
    assert torch.all((samples == 0) | (samples.sign() == x.double().sign()))
    # Closed-form variance (norm/s)^2 p(1-p); the mean is within 5 standard errors.
    p = (x.double().abs() * s / norm) % 1.0
    se = (norm / s) * torch.sqrt(p * (1 - p) / n)
    err = (samples.mean(0) - x.double()).abs()
    assert torch.all(err <= 5 * se + 1e-6)


def _bucket_norms(x: np.ndarray, size: int) -> np.ndarray:
    """Per-coordinate norm of the coordinate's bucket, computed here in float64."""
    out = np.empty_like(x)
    for start in range(0, x.size, size):
        out[start : start + size] = np.linalg.norm(x[start : start + size])
    return out


def _qsgd_draws(codec: C.Codec, x: torch.Tensor, n: int, i: int = 0) -> np.ndarray:
    g = gen(i)
    return torch.stack([codec.decode(codec.encode(x, g)) for _ in range(n)]).double().numpy()


def test_qsgd_buckets_unbiased_and_on_each_buckets_grid():
    # 5 buckets of 64 (the last one 44 long) whose scales differ by 100x, so that one
    # norm for the whole vector and one per bucket give different grids.
    d, size, s, n = 300, 64, 3, 3000
    x = vec(d, seed=5) * torch.repeat_interleave(
        torch.tensor([10.0, 0.1, 1.0, 3.0, 0.5]), torch.tensor([64, 64, 64, 64, 44]))
    samples = _qsgd_draws(C.qsgd(levels=s, bucket_size=size), x, n, i=3)
    xd = x.double().numpy()
    norm_b = _bucket_norms(xd, size)
    r = np.abs(xd) * s / norm_b  # in [0, s]
    levels = np.abs(samples) * s / norm_b
    on_floor = np.abs(levels - np.floor(r)) < 1e-4
    on_ceil = np.abs(levels - np.floor(r) - 1) < 1e-4
    assert np.all(on_floor | on_ceil)
    # Closed form per coordinate: (||x_b|| / s)^2 p (1 - p); mean within 5 standard errors.
    p = r % 1.0
    se = (norm_b / s) * np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(samples.mean(0) - xd) <= 5 * se + 1e-6)


@pytest.mark.parametrize(("d", "size", "s"), [(1000, 64, 2), (1000, 0, 2), (2048, 512, 15)])
def test_qsgd_relative_variance_within_lemma_bound(d: int, size: int, s: int):
    x = vec(d, seed=6)
    n = 400
    samples = _qsgd_draws(C.qsgd(levels=s, bucket_size=size), x, n, i=4)
    xd = x.double().numpy()
    rel = ((samples - xd) ** 2).sum(1) / (xd**2).sum()  # [n] draws of ||Q(x)-x||^2/||x||^2
    # QSGD Lemma 3.1 per bucket of B coordinates: E||Q(x_b)-x_b||^2 <= min(B/s^2,
    # sqrt(B)/s) ||x_b||^2; summed over buckets the same factor bounds the whole vector.
    b = size or d
    bound = min(b / s**2, math.sqrt(b) / s)
    # The exact expectation, sum_i (||x_b|| / s)^2 p_i (1 - p_i), by hand.
    norm_b = _bucket_norms(xd, b)
    p = (np.abs(xd) * s / norm_b) % 1.0
    expected = ((norm_b / s) ** 2 * p * (1 - p)).sum() / (xd**2).sum()
    assert expected <= bound
    assert abs(rel.mean() - expected) <= 5 * rel.std(ddof=1) / math.sqrt(n)
    assert rel.mean() <= bound


def test_qsgd_buckets_cut_the_variance_at_issue_size():
    # The issue's case: d = 196,608, s = 15. One norm: ~22.5 (bound sqrt(d)/s = 29.6);
    # buckets of 512: ~0.38 (bound sqrt(512)/15 = 1.51), for 4 B more per 512 coordinates.
    d, s = 196_608, 15
    x = vec(d, seed=7)
    xd = x.double().numpy()
    rel = {}
    for size in (0, 512):
        draws = _qsgd_draws(C.qsgd(levels=s, bucket_size=size), x, 3, i=5)
        rel[size] = float((((draws - xd) ** 2).sum(1) / (xd**2).sum()).mean())
    assert rel[0] <= math.sqrt(d) / s
    assert rel[512] <= math.sqrt(512) / s
    assert rel[512] < rel[0] / 20
    assert C.qsgd(levels=s).wire_nbytes(d) - C.qsgd(levels=s, bucket_size=0).wire_nbytes(d) == (
        4 * (d // 512 - 1))


def test_qsgd_zero_bucket_decodes_to_zeros():
    x = torch.cat([torch.zeros(8), vec(8, seed=8)])
    codec = C.qsgd(levels=4, bucket_size=8)
    y = codec.decode(codec.encode(x, gen()))
    assert torch.equal(y[:8], torch.zeros(8))
    assert torch.isfinite(y).all()


def test_qsgd_one_bucket_is_the_whole_vector_scheme():
    # bucket_size 0, None, or >= d: the same single norm, so the same message.
    x = vec(700, seed=9)
    ref = C.qsgd(levels=5, bucket_size=0)
    enc = ref.encode(x, gen(6))
    torch.testing.assert_close(enc.payload["norms"], torch.linalg.vector_norm(x).reshape(1))
    for other in (C.qsgd(levels=5, bucket_size=None), C.qsgd(levels=5, bucket_size=700)):
        assert torch.equal(other.decode(other.encode(x, gen(6))), ref.decode(enc))


def test_random_k_unbiased_in_mean():
    d, k, n = 10, 3, 6000
    x = vec(d, seed=11)
    codec = C.random_k(k=k, unbiased=True)
    g = gen(2)
    samples = torch.stack([codec.decode(codec.encode(x, g)) for _ in range(n)]).double()
    # Each coordinate is x_i d/k with probability k/d, else 0: variance x_i^2 (d/k - 1).
    se = x.double().abs() * math.sqrt((d / k - 1) / n)
    assert torch.all((samples.mean(0) - x.double()).abs() <= 5 * se)


def test_same_generator_same_encoding():
    x = vec(300)
    codec = C.qsgd(levels=5)
    a = codec.decode(codec.encode(x, gen(3)))
    b = codec.decode(codec.encode(x, gen(3)))
    c = codec.decode(codec.encode(x, gen(4)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -------------------------------------------------------------------------- byte counts


@pytest.mark.parametrize(
    ("codec", "d", "expected"),
    [
        (C.fp32(), 10, 4 + 40),
        (C.fp16(), 10, 4 + 20),
        (C.bf16(), 7, 4 + 14),
        # qsgd: header + norm + ceil(d * ceil(log2(2s+1)) / 8)
        (C.qsgd(levels=1), 10, 4 + 4 + 3),  # 3 codes -> 2 bits -> 20 bits -> 3 bytes
        (C.qsgd(levels=3), 10, 4 + 4 + 4),  # 7 codes -> 3 bits -> 30 bits -> 4 bytes
        (C.qsgd(levels=4), 10, 4 + 4 + 5),  # 9 codes -> 4 bits -> 40 bits -> 5 bytes
        (C.qsgd(levels=127), 10, 4 + 4 + 10),  # 255 codes -> 8 bits
        (
            C.qsgd(levels=128),
            10,
            4 + 4 + 12,
        ),  # 257 codes -> 9 bits -> 90 bits -> 12 bytes
        # qsgd buckets: one float32 norm per ceil(d / B) bucket.
        (C.qsgd(levels=4, bucket_size=512), 1000, 4 + 4 * 2 + 500),  # 4 bits * 1000
        (C.qsgd(levels=4, bucket_size=500), 1000, 4 + 4 * 2 + 500),
        (C.qsgd(levels=4, bucket_size=0), 1000, 4 + 4 + 500),
        (C.qsgd(levels=4, bucket_size=None), 1000, 4 + 4 + 500),
        (C.qsgd(levels=1, bucket_size=3), 10, 4 + 4 * 4 + 3),  # buckets 3+3+3+1
        (C.qsgd(levels=15), 196_608, 4 + 4 * 384 + 196_608 * 5 // 8),  # default B = 512
        (C.top_k(k=10), 100, 4 + 40 + 40),
        (
            C.top_k(k=10, index_encoding="packed"),
            100,
            4 + 40 + 9,
        ),  # 7 bits * 10 = 70 bits
        (C.top_k(k=3, index_encoding="packed"), 256, 4 + 12 + 3),  # 8 bits each
        (
            C.top_k(k=3, index_encoding="packed"),
            257,
            4 + 12 + 4,
        ),  # 9 bits * 3 = 27 bits
        (C.random_k(k=10), 100, 4 + 40 + 40),
        (C.random_k(k=10, index_encoding="seed"), 100, 4 + 40 + 8),
        (C.sign(), 10, 4 + 4 + 2),
        (C.sign(), 16, 4 + 4 + 2),
        (C.sign(), 17, 4 + 4 + 3),
    ],
)
def test_nbytes_against_hand_count(codec: C.Codec, d: int, expected: int):
    enc = codec.encode(vec(d), gen())
    assert enc.nbytes == expected
    assert codec.wire_nbytes(d) == expected


def test_pack_bits_round_trip_and_size():
    rng = np.random.default_rng(0)
    for bits in (1, 2, 3, 5, 7, 8, 9, 13, 31):
        n = 1001
        codes = torch.from_numpy(rng.integers(0, 2**bits, n))
        packed = C.pack_bits(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(C.unpack_bits(packed, n, bits), codes)


@pytest.mark.parametrize("bits", [3, 10, 24, 9])
def test_pack_bits_across_chunks(bits: int):
    # More codes than one packing chunk, in each code path (one 64-bit word per group
    # for 3, 10 and 24 bits; a bit-by-bit expansion for 9).
    n = C.PACK_CHUNK + 13
    codes = torch.from_numpy(np.random.default_rng(bits).integers(0, 2**bits, n))
    packed = C.pack_bits(codes, bits)
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(C.unpack_bits(packed, n, bits), codes)
    # Bit k of the stream is bit (k mod bits) of code k // bits (checked on a sample).
    k = np.random.default_rng(0).integers(0, n * bits, 200)
    stream_bits = (packed[k // 8].long() >> torch.from_numpy(k % 8)) & 1
    code_bits = (codes[k // bits] >> torch.from_numpy(k % bits)) & 1
    assert torch.equal(stream_bits, code_bits)


def test_pack_bits_layout_lsb_first():
    # codes 1, 2, 3 with 2 bits: bits 10 01 11 (LSB first) -> byte 0b00111001 = 57.
    packed = C.pack_bits(torch.tensor([1, 2, 3]), 2)
    assert packed.tolist() == [1 | (2 << 2) | (3 << 4)]
    with pytest.raises(ValueError, match="codes"):
        C.pack_bits(torch.tensor([4]), 2)


# ----------------------------------------------------------------------- error feedback


def test_error_feedback_top_k_loses_nothing():
    d, k = 50, 5
    xs = [vec(d, seed=20), vec(d, seed=21)]
    ef = C.with_error_feedback(C.top_k(k=k))
    residual = None
    decoded = []
    for x in xs:
        enc, residual = ef.encode_ef(x, residual, gen())
        decoded.append(ef.decode(enc))
    total = decoded[0] + decoded[1] + residual
    torch.testing.assert_close(total, xs[0] + xs[1], rtol=0, atol=1e-6)
    # The second message is the top-k of (x2 + what the first one dropped).
    carried = xs[0] - decoded[0]
    p = (xs[1] + carried).numpy()
    top = np.argsort(-np.abs(p))[:k]
    assert set(np.flatnonzero(decoded[1].numpy())) == set(top.tolist())


def test_error_feedback_resends_what_was_dropped():
    x = vec(30, seed=22)
    ef = C.with_error_feedback(C.top_k(k=4))
    enc1, r1 = ef.encode_ef(x, None, gen())
    # With nothing new to send, the next message is the top-4 of the residual itself.
    enc2, r2 = ef.encode_ef(torch.zeros(30), r1, gen())
    m2 = ef.decode(enc2).numpy()
    top = np.argsort(-np.abs(r1.numpy()))[:4]
    np.testing.assert_array_equal(m2[top], r1.numpy()[top])
    np.testing.assert_allclose(
        ef.decode(enc1).numpy() + m2 + r2.numpy(), x.numpy(), atol=1e-6
    )


def test_transmit_handles_plain_and_ef_codecs():
    x = vec(40)
    t = C.transmit(C.fp16(), x, None, gen())
    assert t.residual is None
    assert t.nbytes == 4 + 80
    t = C.transmit(C.with_error_feedback(C.sign()), x, None, gen())
    torch.testing.assert_close(t.decoded + t.residual, x)


# ---------------------------------------------------------------------- registry/config


def test_make_codec_errors_name_the_parameter():
    with pytest.raises(ValueError, match="levels"):
        C.make_codec("qsgd", levels=0)
    with pytest.raises(ValueError, match="ratio"):
        C.make_codec("top_k", ratio=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        C.make_codec("random_k", k=3, ratio=0.1)
    with pytest.raises(ValueError, match="unknown codec"):
        C.make_codec("zip")
    with pytest.raises(ValueError, match="levels"):
        C.make_codec("fp16", levels=3)


def test_codec_from_config():
    cfg = CommConfig.model_validate(
        {
            "uplink": {"codec": "top_k", "ratio": 0.1, "error_feedback": True},
            "downlink": {"codec": "random_k", "k": 5, "unbiased": False},
        }
    )
    up = C.codec_from_config(cfg.uplink)
    assert isinstance(up, C.ErrorFeedbackCodec)
    assert up.wire_nbytes(100) == 4 + 40 + 40
    down = C.codec_from_config(cfg.downlink)
    assert isinstance(down, C.Codec)
    assert not down.unbiased
    q = C.codec_from_config(CodecConfig(codec="qsgd", levels=4))
    assert q.wire_nbytes(10) == 4 + 4 + 5
    assert q.wire_nbytes(1025) == 4 + 4 * 3 + math.ceil(1025 * 4 / 8)  # default B = 512
    q0 = C.codec_from_config(CodecConfig(codec="qsgd", levels=4, bucket_size=0))
    assert q0.wire_nbytes(1025) == 4 + 4 + math.ceil(1025 * 4 / 8)
    assert C.codec_from_config(CodecConfig(codec="qsgd", levels=4, bucket_size=None)).params[
        "bucket_size"] == 0
    assert isinstance(C.codec_from_config(CommConfig().uplink), C.Codec)


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ({"codec": "qsgd"}, "levels is required"),
        ({"codec": "fp16", "levels": 4}, "levels applies"),
        ({"codec": "fp16", "bucket_size": 64}, "bucket_size applies"),
        ({"codec": "qsgd", "levels": 4, "bucket_size": -1}, "greater than or equal to 0"),
        ({"codec": "top_k"}, "exactly one of k or ratio"),
        ({"codec": "top_k", "k": 3, "ratio": 0.1}, "exactly one of k or ratio"),
        ({"codec": "sign", "k": 3}, "k applies"),
        ({"codec": "top_k", "k": 3, "unbiased": False}, "unbiased applies"),
        ({"codec": "top_k", "k": 3, "index_encoding": "seed"}, "seed"),
        ({"codec": "top_k", "ratio": 0.0}, "greater than 0"),
        ({"codec": "fp32", "bits": 8}, "not a key of codec .fp32."),
        ({"codec": "gzip"}, "codec"),
    ],
)
def test_codec_config_rejects(block: dict, match: str):
    with pytest.raises(ValidationError, match=match):
        CommConfig.model_validate({"uplink": block})
