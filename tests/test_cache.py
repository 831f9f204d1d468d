"""The evaluation cache: a key that changes with everything that determines a result, a hit that
returns the stored result and restores the random state, and nothing cached when turned off."""

from functools import partial

import torch

from defenses_lib import cache
from defenses_lib.attacks import fgsm, pgd
from defenses_lib.evaluation import evaluate
from defenses_lib.run import read_records

GLOBAL_MODEL = torch.nn.Linear(2, 2)


def _reads_a_global(model, x, y):
    return GLOBAL_MODEL(x)


def test_the_key_changes_with_the_weights_the_attack_its_settings_the_images_and_the_random_state(tiny_model):
    x = torch.rand(3, 1, 8, 8)
    base = cache.key("attack", (tiny_model, partial(pgd, eps=0.1), x))
    assert cache.key("attack", (tiny_model, partial(pgd, eps=0.1), x)) == base, "the same evaluation, the same key"
    assert cache.key("attack", (tiny_model, partial(pgd, eps=0.2), x)) != base
    assert cache.key("attack", (tiny_model, partial(fgsm, eps=0.1), x)) != base
    assert cache.key("attack", (tiny_model, partial(pgd, eps=0.1), x + 0.01)) != base
    torch.rand(1)
    assert cache.key("attack", (tiny_model, partial(pgd, eps=0.1), x)) != base, "the random state moved"
    state = torch.get_rng_state()
    before = cache.key("attack", (tiny_model, partial(pgd, eps=0.1), x))
    with torch.no_grad():
        tiny_model[0].weight[0, 0, 0, 0] += 1e-3
    torch.set_rng_state(state)
    assert cache.key("attack", (tiny_model, partial(pgd, eps=0.1), x)) != before, "the weights changed"


def test_a_function_that_reads_a_global_model_is_keyed_by_that_models_weights():
    before = cache.key("attack", (_reads_a_global,))
    with torch.no_grad():
        GLOBAL_MODEL.weight += 1.0
    assert cache.key("attack", (_reads_a_global,)) != before


def test_a_hit_returns_the_stored_result_and_the_random_state_after_it(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DEFENSES_METRICS", str(tmp_path / "records.jsonl"))
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    attacks = {"PGD": partial(pgd, eps=0.1, steps=2)}
    torch.manual_seed(0)
    first = evaluate(tiny_model, x, y, attacks)
    after_first = torch.rand(3)
    torch.manual_seed(0)
    second = evaluate(tiny_model, x, y, attacks)
    assert torch.equal(torch.rand(3), after_first), "a hit leaves the random state an uncached run would"
    assert all(torch.equal(first.correct[k], second.correct[k]) for k in first.correct)
    assert [r["cached"] for r in read_records(tmp_path / "records.jsonl")] == [[], ["clean", "PGD"]]


def test_turned_off_it_always_computes(tiny_model, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, "0")
    calls = []
    for _ in range(2):
        value, hit = cache.cached("attack", (tiny_model,), lambda: calls.append(1) or torch.ones(1))
        assert not hit
    assert len(calls) == 2
    monkeypatch.delenv(cache.CACHE_ENV)
    for expected_hit in (False, True):
        value, hit = cache.cached("attack", (tiny_model, "x"), lambda: calls.append(1) or torch.ones(1))
        assert hit == expected_hit and torch.equal(value, torch.ones(1))
