"""Fuzzing the public entry points with hypothesis: every argument, given any value at all, is either
accepted (and the result keeps its contract) or refused with a ValueError that names the argument.
Never a TypeError from deep inside torch, never a silent wrong result."""

import math
from functools import partial

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from defenses_lib.attacks import EOT, pgd
from defenses_lib.defenses.smoothing import SmoothedClassifier, certify
from defenses_lib.evaluation import evaluate, run_attack
from defenses_lib.training import train

ANY = st.one_of(st.integers(-3, 4), st.floats(allow_nan=True, allow_infinity=True, width=32), st.text(max_size=3),
                st.none(), st.booleans(), st.just([1]), st.just("0.1"))
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _int(v, low=1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(v, strict=False) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return ok and (v > 0 if strict else v >= 0)


class Setup(tuple):
    """(model, x, y), shown briefly in hypothesis's reports."""

    def __repr__(self):
        return "Setup(linear model, 4 images)"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    return Setup((model, torch.rand(4, 1, 8, 8), torch.arange(4)))


def _expect(valid: bool, name: str, call):
    """``call()`` succeeds when the value is valid, else raises a ValueError naming ``name``."""
    if valid:
        return call()
    with pytest.raises(ValueError, match=name):
        call()
    return None


def _in_ball(x_adv, x, eps):
    return x_adv is None or (x_adv - x).abs().max() <= eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1


@FUZZ
@given(value=ANY)
def test_pgd_eps(setup, value):
    model, x, y = setup
    out = _expect(_number(value), "eps", lambda: pgd(model, x, y, eps=value, steps=2))
    assert out is None or _in_ball(out, x, value)


@FUZZ
@given(value=ANY)
def test_pgd_alpha(setup, value):
    model, x, y = setup
    out = _expect(value is None or _number(value, strict=True), "alpha",
                  lambda: pgd(model, x, y, eps=0.1, alpha=value, steps=2))
    assert _in_ball(out, x, 0.1)


@FUZZ
@given(name=st.sampled_from(["steps", "restarts"]), value=ANY)
def test_pgd_counts(setup, name, value):
    model, x, y = setup
    out = _expect(_int(value), name, lambda: pgd(model, x, y, eps=0.1, **{name: value}))
    assert _in_ball(out, x, 0.1)


@FUZZ
@given(name=st.sampled_from(["norm", "loss"]), value=st.one_of(ANY, st.sampled_from(["linf", "l2", "ce", "dlr"])))
def test_pgd_choices(setup, name, value):
    model, x, y = setup
    valid = value in {"norm": ("linf", "l2"), "loss": ("ce", "margin", "dlr")}[name]
    _expect(valid, name, lambda: pgd(model, x, y, eps=0.1, steps=2, **{name: value}))


@FUZZ
@given(name=st.sampled_from(["batch_size", "repeats"]), value=ANY)
def test_evaluate_counts(setup, name, value):
    model, x, y = setup
    r = _expect(_int(value), name, lambda: evaluate(model, x, y, {"PGD": partial(pgd, eps=0.1, steps=1)},
                                                    **{name: value}))
    assert r is None or all(0 <= a <= 1 for a in r.accuracy().values())


@FUZZ
@given(value=ANY)
def test_run_attack_batch_size(setup, value):
    model, x, y = setup
    _expect(_int(value), "batch_size", lambda: run_attack(partial(pgd, eps=0.1, steps=1), model, x, y, value))


CERTIFY_VALID = {"n0": _int, "n": _int, "batch_size": _int, "num_classes": lambda v: _int(v) and v == 10,
                 "alpha": lambda v: _number(v, strict=True) and v < 0.5,
                 "sigma": lambda v: _number(v) or v == [1]}   # a list of one: the same level for every image


@FUZZ
@given(name=st.sampled_from(sorted(CERTIFY_VALID)), value=ANY)
def test_certify_arguments(setup, name, value):
    model, x, _ = setup
    kw = dict(sigma=0.25, n0=3, n=4, batch_size=4, num_classes=10, alpha=0.001)
    cert = _expect(CERTIFY_VALID[name](value), name, lambda: certify(model, x[:2], **{**kw, name: value}))
    assert cert is None or ((cert.radius >= 0).all() and ((cert.prediction >= -1) & (cert.prediction < 10)).all())


@FUZZ
@given(name=st.sampled_from(["draws", "batch_size"]), value=ANY)
def test_randomized_models(setup, name, value):
    model, x, y = setup
    valid = _int(value) or (name == "batch_size" and value is None)
    for make in (partial(EOT, model), partial(SmoothedClassifier, model, 0.25)):
        wrapped = _expect(valid, name, lambda make=make: make(**{name: value})(x))
        assert wrapped is None or wrapped.shape == (4, 10)


@FUZZ
@given(name=st.sampled_from(["epochs", "batch_size", "augment", "optimizer"]), value=ANY)
def test_train_arguments(setup, name, value):
    model, x, y = setup
    data = torch.utils.data.TensorDataset(x, y)
    valid = {"epochs": lambda v: _int(v, 0) and v <= 2, "batch_size": _int, "augment": lambda v: v == "none",
             "optimizer": lambda v: v in ("sgd", "adam")}[name](value)
    if name == "epochs" and _int(value, 3):
        return   # valid, only slow
    _expect(valid, name, lambda: train(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), data,
                                       lambda m, a, b: torch.nn.functional.cross_entropy(m(a), b),
                                       show_progress=False, **{"epochs": 1, name: value}))
