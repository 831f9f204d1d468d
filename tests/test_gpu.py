"""The GPU smoke test (``make gpu-smoke``): skipped without a GPU.

It runs every chapter's paper recipe a few steps (the comparison's CIFAR-10, ResNet-18 set-up:
training, every threat's attacks, AutoAttack, both certificates, the sanity checks and the costs)
and fails if any training, evaluation, sanity check or certificate ran anywhere but the GPU.
"""

import pytest
import torch

from defenses_lib.run import read_records
from test_comparison import paper_recipes_a_few_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: run make gpu-smoke on one")


def test_every_paper_recipe_trains_evaluates_and_certifies_on_the_gpu(data_root, paper_profile, tmp_path,
                                                                        monkeypatch):
    log = tmp_path / "records.jsonl"
    monkeypatch.setenv("DEFENSES_METRICS", str(log))
    paper_recipes_a_few_steps(data_root, paper_profile)
    records = read_records(log)
    kinds = {r["kind"] for r in records}
    assert {"training", "evaluation", "sanity checks", "certificate"} <= kinds, kinds
    on_cpu = [(r["kind"], r.get("setting", r.get("name"))) for r in records if not r["device"].startswith("cuda")]
    assert not on_cpu, f"ran on the CPU while a GPU is present: {on_cpu}"
