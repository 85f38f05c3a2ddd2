"""Codecs for flat update vectors, with exact byte counts.

A codec turns a flat vector ``x`` of ``d`` coordinates into an :class:`Encoded` message
and back. ``Encoded.payload`` holds exactly the tensors that would be written to the
wire (values, packed indices, packed codes, scales), so ``Encoded.nbytes`` is their
``numel * element_size`` plus a fixed header. Sub-byte codes (QSGD levels, sign bits,
packed indices) are really bit-packed into ``uint8`` tensors, so the count is the size
of a payload that exists, not a formula.

Wire format (documented so that byte counts can be checked by hand):

* header: :data:`HEADER_NBYTES` = 4 bytes, one ``uint32`` holding the number of
  coordinates carried by the message (``d`` for dense codecs, ``k`` for sparse ones).
  The codec, its parameters, the vector length ``d`` and the dtype of the decoded vector
  are fixed for a whole run, agreed at setup, and are not sent per message.
* ``fp32`` / ``fp16`` / ``bf16``: ``d`` values of 4 / 2 / 2 bytes.
* ``qsgd``: one ``float32`` norm per bucket (``4 * ceil(d / B)`` bytes, ``B`` the
  bucket size; 4 bytes when ``B`` is 0, one norm for the whole vector) +
  ``ceil(d * bits / 8)`` bytes of packed codes, ``bits = ceil(log2(2 s + 1))`` (a signed
  level in ``{-s, ..., s}``).
* ``top_k`` / ``random_k``: ``k`` ``float32`` values (4 k bytes) + indices, either
  ``int32`` (4 k bytes, ``index_encoding="int32"``), bit-packed with
  ``ceil(log2 d)`` bits each (``ceil(k * ceil(log2 d) / 8)`` bytes,
  ``index_encoding="packed"``), or, for ``random_k`` only, one ``int64`` seed from which
  the receiver regenerates the indices (8 bytes, ``index_encoding="seed"``).
* ``sign``: one ``float32`` scale (4 bytes) + ``ceil(d / 8)`` bytes of sign bits.

Bits are packed least-significant first: code ``j`` occupies bits
``[j * bits, (j + 1) * bits)`` of the little-endian byte stream.

Error feedback (:func:`with_error_feedback`) wraps any codec; the residual is per-client
state that the caller stores and passes back in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fedflat.scenario.comm import CodecConfig

HEADER_NBYTES = 4


def fp32_nbytes(t: Tensor) -> int:
    """Bytes of a tensor sent uncompressed next to a delta or model: one header, 4 per value."""
    return HEADER_NBYTES + 4 * t.numel()
"""Bytes of the per-message header: one uint32 count of coordinates carried."""

IndexEncoding = Literal["int32", "packed", "seed"]

# Codes are packed in chunks of this many codes; a multiple of 8 so that every chunk
# starts on a byte boundary whatever the bit width (8 codes * bits = bits whole bytes).
PACK_CHUNK = 1 << 20


@dataclass(frozen=True)
class Encoded:
    """One message on the wire.

    Attributes:
        codec: name of the codec that produced it (checked by ``decode``).
        numel: length ``d`` of the encoded vector (a session constant, not sent).
        dtype: dtype of the decoded vector (a session constant, not sent).
        payload: the tensors written to the wire, by name.
    """

    codec: str
    numel: int
    dtype: torch.dtype
    payload: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Exact bytes on the wire: the header plus every payload tensor's bytes."""
        return HEADER_NBYTES + sum(
            t.numel() * t.element_size() for t in self.payload.values()
        )


class Codec(NamedTuple):
    """A codec: pure functions over flat vectors.

    Attributes:
        name: registry name (``"fp16"``, ``"qsgd"``, ...).
        encode: ``encode(x [d], gen) -> Encoded``; draws only from ``gen``.
        decode: ``decode(enc) -> Tensor [d]`` in the dtype of the encoded ``x``.
        wire_nbytes: ``wire_nbytes(d)`` = the ``nbytes`` of any message for length ``d``
            (every codec here has a size independent of the values), so a system model
            can time a transfer before the update exists.
        unbiased: whether ``E[decode(encode(x))] = x`` over the generator.
        params: the hyperparameters, for logging.
    """

    name: str
    encode: Callable[[Tensor, torch.Generator], Encoded]
    decode: Callable[[Encoded], Tensor]
    wire_nbytes: Callable[[int], int]
    unbiased: bool
    params: Mapping[str, Any]


class ErrorFeedbackCodec(NamedTuple):
    """A codec wrapped with error feedback (see :func:`with_error_feedback`).

    Attributes:
        name: ``"ef_" + inner.name``.
        inner: the wrapped codec.
        encode_ef: ``encode_ef(x, residual | None, gen) -> (Encoded, new_residual)``.
        decode: the inner codec's decode.
        wire_nbytes: the inner codec's byte count.
    """

    name: str
    inner: Codec
    encode_ef: Callable[
        [Tensor, Tensor | None, torch.Generator], tuple[Encoded, Tensor]
    ]
    decode: Callable[[Encoded], Tensor]
    wire_nbytes: Callable[[int], int]


class Transmission(NamedTuple):
    """What :func:`transmit` returns: the receiver's vector, bytes, the new residual."""

    decoded: Tensor
    nbytes: int
    residual: Tensor | None


# ----------------------------------------------------------------------------- helpers


def _check_vector(x: Tensor, codec: str) -> None:
    if x.dim() != 1:
        raise ValueError(
            f"{codec}: expected a flat 1-D vector, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{codec}: expected a floating-point vector, got dtype {x.dtype}"
        )


def _check_message(enc: Encoded, name: str) -> None:
    if enc.codec != name:
        raise ValueError(
            f"codec {name!r} cannot decode a message encoded by {enc.codec!r}"
        )


def bits_for(max_code: int) -> int:
    """Bits needed to store every integer code in ``[0, max_code]`` (at least 1)."""
    if max_code < 0:
        raise ValueError(f"max_code must be >= 0, got {max_code}")
    return max(1, int(max_code).bit_length())


def _group(bits: int) -> tuple[int, int]:
    """Codes per group and bytes per group, a group being the fewest whole bytes."""
    codes_per_group = 8 // math.gcd(bits, 8)
    return codes_per_group, codes_per_group * bits // 8


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes of ``bits`` bits each into bytes, least-significant bit first.

    Args:
        codes: [n] integer tensor with values in ``[0, 2**bits)``.
        bits: bit width per code, 1..32.

    Returns:
        [ceil(n * bits / 8)] ``uint8`` tensor.

    Raises:
        ValueError: if ``bits`` is out of range or a code does not fit.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    n = codes.numel()
    if n and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(
            f"codes must lie in [0, 2**{bits}), got [{codes.min()}, {codes.max()}]"
        )
    codes = codes.reshape(-1).to(torch.int64)
    g, nbytes_group = _group(bits)
    dev = codes.device
    out = []
    # Chunks (a multiple of 8 codes, so each starts on a byte boundary) bound the size
    # of the temporaries for large d.
    for start in range(0, n, PACK_CHUNK):
        chunk = codes[start : start + PACK_CHUNK]
        if g * bits <= 56:
            # A group of g codes is one <= 56-bit integer: OR the shifted codes, then
            # cut it into bytes. Pad with zero codes to whole groups.
            chunk = torch.cat([chunk, chunk.new_zeros((-chunk.numel()) % g)])
            shifts = bits * torch.arange(g, device=dev)
            word = (chunk.view(-1, g) << shifts).sum(1)  # [groups], no overlapping bits
            byte_shifts = 8 * torch.arange(nbytes_group, device=dev)
            out.append(((word.unsqueeze(1) >> byte_shifts) & 0xFF).reshape(-1))
        else:
            # Wide odd widths: expand to single bits (bits per code * 8 bytes of temp).
            bit_stream = (chunk.unsqueeze(1) >> torch.arange(bits, device=dev)) & 1
            bit_stream = bit_stream.reshape(-1)
            pad = (-bit_stream.numel()) % 8  # only the last chunk is not whole bytes
            bit_stream = torch.cat([bit_stream, bit_stream.new_zeros(pad)])
            out.append((bit_stream.view(-1, 8) << torch.arange(8, device=dev)).sum(1))
    if not out:
        return torch.zeros(0, dtype=torch.uint8, device=dev)
    return torch.cat(out)[: math.ceil(n * bits / 8)].to(torch.uint8)


def unpack_bits(packed: Tensor, n: int, bits: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes (int64 [n])."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    needed = math.ceil(n * bits / 8)
    if packed.numel() < needed:
        raise ValueError(
            f"{n} codes of {bits} bits need {needed} bytes, got {packed.numel()}"
        )
    g, nbytes_group = _group(bits)
    dev = packed.device
    mask = (1 << bits) - 1
    out = []
    for start in range(0, n, PACK_CHUNK):
        count = min(PACK_CHUNK, n - start)
        first = start * bits // 8  # exact: start is a multiple of 8 codes
        chunk = packed[first : first + math.ceil(count * bits / 8)].to(torch.int64)
        if g * bits <= 56:
            chunk = torch.cat([chunk, chunk.new_zeros((-chunk.numel()) % nbytes_group)])
            byte_shifts = 8 * torch.arange(nbytes_group, device=dev)
            word = (chunk.view(-1, nbytes_group) << byte_shifts).sum(1)  # [groups]
            shifts = bits * torch.arange(g, device=dev)
            codes = ((word.unsqueeze(1) >> shifts) & mask).reshape(-1)
        else:
            bit_stream = (chunk.unsqueeze(1) >> torch.arange(8, device=dev)) & 1
            bit_matrix = bit_stream.reshape(-1)[: count * bits].view(count, bits)
            codes = (bit_matrix << torch.arange(bits, device=dev)).sum(1)
        out.append(codes[:count])
    if not out:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    return torch.cat(out)


def _resolve_k(d: int, k: int | None, ratio: float | None) -> int:
    """Number of kept coordinates: ``min(k, d)`` or ``max(1, ceil(ratio * d))``."""
    if k is not None:
        return min(k, d)
    if ratio is None:  # pragma: no cover - factories guarantee one of them
        raise ValueError("one of k or ratio is required")
    return min(d, max(1, math.ceil(ratio * d)))


def _check_sparsity(name: str, k: int | None, ratio: float | None) -> None:
    if (k is None) == (ratio is None):
        raise ValueError(
            f"{name}: give exactly one of k or ratio, got k={k}, ratio={ratio}"
        )
    if k is not None and k < 1:
        raise ValueError(f"{name}: k must be >= 1, got {k}")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name}: ratio must be in (0, 1], got {ratio}")


# ------------------------------------------------------------------------------ codecs


def fp32() -> Codec:
    """Uncompressed float32: the reference channel (lossless for float32 input)."""
    return _float_codec("fp32", torch.float32)


def fp16() -> Codec:
    """IEEE half precision: round-to-nearest, 2 bytes per coordinate.

    Values beyond the fp16 range (|x| > 65504) become inf, as a real fp16 wire would.
    """
    return _float_codec("fp16", torch.float16)


def bf16() -> Codec:
    """bfloat16: float32's exponent range, 8-bit mantissa, 2 bytes per coordinate."""
    return _float_codec("bf16", torch.bfloat16)


def _float_codec(name: str, wire_dtype: torch.dtype) -> Codec:
    element = torch.empty(0, dtype=wire_dtype).element_size()

    def encode(x: Tensor, gen: torch.Generator) -> Encoded:
        del gen  # deterministic rounding
        _check_vector(x, name)
        return Encoded(name, x.numel(), x.dtype, {"values": x.to(wire_dtype)})

    def decode(enc: Encoded) -> Tensor:
        _check_message(enc, name)
        return enc.payload["values"].to(enc.dtype)

    return Codec(
        name=name,
        encode=encode,
        decode=decode,
        wire_nbytes=lambda d: HEADER_NBYTES + element * d,
        unbiased=False,
        params={},
    )


def qsgd(*, levels: int, bucket_size: int | None = 512) -> Codec:
    """QSGD stochastic uniform quantisation with ``s = levels`` levels (unbiased).

    The vector is cut into consecutive buckets of ``B = bucket_size`` coordinates (the
    last one shorter when ``B`` does not divide ``d``), each with its own norm. Each
    coordinate is sent as ``||x_b||_2 * sign(x_i) * l_i / s``, ``x_b`` being its bucket,
    where ``l_i`` is ``floor(s |x_i| / ||x_b||)`` or that plus one, the latter with
    probability equal to the remainder, so ``E[q_i] = x_i``. The variance per coordinate
    is ``(||x_b|| / s)^2 p_i (1 - p_i)`` with ``p_i`` the remainder, and per bucket
    ``E||Q(x_b) - x_b||^2 <= min(B / s^2, sqrt(B) / s) ||x_b||^2`` (the paper's Lemma 3.1
    with ``n = B``), so buckets trade 4 bytes per ``B`` coordinates for a variance that
    no longer grows with ``d``. The signed level ``sign(x_i) l_i`` in ``{-s, ..., s}`` is
    sent as the code ``sign(x_i) l_i + s`` with ``bits = ceil(log2(2 s + 1))`` bits,
    plus one float32 norm per bucket. Dense bit-packing, not the Elias coding of the
    paper.

    Args:
        levels: number of quantisation levels ``s >= 1`` per sign.
        bucket_size: coordinates per norm, ``B >= 1``; 512 as in the reference
            implementations (the paper's experiments and IST-DASLab's code; GRACE uses
            128). ``0`` or ``None``: one norm for the whole vector (the paper's plain
            scheme, whose variance bound grows as ``sqrt(d) / s``).

    Returns:
        The codec.

    Raises:
        ValueError: if ``levels < 1`` or ``bucket_size < 0``.

    References:
        Alistarh, Grubic, Li, Tomioka, Vojnovic. "QSGD: Communication-Efficient SGD via
        Gradient Quantization and Encoding." NeurIPS 2017.
        https://arxiv.org/abs/1610.02132
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"qsgd: levels must be an integer >= 1, got {levels!r}")
    if bucket_size is not None and (
        isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 0
    ):
        raise ValueError(
            f"qsgd: bucket_size must be an integer >= 0 or None, got {bucket_size!r}"
        )
    s = levels
    bits = bits_for(2 * s)
    bucket = bucket_size or 0  # 0: a single bucket spanning the vector

    def layout(d: int) -> tuple[int, int]:
        """(bucket length, number of buckets); a zero-length vector still sends one norm."""
        size = bucket if bucket else max(d, 1)
        return size, max(1, math.ceil(d / size))

    def encode(x: Tensor, gen: torch.Generator) -> Encoded:
        _check_vector(x, "qsgd")
        d = x.numel()
        size, nb = layout(d)
        xf = x.to(torch.float32)
        # Zero padding completes the last bucket; it changes no norm and is not sent.
        rows = torch.cat([xf, xf.new_zeros(nb * size - d)]).view(nb, size)
        norms = torch.linalg.vector_norm(rows, dim=1)  # [nb]
        # A zero bucket has no direction: level 0 everywhere (decodes to zeros).
        tiny = torch.finfo(torch.float32).tiny
        ratio = (rows.abs() / norms.clamp_min(tiny).unsqueeze(1) * s).reshape(-1)[:d]
        low = ratio.floor()
        u = torch.rand(xf.shape, generator=gen, device=xf.device, dtype=torch.float32)
        level = (low + (u < ratio - low).to(torch.float32)).clamp(max=s)  # [d] in [0,s]
        signed = torch.where(xf < 0, -level, level).to(torch.int64)
        codes = pack_bits(signed + s, bits)
        return Encoded("qsgd", d, x.dtype, {"norms": norms, "codes": codes})

    def decode(enc: Encoded) -> Tensor:
        _check_message(enc, "qsgd")
        d = enc.numel
        size, nb = layout(d)
        signed = (unpack_bits(enc.payload["codes"], d, bits) - s).to(torch.float32)
        rows = torch.cat([signed, signed.new_zeros(nb * size - d)]).view(nb, size)
        values = enc.payload["norms"].unsqueeze(1) * rows / s
        return values.reshape(-1)[:d].to(enc.dtype)

    return Codec(
        name="qsgd",
        encode=encode,
        decode=decode,
        wire_nbytes=lambda d: HEADER_NBYTES + 4 * layout(d)[1] + math.ceil(d * bits / 8),
        unbiased=True,
        params={"levels": s, "bits": bits, "bucket_size": bucket},
    )


def _index_payload(
    idx: Tensor, d: int, encoding: IndexEncoding, seed: Tensor | None
) -> dict[str, Tensor]:
    if encoding == "int32":
        return {"indices": idx.to(torch.int32)}
    if encoding == "packed":
        return {"indices": pack_bits(idx, bits_for(d - 1))}
    if seed is None:  # pragma: no cover - factories forbid seed for top_k
        raise ValueError("index_encoding='seed' needs a seed")
    return {"seed": seed}


def _index_nbytes(k: int, d: int, encoding: IndexEncoding) -> int:
    if encoding == "int32":
        return 4 * k
    if encoding == "packed":
        return math.ceil(k * bits_for(d - 1) / 8)
    return 8


def _decode_sparse(
    enc: Encoded, name: str, encoding: IndexEncoding, scale: float
) -> Tensor:
    _check_message(enc, name)
    values = enc.payload["values"]
    k, d = values.numel(), enc.numel
    if encoding == "int32":
        idx = enc.payload["indices"].to(torch.int64)
    elif encoding == "packed":
        idx = unpack_bits(enc.payload["indices"], k, bits_for(d - 1))
    else:
        idx = _seeded_indices(int(enc.payload["seed"]), d, k).to(values.device)
    out = torch.zeros(d, dtype=torch.float32, device=values.device)
    out[idx] = values * (d / k if scale else 1.0)
    return out.to(enc.dtype)


def _seeded_indices(seed: int, d: int, k: int) -> Tensor:
    # The receiver rebuilds the sender's permutation from the 8-byte seed (CPU
    # generator, so both sides agree whatever device the vector lives on).
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return torch.randperm(d, generator=g)[:k]


def _check_index_encoding(name: str, encoding: str, allowed: tuple[str, ...]) -> None:
    if encoding not in allowed:
        raise ValueError(
            f"{name}: index_encoding must be one of {allowed}, got {encoding!r}"
        )


def top_k(
    *,
    k: int | None = None,
    ratio: float | None = None,
    index_encoding: IndexEncoding = "int32",
) -> Codec:
    """Top-k sparsification: keep the ``k`` coordinates of largest magnitude (biased).

    Kept values travel as float32, indices as ``index_encoding`` (see module docstring).
    ``k`` is capped at ``d``; with ``ratio``, ``k = max(1, ceil(ratio * d))``. Ties in
    magnitude are broken by ``torch.topk``. Biased: pair it with error feedback.

    Args:
        k: number of coordinates kept.
        ratio: fraction of coordinates kept, in (0, 1]; exactly one of ``k``, ``ratio``.
        index_encoding: ``"int32"`` or ``"packed"`` (``ceil(log2 d)`` bits per index).

    Returns:
        The codec.

    Raises:
        ValueError: on a bad ``k``, ``ratio`` or ``index_encoding``.

    References:
        Aji, Heafield. "Sparse Communication for Distributed Gradient Descent." EMNLP
        2017. https://arxiv.org/abs/1704.05021 ; Stich, Cordonnier, Jaggi. "Sparsified
        SGD with Memory." NeurIPS 2018. https://arxiv.org/abs/1809.07599
    """
    _check_sparsity("top_k", k, ratio)
    _check_index_encoding("top_k", index_encoding, ("int32", "packed"))

    def encode(x: Tensor, gen: torch.Generator) -> Encoded:
        del gen  # deterministic
        _check_vector(x, "top_k")
        d = x.numel()
        kk = _resolve_k(d, k, ratio)
        idx = torch.topk(x.abs(), kk, sorted=False).indices
        payload = {"values": x[idx].to(torch.float32)}
        payload.update(_index_payload(idx, d, index_encoding, None))
        return Encoded("top_k", d, x.dtype, payload)

    def decode(enc: Encoded) -> Tensor:
        return _decode_sparse(enc, "top_k", index_encoding, scale=False)

    def wire_nbytes(d: int) -> int:
        kk = _resolve_k(d, k, ratio)
        return HEADER_NBYTES + 4 * kk + _index_nbytes(kk, d, index_encoding)

    return Codec(
        name="top_k",
        encode=encode,
        decode=decode,
        wire_nbytes=wire_nbytes,
        unbiased=False,
        params={"k": k, "ratio": ratio, "index_encoding": index_encoding},
    )


def random_k(
    *,
    k: int | None = None,
    ratio: float | None = None,
    unbiased: bool = True,
    index_encoding: IndexEncoding = "int32",
) -> Codec:
    """Random-k sparsification: keep ``k`` coordinates drawn uniformly, no replacement.

    With ``unbiased=True`` the receiver scales kept values by ``d / k`` so that
    ``E[decode(encode(x))] = x`` (variance grows by ``d/k - 1`` times ``||x||^2``); with
    ``unbiased=False`` the kept values are sent as they are (a contraction, for error
    feedback). ``index_encoding="seed"`` sends one int64 seed instead of the indices:
    the receiver regenerates the same permutation.

    Args:
        k: number of coordinates kept.
        ratio: fraction kept, in (0, 1]; exactly one of ``k``, ``ratio``.
        unbiased: scale by ``d / k`` on decode.
        index_encoding: ``"int32"``, ``"packed"`` or ``"seed"``.

    Returns:
        The codec.

    Raises:
        ValueError: on a bad ``k``, ``ratio`` or ``index_encoding``.

    References:
        Wangni, Wang, Liu, Zhang. "Gradient Sparsification for Communication-Efficient
        Distributed Optimization." NeurIPS 2018. https://arxiv.org/abs/1710.09854 ;
        Stich, Cordonnier, Jaggi. "Sparsified SGD with Memory." NeurIPS 2018.
    """
    _check_sparsity("random_k", k, ratio)
    _check_index_encoding("random_k", index_encoding, ("int32", "packed", "seed"))

    def encode(x: Tensor, gen: torch.Generator) -> Encoded:
        _check_vector(x, "random_k")
        d = x.numel()
        kk = _resolve_k(d, k, ratio)
        seed: Tensor | None = None
        if index_encoding == "seed":
            seed = torch.randint(0, 2**62, (), generator=gen, device=gen.device).cpu()
            idx = _seeded_indices(int(seed), d, kk).to(x.device)
        else:
            idx = torch.randperm(d, generator=gen, device=gen.device)[:kk].to(x.device)
        payload = {"values": x[idx].to(torch.float32)}
        payload.update(_index_payload(idx, d, index_encoding, seed))
        return Encoded("random_k", d, x.dtype, payload)

    def decode(enc: Encoded) -> Tensor:
        return _decode_sparse(enc, "random_k", index_encoding, scale=unbiased)

    def wire_nbytes(d: int) -> int:
        kk = _resolve_k(d, k, ratio)
        return HEADER_NBYTES + 4 * kk + _index_nbytes(kk, d, index_encoding)

    return Codec(
        name="random_k",
        encode=encode,
        decode=decode,
        wire_nbytes=wire_nbytes,
        unbiased=unbiased,
        params={
            "k": k,
            "ratio": ratio,
            "unbiased": unbiased,
            "index_encoding": index_encoding,
        },
    )


def sign() -> Codec:
    """Scaled sign compression: each coordinate becomes +-mean(|x|), one bit each.

    The decoded vector is ``(||x||_1 / d) * sign(x)``. One bit per coordinate (1 for
    ``x_i >= 0``, so a zero coordinate decodes to ``+scale``) plus one float32 scale,
    the mean absolute value. Biased; the scaled form is the one whose error-feedback
    variant converges (EF-SignSGD).

    Returns:
        The codec.

    References:
        Bernstein, Wang, Azizzadenesheli, Anandkumar. "signSGD." ICML 2018.
        https://arxiv.org/abs/1802.04434 ; Karimireddy, Rebjock, Stich, Jaggi. "Error
        Feedback Fixes SignSGD and other Gradient Compression Schemes." ICML 2019.
        https://arxiv.org/abs/1901.09847
    """

    def encode(x: Tensor, gen: torch.Generator) -> Encoded:
        del gen  # deterministic
        _check_vector(x, "sign")
        xf = x.to(torch.float32)
        scale = xf.abs().mean() if x.numel() else xf.new_zeros(())
        bits = pack_bits((xf >= 0).to(torch.int64), 1)
        return Encoded(
            "sign", x.numel(), x.dtype, {"scale": scale.reshape(()), "bits": bits}
        )

    def decode(enc: Encoded) -> Tensor:
        _check_message(enc, "sign")
        b = unpack_bits(enc.payload["bits"], enc.numel, 1).to(torch.float32)
        return (enc.payload["scale"] * (2.0 * b - 1.0)).to(enc.dtype)

    return Codec(
        name="sign",
        encode=encode,
        decode=decode,
        wire_nbytes=lambda d: HEADER_NBYTES + 4 + math.ceil(d / 8),
        unbiased=False,
        params={},
    )


# ----------------------------------------------------------------------- error feedback


def with_error_feedback(codec: Codec) -> ErrorFeedbackCodec:
    """Wrap a codec with error feedback (memory of what compression dropped).

    ``encode_ef(x, residual, gen)`` encodes ``p = x + residual`` and returns the message
    with ``new_residual = p - decode(message)``; a ``None`` residual means zeros (first
    round). Hence, over rounds, the decoded messages plus the last residual sum to the
    inputs exactly (up to float rounding): nothing is lost, only delayed.

    Args:
        codec: the codec to wrap.

    Returns:
        The wrapped codec. The residual is per-sender state (one tensor per client for
        an uplink, one for the server for a downlink) kept by the caller.

    References:
        Seide, Fu, Droppo, Li, Yu. "1-Bit Stochastic Gradient Descent and its
        Application to Data-Parallel Distributed Training of Speech DNNs." Interspeech
        2014; Karimireddy et al. ICML 2019 (above); Stich et al. NeurIPS 2018 (above).
    """

    def encode_ef(
        x: Tensor, residual: Tensor | None, gen: torch.Generator
    ) -> tuple[Encoded, Tensor]:
        if residual is not None and residual.shape != x.shape:
            raise ValueError(
                f"error feedback: residual shape {tuple(residual.shape)} differs from "
                f"the vector's {tuple(x.shape)}"
            )
        corrected = x if residual is None else x + residual.to(x.dtype)
        enc = codec.encode(corrected, gen)
        return enc, corrected - codec.decode(enc)

    return ErrorFeedbackCodec(
        name="ef_" + codec.name,
        inner=codec,
        encode_ef=encode_ef,
        decode=codec.decode,
        wire_nbytes=codec.wire_nbytes,
    )


def transmit(
    codec: Codec | ErrorFeedbackCodec,
    x: Tensor,
    residual: Tensor | None,
    gen: torch.Generator,
) -> Transmission:
    """Send ``x`` through ``codec``: the receiver's vector, the bytes, the new residual.

    For a plain codec the residual is returned unchanged (``None`` stays ``None``).
    """
    if isinstance(codec, ErrorFeedbackCodec):
        enc, new_residual = codec.encode_ef(x, residual, gen)
        return Transmission(codec.decode(enc), enc.nbytes, new_residual)
    enc = codec.encode(x, gen)
    return Transmission(codec.decode(enc), enc.nbytes, residual)


# ---------------------------------------------------------------------------- registry

class CodecEntry(NamedTuple):
    """A codec's scenario config class and the factory its fields are the arguments of."""

    config: type[CodecConfig]
    factory: Callable[..., Codec]


def _registry() -> dict[str, CodecEntry]:
    # Imported here: the scenario schema is pydantic, the codecs need only torch, and
    # fedflat.scenario.comm imports nothing of fedflat.comm.
    from fedflat.scenario import comm as sc

    entries = (
        CodecEntry(sc.Fp32Codec, fp32), CodecEntry(sc.Fp16Codec, fp16),
        CodecEntry(sc.Bf16Codec, bf16), CodecEntry(sc.QsgdCodec, qsgd),
        CodecEntry(sc.TopKCodec, top_k), CodecEntry(sc.RandomKCodec, random_k),
        CodecEntry(sc.SignCodec, sign),
    )
    return {e.config.model_fields["codec"].default: e for e in entries}


# The one table of codecs; the names are the configs' ``codec`` literals
# (tests/test_registry.py checks they are the scenario union's).
CODEC_REGISTRY: dict[str, CodecEntry] = _registry()
CODEC_NAMES: tuple[str, ...] = tuple(CODEC_REGISTRY)
_FACTORIES: dict[str, Callable[..., Codec]] = {n: e.factory for n, e in CODEC_REGISTRY.items()}


def make_codec(name: str, **params: Any) -> Codec:
    """Build a codec by registry name with keyword hyperparameters.

    Raises:
        ValueError: on an unknown name or a parameter the codec does not take.
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {list(_FACTORIES)}") from None
    try:
        return factory(**params)
    except TypeError as exc:  # an unexpected keyword
        raise ValueError(f"codec {name!r}: {exc}") from None


def codec_from_config(cfg: CodecConfig) -> Codec | ErrorFeedbackCodec:
    """Build the codec a ``comm.uplink`` / ``comm.downlink`` block describes."""
    codec = CODEC_REGISTRY[cfg.codec].factory(**cfg.factory_kwargs())
    return with_error_feedback(codec) if cfg.error_feedback else codec
