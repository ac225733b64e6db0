import numpy as np
import pytest
import torch

from swarmtrain.compression.wire import (
    TWO_BIT_BLOCK,
    SPARSE_WIRE_VERSION,
    WireFormatError,
    _varint_decode,
    _varint_encode,
    decode_sparse,
    encode_sparse,
)


def _sparse(numel, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    indices = torch.sort(torch.randperm(numel, generator=generator)[:count]).values
    return indices, torch.randn(count, generator=generator) * 3


def test_varint_roundtrip_edges():
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**35 + 7, 2**62], dtype=np.uint64)
    assert np.array_equal(_varint_decode(_varint_encode(values), len(values)), values)
    assert len(_varint_encode(np.array([127, 128], dtype=np.uint64))) == 3


@pytest.mark.parametrize("value_format", ["fp32", "fp16", "8bit", "2bit"])
@pytest.mark.parametrize("numel,count", [(1000, 0), (1000, 1), (100_000, 1000), (10_000, 6000)])
def test_roundtrip_indices_exact_values_bounded(value_format, numel, count):
    indices, values = _sparse(numel, count)
    part = decode_sparse(encode_sparse(indices, values, numel, value_format), expected_numel=numel)
    assert torch.equal(part.indices, indices)
    error = (part.values - values).abs()
    if value_format == "fp32":
        assert torch.equal(part.values, values)
    elif value_format == "fp16":
        assert torch.all(error <= values.abs() * 2**-11 + 1e-7)
    elif value_format == "8bit" and count:
        assert error.max() <= 0.02 * values.abs().max()  # blockwise 8-bit: about 1% of the block max
    elif count:  # 2-bit: the sign is exact, the magnitude is one of its block's two levels
        assert torch.equal(torch.sign(part.values), torch.sign(values))
        assert error.max() <= values.abs().max()
    torch.testing.assert_close(part.to_dense()[indices], part.values)


def test_picks_the_smaller_index_encoding():
    numel = 80_000
    sparse = encode_sparse(*_sparse(numel, 100), numel, "fp16")  # ~2 bytes per index << bitmap (10 kB)
    dense = encode_sparse(*_sparse(numel, 40_000), numel, "fp16")  # bitmap (10 kB) << 40k varints
    assert len(sparse) < 100 * 2 + 100 * 3
    assert len(dense) <= 40_000 * 2 + numel // 8 + 16
    assert decode_sparse(dense).indices.numel() == 40_000


def test_compact_at_one_percent():
    numel = 1_000_000
    encoded = encode_sparse(*_sparse(numel, numel // 100), numel, "fp16")
    assert len(encoded) < 3.5 * numel // 100  # fp16 value + ~1.3 byte index per entry
    encoded_8bit = encode_sparse(*_sparse(numel, numel // 100), numel, "8bit")
    assert len(encoded_8bit) < 2.5 * numel // 100
    encoded_2bit = encode_sparse(*_sparse(numel, numel // 100), numel, "2bit")
    assert len(encoded_2bit) < 1.7 * numel // 100  # a quarter byte per value + the index


def test_other_wire_version_is_refused():
    encoded = bytearray(encode_sparse(*_sparse(100, 5), 100, "fp16"))
    encoded[0] = SPARSE_WIRE_VERSION + 1
    with pytest.raises(WireFormatError, match="version"):
        decode_sparse(bytes(encoded))


def test_malformed_messages_are_rejected():
    numel = 1000
    indices, values = _sparse(numel, 20)
    good = encode_sparse(indices, values, numel, "fp16")
    with pytest.raises(WireFormatError):
        decode_sparse(good[:-1])  # truncated values
    with pytest.raises(WireFormatError):
        decode_sparse(good + b"\x00")  # trailing garbage
    with pytest.raises(WireFormatError):
        decode_sparse(good, expected_numel=999)  # wrong span
    with pytest.raises(WireFormatError):
        decode_sparse(b"\x01")
    nan_values = values.clone()
    nan_values[3] = float("nan")
    for value_format in ("fp32", "fp16"):
        with pytest.raises(WireFormatError, match="non-finite"):
            decode_sparse(encode_sparse(indices, nan_values, numel, value_format))
    # hand-built: a repeated index (zero delta) and an index beyond the span
    header = bytes([SPARSE_WIRE_VERSION, 1 << 1])
    repeated = header + bytes([10, 2, 2, 3, 0]) + np.ones(2, np.float16).tobytes()
    with pytest.raises(WireFormatError, match="increasing"):
        decode_sparse(repeated)
    beyond = header + bytes([10, 1, 1, 12]) + np.ones(1, np.float16).tobytes()
    with pytest.raises(WireFormatError, match="range"):
        decode_sparse(beyond)


def test_encoder_rejects_unsorted_or_out_of_range_indices():
    with pytest.raises(ValueError):
        encode_sparse(torch.tensor([5, 3]), torch.ones(2), 10)
    with pytest.raises(ValueError):
        encode_sparse(torch.tensor([10]), torch.ones(1), 10)
    with pytest.raises(ValueError):
        encode_sparse(torch.tensor([1]), torch.ones(1), 10, "int4")


def test_fp16_overflow_is_clamped_not_inf():
    part = decode_sparse(encode_sparse(torch.tensor([0, 1]), torch.tensor([1e6, -1e6]), 2, "fp16"))
    assert part.values.tolist() == [65504.0, -65504.0]


def test_two_bit_values_keep_signs_and_two_magnitudes_per_block():
    numel, count = 100_000, 2500  # three blocks, the last one partial
    indices, values = _sparse(numel, count)
    encoded = encode_sparse(indices, values, numel, "2bit")
    part = decode_sparse(encoded, expected_numel=numel)
    assert torch.equal(part.indices, indices)
    assert torch.equal(torch.sign(part.values), torch.sign(values))
    for start in range(0, count, TWO_BIT_BLOCK):
        block, decoded = values[start : start + TWO_BIT_BLOCK], part.values[start : start + TWO_BIT_BLOCK]
        levels = torch.unique(decoded.abs())
        assert len(levels) == 2
        # the two levels are the means of the magnitudes on either side of the block's mean magnitude
        split = block.abs().mean()
        high = block.abs() > split
        torch.testing.assert_close(levels, torch.stack([block.abs()[~high].mean(), block.abs()[high].mean()]))
    # better than one magnitude per block (the sign-and-scale 1-bit quantizer), and 2 bits per value
    one_level = torch.sign(values) * values.abs().mean()
    assert (part.values - values).pow(2).sum() < 0.5 * (one_level - values).pow(2).sum()
    value_bytes = -(-count // 4) + 8 * -(-count // TWO_BIT_BLOCK)
    assert len(encoded) == len(encode_sparse(indices, values, numel, "fp32")) - 4 * count + value_bytes


def test_two_bit_edge_cases_and_malformed_levels():
    one = decode_sparse(encode_sparse(torch.tensor([3]), torch.tensor([-0.25]), 10, "2bit"))
    assert one.values.tolist() == [-0.25]
    equal = decode_sparse(encode_sparse(torch.arange(5), torch.full((5,), 2.0), 5, "2bit"))
    assert equal.values.tolist() == [2.0] * 5
    assert decode_sparse(encode_sparse(torch.zeros(0, dtype=torch.long), torch.zeros(0), 10, "2bit")).values.numel() == 0
    for bad in (float("nan"), float("inf")):
        with pytest.raises(WireFormatError, match="levels"):
            decode_sparse(encode_sparse(torch.arange(3), torch.tensor([1.0, bad, -1.0]), 3, "2bit"))
    good = encode_sparse(torch.arange(3), torch.tensor([1.0, 2.0, -1.0]), 3, "2bit")
    negative_level = good[:-4] + np.array([-1.0], np.float32).tobytes()
    with pytest.raises(WireFormatError, match="levels"):
        decode_sparse(negative_level)
    with pytest.raises(WireFormatError, match="value section"):
        decode_sparse(good[:-1])


def test_two_bit_senders_with_fp16_averages_conserve_the_mass():
    """gaussiank:RHO+2bit: senders' values 2-bit, the reducers' averages fp16; error feedback keeps
    Σ w·applied + Σ w_i·residual_i = Σ w_i·corrected_i."""
    from swarmtrain.compression.selection import gaussiank
    from swarmtrain.compression.sparse_reduce import absorb_requantization, apply_averages, reduce_span, sender_payloads, spans
    from swarmtrain.compression.spec import parse_compression_spec

    spec = parse_compression_spec("gaussiank:0.05+2bit")
    assert (spec.value_format, spec.average_format) == ("2bit", "fp16")
    numel, weights = 20_000, [1.0, 2.0, 1.0]
    generator = torch.Generator().manual_seed(3)
    corrected = [torch.randn(numel, generator=generator) ** 3 for _ in weights]
    all_spans = spans(numel, [1.0] * len(weights))
    reducers = list(range(len(weights)))
    payloads = [sender_payloads(c, torch.sort(gaussiank(c, 0.05)).values, all_spans, reducers, spec.value_format)
                for c in corrected]
    reductions = []
    for r, (start, end) in enumerate(all_spans):
        parts = {i: (weights[i], decode_sparse(payloads[i][r], end - start)) for i in range(len(weights))}
        reductions.append(reduce_span(parts, end - start, 0.05, spec.value_format, average_format=spec.average_format))
        assert reductions[-1].encoded[1] >> 1 == 1  # the average travels fp16
    total = torch.zeros(numel, dtype=torch.float64)
    applied = None
    for i, weight in enumerate(weights):
        applied, residual, _ = apply_averages(corrected[i], all_spans, reducers, payloads[i],
                                              [r.encoded for r in reductions], contributed=True)
        absorb_requantization(residual, reductions[i].requantization_error, all_spans[i][0],
                              reductions[i].total_weight, weight)
        total += weight * residual.double()
    total += sum(weights) * applied.double()
    expected = sum(w * c.double() for w, c in zip(weights, corrected))
    assert (total - expected).abs().max() < 1e-4 * expected.abs().max()
