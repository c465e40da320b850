"""The shared helpers must be able to fail: each check is shown rejecting a bad value."""
import pytest
import torch

from helpers import (TOLERANCES, assert_bitwise_equal, assert_close_to_ref, assert_within_torch_error, poisoned,
                     randn, strided)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 113), (2, 1, 5)])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_strided_is_a_nonzero_noncontiguous_view(shape, dtype):
    x = strided(shape, dtype=dtype, seed=3)
    assert x.shape == shape and x.dtype == dtype
    assert not x.is_contiguous() or x.numel() == 1
    assert x.storage_offset() > 0
    assert (x != 0).all()
    assert torch.equal(strided(shape, dtype=dtype, seed=3), x)  # seeded


def test_poisoned_is_all_nan():
    assert torch.isnan(poisoned((4, 5))).all()


def test_close_to_ref_rejects_errors_nan_and_shape():
    ref = randn((50,), dtype=torch.float64)
    assert_close_to_ref(ref.float(), ref)
    with pytest.raises(AssertionError, match="max abs err"):
        assert_close_to_ref((ref + 1e-3).float(), ref)
    bad = ref.float().clone()
    bad[3] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_ref(bad, ref)
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_ref(ref[:10].float(), ref)


def test_within_torch_error_rule():
    ref = randn((200,), dtype=torch.float64)
    theirs = ref.float()
    assert_within_torch_error(ref.float(), theirs, ref)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_within_torch_error((ref * (1 + 1e-4)).float(), theirs, ref)
    bad = ref.float().clone()
    bad[7] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_within_torch_error(bad, theirs, ref)


def test_bitwise_equal_sees_one_ulp_and_nan_payloads():
    a = randn((9,))
    b = a.clone()
    assert_bitwise_equal(a, b)
    b[4] = torch.nextafter(b[4], torch.tensor(float("inf")))
    with pytest.raises(AssertionError, match="bitwise"):
        assert_bitwise_equal(a, b)
