"""BatchNorm → ACON-C / Meta-ACON fused (``acon.fuse_bn_acon``): the same values, gradients, running
statistics and checkpoints as the two modules, without keeping the BatchNorm output for backward."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from acon import AconC, MetaAconC, fuse_bn_acon, unfuse_bn_acon
from acon.fuse_bn import FusedBNAconC, FusedBNMetaAconC, count_fused
from acon.fused import cpu

ROOT = Path(__file__).resolve().parents[1]
INTERPRETING = (
    os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ACON_FUSED_CPU_BACKEND") == "triton"
)
TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5)}  # as tests/test_fused.py


@pytest.fixture
def eager_fp64():
    """fp64 runs the eager formulas (no Inductor build inside a unit test)."""
    cpu.set_mode("eager")
    yield
    cpu.set_mode(None)


def pair(act: type, c: int = 6, dtype=torch.float64, **bn_kwargs) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c, **bn_kwargs), act(c))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5), net[1].bias.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2)
    return net.to(dtype)


def close(a: torch.Tensor, b: torch.Tensor, dtype, scale: float | None = None) -> bool:
    """Within the fused-op tolerances, sums scaled by the largest value (as acon.fused.selfcheck)."""
    rtol, atol = TOL[dtype]
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max()) if scale is None else scale
    return bool(((a - b).abs() <= atol * (1 + scale) + rtol * b.abs()).all())


def grads_close(ref: nn.Module, fused: nn.Module, dtype) -> None:
    """Every parameter's gradient, absolute errors scaled by the largest gradient of the model (the
    biases before a BatchNorm have an exact gradient of 0: theirs are rounding noise in both)."""
    scale = max(float(p.grad.abs().max()) for p in ref.parameters())
    for (name, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters(), strict=True):
        assert close(b.grad, a.grad, dtype, scale), name


def step_both(ref: nn.Module, fused: nn.Module, x: torch.Tensor, steps: int = 1):
    for _ in range(steps):
        g = torch.randn(x.shape[0], ref[-1].channels, *x.shape[2:], dtype=x.dtype, device=x.device)
        ya, yb = ref(x), fused(x)
        ya.backward(g), yb.backward(g)
    return ya, yb


@pytest.mark.parametrize("act", [AconC, MetaAconC])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(
    "layout,n", [("nchw", 4), ("channels_last", 3), pytest.param("nchw", 1, marks=pytest.mark.slow)]
)
def test_values_gradients_and_running_stats_match_the_two_modules(act, dtype, layout, n, eager_fp64):
    ref = pair(act, dtype=dtype)
    fused = fuse_bn_acon(copy.deepcopy(ref))
    assert count_fused(fused) == 1 and isinstance(fused[2], FusedBNAconC | FusedBNMetaAconC)
    x = torch.randn(n, 3, 7, 5, dtype=dtype) * 2 + 0.5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    ya, yb = step_both(ref, fused, x, steps=3)
    assert close(yb, ya, dtype)
    grads_close(ref, fused, dtype)  # conv (so dx), BN w/b, p1, p2, β, Meta's β network
    for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers(), strict=True):
        assert close(b, a, dtype), name
    ref.eval(), fused.eval()
    with torch.no_grad():
        assert close(fused(x), ref(x), dtype)  # eval: BN folded into one per-channel affine


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_running_statistics_follow_batchnorm2d(momentum, layout):
    """Channels-last statistics are torch's own (bit-identical); NCHW ones are computed row by row (faster)
    and agree to float32 rounding."""
    ref = pair(AconC, dtype=torch.float32, momentum=momentum)
    fused = fuse_bn_acon(copy.deepcopy(ref))
    for k in range(4):
        x = torch.randn(5, 3, 6, 6) * (k + 1) + 3 * k
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        ref(x), fused(x)
    for (name, a), (_, b) in zip(ref[1].named_buffers(), fused[1].named_buffers(), strict=True):
        if layout == "channels_last" or name == "num_batches_tracked":
            assert torch.equal(a, b), name
        else:
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), name
    assert int(fused[1].num_batches_tracked) == 4


@pytest.mark.parametrize("act", [AconC, MetaAconC])
def test_gradcheck_fp64(act, eager_fp64):
    torch.manual_seed(1)
    bn, a = nn.BatchNorm2d(3).double(), act(3).double()
    seq = fuse_bn_acon(nn.Sequential(bn, a))
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    params = [p for p in seq.parameters()]

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(
            seq, dict(zip([n for n, _ in seq.named_parameters()], ps, strict=True))
        ):
            return seq(x)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


def test_frozen_and_eval_batchnorm_fuse_and_train_the_activation(eager_fp64):
    from torchvision.ops.misc import FrozenBatchNorm2d

    ref = pair(AconC)
    frozen = FrozenBatchNorm2d(6).double()
    frozen.load_state_dict({k: v for k, v in ref[1].state_dict().items() if k != "num_batches_tracked"})
    ref[1] = frozen
    fused = fuse_bn_acon(copy.deepcopy(ref))
    assert count_fused(fused) == 1
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    step_both(ref, fused, x)
    grads_close(ref, fused, torch.float64)
    evalbn = pair(MetaAconC)
    evalbn[1].eval()  # an eval-mode BN in a training model (transfer): running statistics, trainable affine
    fused = fuse_bn_acon(copy.deepcopy(evalbn))
    step_both(evalbn, fused, x)
    grads_close(evalbn, fused, torch.float64)
    assert torch.equal(evalbn[1].running_mean, fused[1].running_mean)


def families() -> list:
    slow = pytest.mark.slow
    return [
        ("shufflenetv2_x0_5", {}, 37),  # every activation
        ("resnet18", {}, 8),  # acon1 of each block; acon2 follows the residual sum
        pytest.param("resnet50", {"act_placement": "all"}, 33, marks=slow),  # stem, act1, acon per block
        pytest.param("mobilenetv2_x0_17", {}, 35, marks=slow),
        pytest.param("mobilenetv1_x0_25", {}, 27, marks=slow),
        pytest.param("tfnet_x0_5", {}, 17, marks=slow),  # the block activation follows a sum or concat
    ]


def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Every BatchNorm's running statistics set to its statistics on ``x`` in training mode, as after
    training: with the initial ones (mean 0, variance 1) eval-mode activations grow layer by layer, and in
    a deep network fp32 rounding alone then moves the output by tens of percent."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # the cumulative average: one batch sets them
    model.train()
    with torch.no_grad():
        model(x)
    for bn, m in zip(bns, momenta, strict=True):
        bn.momentum = m


@pytest.mark.parametrize("act", [AconC, pytest.param(MetaAconC, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name,kwargs,pairs", families())
def test_every_family_fuses_and_keeps_its_state_dict(name, kwargs, pairs, act, tmp_path):
    """Same keys both ways, and in eval mode the fused model is as close to the unfused one in float64 as
    the unfused one in fp32 is (their fp32 roundings differ: the row kernels normalise on load)."""
    from models import create_model

    torch.manual_seed(0)
    model = create_model(name, act, num_classes=10, **kwargs)
    calibrate(model, torch.randn(8, 3, 32, 32))
    keys = list(model.state_dict())
    saved = tmp_path / "unfused.pt"
    torch.save(model.state_dict(), saved)
    fuse_bn_acon(model)
    assert count_fused(model) == pairs
    assert list(model.state_dict()) == keys
    model.load_state_dict(torch.load(saved))  # an unfused checkpoint loads into the fused model
    torch.save(model.state_dict(), tmp_path / "fused.pt")
    plain = create_model(name, act, num_classes=10, **kwargs)
    plain.load_state_dict(torch.load(tmp_path / "fused.pt"))  # and a fused one into the unfused model
    model.eval(), plain.eval()
    exact = copy.deepcopy(plain).double()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = exact(x.double())
        err = lambda m: float((m(x).double() - want).abs().max())  # noqa: E731
        assert err(model) <= 2 * err(plain) + 1e-5 * float(want.abs().max())
    unfuse_bn_acon(model)
    assert count_fused(model) == 0 and list(model.state_dict()) == keys


def test_fused_model_deep_copies_and_pickles(tmp_path):
    model = fuse_bn_acon(pair(MetaAconC, dtype=torch.float32))
    clone = copy.deepcopy(model)  # EMA copies
    assert clone[2].__dict__["_fused_bn"] is clone[1]
    torch.save(model, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randn(2, 3, 5, 5)
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))


def test_beta_hooks_see_the_normalised_input():
    """Forward hooks on a fused Meta-ACON get the BN input; its generate_beta normalises it first."""
    ref = pair(MetaAconC, dtype=torch.float32).eval()
    fused = fuse_bn_acon(copy.deepcopy(ref))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = ref[2].generate_beta(ref[1](ref[0](x)))
        assert torch.allclose(fused[2].generate_beta(fused[0](x)), want, atol=1e-6)


def test_backward_keeps_no_batchnorm_output():
    """Saved for backward: the conv's input, the BN input (one tensor) and the ACON output, as with ReLU."""
    from acon.memory import saved_tensor_bytes

    def measure(act, fuse: bool = False) -> int:
        net = pair(act, c=32, dtype=torch.float32)
        net = nn.Sequential(*(fuse_bn_acon(net) if fuse else net), nn.Conv2d(32, 8, 1))
        x = torch.randn(4, 3, 32, 32)
        return saved_tensor_bytes(net, lambda: net(x))

    relu = measure(lambda c: nn.ReLU(inplace=True))
    unfused = measure(AconC)
    assert measure(AconC, fuse=True) <= relu < unfused
    assert measure(MetaAconC, fuse=True) <= relu * 1.01 < measure(MetaAconC)


def _sync_worker(rank: int, path: str, out: str, dtype: torch.dtype) -> None:
    import torch.distributed as dist

    from acon.fused import bn_native
    from acon.syncbn import convert_sync_batchnorm

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    if dtype == torch.float64:
        cpu.set_mode("eager")  # the torch formulas (no Inductor build in the workers)
    rows = {"n": 0}
    row_backward = bn_native.bn_acon_backward

    def counted(*a):
        rows["n"] += 1
        return row_backward(*a)

    bn_native.bn_acon_backward = counted
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    g = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    for act in (AconC, MetaAconC):
        net = convert_sync_batchnorm(pair(act, c=4), torch.device("cpu")).to(dtype)
        fuse_bn_acon(net)
        net(x[3 * rank : 3 * rank + 3].to(dtype)).backward(g[3 * rank : 3 * rank + 3].to(dtype))
        for p in net.parameters():
            dist.all_reduce(p.grad)
        torch.save(
            {"grads": [p.grad for p in net.parameters()], "buffers": list(net.buffers()), "rows": rows["n"]},
            f"{out}.{act.__name__}.{rank}",
        )
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_syncbn_under_two_gloo_ranks_matches_one_process_on_the_whole_batch(tmp_path, dtype):
    """Two real gloo ranks, half the batch each: synced statistics, summed gradients as on one process
    (fp64: the torch path; fp32: the C++ row kernels, whose BatchNorm sums are all-reduced between their
    two backward passes)."""
    import torch.multiprocessing as mp

    from acon.fused import native

    out = str(tmp_path / "res")
    mp.spawn(_sync_worker, args=(str(tmp_path / "init"), out, dtype), nprocs=2, join=True)
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    g = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    row_kernels = dtype == torch.float32 and native.available() and native.vector_width() <= 25
    for count, act in enumerate((AconC, MetaAconC), start=1):
        ref = pair(act, c=4)
        ref(x).backward(g)
        for rank in (0, 1):
            got = torch.load(f"{out}.{act.__name__}.{rank}")
            assert got["rows"] == (count if row_kernels else 0)
            scale = max(float(p.grad.abs().max()) for p in ref.parameters())
            for p, a in zip(ref.parameters(), got["grads"], strict=True):
                assert close(a.double(), p.grad, dtype, scale)
            for b, a in zip(ref.buffers(), got["buffers"], strict=True):
                assert close(a.double(), b.double(), dtype)


@pytest.mark.skipif(INTERPRETING, reason="already inside the interpreter run")
@pytest.mark.slow
def test_fused_pairs_on_the_triton_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", ACON_FUSED_CPU_BACKEND="triton")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", __file__, "-k", "values_gradients and fp32"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]


def _digits(out: Path, *extra: str) -> list[str]:
    """``python train.py``'s defaults (ShuffleNetV2 0.5x, ACON-C, the embedded digits), a few steps."""
    return [
        f"out_dir={out}",
        "run_name=r",
        "trainer.threads=1",
        "trainer.progress=false",
        "data.num_workers=0",
        "deterministic=true",
        *extra,
    ]


def _model_state(path: Path) -> dict:
    from acon.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


@pytest.mark.slow
def test_digits_runs_fused_and_unfused_agree_and_resume_bit_identically(tmp_path):
    """trainer.fuse_bn_act=true and false train the default model alike (the run-to-run bound of
    tests/test_train_pipeline.py: 1e-2 of each tensor's update after 2 steps); a fused run stopped after 2 steps and
    resumed ends bit-identical to one that ran its 4 steps at once."""
    from conftest import compose
    from recording import run_recording

    from acon.builders import build_model

    on = run_recording(_digits(tmp_path / "on", "trainer.fuse_bn_act=true", "trainer.max_steps=2"))
    assert any("37 BatchNorm → ACON-C/Meta-ACON pairs run fused" in m for _, m in on.lines), on.lines
    run_recording(_digits(tmp_path / "off", "trainer.fuse_bn_act=false", "trainer.max_steps=2"))
    fused, plain = (_model_state(tmp_path / d / "r" / "last.pt") for d in ("on", "off"))
    cfg = compose([])
    torch.manual_seed(cfg.seed)
    init = build_model(cfg.model, cfg.activation, int(cfg.data.num_classes)).state_dict()
    assert list(fused) == list(plain) == list(init)
    for k, v in init.items():  # not the conv biases before a BatchNorm: their exact gradient is 0
        if v.is_floating_point() and (plain[k] - v).norm() > 1e-4:
            assert (fused[k] - plain[k]).norm() <= 1e-2 * (plain[k] - v).norm(), k

    run_recording(_digits(tmp_path / "once", "trainer.fuse_bn_act=true", "trainer.max_steps=4"))
    half = _digits(tmp_path / "split", "trainer.fuse_bn_act=true")
    run_recording([*half, "trainer.max_steps=2"])
    run_recording([*half, "trainer.max_steps=4"])
    once, resumed = (_model_state(tmp_path / d / "r" / "last.pt") for d in ("once", "split"))
    for k, v in once.items():
        assert torch.equal(resumed[k], v), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("act", [AconC, MetaAconC])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_fused_pairs_match_the_two_modules(act, channels_last):
    """On CUDA (the Triton ACON kernels inside the fused op): fp32 values, gradients and running statistics."""
    ref = pair(act, c=64, dtype=torch.float32).cuda()
    fused = fuse_bn_acon(copy.deepcopy(ref))
    x = torch.randn(8, 3, 28, 28, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    ya, yb = step_both(ref, fused, x, steps=2)
    assert close(yb, ya, torch.float32)
    grads_close(ref, fused, torch.float32)
    for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers(), strict=True):
        assert close(b, a, torch.float32), name


def test_fuse_bn_act_setting():
    """``auto`` fuses eager CPU runs only; ``true``/``false`` do what they say."""
    from acon.fuse_bn import fuse_for_run, fuse_setting

    cpu_dev, cuda_dev = torch.device("cpu"), torch.device("cuda")
    assert fuse_setting("auto", cpu_dev, False) and not fuse_setting("auto", cpu_dev, True)
    assert not fuse_setting("auto", cuda_dev, False) and fuse_setting(True, cuda_dev, False)
    assert not fuse_setting(False, cpu_dev, False)
    model = pair(AconC, dtype=torch.float32)
    assert fuse_for_run(model, False, cpu_dev, False) is None and count_fused(model) == 0
    assert "1 BatchNorm" in fuse_for_run(model, "auto", cpu_dev, False) and count_fused(model) == 1
    assert fuse_for_run(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), "auto", cpu_dev, False) is None


@pytest.mark.slow
def test_compiled_fused_model_runs_the_pairs_unfused(eager_fp64):
    """Under torch.compile a fused pair traces as its two modules: same values and gradients."""
    ref = pair(AconC, dtype=torch.float32)
    fused = fuse_bn_acon(copy.deepcopy(ref))
    compiled = torch.compile(fused)
    x = torch.randn(2, 3, 6, 6)
    ya, yb = ref(x), compiled(x)
    ya.sum().backward(), yb.sum().backward()
    assert close(yb, ya, torch.float32)
    grads_close(ref, fused, torch.float32)
