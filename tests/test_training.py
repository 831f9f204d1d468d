"""Training: checkpoints round-trip and resume to the same result, losses match their formulas."""

import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from defenses_lib.data import ImageDataset
from defenses_lib.runtime import pick_device, timeit, timing_rounds
from defenses_lib.training import (CrossEntropy, PGDAdversarialLoss, TradesLoss, atomic_save, fit, load_checkpoint,
                                   recipe_hash, step_time, train)


def _dataset(n=96):
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    kw = dict(batch_size=16, optimizer="sgd", lr=0.05, milestones=(2,), seed=3, show_progress=False)
    straight = _model()
    train(straight, _dataset(), PGDAdversarialLoss(0.1, steps=2), epochs=3, **kw)

    ckpt = tmp_path / "run.pt"
    first = _model()
    train(first, _dataset(), PGDAdversarialLoss(0.1, steps=2), epochs=1, checkpoint=ckpt, **kw)  # "interrupted"
    resumed = _model()
    history = train(resumed, _dataset(), PGDAdversarialLoss(0.1, steps=2), epochs=3, checkpoint=ckpt, **kw)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert torch.equal(_weights(straight), _weights(resumed))


class _ShiftedLoss(torch.nn.Module):
    """Cross-entropy of the logits plus a learned scalar (a stand-in for a dual variable), plus its square."""

    def __init__(self):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, model, x, y):
        return F.cross_entropy(model(x), y) + self.shift ** 2


def test_loss_parameters_get_their_own_adam_and_resume(tmp_path):
    kw = dict(batch_size=16, optimizer="sgd", lr=0.05, loss_lr=0.01, seed=3, show_progress=False)
    straight, straight_loss = _model(), _ShiftedLoss()
    train(straight, _dataset(), straight_loss, epochs=2, **kw)
    # Adam moves a parameter by about lr per step whatever its gradient: 12 steps of 0.01 from 1.0
    assert straight_loss.shift.item() == pytest.approx(1.0 - 0.12, abs=1e-3)
    ckpt = tmp_path / "run.pt"
    train(_model(), _dataset(), _ShiftedLoss(), epochs=1, checkpoint=ckpt, **kw)
    resumed, resumed_loss = _model(), _ShiftedLoss()
    train(resumed, _dataset(), resumed_loss, epochs=2, checkpoint=ckpt, **kw)
    assert torch.equal(_weights(straight), _weights(resumed))
    assert resumed_loss.shift.item() == straight_loss.shift.item()


def test_finished_checkpoint_is_loaded_not_retrained(tmp_path):
    ckpt = tmp_path / "done.pt"
    a = _model()
    train(a, _dataset(), CrossEntropy(), epochs=2, checkpoint=ckpt, show_progress=False)
    stamp = ckpt.stat().st_mtime_ns
    b = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    history = train(b, _dataset(), CrossEntropy(), epochs=2, checkpoint=ckpt, show_progress=False)
    assert torch.equal(_weights(a), _weights(b)) and len(history) == 2
    assert ckpt.stat().st_mtime_ns == stamp


def test_atomic_save_round_trip_and_no_leftovers(tmp_path):
    state = {"w": torch.arange(3.0), "epoch": 2, "history": [{"loss": 0.5}]}
    atomic_save(state, tmp_path / "a" / "ck.pt")
    back = load_checkpoint(tmp_path / "a" / "ck.pt")
    assert torch.equal(back["w"], state["w"]) and back["history"] == state["history"]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["ck.pt"]


def test_failed_save_leaves_nothing(tmp_path):
    with pytest.raises(Exception):
        atomic_save({"f": lambda: 0}, tmp_path / "bad.pt")
    assert list(tmp_path.iterdir()) == []


def test_trades_with_beta_zero_is_cross_entropy():
    model, ds = _model(), _dataset(16)
    x, y = ds.tensors()
    assert torch.allclose(TradesLoss(0.1, beta=0.0, steps=1)(model, x, y), F.cross_entropy(model(x), y))
    assert TradesLoss(0.1, beta=6.0, steps=3)(model, x, y) >= F.cross_entropy(model(x), y)


def test_adversarial_loss_exceeds_clean_loss():
    model, ds = _model(), _dataset(32)
    x, y = ds.tensors()
    assert PGDAdversarialLoss(0.1, steps=5)(model, x, y) > CrossEntropy()(model, x, y)


def test_bad_training_arguments():
    with pytest.raises(ValueError, match="eps"):
        PGDAdversarialLoss(-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        train(_model(), _dataset(), CrossEntropy(), epochs=1, optimizer="lbfgs", show_progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train(_model(), _dataset(), CrossEntropy(), epochs=-1, show_progress=False)


def test_device_and_recipe_hash():
    assert pick_device("cpu").type == "cpu"
    assert recipe_hash({"a": 1, "b": 2}) == recipe_hash({"b": 2, "a": 1}) != recipe_hash({"a": 2, "b": 2})


def test_resume_when_the_checkpoint_is_mapped_to_another_device(tmp_path, monkeypatch):
    """A checkpoint loaded onto the training device (a GPU) still restores the CPU random state."""
    import defenses_lib.training as training

    ckpt = tmp_path / "run.pt"
    train(_model(), _dataset(), CrossEntropy(), epochs=1, checkpoint=ckpt, show_progress=False)
    real = training.load_checkpoint

    def on_meta_device(path, device=None):
        state = real(path, device)
        state["rng"] = state["rng"].to("meta")  # stands in for a tensor that is not on the CPU
        return state

    monkeypatch.setattr(training, "load_checkpoint", on_meta_device)
    # .cpu() on a meta tensor raises NotImplementedError; without the .cpu() call, set_rng_state raises TypeError
    with pytest.raises(NotImplementedError):
        train(_model(), _dataset(), CrossEntropy(), epochs=2, checkpoint=ckpt, show_progress=False)


def test_fit_names_the_checkpoint_by_recipe_and_loads_a_finished_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEFENSES_RUNS", str(tmp_path))
    kw = dict(chapter="ch", name="m", recipe={"data": "toy"}, epochs=1, batch_size=32, show_progress=False)
    a = fit(_model(), _dataset(), PGDAdversarialLoss(0.1, steps=1), **kw)
    assert "trained now" in capsys.readouterr().out and not a.training
    b = fit(_model(), _dataset(), PGDAdversarialLoss(0.1, steps=1), **kw)
    assert "finished run loaded" in capsys.readouterr().out and torch.equal(_weights(a), _weights(b))
    fit(_model(), _dataset(), PGDAdversarialLoss(0.2, steps=1), **kw)  # another loss setting: another checkpoint
    assert len(list((tmp_path / "ch").glob("m-*.pt"))) == 2


def test_step_time_leaves_the_weights_alone():
    model, (x, y) = _model(), _dataset(32).tensors()
    before = _weights(model)
    assert step_time(model, CrossEntropy(), x, y, repeat=2) > 0
    assert torch.equal(before, _weights(model)) and all(p.grad is None for p in model.parameters())


def test_timeit_counts_its_calls():
    calls = []
    assert timeit(lambda: calls.append(1), repeat=3, warmup=2) >= 0 and len(calls) == 5
    with pytest.raises(ValueError, match="repeat"):
        timeit(lambda: None, repeat=0)


def test_timing_rounds_interleave_and_warm_up_once():
    calls = []
    times = timing_rounds({"slow": lambda: (calls.append("s"), time.sleep(0.02)),
                           "fast": lambda: calls.append("f")}, rounds=3, warmup=1)
    assert calls == ["s", "s", "f", "f", "s", "f", "s", "f"]
    assert min(times["slow"]) >= 0.02 > max(times["fast"])
    with pytest.raises(ValueError, match="rounds"):
        timing_rounds({"a": lambda: None}, rounds=0)


def test_timing_rounds_pairs_every_round_and_times_the_median_of_each():
    calls = []
    times = timing_rounds({"a": lambda: calls.append("a"), "b": lambda: (calls.append("b"), time.sleep(0.01))},
                          rounds=4, repeat=3, warmup=0)
    assert calls == (["a"] * 3 + ["b"] * 3) * 4
    assert [len(t) for t in times.values()] == [4, 4]
    assert all(b >= 0.01 > a for a, b in zip(times["a"], times["b"]))
    with pytest.raises(ValueError, match="rounds"):
        timing_rounds({"a": lambda: None}, rounds=0)


@pytest.mark.parametrize("env", [{"TQDM_DISABLE": "1"}, {"DEFENSES_PROGRESS": "terminal"}])
def test_the_progress_display_does_not_change_what_training_sees(env, monkeypatch):
    def trained():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        train(model, TensorDataset(x, y), CrossEntropy(), epochs=1, batch_size=8, device="cpu")
        return model[1].weight.detach().clone()

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    for key in ("TQDM_DISABLE", "DEFENSES_PROGRESS"):
        monkeypatch.delenv(key, raising=False)
    shown = trained()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert torch.equal(trained(), shown)
