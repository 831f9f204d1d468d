"""Training: checkpoints round-trip and resume to the same result, losses match their formulas."""

import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from defenses_lib.data import ImageDataset
from defenses_lib.defenses.armor import ArmorLoss, RFGSMAdversarialLoss, TransportCost
from defenses_lib.defenses.baselines import CrossEntropy, PGDAdversarialLoss, TradesLoss
from defenses_lib.defenses.drsl import DRSLLoss
from defenses_lib.defenses.ensembles import DLCLoss, GALLoss
from defenses_lib.defenses.purification import AToPLoss, RandomTransform
from defenses_lib.defenses.smoothing import GaussianNoiseLoss, VariationalSmoothingLoss
from defenses_lib.runtime import pick_device, timeit, timing_rounds
from defenses_lib.training import (CheckpointError, _epoch_loader, atomic_save, fit, identity, load_checkpoint,
                                   loss_time, recipe_hash, step_time, train)


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


def test_every_single_byte_flip_truncation_or_empty_file_is_refused_naming_the_file(tmp_path):
    """40 single-byte flips spread over the file, a truncation and an empty file: each is a
    CheckpointError that names the file and says to delete it; none loads changed weights."""
    path = tmp_path / "ck.pt"
    atomic_save({"w": torch.arange(1000.0), "epoch": 3}, path)
    good = path.read_bytes()
    damaged = [bytes(good[:i]) + bytes([good[i] ^ 0x01]) + bytes(good[i + 1:])
               for i in torch.linspace(0, len(good) - 1, 40).long().tolist()]
    damaged += [good[: len(good) // 2], b""]
    for data in damaged:
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=f"checkpoint {path} .*delete it"):
            load_checkpoint(path)


def test_a_checkpoint_from_before_digests_loads_with_a_warning(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="carries no digest"):
        assert torch.equal(load_checkpoint(tmp_path / "old.pt")["w"], torch.ones(2))


def test_a_write_killed_earlier_leaves_no_stray_file_after_the_next(tmp_path):
    """A temporary file that a killed write left beside the checkpoint is removed by the next write."""
    stray = tmp_path / ".ck.pt.abc123.tmp"
    stray.write_bytes(b"half a checkpoint")
    atomic_save({"epoch": 1}, tmp_path / "ck.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_failed_save_leaves_nothing(tmp_path):
    with pytest.raises((AttributeError, TypeError, RuntimeError)):  # pickling a lambda fails
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
    assert "trained now" in capsys.readouterr().out and not a.model.training and a.record["how"] == "trained now"
    b = fit(_model(), _dataset(), PGDAdversarialLoss(0.1, steps=1), **kw)
    assert "finished run loaded" in capsys.readouterr().out and torch.equal(_weights(a.model), _weights(b.model))
    assert b.record["how"] == "finished run loaded" and b.record["history"] == a.record["history"]
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


def test_an_epochs_batches_depend_only_on_seed_and_epoch():
    ds = _dataset(40)
    first = [y for _, y in _epoch_loader(ds, 8, seed=1, epoch=2)]
    loader = _epoch_loader(ds, 8, seed=1, epoch=2)
    iter(loader)   # an extra iter(), as some progress bars make, draws nothing
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in loader]))
    other = torch.cat([y for _, y in _epoch_loader(ds, 8, seed=1, epoch=3)])
    assert not torch.equal(torch.cat(first), other) and sorted(other.tolist()) == sorted(ds.targets.tolist())


LOSSES = [  # (constructor, arguments, another value for each argument)
    (PGDAdversarialLoss, dict(eps=0.1), dict(eps=0.2, steps=3, alpha=0.05, norm="l2", random_start=False)),
    (TradesLoss, dict(eps=0.1), dict(eps=0.2, beta=1.0, steps=3, alpha=0.05)),
    (GALLoss, dict(), dict(coeff=1.0)),
    (DLCLoss, dict(), dict(alpha=2.0, beta=0.5, h=0.2, direction="random", shared_direction=False,
                           abs_cos=False, gamma=0.1)),
    (AToPLoss, dict(eps=0.1), dict(eps=0.2, lam=0.5, attack="pgd", steps=3, victim="pipeline",
                                   l1_target="adversarial")),
    (GaussianNoiseLoss, dict(sigma=0.25), dict(sigma=0.5)),
    (VariationalSmoothingLoss, dict(), dict(sigma_t_range=(0.1, 0.4), draws=2, beta=0.5, tau=0.2)),
    (ArmorLoss, dict(eps=0.1, cost=TransportCost(0.01)),
     dict(eps=0.2, cost=TransportCost(0.02), divergence="alpha", alpha=3.0, steps=5, step_size=0.02, t=0.5,
          clip=True, domain="binary", positivity="reset", softplus_beta=2.0, lam_init=0.5, nu_init=0.5, lr=0.1)),
    (RFGSMAdversarialLoss, dict(), dict(steps=5, step_size=0.1)),
    (DRSLLoss, dict(), dict(a=0.5, b=2.0, space="prob", reduction="batch_sum", center="authors")),
]


def _checkpoint_hash(model, loss):
    return recipe_hash(identity(model, loss, {"data": "toy"}, "m", 1, {"lr": 1e-3}))


@pytest.mark.parametrize("make, base, others", LOSSES, ids=[m.__name__ for m, _, _ in LOSSES])
def test_two_losses_that_differ_in_any_argument_never_share_a_checkpoint(make, base, others):
    model = _model()
    reference = _checkpoint_hash(model, make(**base))
    assert _checkpoint_hash(model, make(**base)) == reference   # the same arguments: the same checkpoint
    for key, value in others.items():
        assert _checkpoint_hash(model, make(**{**base, key: value})) != reference, key


def test_the_models_arguments_name_the_checkpoint_too():
    from defenses_lib.defenses.purification import InpaintingUNet, PurifiedClassifier
    loss = CrossEntropy()

    def pipeline(**transform):
        return PurifiedClassifier(_model(), InpaintingUNet(1, 8), RandomTransform(**transform))

    assert _checkpoint_hash(pipeline(), loss) == _checkpoint_hash(pipeline(), loss)
    for key, value in dict(kind="rt1", block=2, missing_rate=0.5, sigma=0.1, n_masks=3, fixed_seed=1).items():
        assert _checkpoint_hash(pipeline(**{key: value}), loss) != _checkpoint_hash(pipeline(), loss), key


def test_loss_time_runs_the_loss_alone_on_the_given_logits():
    seen = []

    def loss(model, x, y):
        z = model(x)
        seen.append(z.shape)
        return F.cross_entropy(z, y)

    assert loss_time(loss, torch.randn(4, 10), torch.arange(4), repeat=3) > 0
    assert seen == [(4, 10)] * 4   # one warm-up and three timed calls
