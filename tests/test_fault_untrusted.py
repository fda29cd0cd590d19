"""Untrusted checkpoints: loading never runs code, and another architecture's weights are refused."""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch
from conftest import run_cli

from acon.checkpoint import CheckpointError, load_checkpoint, load_model_state


class _RunsCommand:
    """Unpickling this object would call os.system (the classic malicious checkpoint)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def evil(tmp_path):
    """A torch.save zip checkpoint and a raw pickle, both carrying the command; plus the marker path."""
    marker = tmp_path / "PWNED"
    zip_ckpt, raw = tmp_path / "evil.pt", tmp_path / "evil.pkl"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _RunsCommand(marker)}, zip_ckpt)
    raw.write_bytes(pickle.dumps({"payload": _RunsCommand(marker)}))
    assert not marker.exists()
    return zip_ckpt, raw, marker


def test_sanity_unsafe_load_would_run_the_command(evil):
    zip_ckpt, _, marker = evil
    torch.load(zip_ckpt, weights_only=False)  # what a careless loader does: the payload runs
    assert marker.exists()


def test_load_checkpoint_refuses_malicious_pickles(evil):
    zip_ckpt, raw, marker = evil
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pt.*GLOBAL posix\.system.*nothing"):
        load_checkpoint(zip_ckpt)
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pkl"):
        load_checkpoint(raw)
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pt"):
        load_checkpoint(zip_ckpt, mmap=True)
    assert not marker.exists()


def test_eval_cli_refuses_malicious_checkpoint(evil, tmp_path):
    zip_ckpt, _, marker = evil
    proc = run_cli(
        [sys.executable, "eval.py", f"checkpoint={zip_ckpt}"],
        env={"ACON_EVAL_DIR": str(tmp_path / "eval")},
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: refused to load" in proc.stderr and str(zip_ckpt) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_garbage_and_truncated_files_give_clear_errors(tmp_path):
    empty, garbage, trunc = tmp_path / "empty.pt", tmp_path / "garbage.pt", tmp_path / "trunc.pt"
    empty.write_bytes(b"")
    garbage.write_bytes(os.urandom(512))
    torch.save({"w": torch.randn(1000)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="empty.pt.*empty or truncated"):
        load_checkpoint(empty)
    for f in (garbage, trunc):
        with pytest.raises(CheckpointError, match=f.name):
            load_checkpoint(f)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    # malformed pickle streams, as random bytes sometimes are: the unpickler's stack and memo underflow
    for name, raw in (("stack.pt", b"\x80\x02\x85."), ("memo.pt", b"\x80\x02h\x05.")):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(CheckpointError, match=rf"{name}.*not a valid checkpoint"):
            load_checkpoint(tmp_path / name)
    assert torch.equal(load_checkpoint(tmp_path / "ok.pt")["w"], torch.load(tmp_path / "ok.pt")["w"])


def test_other_architecture_refused_with_key_lists(tmp_path):
    import models

    resnet = models.create_model("resnet18", activation="relu", num_classes=3, small_input=True)
    shuffle = models.create_model("shufflenetv2_x0_5", activation="relu", num_classes=3, small_input=True)
    torch.save({"model": resnet.state_dict()}, tmp_path / "resnet.pt")
    state = load_checkpoint(tmp_path / "resnet.pt")["model"]
    before = {k: v.clone() for k, v in shuffle.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_model_state(shuffle, state, str(tmp_path / "resnet.pt"))
    msg = str(info.value)
    missing = sorted(set(shuffle.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(shuffle.state_dict()))
    assert "resnet.pt" in msg and "missing keys: " + missing[0] in msg
    assert "unexpected keys: " + unexpected[0] in msg
    assert all(torch.equal(v, shuffle.state_dict()[k]) for k, v in before.items())  # untouched
    # same architecture, other width of the classifier: a shape mismatch is named too
    other = models.create_model("resnet18", activation="relu", num_classes=5, small_input=True)
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*fc\.weight: \(3, 512\) vs \(5, 512\)"):
        load_model_state(other, state, "resnet.pt")
