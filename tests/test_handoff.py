"""The DLPack handoff: C++ sees exactly the pointer, shape, strides, dtype and device torch has."""
import pytest
import torch
from torch.utils.dlpack import to_dlpack

from pyseqkern import _C
from helpers import devices, randn, strided

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool]


def expected(t):
    dev = "cpu" if t.device.type == "cpu" else "cuda"
    return (t.data_ptr(), str(t.dtype).replace("torch.", ""), dev, t.device.index or 0, tuple(t.shape))


def make(kind, dtype, device):
    if kind == "strided":
        return strided((5, 3, 7), dtype, device, seed=2)
    base = randn((7, 113), dtype, device, seed=1)
    return {"contiguous": base, "transposed": base.t(), "expanded": base[0].expand(4, 113),
            "scalar": base[2, 3], "empty": base[:0]}[kind]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contiguous", "strided", "transposed", "expanded", "scalar", "empty"])
def test_describe_matches_torch(device, dtype, kind):
    t = make(kind, dtype, device)
    ptr, dt, dev, index, sizes, strides = _C.describe(to_dlpack(t))
    assert (ptr, dt, dev, index, sizes) == expected(t)
    # torch may normalize strides of size-1 dimensions, and of every dimension of an empty tensor (torch
    # 2.4 exports torch.empty(0, 7) with strides (1, 1)): there they address nothing.
    for size, got, want in zip(t.shape, strides, t.stride()):
        assert size == 1 or t.numel() == 0 or got == want


def test_handoff_noop_takes_six_tensors():
    ts = [randn((3, 4), seed=i) for i in range(6)]
    assert _C.handoff_noop(*[to_dlpack(t) for t in ts]) is None


def test_rejects_non_capsules_and_used_capsules():
    with pytest.raises(TypeError, match="argument 'tensor': expected an unconsumed DLPack capsule"):
        _C.describe(torch.ones(3))
    cap = to_dlpack(torch.ones(3))
    torch.utils.dlpack.from_dlpack(cap)  # consumes it (renamed to used_dltensor)
    with pytest.raises(TypeError, match="unconsumed DLPack capsule"):
        _C.describe(cap)


def test_rejects_unsupported_dtype_and_too_many_dims():
    # (torch's names: they had read "DLPack code 5, 64 bits")
    with pytest.raises(TypeError, match="argument 'tensor': unsupported dtype complex64 "):
        _C.describe(to_dlpack(torch.ones(3, dtype=torch.complex64)))
    with pytest.raises(TypeError, match="unsupported dtype uint8 "):
        _C.describe(to_dlpack(torch.ones(3, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="at most 8 dimensions, got 9"):
        _C.describe(to_dlpack(torch.ones([1] * 9)))


@pytest.mark.cuda
def test_mixed_devices_are_rejected_naming_the_argument():
    ts = [torch.ones(2) for _ in range(6)]
    ts[4] = ts[4].cuda()
    with pytest.raises(ValueError, match="argument 'e' is on cuda:0 but 'a' is on cpu"):
        _C.handoff_noop(*[to_dlpack(t) for t in ts])
