"""One-launch split-K reduction of the decode kernels (W4A16, int8, ternary) vs the atomic path (interpreter)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from quantbench.kernels import int8mm  # noqa: E402
from quantbench.kernels import ternary as T  # noqa: E402

triton_tuning = pytest.importorskip("quantbench.kernels.triton_tuning")
from quantbench.kernels import triton_int8, triton_ternary  # noqa: E402

pytestmark = pytest.mark.triton


def _int8_call(m=3, k=200, n=72, bias=True):
    g = torch.Generator().manual_seed(0)
    xq, xs = int8mm.quantize_per_token(torch.randn(m, k, generator=g))
    wq, ws = int8mm.quantize_weight_per_channel(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    return (lambda: triton_int8.int8_matmul_triton(xq, xs, wq, ws, b)), int8mm.int8_matmul_reference(xq, xs, wq, ws, b)


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(triton_tuning, "_VERIFIED", {})
    monkeypatch.setattr(triton_tuning, "_WORKSPACES", {})


def test_fused_reduction_is_verified_once_and_leaves_the_workspace_zeroed(fresh):
    call, ref = _int8_call()
    for _ in range(2):
        torch.testing.assert_close(call(), ref, rtol=1e-6, atol=1e-5)
    assert triton_tuning.fused_splitk_state("int8", torch.device("cpu")) is True
    ws, cnt = triton_tuning._WORKSPACES["cpu"]
    assert not ws.any() and not cnt.any()


def test_atomic_path_when_disabled(fresh, monkeypatch):
    monkeypatch.setattr(triton_tuning, "FUSED_SPLITK", False)
    call, ref = _int8_call(bias=False)
    torch.testing.assert_close(call(), ref, rtol=1e-6, atol=1e-5)
    assert triton_tuning._WORKSPACES == {}


def test_a_disagreeing_fused_reduction_falls_back(fresh):
    # a dirty workspace makes the fused result wrong: the first-call check must catch it
    triton_tuning.splitk_workspace(torch.device("cpu"), 16 * 1024, 1024)[0].fill_(1.0)
    call, ref = _int8_call()
    with pytest.warns(RuntimeWarning, match="atomic path"):
        out = call()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    assert triton_tuning.fused_splitk_state("int8", torch.device("cpu")) is False
    torch.testing.assert_close(call(), ref, rtol=1e-6, atol=1e-5)  # atomic path from now on


def test_ternary_fused_half_output(fresh):
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-1, 2, (40, 256), generator=g, dtype=torch.int8)
    x = torch.randn(2, 256, generator=g)
    y = triton_ternary.ternary_matmul(x, T.pack_ternary(codes), torch.full((1,), 0.5), out_dtype=torch.float16)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), x.double() @ codes.double().T * 0.5, rtol=2e-3, atol=2e-2)
    assert triton_tuning.fused_splitk_state("ternary", torch.device("cpu")) is True


def test_launch_with_reuses_the_last_config():
    import triton

    calls = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((grid, a, kw))

    class FakeTuned:
        fn = FakeKernel()
        best_config = triton.Config({"BLOCK_M": 16, "SPLIT_K": 4}, num_warps=8, num_stages=3)

    grid = lambda meta: (meta["BLOCK_M"], meta["SPLIT_K"])  # noqa: E731
    assert not triton_tuning.launch_with(FakeTuned(), grid, False, 1, REDUCE=1)
    assert triton_tuning.launch_with(FakeTuned(), grid, True, 1, 2, REDUCE=1)
    assert calls == [((16, 4), (1, 2), {"BLOCK_M": 16, "SPLIT_K": 4, "REDUCE": 1, "num_warps": 8, "num_stages": 3})]
    FakeTuned.best_config = None
    assert not triton_tuning.launch_with(FakeTuned(), grid, True, 1)
