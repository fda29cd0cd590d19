"""ACON activations against the paper's mathematics and the authors' released module layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import acon.fused
from acon import AconA, AconB, AconC, MetaAconC, ReLU, Swish
from acon.functional import acon_c_reference

C = 4


def _set(module: nn.Module, **values: float | torch.Tensor) -> nn.Module:
    """Fill the named per-channel parameters of ``module`` with constants or per-channel tensors."""
    with torch.no_grad():
        for name, v in values.items():
            param = getattr(module, name)
            flat = torch.as_tensor(v, dtype=param.dtype).flatten()
            param.copy_(flat.expand(param.numel()).reshape(param.shape))
    return module


def _all_modules(channels: int = C) -> list[nn.Module]:
    """One instance of every activation module, on small sizes."""
    return [
        ReLU(channels),
        Swish(channels),
        Swish(channels, learnable_beta=False),
        AconA(channels),
        AconB(channels),
        AconC(channels),
        MetaAconC(channels, r=2),
    ]


# ---- the paper's limits and special cases --------------------------------------------------------


@pytest.mark.slow  # long; run with -m slow
def test_acon_c_beta_to_zero_is_the_mean():
    torch.manual_seed(0)
    x = torch.linspace(-6, 6, 241).repeat(2, C, 1).double()
    act = _set(AconC(C).double(), beta=1e-7)
    p1, p2 = act.p1.view(1, C, 1), act.p2.view(1, C, 1)
    assert torch.allclose(act(x), (p1 + p2) / 2 * x, atol=1e-5, rtol=0)
    # and it is not the mean at β = 1 (the check can fail)
    assert not torch.allclose(_set(act, beta=1.0)(x), (p1 + p2) / 2 * x, atol=1e-2)


@pytest.mark.parametrize("beta", [1e2, 1e4, 1e6])
def test_acon_c_beta_to_infinity_is_the_max(beta):
    torch.manual_seed(0)
    x = torch.cat([torch.linspace(-6, 6, 241), torch.tensor([0.0, 1e-7, -1e-7])]).repeat(2, C, 1).double()
    act = _set(AconC(C).double(), p1=[1.2, -0.8, 2.0, 0.5], p2=[-0.8, 1.2, 0.5, 0.5], beta=beta)
    p1, p2 = act.p1.view(1, C, 1), act.p2.view(1, C, 1)
    want = torch.maximum(p1 * x, p2 * x)
    # |smooth max - max| <= 0.2785 / β (max over z of z·σ(-z)); the error is largest near x = 0
    err = (act(x) - want).abs().max().item()
    assert err <= 0.2785 / beta + 1e-12
    far = x.abs() > 50 / beta
    assert torch.allclose(act(x)[far.expand_as(want)], want[far.expand_as(want)], atol=1e-12, rtol=1e-12)


def test_acon_c_with_p1_1_p2_0_beta_1_is_silu():
    torch.manual_seed(0)
    x = torch.randn(3, C, 5, 5)
    act = _set(AconC(C), p1=1.0, p2=0.0, beta=1.0)
    torch.testing.assert_close(act(x), F.silu(x))


def test_swish_equals_acon_a_and_fixed_swish_is_silu():
    torch.manual_seed(0)
    x = torch.randn(3, C, 5, 5)
    beta = torch.tensor([0.3, 1.0, 2.5, -1.0])
    swish, acon_a = _set(Swish(C), beta=beta), _set(AconA(C), beta=beta)
    torch.testing.assert_close(swish(x), acon_a(x))
    torch.testing.assert_close(acon_a(x), x * torch.sigmoid(beta.view(1, C, 1, 1) * x))
    assert [n for n, _ in acon_a.named_parameters()] == ["beta"]
    fixed = Swish(C, learnable_beta=False)
    assert list(fixed.parameters()) == [] and "beta" in fixed.state_dict()
    torch.testing.assert_close(fixed(x), F.silu(x))


def test_acon_b_is_acon_c_with_p1_1():
    torch.manual_seed(0)
    x = torch.randn(3, C, 5, 5)
    b = _set(AconB(C), p=[0.25, -0.5, 1.5, 0.0], beta=[0.5, 1.0, 3.0, 10.0])
    c = _set(AconC(C), p1=1.0, p2=b.p.detach().flatten(), beta=b.beta.detach().flatten())
    torch.testing.assert_close(b(x), c(x))
    # the smooth PReLU: far from 0 it is max(x, p·x)
    big, p = torch.full((1, C, 1, 1), 1e3), b.p.detach()
    for v in (big, -big):
        torch.testing.assert_close(b(v), torch.maximum(v, p * v))


def test_initialisation_matches_the_authors():
    torch.manual_seed(0)
    for act in (AconC(4096), MetaAconC(4096)):
        for name in ("p1", "p2"):
            p = getattr(act, name).detach()
            assert p.shape == (1, 4096, 1, 1)
            assert abs(p.mean().item()) < 0.1 and abs(p.std().item() - 1.0) < 0.1, name
    assert torch.equal(AconC(8).beta.detach(), torch.ones(1, 8, 1, 1))


# ---- the first derivative ------------------------------------------------------------------------


def _derivative(p1: float, p2: float, beta: float, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    t = lambda v: torch.tensor(v, dtype=x.dtype)  # noqa: E731
    (grad,) = torch.autograd.grad(acon_c_reference(x, t(p1), t(p2), t(beta)).sum(), x)
    return grad


@pytest.mark.parametrize("p1,p2", [(1.0, 0.0), (1.2, -0.8), (0.3, 0.25), (-0.5, -2.0)])
@pytest.mark.parametrize("beta", [0.01, 1.0, 7.0, 1e3])
def test_acon_c_derivative_bounds_and_limits(p1, p2, beta):
    z = torch.linspace(-30, 30, 60001, dtype=torch.float64)  # z = β(p1 - p2)x covers both extrema
    d = _derivative(p1, p2, beta, z / (beta * (p1 - p2)))
    upper, lower = 1.0998 * p1 - 0.0998 * p2, 1.0998 * p2 - 0.0998 * p1
    slack = 1e-4 * (p1 - p2)  # the paper's constants are rounded: the exact ones are 1.09984 / 0.09984
    assert d.max().item() <= upper + slack and d.min().item() >= lower - slack
    # the bounds are tight: the extrema are reached (at z ≈ ±2.4) whatever β
    assert d.max().item() == pytest.approx(upper, abs=2 * slack)
    assert d.min().item() == pytest.approx(lower, abs=2 * slack)
    ends = _derivative(p1, p2, beta, torch.tensor([1e4, -1e4], dtype=torch.float64) / (beta * (p1 - p2)))
    assert ends.tolist() == pytest.approx([p1, p2], abs=1e-9)


# ---- gradcheck on every learnable parameter -----------------------------------------------------


def _gradcheck_module(act: nn.Module, x: torch.Tensor) -> None:
    names = [n for n, _ in act.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in act.named_parameters())

    def fn(inp, *ps):
        return functional_call(act, dict(zip(names, ps, strict=True)), (inp,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("index", range(len(_all_modules())))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_every_module_every_parameter(index, mode):
    torch.manual_seed(index)
    act = _all_modules(3)[index].double().train(mode == "train")
    if isinstance(act, MetaAconC):  # non-trivial running stats so the eval path differs from identity
        with torch.no_grad():
            for bn in (act.bn1, act.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    x = x + 0.1 * x.sign()  # keep away from ReLU's kink at 0
    _gradcheck_module(act, x)
    if isinstance(act, MetaAconC):
        names = {n for n, _ in act.named_parameters()}
        assert {"fc1.weight", "fc1.bias", "bn1.weight", "fc2.weight", "bn2.weight", "bn2.bias"} <= names
        _gradcheck_module(act, x[:1].clone())  # the batch-size-1 fallback is differentiable as well


# ---- Meta-ACON ------------------------------------------------------------------------------------


def test_meta_acon_beta_in_open_unit_interval_and_per_sample():
    torch.manual_seed(0)
    act = MetaAconC(8, r=2)
    x = torch.randn(6, 8, 5, 5) * torch.linspace(0.1, 10, 6).view(6, 1, 1, 1)
    for mode in (True, False):
        beta = act.train(mode).generate_beta(x)
        assert beta.shape == (6, 8, 1, 1)
        assert bool(((beta > 0) & (beta < 1)).all())
        assert not torch.allclose(beta[0], beta[1]), "two samples got the same β"
    # β really enters the output per sample: the same image gives a different output in another batch
    act.eval()
    x2 = torch.cat([x[:1], torch.randn(1, 8, 5, 5) * 5])
    assert not torch.allclose(act.generate_beta(x2)[0], act.generate_beta(x2)[1])


def test_meta_acon_batch_size_one_train_and_eval():
    torch.manual_seed(0)
    act = MetaAconC(8, r=2)
    bns = (act.bn1, act.bn2)
    act.train()
    act(torch.randn(4, 8, 3, 3)).sum().backward()  # give the running stats non-default values
    before = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]

    x1 = torch.randn(1, 8, 3, 3)
    y_train = act(x1)
    y_train.sum().backward()
    for bn, snap in zip(bns, before, strict=True):
        for k, v in bn.state_dict().items():
            assert torch.equal(v, snap[k]), f"running stat {k} changed on a batch of one"
    assert act.fc1.weight.grad is not None and act.bn2.weight.grad is not None
    y_eval = act.eval()(x1)
    torch.testing.assert_close(y_train, y_eval)  # the fallback is exactly the eval-mode β network

    act.train()(torch.randn(2, 8, 3, 3))
    for bn, snap in zip(bns, before, strict=True):
        assert not torch.equal(bn.running_mean, snap["running_mean"])
        assert not torch.equal(bn.running_var, snap["running_var"])
        assert bn.num_batches_tracked.item() == snap["num_batches_tracked"].item() + 1


# ---- state_dict compatibility with the authors' layout -------------------------------------------


class _AuthorsAconC(nn.Module):
    """Re-statement of the released ACON-C parameter layout (names and shapes), for key checks."""

    def __init__(self, width: int) -> None:
        super().__init__()
        for name in ("p1", "p2", "beta"):
            self.register_parameter(name, nn.Parameter(torch.randn(1, width, 1, 1)))


class _AuthorsMetaAconC(nn.Module):
    """Re-statement of the released Meta-ACON-C layout and forward pass, for 4-D input."""

    def __init__(self, width: int, r: int = 16) -> None:
        super().__init__()
        hidden = max(r, width // r)
        self.fc1, self.bn1 = nn.Conv2d(width, hidden, 1), nn.BatchNorm2d(hidden)
        self.fc2, self.bn2 = nn.Conv2d(hidden, width, 1), nn.BatchNorm2d(width)
        self.p1 = nn.Parameter(torch.randn(1, width, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)
        beta = torch.sigmoid(self.bn2(self.fc2(self.bn1(self.fc1(pooled)))))
        d = (self.p1 - self.p2) * x
        return d * torch.sigmoid(beta * d) + self.p2 * x


def test_acon_c_state_dict_matches_authors():
    torch.manual_seed(0)
    ours, theirs = AconC(6), _AuthorsAconC(6)
    assert list(ours.state_dict()) == ["p1", "p2", "beta"]
    assert all(v.shape == (1, 6, 1, 1) for v in ours.state_dict().values())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 6, 3, 3)
    sd = theirs.state_dict()
    torch.testing.assert_close(ours(x), acon_c_reference(x, sd["p1"], sd["p2"], sd["beta"]))


@pytest.mark.parametrize("channels,r", [(8, 2), (64, 16), (256, 16)])
def test_meta_acon_state_dict_matches_authors(channels, r):
    torch.manual_seed(0)
    ours, theirs = MetaAconC(channels, r=r), _AuthorsMetaAconC(channels, r=r)
    assert {k.split(".")[0] for k in ours.state_dict()} == {"p1", "p2", "fc1", "bn1", "fc2", "bn2"}
    assert ours.fc1.out_channels == max(r, channels // r) and ours.fc1.bias is not None
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items()
    ]
    theirs.train()(torch.randn(4, channels, 3, 3))  # non-default running stats
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, channels, 4, 4)
    for mode in (False, True):
        torch.testing.assert_close(ours.train(mode)(x), theirs.train(mode)(x), rtol=1e-5, atol=1e-5)


# ---- shapes, memory formats, mixed precision ------------------------------------------------------


@pytest.mark.parametrize("index", range(len(_all_modules())))
def test_2d_3d_4d_inputs_agree(index):
    torch.manual_seed(0)
    act = _all_modules(C)[index].eval()
    x4 = torch.randn(3, C, 5, 1)
    y4 = act(x4)
    torch.testing.assert_close(act(x4[..., 0]), y4[..., 0])  # (N, C, L), e.g. after Conv1d
    x2 = x4[:, :, :1]
    torch.testing.assert_close(act(x2[..., 0, 0]), act(x2)[..., 0, 0])  # (N, C), e.g. after Linear
    if not isinstance(act, ReLU):
        with pytest.raises(ValueError, match="shape"):
            act(torch.randn(C))


@pytest.mark.parametrize("index", range(len(_all_modules())))
def test_channels_last_equals_contiguous(index):
    torch.manual_seed(0)
    act = _all_modules(C)[index]
    x = torch.randn(3, C, 6, 5)
    xc = x.to(memory_format=torch.channels_last)
    for mode in (True, False):
        act.train(mode)
        y, yc = act(x), act(xc)
        torch.testing.assert_close(yc, y, rtol=1e-6, atol=1e-6)
        assert yc.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("cls", [Swish, AconA, AconB, AconC, MetaAconC])
def test_wrong_channel_count_is_a_clear_error(cls):
    with pytest.raises(ValueError, match=r"4 channels.*\(2, 3, 5, 5\)"):
        cls(4)(torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("index", range(len(_all_modules())))
def test_autocast_bf16_cpu_keeps_dtype(index):
    torch.manual_seed(0)
    act = _all_modules(C)[index]
    conv = nn.Conv2d(C, C, 1)
    x = torch.randn(2, C, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y = act(h)
        assert y.dtype == torch.bfloat16
        assert act(x).dtype == torch.float32
    y.float().sum().backward()
    assert all(p.dtype == torch.float32 for p in act.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in act.parameters())
    torch.testing.assert_close(y.float(), act(h.float()), rtol=0.05, atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index", range(len(_all_modules())))
def test_autocast_cuda_keeps_dtype(index, dtype):
    torch.manual_seed(0)
    act, conv = _all_modules(C)[index].cuda(), nn.Conv2d(C, C, 1).cuda()
    x = torch.randn(2, C, 4, 4, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        h = conv(x)
        y = act(h)
    assert y.dtype == dtype
    y.float().sum().backward()
    torch.testing.assert_close(y.float(), act(h.float()), rtol=0.05, atol=0.05)


# ---- the impl dispatch contract with acon.fused ---------------------------------------------------


def test_invalid_impl_is_rejected():
    with pytest.raises(ValueError, match="impl"):
        AconC(4, impl="triton")


def test_reference_impl_never_asks_fused(monkeypatch):
    def boom(*args):
        raise AssertionError("fused path consulted for impl='reference'")

    monkeypatch.setattr(acon.fused, "available", boom)
    x = torch.randn(2, C, 3, 3)
    for act in (AconC(C, impl="reference"), MetaAconC(C, r=2, impl="reference")):
        assert act(x).shape == x.shape


@pytest.mark.parametrize("cls", [AconC, MetaAconC])
def test_auto_impl_dispatches_to_fused_with_contract_shapes(monkeypatch, cls):
    calls = []
    monkeypatch.setattr(acon.fused, "available", lambda x, impl: impl == "auto")

    def fake(x, p1, p2, beta):
        calls.append((p1.shape, p2.shape, beta.shape))
        return acon_c_reference(x, p1, p2, beta)

    monkeypatch.setattr(acon.fused, "acon_c", fake)
    # the C++ kernels' direct paths off (AconC: test_native_path_serves_aconc_directly below; MetaAconC's
    # one op: tests/test_meta_native.py): the general dispatch through acon.fused.acon_c
    monkeypatch.setattr(acon.fused.meta_native, "served_params", lambda meta, x: None)
    monkeypatch.setattr(acon.activations, "native_plan", lambda *args: None)
    act = cls(C, r=2) if cls is MetaAconC else cls(C)
    act.eval()
    x = torch.randn(3, C, 4, 4)
    y = act(x)
    act.impl = "reference"
    torch.testing.assert_close(y, act(x))
    beta_shape = (3, C, 1, 1) if cls is MetaAconC else (1, C, 1, 1)
    assert calls == [((1, C, 1, 1), (1, C, 1, 1), beta_shape)]
