"""csrc/fingerprint.h: the sampled fingerprint each inference cache entry checks on a hit."""
from __future__ import annotations

import pytest
import torch

from pyseqkern import _C

SAMPLES = 64  # Fingerprint::kSamplesPerSpan


def span(t):
    """A flat span: one row of all of t's bytes."""
    return (t.data_ptr(), 1, 0, t.numel() * t.element_size())


def rows(t):
    """A matrix span: t's rows (contiguous each), as ops.param_cache.fingerprint gives a 2-D parameter."""
    return (t.data_ptr(), t.shape[0], t.stride(0) * t.element_size(), t.shape[1] * t.element_size())


def assert_each_write_seen(fp, buf, where):
    """Adds 1 to buf[i] for each index i of `where` in turn: fp must see it, and match again once undone."""
    for i in where:
        saved = buf[i].clone()
        buf[i] += 1
        assert not fp.matches(), f"a write to {i} of {tuple(buf.shape)} went unseen"
        buf[i] = saved
        assert fp.matches()


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
    run = buf.shape[0] // SAMPLES + 1
    assert_each_write_seen(fp, buf, [slice(start, start + run) for start in range(0, buf.shape[0] - run + 1, 7)])


def test_fingerprint_of_several_spans_and_empty_ones():
    a, b = torch.randn(100), torch.randn(3, dtype=torch.bfloat16)  # (b: 6 bytes, read byte by byte)
    fp = _C.Fingerprint([span(a), (0, 1, 0, 0), span(b), (a.data_ptr(), 1, 0, 0), (a.data_ptr(), 0, 8, 8)])
    assert fp.samples == min(SAMPLES, (400 - 8 + 7) // 8 + 1) + 6
    assert fp.matches()
    b[2] = 5.0
    assert not fp.matches()
    assert _C.Fingerprint([]).matches()


@pytest.mark.parametrize("shape,dtype", [((192, 48), torch.float64), ((300, 128), torch.float32),
                                         ((1024, 64), torch.float64), ((7, 13), torch.float32),
                                         ((2, 2), torch.float32), ((33, 4), torch.bfloat16)])
def test_fingerprint_of_a_matrix_sees_every_column_and_every_64th_of_its_rows(shape, dtype):
    """A matrix's sample lies on its diagonal: a write to any whole column of rows of up to 512 bytes is
    seen (a `.data` write pruning one input feature of an LSTM's float64 W_ih, 1/48 of it, went unseen in
    5 of 96 columns with the words spread evenly over the bytes), and so is one to any run of rows of
    about a 64th of them."""
    buf = torch.randn(shape).to(dtype)
    fp = _C.Fingerprint([rows(buf)])
    words_per_row = (shape[1] * buf.element_size() - 8 + 7) // 8 + 1
    assert fp.samples == min(SAMPLES, shape[0] * words_per_row)
    assert fp.matches()
    assert_each_write_seen(fp, buf, [(slice(None), col) for col in range(shape[1])])
    run = shape[0] // SAMPLES + 1
    assert_each_write_seen(fp, buf, [slice(start, start + run) for start in range(shape[0] - run + 1)])


def test_fingerprint_of_a_wide_matrix_sees_any_band_of_a_64th_of_its_columns():
    buf = torch.randn(512, 1024)
    fp = _C.Fingerprint([rows(buf)])
    band = buf.shape[1] // SAMPLES
    bands = [(slice(None), slice(start, start + band)) for start in range(buf.shape[1] - band + 1)]
    assert_each_write_seen(fp, buf, bands)


def test_fingerprint_of_strided_rows_reads_only_the_rows():
    """Rows `row_stride` apart (a view of every other row, a slice of a wider matrix): the sample reads
    inside the rows only, so a write between them is not seen and one in them is."""
    big = torch.randn(200, 40)
    view = big[::2, 3:35]
    fp = _C.Fingerprint([rows(view)])
    big[1::2] += 1  # the rows between
    big[:, :3] += 1
    big[:, 35:] += 1
    assert fp.matches()
    view[:, 31] += 1  # the view's last column
    assert not fp.matches()


def test_fingerprint_refuses_rows_under_a_word():
    buf = torch.randn(10, 1)
    with pytest.raises(ValueError, match="rows of 8 bytes or more"):
        _C.Fingerprint([rows(buf)])
