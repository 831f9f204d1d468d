"""Distributed data parallel: two gloo processes under torchrun train the same model as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defenses_lib import distributed
from defenses_lib.training import load_checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def test_two_gloo_processes_train_the_same_model_as_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, SCRIPT, tmp_path / "one.pt"], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
                    tmp_path / "two.pt"], check=True, env=env, capture_output=True)
    one, two = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(tmp_path / "two.pt")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for loss, state in one["states"].items():
        for part in ("model", "loss"):
            for key, value in state[part].items():
                other = two["states"][loss][part][key]
                gap = (value - other).abs().max()
                assert torch.allclose(value, other, atol=1e-5), f"{loss}: {part}.{key} differs by {gap}"


def test_one_process_is_not_distributed():
    x, y = torch.zeros(5, 1, 2, 2), torch.arange(5)
    assert distributed.setup() is False and distributed.world_size() == 1 and distributed.is_main()
    xs, ys, share = distributed.shard(x, y)
    assert xs is x and ys is y and share == 1.0


def test_shards_cover_the_batch_and_their_shares_average_to_one(monkeypatch):
    x, y = torch.arange(5.0).view(5, 1, 1, 1), torch.arange(5)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    parts = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard(x, y))
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert [len(p[1]) for p in parts] == [3, 2] and sum(p[2] for p in parts) / 2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="batch of 1 cannot be split over 2 processes"):
        distributed.shard(x[:1], y[:1])


EVAL = Path(__file__).parent / "scripts" / "ddp_eval.py"


def test_under_torchrun_each_example_is_evaluated_once_and_every_process_gets_every_result(tmp_path):
    """Two gloo processes split the evaluation: the same per-example results as one process, and
    together the two models were shown as many examples as the one model was, not twice as many."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DEFENSES_EVAL_CACHE="0")
    subprocess.run([sys.executable, EVAL, tmp_path / "one.pt"], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", EVAL,
                    tmp_path / "two.pt"], check=True, env=env, capture_output=True)
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for row, outcome in one["correct"].items():
        assert torch.equal(outcome, two["correct"][row]), row
    assert two["certified"] == one["certified"] == 5
    assert sum(two["seen"]) == one["seen"][0] and max(two["seen"]) < one["seen"][0]
