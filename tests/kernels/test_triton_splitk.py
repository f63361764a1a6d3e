"""Split-K of the decode kernels (W4A16, int8, ternary): the shared epilogue vs torch, and the one-launch
reduction vs the atomic path (interpreter)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from quantbench.kernels import int8mm  # noqa: E402
from quantbench.kernels import ternary as T  # noqa: E402

triton_tuning = pytest.importorskip("quantbench.kernels.triton_tuning")
triton = pytest.importorskip("triton")
tl = triton.language
from quantbench.kernels import triton_int8, triton_ternary  # noqa: E402

pytestmark = pytest.mark.triton


@triton.jit
def _epilogue_kernel(
    p_ptr,
    bias_ptr,
    c_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    REDUCE: tl.constexpr,
):
    # tile program_id(0), split program_id(1): its partial is p[split], read through wrapped indices
    # (as the GEMM kernels do) so the out-of-range lanes hold real values the epilogue must mask
    n_tiles = tl.cdiv(N, BLOCK_N)
    offs_m = (tl.program_id(0) // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    y = tl.load(p_ptr + tl.program_id(1) * M * N + (offs_m % M)[:, None] * N + (offs_n % N)[None, :])
    triton_tuning.splitk_epilogue(y, bias_ptr, c_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                                  HAS_BIAS, SPLIT_K, REDUCE)  # fmt: skip


# (SPLIT_K, REDUCE, c's dtype): no split (plain store), one-launch reduction, atomics into a zeroed fp32 c
@pytest.mark.parametrize(
    "split_k,reduce,out_dtype",
    [(1, 0, torch.float32), (1, 0, torch.float16), (3, 2, torch.float32), (3, 2, torch.float16), (3, 1, torch.float32)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_shared_epilogue_matches_torch(split_k, reduce, out_dtype, bias):
    M, N, bm, bn = 5, 40, 16, 16
    g = torch.Generator().manual_seed(1)
    parts = torch.randint(-64, 64, (split_k, M, N), generator=g).float() / 8  # exact sums in any order
    b = torch.randint(-64, 64, (N,), generator=g).float() / 4 if bias else None
    ref = (parts.sum(0) + (b if bias else 0)).to(out_dtype)
    out = (torch.zeros if reduce == 1 else torch.empty)(M, N, dtype=out_dtype).t().contiguous().t()  # column-major c
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    ws, cnt = torch.zeros(M * N), torch.zeros(tiles, dtype=torch.int32)
    _epilogue_kernel[(tiles, split_k)](parts, b if bias else parts, out, ws, cnt, M, N, out.stride(0), out.stride(1),
                                       bias, bm, bn, split_k, reduce)  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not ws.any() and not cnt.any()  # the one-launch reduction leaves its workspace zeroed


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


def test_launch_tuned_reruns_atomics_after_autotuning():
    class FakeTuned:  # each launch adds 1 to out; a call with a new key benchmarks three configs first
        best_config, cache = None, {}

        def __getitem__(self, grid):
            def run(out, REDUCE):
                runs = 1 if "key" in self.cache else 4
                self.cache["key"] = True
                out += runs

            return run

    out = torch.zeros(2)
    triton_tuning.launch_tuned(FakeTuned(), None, False, out, 1, out)
    assert out.tolist() == [1.0, 1.0]  # zeroed after the autotuning call, then run once
    FakeTuned.cache = {}
    triton_tuning.launch_tuned(FakeTuned(), None, False, out, 2, out)
    assert out.tolist() == [5.0, 5.0]  # REDUCE = 2 adds nothing into a zeroed out: no rerun
