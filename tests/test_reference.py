"""Stored runs: what a chapter keeps round-trips exactly, the runner stores one seed's run, the reference
profiles keep the quick recipes on the same test images."""

import json

import nbformat
import pytest
import torch

from defenses_lib import reference, run
from defenses_lib.comparison import common, is_chapters_own, scored
from defenses_lib.defenses.base import Defense
from defenses_lib.evaluation import RobustResult
from defenses_lib.profiles import PROFILES, SEED_ENV, get_profile
from defenses_lib.runtime import METRICS_ENV


def example_result() -> RobustResult:
    g = torch.Generator().manual_seed(0)
    return RobustResult({"clean": torch.rand(37, generator=g) > 0.3, "PGD": torch.rand(37, generator=g) > 0.6,
                         "EOT": torch.randint(0, 5, (37,), generator=g) / 4}, {"PGD": 1.5}, "toy, l_inf 0.1")


def test_kept_values_round_trip_exactly_with_their_key_types():
    r = example_result()
    value = {"results": {"toy": {"l_inf 0.1": r}}, "certified": {"toy": {0.25: r.correct["PGD"]}},
             "costs": [{"seconds": 2.5, "stages": "standard 2"}, None, 3, "x"]}
    back = reference.decode(json.loads(json.dumps(reference.encode(value))))
    got = back["results"]["toy"]["l_inf 0.1"]
    assert isinstance(got, RobustResult) and got.setting == r.setting and got.seconds == r.seconds
    for k, v in r.correct.items():
        assert got.correct[k].dtype == (torch.bool if v.dtype == torch.bool else torch.float32)
        assert torch.equal(got.correct[k], v if v.dtype == torch.bool else v.float()), k
    assert list(back["certified"]["toy"]) == [0.25], "a float key stays a float"
    assert back["costs"] == [{"seconds": 2.5, "stages": "standard 2"}, None, 3, "x"]


def test_bits_are_packed():
    bits = reference.encode(torch.ones(1000, dtype=torch.bool))
    assert len(bits["bits"]) <= 4 * 125 // 3 + 4, "1,000 outcomes in 125 bytes"


def test_an_unknown_type_or_tag_is_named():
    with pytest.raises(TypeError, match="got a set"):
        reference.encode({1, 2})
    with pytest.raises(ValueError, match="tagged with one of"):
        reference.decode({"pickle": "..."})


def test_keep_records_for_the_runner_only(tmp_path, monkeypatch):
    monkeypatch.delenv(METRICS_ENV, raising=False)
    reference.keep(x=1)   # outside a runner: nothing, and no error
    log = tmp_path / "records.jsonl"
    monkeypatch.setenv(METRICS_ENV, str(log))
    reference.keep(results={"a": torch.tensor([True, False])})
    [line] = log.read_text().splitlines()
    assert json.loads(line)["kind"] == reference.KIND and json.loads(line)["name"] == "results"


def test_store_and_load_by_seed(tmp_path):
    for seed in (2, 0):
        records = [{"kind": reference.KIND, "name": "acc", "value": reference.encode(torch.tensor([seed > 0]))},
                   {"kind": "evaluation", "name": "ignored"}]
        reference.store(reference.path_of("armor", "reference", seed, tmp_path), {"seed": seed, "commit": "c"},
                        records)
    runs = reference.load("armor", results=tmp_path)
    assert [r.seed for r in runs] == [0, 2] and runs[1]["acc"].tolist() == [True]
    assert runs[0].about["commit"] == "c" and set(runs[0].kept) == {"acc"}
    with pytest.raises(KeyError, match="kept \\['acc'\\], not 'results'"):
        runs[0]["results"]
    assert reference.load("armor", "paper", results=tmp_path) == []


def test_pooled_averages_seeds_on_the_same_images():
    a, b = torch.tensor([True, False, True]), torch.tensor([True, True, False])
    assert reference.pooled([a, b]).tolist() == [1.0, 0.5, 0.5]   # (stats.pooled)
    with pytest.raises(ValueError, match="same test images"):
        reference.pooled([a, b[:2]])


CHAPTER = [
    "from defenses_lib.profiles import get_profile\nfrom defenses_lib.reference import keep\nimport torch\n"
    "P = get_profile('foundations')\nprint(P.name, P.seed)",
    "keep(outcomes=torch.arange(4) < P.seed)",
    "assert P.seed < 0, 'a claim that fails at this scale'",
]


@pytest.fixture
def toy_book(tmp_path, monkeypatch):
    """A book whose chapter 0 is a three-cell notebook, and a results folder, both under tmp_path."""
    (tmp_path / "book").mkdir()
    cells = [nbformat.v4.new_code_cell(c) for c in CHAPTER]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), tmp_path / "book" / run.CHAPTERS["foundations"])
    monkeypatch.setattr(run, "BOOK", tmp_path / "book")
    monkeypatch.setattr(reference, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(run, "uncommitted", lambda: "")
    return tmp_path


def test_the_runner_stores_one_seed_of_a_reference_run(toy_book):
    out = toy_book / "out"
    assert run.main(["foundations", "--profile", "reference", "--seed", "3", "--store", "--out", str(out)]) == 1
    executed = nbformat.read(out / run.CHAPTERS["foundations"], as_version=4)
    assert executed.cells[0].outputs[0].text == "reference 3\n", "the seed reached the kernel"
    [stored] = reference.load("foundations", results=toy_book / "results")
    assert stored.seed == 3 and stored["outcomes"].tolist() == [True, True, True, False]
    assert stored.about["command"] == "python -m defenses_lib.run foundations --profile reference --seed 3 --store"
    assert stored.about["cells with failed claims"] == [2] and stored.about["seconds"] > 0
    assert "CPUs" in stored.about["machine"] and stored.about["commit"]


def test_a_stored_run_skips_the_cells_that_read_the_stored_runs(toy_book):
    path = toy_book / "book" / run.CHAPTERS["foundations"]
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(1, nbformat.v4.new_code_cell("raise RuntimeError('no stored run yet')",
                                                 metadata={"tags": [run.STORED_RUNS_TAG]}))
    nbformat.write(nb, path)
    assert run.main(["foundations", "--profile", "reference", "--seed", "3", "--store", "--out",
                     str(toy_book / "out")]) == 1, "the claim cell still fails"
    assert reference.load("foundations", results=toy_book / "results")[0]["outcomes"].tolist() == [True] * 3 + [False]
    assert run.main(["foundations", "--profile", "reference", "--out", str(toy_book / "plain")]) == 1
    errors = json.loads((toy_book / "plain" / "metrics.json").read_text())["errors"]
    assert [e["cell"] for e in errors] == [1] and "no stored run yet" in errors[0]["error"], "run without --store"


def test_store_refuses_uncommitted_code_and_a_notebook(toy_book, monkeypatch, capsys):
    monkeypatch.setattr(run, "uncommitted", lambda: "M defenses_lib/attacks.py")
    with pytest.raises(SystemExit):
        run.main(["foundations", "--profile", "reference", "--store"])
    assert "M defenses_lib/attacks.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--notebook", str(toy_book / "book" / run.CHAPTERS["foundations"]), "--store"])
    assert "--store needs a chapter" in capsys.readouterr().err
    assert not (toy_book / "results").exists()


def test_the_seed_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(SEED_ENV, "2")
    assert get_profile("armor").seed == 2 and get_profile("armor", seed=5).seed == 5
    monkeypatch.setenv(SEED_ENV, "two")
    with pytest.raises(ValueError, match="DEFENSES_SEED must be a non-negative integer, got 'two'"):
        get_profile("armor")


@pytest.mark.parametrize("chapter", sorted(PROFILES))
def test_reference_profiles_score_many_images_on_the_quick_test_seed(chapter):
    quick, ref = get_profile(chapter, "quick"), get_profile(chapter, "reference")
    assert ref.test_seed == quick.seed + 1, "seed 0 of the reference scores the quick run's test images"
    assert ref.n_test >= (500 if chapter in ("purification", "smoothing") else 1_000)
    assert ref.seed == quick.seed and ref.n_train == quick.n_train and ref.arch == quick.arch


def test_the_comparison_at_reference_scale_reuses_the_chapters_models():
    P = get_profile("comparison", "reference")
    assert [c for c in PROFILES if c != "comparison" and is_chapters_own(P, c)] == [
        "foundations", "ensembles", "purification", "armor", "drsl"]


def test_a_randomized_defense_is_scored_on_the_first_randomized_n():
    P = get_profile("comparison", "reference")
    x, y = torch.rand(P.n_test, 1, 2, 2), torch.arange(P.n_test) % 10
    model = torch.nn.Flatten()
    det = Defense("d", model)
    rand = Defense("r", model, randomized=True, fixed_model=model)
    assert len(scored(P, det, x, y)[1]) == P.n_test and len(scored(P, rand, x, y)[1]) == P.randomized_n
    a, b = common(torch.ones(5), torch.zeros(3))
    assert len(a) == len(b) == 3


def test_the_reference_table_pools_the_seeds_of_stored_runs(tmp_path):
    from defenses_lib.comparison import reference_table
    from defenses_lib.evaluation import table_html
    from defenses_lib.stats import OverSeeds

    def run_of(seed, with_aa):
        right = torch.arange(100) < 80 + 10 * seed                   # 80% clean in seed 0, 90% in seed 1
        robust = torch.arange(100) < 40 + 20 * seed                  # 40% and 60% in the worst case
        res = {"l_inf 0.1": RobustResult({"clean": right, "PGD": robust})}
        if with_aa:
            res["l_inf 0.1 + AutoAttack (first 50)"] = RobustResult({"clean": right[:50], "AutoAttack": robust[:50]})
        records = [{"kind": reference.KIND, "name": k, "value": reference.encode(v)} for k, v in {
            "results": {"smoothed": res, "plain": {"l_inf 0.1": res["l_inf 0.1"]}},
            "certified": {"smoothed": {0.25: robust}}}.items()]
        reference.store(reference.path_of("comparison", "reference", seed, tmp_path), {"seed": seed}, records)

    run_of(0, with_aa=True)
    run_of(1, with_aa=False)
    table = reference_table(reference.load("comparison", results=tmp_path), radii=(0.25,))
    cell = table["smoothed"]["worst case, l_inf 0.1"]
    assert isinstance(cell, OverSeeds) and cell.per_seed == (0.4, 0.6) and cell.pooled.value == pytest.approx(0.5)
    assert cell.sd == pytest.approx(0.1414, abs=1e-3) and cell.pooled.n == 100
    assert table["smoothed"]["worst case, l_inf 0.1 + AutoAttack (first 50)"].per_seed == (0.8,), "seed 0 only"
    assert table["smoothed"]["certified, l_2 r = 0.25"].per_seed == (0.4, 0.6)
    assert table["plain"]["certified, l_2 r = 0.25"] == "–" and table["plain"]["clean"].per_seed == (0.8, 0.9)
    assert "sd 14.1" in table_html(table) and "1 seed" in table_html(table)


def _stored(tmp_path, seed, outcomes):
    """Store a comparison run of ``seed`` whose results are ``outcomes`` ({defense: {threat: RobustResult}})."""
    records = [{"kind": reference.KIND, "name": "results", "value": reference.encode(outcomes)}]
    about = {"seed": seed, "commit": "0123456789abcdef", "seconds": 3_900, "machine": "Linux x86_64, 2 CPUs",
             "command": f"python -m defenses_lib.run comparison --profile reference --seed {seed} --store"}
    reference.store(reference.path_of("comparison", "reference", seed, tmp_path), about, records)


def test_seed_outcomes_cut_every_seed_to_the_images_all_defenses_were_scored_on(tmp_path):
    from defenses_lib.comparison import seed_outcomes
    T, F = True, False
    for seed in (0, 1):
        det = RobustResult({"clean": torch.tensor([T, T, F, T]), "PGD": torch.tensor([T, F, F, seed == 1])})
        rand = RobustResult({"clean": torch.tensor([0.9, 0.2, 0.7]), "PGD": torch.tensor([0.5, 0.1, 0.6])})
        _stored(tmp_path, seed, {"det": {"t": det}, "rand": {"t": rand}})
    runs = reference.load("comparison", results=tmp_path)
    worst = seed_outcomes(runs, ["det", "rand"], "t")
    assert [t.tolist() for t in worst["det"]] == [[T, F, F], [T, F, F]], "cut to the randomized defense's 3 images"
    assert torch.allclose(worst["rand"][1], torch.tensor([0.5, 0.1, 0.6]))
    assert [t.tolist() for t in seed_outcomes(runs, ["det"], "t", "clean")["det"]] == [[T, T, F, T]] * 2
    with pytest.raises(ValueError, match="outcome must be"):
        seed_outcomes(runs, ["det"], "t", "best case")
    with pytest.raises(KeyError, match="'det' at 'u'.*\\[0, 1\\]"):
        seed_outcomes(runs, ["det"], "u")
    assert runs[1].describe() == ("seed 1: commit 0123456, 1 h 05 min on Linux x86_64, 2 CPUs\n"
                                  "    python -m defenses_lib.run comparison --profile reference --seed 1 --store")


def test_the_reference_figure_draws_each_seed_and_the_pooled_interval(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from defenses_lib.comparison import reference_table
    from defenses_lib.plots import reference_figure
    for seed in (0, 1, 2):
        right = torch.arange(50) < 30 + 5 * seed
        _stored(tmp_path, seed, {n: {"t": RobustResult({"clean": right, "PGD": right & (torch.arange(50) % 2 == 0)})}
                                 for n in ("a", "b")})
    table = reference_table(reference.load("comparison", results=tmp_path), radii=())
    fig = reference_figure(table, ["clean", "worst case, t"])
    assert len(fig.axes) == 2
    seeds_drawn = [c for c in fig.axes[0].collections if len(c.get_offsets()) == 3]
    assert len(seeds_drawn) == 2, "one marker per seed, for each of the two defenses"
    assert sorted(float(v) for v in seeds_drawn[0].get_offsets()[:, 0]) == [60.0, 70.0, 80.0]


def test_a_stored_run_cut_short_resumes_from_its_committed_partial_evaluations(toy_book, monkeypatch):
    """A run broken after an evaluation leaves it in seed-N-partial/; a run in a fresh output folder (a new
    clone) reads it back instead of computing it, stores the seed and removes the partial folder."""
    cells = ["from defenses_lib.cache import cached\nfrom defenses_lib.reference import keep\nimport os, torch\n"
             "torch.manual_seed(0)   # the key holds the random state, as a chapter sets it",
             "value, hit = cached('toy', ['an evaluation'], lambda: torch.arange(3) > 0)\nprint('hit', hit)\n"
             "keep(outcomes=value)",
             "assert os.environ.get('TOY_BROKEN') != '1' or 1 / 0"]
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells]),
                   toy_book / "book" / run.CHAPTERS["foundations"])
    monkeypatch.setenv("TOY_BROKEN", "1")
    args = ["foundations", "--profile", "reference", "--seed", "4", "--store", "--out"]
    assert run.main(args + [str(toy_book / "first")]) == 1
    path = reference.path_of("foundations", "reference", 4)
    assert not path.exists() and len(list(reference.partial_of(path).glob("toy-*.pt"))) == 1
    monkeypatch.setenv("TOY_BROKEN", "0")
    assert run.main(args + [str(toy_book / "fresh")]) == 0
    executed = nbformat.read(toy_book / "fresh" / run.CHAPTERS["foundations"], as_version=4)
    assert executed.cells[1].outputs[0].text == "hit True\n", "read back, not computed again"
    assert reference.load("foundations", results=toy_book / "results")[0]["outcomes"].tolist() == [False, True, True]
    assert not reference.partial_of(path).exists()


def test_load_says_how_to_make_a_run_when_too_few_are_stored(tmp_path):
    assert reference.load("comparison", results=tmp_path) == []
    with pytest.raises(FileNotFoundError, match="holds 0 stored runs, at_least=1.*--seed N --store"):
        reference.load("comparison", results=tmp_path, at_least=1)
