"""Every rank of a DDP job resumes from the same checkpoint at the same step, or the job stops with one line
(a shared file system can show nodes different versions of ``last.pt``)."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from recording import run_recording, small_shufflenet

from acon import resume
from acon.checkpoint import CheckpointError

CASES = {  # rank 0's and rank 1's (path, step)
    "same": [("/r/last.pt", 120), ("/r/last.pt", 120)],
    "older file": [("/r/last.pt", 120), ("/r/last.pt", 100)],
    "no file": [("/r/last.pt", 120), (None, None)],
    "fresh": [(None, None), (None, None)],
    "same step, own mount": [("/r/last.pt", 120), ("/mnt/r/last.pt", 120)],
}


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for name, views in CASES.items():
        path, step = views[rank]
        try:
            resume.check_same_resume(path and resume.Path(path), step)
            queue.put((name, rank, None))
        except CheckpointError as e:
            queue.put((name, rank, str(e)))
    dist.destroy_process_group()


def test_two_gloo_ranks_that_see_different_checkpoints_both_stop():
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(free_port(), queue), nprocs=2)
    seen: dict[str, set] = {}
    for _ in range(2 * len(CASES)):
        name, _rank, error = queue.get()
        seen.setdefault(name, set()).add(error)
    assert seen["same"] == seen["fresh"] == seen["same step, own mount"] == {None}
    (older,), (missing,) = seen["older file"], seen["no file"]  # both ranks: the same message
    assert "rank 0: /r/last.pt at step 120; rank 1: /r/last.pt at step 100" in older
    assert "rank 0: /r/last.pt at step 120; rank 1: a fresh start" in missing
    assert "rerun the same command" in missing


@pytest.fixture
def rank_1_sees_an_older_checkpoint(monkeypatch):
    """A second rank whose file system still shows the previous last.pt (its step 1 lower)."""
    monkeypatch.setattr(
        resume, "all_gather_object", lambda view: [view, (view[0], view[1] - 1 if view[1] else None)]
    )


def test_the_trainer_checks_its_resume_against_the_other_ranks(
    tiny_imagenet, tmp_path, rank_1_sees_an_older_checkpoint
):
    """Before: each rank continued from the checkpoint it read, at its own step."""
    args = small_shufflenet(tiny_imagenet, tmp_path, "run_name=r")
    run_recording(args)  # a fresh start: every rank agrees (none has a checkpoint)
    with pytest.raises(CheckpointError, match=r"rank 0: \S+last.pt at step 6; rank 1: \S+last.pt at step 5"):
        run_recording([*args, "recipe.epochs=2", "resume_mode=extend"])
