"""bf16/fp16 on a CPU without their instructions: loom's autocast computes the matrix products and the
attention with fp32 kernels on the low-precision operands (``Fp32Products``), rounding the results back.

Shown here: the products reach the kernels in fp32 there and in the low dtype elsewhere (a recording
mode under loom's sees which); each product's numbers are a native kernel's to one unit in the last
place; what autocast keeps for the backward is unchanged (same bytes, same dtypes); and a bf16
training run gives the losses and weights of one computed with torch's own (emulated) kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from loom.train import precision as precision_module
from loom.train.precision import Fp32Products, autocast

aten = torch.ops.aten
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
KERNELS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu")


class Recorder(TorchDispatchMode):
    """The dtypes of the tensor operands each product or attention kernel is called with (entered
    before loom's autocast, it sees what loom's mode hands on)."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # let torch.compile compile under it, as under loom's

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith(KERNELS):
            self.calls.append((name, {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}))
        return func(*args, **(kwargs or {}))


def _block(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A linear layer, causal attention and a batched product: the kernels a Transformer block runs."""
    h = F.linear(x, w, b)  # (B, T, C)
    q = k = v = h.unflatten(-1, (2, -1)).transpose(1, 2)  # (B, 2, T, C/2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
    return (y @ y.transpose(1, 2)).float().square().mean()


def _leaves(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, requires_grad=True) for s in [(2, 16, 32), (32, 32), (32,)]]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("native", [False, True])
def test_products_reach_the_kernels_in_fp32_only_where_the_cpu_would_emulate_them(precision, native, monkeypatch):
    monkeypatch.setattr(precision_module, "_cpu_runs_natively", lambda dtype: native)
    with Recorder() as seen:
        with autocast(torch.device("cpu"), precision):
            _block(*_leaves()).backward()
    names = {name for name, _ in seen.calls}
    assert {"mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention_for_cpu_backward"} <= names, names
    low = LOW[precision]  # (the attention's backward takes its fp32 log-sum-exp either way)
    assert all((low in dtypes) is native for _, dtypes in seen.calls), seen.calls
    assert all(dtypes <= {low, torch.float32} for _, dtypes in seen.calls), seen.calls


def _native_and_mode(fn, dtype: torch.dtype):
    return fn(), _in_mode(fn, dtype)


def _in_mode(fn, dtype):
    with Fp32Products(dtype):
        return fn()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_each_product_gives_a_native_kernel_s_numbers(dtype):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    a, b, c, bias = r(24, 40), r(40, 48), r(3, 24, 40), r(48)
    d, e = r(3, 40, 48), r(3, 24, 48)
    out_mm, out_addmm = torch.empty(24, 48, dtype=dtype), torch.empty(24, 48, dtype=dtype)
    cases = {
        "mm": lambda: a @ b,
        "addmm": lambda: torch.addmm(bias, a, b),
        "addmm scaled": lambda: torch.addmm(bias, a, b, beta=0.5, alpha=2.0),
        "bmm": lambda: torch.bmm(c, d),
        "baddbmm": lambda: torch.baddbmm(e, c, d, alpha=0.5),
        "mm out=": lambda: torch.mm(a, b, out=out_mm).clone(),
        "addmm out=": lambda: torch.addmm(bias, a, b, out=out_addmm).clone(),
    }
    for name, fn in cases.items():
        native, mode = _native_and_mode(fn, dtype)
        assert mode.dtype == native.dtype == dtype and mode.shape == native.shape, name
        _assert_one_ulp(mode, native, dtype, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ["causal", "boolean", "none"])
def test_attention_and_its_backward_give_a_native_kernel_s_numbers(dtype, mask):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 32, 16, generator=g).to(dtype) for _ in range(3))
    keep = torch.rand(2, 1, 32, 32, generator=g) > 0.3
    keep[..., 0] = True
    grad = torch.randn(2, 4, 32, 16, generator=g).to(dtype)

    def attention(dtype=dtype):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        y = F.scaled_dot_product_attention(*leaves, is_causal=mask == "causal",
                                           attn_mask=keep if mask == "boolean" else None)
        y.backward(grad.to(dtype))
        return [y.detach()] + [t.grad for t in leaves]

    native, mode = _native_and_mode(attention, dtype)
    exact = attention(torch.float64)
    for name, n, m, x in zip(["output", "dq", "dk", "dv"], native, mode, exact):
        assert m.dtype == n.dtype == dtype, name
        # the native kernel rounds its probabilities to dtype before multiplying them with v: many
        # elements differ by a unit in the last place, and the fp32 kernel's are the closer to float64
        _assert_one_ulp(m, n, dtype, name, scale=2, differing=1.0)
        assert (m.double() - x).norm() <= (n.double() - x).norm() * 1.05, name


def _assert_one_ulp(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str, scale: float = 1,
                    differing: float = 0.1) -> None:
    """Equal but for the order of fp32 sums: a few units in the last place of the larger elements (the
    tolerance is relative to the output's magnitude, where a cancelled sum's last place lies)."""
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp * scale,
                               atol=2 * ulp * scale * want.float().abs().max().item(), msg=name)
    share = (got != want).float().mean().item()
    assert share <= differing, f"{name}: {share:.3f} of the elements differ"


def _saved_for_backward(native: bool, monkeypatch) -> list[tuple[torch.dtype, torch.Size]]:
    monkeypatch.setattr(precision_module, "_cpu_runs_natively", lambda dtype: native)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(torch.device("cpu"), "bf16"):
            loss = _block(*_leaves())
    loss.backward()
    return saved


def test_autocast_keeps_the_same_tensors_for_the_backward(monkeypatch):
    """The mode sits below autograd: the backward keeps autocast's bf16 activations, no fp32 copies."""
    emulated, native = _saved_for_backward(False, monkeypatch), _saved_for_backward(True, monkeypatch)
    assert sorted(map(str, emulated)) == sorted(map(str, native))
    assert any(dtype == torch.bfloat16 for dtype, _ in emulated)


@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_a_bf16_run_trains_as_with_torch_s_own_kernels(model, monkeypatch):
    """Losses and weights of a few bf16 steps against the same run on torch's own (emulated) kernels,
    within bf16 rounding (the tolerance of the bf16 layout checks)."""
    from tests.distributed.parity import assert_matches_roughly, train_single

    runs = {}
    for native in (True, False):
        monkeypatch.setattr(precision_module, "_cpu_runs_natively", lambda dtype, native=native: native)
        runs[native] = train_single(model, ["train.precision=bf16"])
    # test_parity's bf16 SMOKE_TOLERANCE
    assert_matches_roughly(runs[False], runs[True], loss_rtol=1e-3, matrix_rtol=0.1)


def test_recomputation_recomputes_the_same_products(monkeypatch):
    """Recomputation runs the forward again inside the backward, under the same mode: a bf16 run with
    selective or full recompute gives bit for bit the losses and weights of one without (a backward run
    outside the mode would recompute with torch's own kernels, which round otherwise)."""
    from tests.distributed.parity import train_single

    monkeypatch.setattr(precision_module, "_cpu_runs_natively", lambda dtype: False)
    plain = train_single("gpt", ["train.precision=bf16"])
    for recompute in ("selective", "full"):
        got = train_single("gpt", ["train.precision=bf16", f"parallel.recompute={recompute}"])
        assert got["losses"] == plain["losses"], recompute
        assert all(torch.equal(got["params"][k], v) for k, v in plain["params"].items()), recompute

@pytest.mark.slow
def test_compiled_bf16_training_keeps_fp32_products(monkeypatch):
    """Inductor's code calls its matrix products as out= kernels (``extern_kernels.mm``): the mode takes
    those as well, and dynamo compiles under it (a mode that did not let it would leave the blocks
    eager). The compiled run's losses and weights are the eager bf16 run's, within bf16 rounding.
    Inductor builds C++ (tens of seconds): marked slow."""
    from torch._dynamo.utils import counters

    from tests.distributed.parity import assert_matches_roughly, train_single

    monkeypatch.setattr(precision_module, "_cpu_runs_natively", lambda dtype: False)
    eager = train_single("gpt", ["train.precision=bf16"])
    torch._dynamo.reset()
    counters.clear()
    with Recorder() as seen:
        compiled = train_single("gpt", ["train.precision=bf16", "train.compile=true"])
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    products = [dtypes for name, dtypes in seen.calls if not name.startswith("_scaled")]
    assert products and all(torch.bfloat16 not in dtypes for dtypes in products), seen.calls
    assert_matches_roughly(compiled, eager, loss_rtol=1e-3, matrix_rtol=0.1)
