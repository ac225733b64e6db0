"""Compact, versioned wire encoding of one sparse vector (flat indices into a span + values).

Layout (all integers LEB128 varints unless noted)::

    byte    SPARSE_WIRE_VERSION          peers refuse any other version
    byte    flags                 bit 0: indices as bitmap (else delta varints); bits 1-2: value format
    varint  numel                 length of the dense span the indices point into
    varint  count                 number of (index, value) pairs
    varint  index_bytes           length of the index section
    ...     index section         bitmap: ceil(numel/8) bytes, little bit order (numpy packbits "little")
                                  deltas: first index, then successive differences (each >= 1)
    ...     value section         fp32: 4*count | fp16: 2*count |
                                  8bit: count codes + float32 absmax per EIGHT_BIT_BLOCK values
                                  (bitsandbytes blockwise dynamic quantization, fixed dynamic map) |
                                  2bit: ceil(count/4) bytes of 2-bit codes (four per byte, first value
                                  in the lowest bits) + two float32 levels per TWO_BIT_BLOCK values

Indices are always exact; the smaller of bitmap and delta-varint is chosen per message. Values are
rounded: fp16 keeps a relative error <= 2^-11 (within fp16 range), 8-bit blockwise keeps the error of
each value within about 1% of its block's largest magnitude, and 2-bit keeps the sign and one of two
magnitudes per block (see :func:`_two_bit_levels`): coarse, meant for error-feedback senders, whose
rounding stays in their residual (SparseLoCo's 2-bit values). Decoding validates everything a malicious or
buggy peer could get wrong (version, lengths, index order and range, finiteness) and raises
:class:`WireFormatError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

SPARSE_WIRE_VERSION = 1  # of this message format (the swarm protocol has its own: net.run_config.PROTOCOL_VERSION)
VALUE_FORMATS = {"fp32": 0, "fp16": 1, "8bit": 2, "2bit": 3}  # a 2-bit field of the flags byte: this is all of it
_FORMAT_NAMES = {code: name for name, code in VALUE_FORMATS.items()}
EIGHT_BIT_BLOCK = 1024  # values per absmax; 4 bytes / 1024 values is 0.4% overhead
TWO_BIT_BLOCK = 1024  # values per pair of float32 levels: 8 bytes / 1024 values is 0.06 bit per value
_FLAG_BITMAP = 1
FP16_MAX = 65504.0


class WireFormatError(ValueError):
    """A message that is not a valid sparse part of our wire version."""


@dataclass
class SparsePart:
    numel: int
    indices: torch.Tensor  # int64, strictly increasing, < numel
    values: torch.Tensor  # float32, finite, same length as indices

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.numel, dtype=torch.float32)
        dense.index_add_(0, self.indices, self.values)
        return dense


def _varint_encode(values: np.ndarray) -> bytes:
    """Vectorized LEB128 of non-negative integers."""
    values = np.asarray(values, dtype=np.uint64)
    if values.size == 0:
        return b""
    # a value needs one byte per started 7 bits: count how many 7-bit boundaries it reaches
    num_bytes = np.ones(values.shape, dtype=np.int64)
    for boundary in range(1, 10):
        num_bytes += values >= (np.uint64(1) << np.uint64(7 * boundary))
    max_bytes = int(num_bytes.max())
    shifts = (7 * np.arange(max_bytes, dtype=np.uint64))[None, :]
    groups = ((values[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
    position = np.arange(max_bytes)[None, :]
    groups[position < (num_bytes[:, None] - 1)] |= 0x80  # continuation bit on all but the last byte
    return groups[position < num_bytes[:, None]].tobytes()


def _varint_decode(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    terminators = np.flatnonzero((raw & 0x80) == 0)
    if len(terminators) != count or (count > 0 and terminators[-1] != len(raw) - 1):
        raise WireFormatError(f"index section holds {len(terminators)} varints, expected {count}")
    if count == 0:
        if len(raw):
            raise WireFormatError("index bytes present for an empty part")
        return np.zeros(0, dtype=np.uint64)
    starts = np.concatenate([[0], terminators[:-1] + 1])
    lengths = terminators - starts + 1
    if lengths.max() > 9:  # > 63 bits
        raise WireFormatError("varint too long")
    position = np.arange(len(raw)) - np.repeat(starts, lengths)
    shifted = (raw & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
    return np.add.reduceat(shifted, starts)


def _read_varint(buffer: memoryview, offset: int) -> Tuple[int, int]:
    result, shift = 0, 0
    while True:
        if offset >= len(buffer) or shift > 63:
            raise WireFormatError("truncated or oversized header varint")
        byte = buffer[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, offset


def _header_varint(value: int) -> bytes:
    return _varint_encode(np.array([value], dtype=np.uint64))


def _encode_values(values: torch.Tensor, value_format: str) -> bytes:
    values = values.detach().to(torch.float32).reshape(-1).contiguous()
    if value_format == "fp32":
        return values.numpy().tobytes()
    if value_format == "fp16":
        # clamp instead of producing inf: an inf would be rejected by every receiver
        return values.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).numpy().tobytes()
    if value_format == "8bit":
        if values.numel() == 0:
            return b""
        import bitsandbytes.functional as bnb_functional  # imported lazily: its import is slow and chatty

        codes, state = bnb_functional.quantize_blockwise(values, blocksize=EIGHT_BIT_BLOCK)
        return codes.numpy().tobytes() + state.absmax.to(torch.float32).numpy().tobytes()
    if value_format == "2bit":
        return _encode_two_bit(values)
    raise ValueError(f"unknown value format {value_format!r}; use one of {sorted(VALUE_FORMATS)}")


def _two_bit_levels(magnitudes: torch.Tensor, present: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(low, high) magnitude levels of each block (a row of `magnitudes`; `present` marks the real
    values of a padded last block), and which values take the high one. One Lloyd step of a
    two-level quantizer of the magnitudes: split at the block's mean magnitude, each level the mean of
    its side (a side left empty takes the other's level). A non-finite value makes its block's levels
    non-finite, which every receiver refuses."""
    counts = present.sum(1, keepdim=True).clamp(min=1)
    split = (magnitudes * present).sum(1, keepdim=True) / counts
    high = present & (magnitudes > split)
    low = present & ~high

    def side_mean(side):
        return (magnitudes * side).sum(1) / side.sum(1).clamp(min=1)

    low_level, high_level = side_mean(low), side_mean(high)
    low_level = torch.where(low.any(1), low_level, high_level)
    high_level = torch.where(high.any(1), high_level, low_level)
    return torch.stack([low_level, high_level], dim=1), high


def _encode_two_bit(values: torch.Tensor) -> bytes:
    count = values.numel()
    if count == 0:
        return b""
    num_blocks = -(-count // TWO_BIT_BLOCK)
    magnitudes = torch.zeros(num_blocks * TWO_BIT_BLOCK)
    magnitudes[:count] = values.abs()
    present = (torch.arange(num_blocks * TWO_BIT_BLOCK) < count).view(num_blocks, TWO_BIT_BLOCK)
    levels, high = _two_bit_levels(magnitudes.view(num_blocks, TWO_BIT_BLOCK), present)
    codes = (values < 0).to(torch.uint8) | (high.reshape(-1)[:count].to(torch.uint8) << 1)
    codes = np.pad(codes.numpy(), (0, -count % 4)).reshape(-1, 4)
    packed = (codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)).astype(np.uint8)
    return packed.tobytes() + levels.to(torch.float32).numpy().tobytes()


def _decode_two_bit(data: memoryview, count: int) -> torch.Tensor:
    num_blocks = -(-count // TWO_BIT_BLOCK)
    code_bytes = -(-count // 4)
    if len(data) != code_bytes + 8 * num_blocks:
        raise WireFormatError(f"value section has {len(data)} bytes, expected {code_bytes + 8 * num_blocks}")
    if count == 0:
        return torch.zeros(0)
    packed = np.frombuffer(data[:code_bytes], dtype=np.uint8)
    codes = np.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], axis=1).reshape(-1)[:count]
    levels = np.frombuffer(data[code_bytes:], dtype=np.float32).reshape(num_blocks, 2)
    if not np.isfinite(levels).all() or (levels < 0).any():
        raise WireFormatError("2-bit levels must be finite and non-negative")
    magnitudes = levels[np.arange(count) // TWO_BIT_BLOCK, codes >> 1]
    return torch.from_numpy(np.where(codes & 1, -magnitudes, magnitudes).astype(np.float32))


_DYNAMIC_MAP = None


def _decode_values(data: memoryview, count: int, value_format: str) -> torch.Tensor:
    if value_format == "fp32":
        expected = 4 * count
        if len(data) != expected:
            raise WireFormatError(f"value section has {len(data)} bytes, expected {expected}")
        values = torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy())
    elif value_format == "fp16":
        if len(data) != 2 * count:
            raise WireFormatError(f"value section has {len(data)} bytes, expected {2 * count}")
        values = torch.from_numpy(np.frombuffer(data, dtype=np.float16).astype(np.float32))
    elif value_format == "2bit":
        values = _decode_two_bit(data, count)
    else:  # 8bit
        num_blocks = -(-count // EIGHT_BIT_BLOCK)
        if len(data) != count + 4 * num_blocks:
            raise WireFormatError(f"value section has {len(data)} bytes, expected {count + 4 * num_blocks}")
        if count == 0:
            return torch.zeros(0)
        global _DYNAMIC_MAP
        import bitsandbytes.functional as bnb_functional

        if _DYNAMIC_MAP is None:
            _DYNAMIC_MAP = bnb_functional.create_dynamic_map()
        codes = torch.from_numpy(np.frombuffer(data[:count], dtype=np.uint8).copy())
        absmax = torch.from_numpy(np.frombuffer(data[count:], dtype=np.float32).copy())
        if not torch.isfinite(absmax).all():
            raise WireFormatError("non-finite block scale")
        values = bnb_functional.dequantize_blockwise(
            codes, absmax=absmax, code=_DYNAMIC_MAP, blocksize=EIGHT_BIT_BLOCK
        ).to(torch.float32)
    if not torch.isfinite(values).all():
        raise WireFormatError("non-finite value")
    return values


def encode_sparse(indices: torch.Tensor, values: torch.Tensor, numel: int, value_format: str = "fp16") -> bytes:
    """Encode sorted, distinct flat ``indices`` (< numel) with their ``values``."""
    if value_format not in VALUE_FORMATS:
        raise ValueError(f"unknown value format {value_format!r}; use one of {sorted(VALUE_FORMATS)}")
    index_array = indices.detach().cpu().reshape(-1).numpy().astype(np.int64)
    count = len(index_array)
    if count != values.numel():
        raise ValueError(f"{count} indices but {values.numel()} values")
    if count and (index_array[0] < 0 or index_array[-1] >= numel or np.any(np.diff(index_array) <= 0)):
        raise ValueError("indices must be sorted, distinct and within [0, numel)")

    deltas = np.diff(index_array, prepend=0).astype(np.uint64) if count else np.zeros(0, np.uint64)
    varint_section = _varint_encode(deltas)
    bitmap_size = (numel + 7) // 8
    flags = VALUE_FORMATS[value_format] << 1
    if bitmap_size < len(varint_section):
        mask = np.zeros(numel, dtype=bool)
        mask[index_array] = True
        index_section = np.packbits(mask, bitorder="little").tobytes()
        flags |= _FLAG_BITMAP
    else:
        index_section = varint_section
    header = bytes([SPARSE_WIRE_VERSION, flags]) + _header_varint(numel) + _header_varint(count)
    header += _header_varint(len(index_section))
    return header + index_section + _encode_values(values, value_format)


def decode_sparse(data: bytes, expected_numel: int = None) -> SparsePart:
    """Decode and validate a message from :func:`encode_sparse`; raise WireFormatError if malformed."""
    buffer = memoryview(data)
    if len(buffer) < 2:
        raise WireFormatError("message too short")
    if buffer[0] != SPARSE_WIRE_VERSION:
        raise WireFormatError(f"wire version {buffer[0]} is not ours ({SPARSE_WIRE_VERSION}); refusing to average")
    flags = buffer[1]
    value_format = _FORMAT_NAMES.get(flags >> 1)
    if value_format is None:
        raise WireFormatError(f"unknown value format code {flags >> 1}")
    numel, offset = _read_varint(buffer, 2)
    count, offset = _read_varint(buffer, offset)
    index_bytes, offset = _read_varint(buffer, offset)
    if expected_numel is not None and numel != expected_numel:
        raise WireFormatError(f"span length {numel} != expected {expected_numel}")
    if count > numel or offset + index_bytes > len(buffer):
        raise WireFormatError("count or index section length inconsistent with message")
    index_section = buffer[offset : offset + index_bytes]
    value_section = buffer[offset + index_bytes :]
    if flags & _FLAG_BITMAP:
        if index_bytes != (numel + 7) // 8:
            raise WireFormatError("bitmap length does not match span length")
        bits = np.unpackbits(np.frombuffer(index_section, dtype=np.uint8), bitorder="little")
        if bits[numel:].any():
            raise WireFormatError("bitmap has bits beyond the span")
        index_array = np.flatnonzero(bits[:numel]).astype(np.int64)
        if len(index_array) != count:
            raise WireFormatError(f"bitmap holds {len(index_array)} indices, header says {count}")
    else:
        deltas = _varint_decode(bytes(index_section), count)
        if count and np.any(deltas[1:] == 0):
            raise WireFormatError("indices are not strictly increasing")
        if count and deltas.max() >= numel:
            raise WireFormatError("index out of range")
        index_array = np.cumsum(deltas, dtype=np.uint64).astype(np.int64)
        if count and index_array[-1] >= numel:
            raise WireFormatError("index out of range")
    values = _decode_values(value_section, count, value_format)
    return SparsePart(numel, torch.from_numpy(index_array), values)
