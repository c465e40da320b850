"""csrc/fingerprint.h: the sampled fingerprint each inference cache entry checks on a hit."""
from __future__ import annotations

import pytest
import torch

from pyseqkern import _C

SAMPLES = 64  # Fingerprint::kSamplesPerSpan


def span(t):
    return (t.data_ptr(), t.numel() * t.element_size())


@pytest.mark.parametrize("nbytes", [1, 3, 7, 8, 9, 15, 64, 511, 513, 8 * SAMPLES, 8 * SAMPLES + 1, 1 << 20])
def test_fingerprint_samples_both_ends_and_sees_whole_writes(nbytes):
    buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    fp = _C.Fingerprint([span(buf)])
    assert fp.samples == (nbytes if nbytes < 8 else min(SAMPLES, (nbytes - 8 + 7) // 8 + 1))
    assert fp.matches() and fp.matches()
    for at in (0, nbytes - 1):  # the first and the last byte are always sampled
        buf[at] ^= 1
        assert not fp.matches(), f"a write to byte {at} of {nbytes} went unseen"
        buf[at] ^= 1
        assert fp.matches()
    buf.add_(1)  # a write to every byte
    assert not fp.matches()


def test_fingerprint_sees_any_slice_of_a_64th():
    """Samples are spread evenly: a write to any contiguous 1/64 of a span touches one."""
    buf = torch.randn(1024, 256)
    fp = _C.Fingerprint([span(buf)])
    rows = buf.shape[0] // SAMPLES + 1
    for start in range(0, buf.shape[0] - rows + 1, 7):
        saved = buf[start:start + rows].clone()
        buf[start:start + rows] += 1
        assert not fp.matches(), f"rows {start}..{start + rows} written unseen"
        buf[start:start + rows] = saved
        assert fp.matches()


def test_fingerprint_of_several_spans_and_empty_ones():
    a, b = torch.randn(100), torch.randn(3, dtype=torch.bfloat16)  # (b: 6 bytes, read byte by byte)
    fp = _C.Fingerprint([span(a), (0, 0), span(b), (a.data_ptr(), 0)])
    assert fp.samples == min(SAMPLES, (400 - 8 + 7) // 8 + 1) + 6
    assert fp.matches()
    b[2] = 5.0
    assert not fp.matches()
    assert _C.Fingerprint([]).matches()
