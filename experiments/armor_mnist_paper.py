"""Chapter 4's paper profile on a CPU or GPU, headless: the ARMOR_D paper's own MNIST setting.

Trains the chosen models of ``get_profile("armor", "paper")`` on the 60,000 MNIST training images
(the paper's network, SGD lr 0.1 then 0.01 after epoch 5, batch 100, 10 epochs, seed 0), then
evaluates each on the 10,000 test images under the paper's attacks (FGSM and PGD-40 at eps = 0.1,
step 0.01, zero start) and ours (PGD-40 from a random start at eps = 0.1 and 0.3), and writes
``OUT/<model>.json``. Training checkpoints after every epoch under $DEFENSES_RUNS/armor, so
running the same command again resumes. The commands this book ran are in results/armor_paper/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch

from defenses_lib.attacks import fgsm, pgd
from defenses_lib.data import chapter_data
from defenses_lib.defenses import armor
from defenses_lib.profiles import get_profile
from defenses_lib.run import commit


def attacks(P) -> dict:
    """The paper's FGSM and PGD-40 at eps = 0.1 (zero start), and PGD-40 from a random start at each eval eps."""
    name = f"PGD-{P.eval_steps}"
    out = {"FGSM eps=0.1": partial(fgsm, eps=0.1),
           f"{name} eps=0.1 (paper: zero start)": partial(pgd, eps=0.1, alpha=P.eval_step, steps=P.eval_steps,
                                                          random_start=False)}
    for e in P.eval_eps:
        out[f"{name} eps={e:g} (random start)"] = partial(pgd, eps=e, alpha=P.eval_step, steps=P.eval_steps)
    return out


def main(argv=None) -> None:
    """Parse the arguments, train the models one after the other, evaluate each and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ARMOR_D KL", "PGD-AT"])
    parser.add_argument("--out", type=Path, default=Path("results/armor_paper"))
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    P = get_profile("armor", args.profile)
    unknown = set(args.models) - set(P.models)
    if unknown:
        parser.error(f"--models must be among {list(P.models)}, got {sorted(unknown)}")
    train_set, x, y = chapter_data(P)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        t0 = time.perf_counter()
        defense = armor.build(P, train_set, device=args.device, names=[name])[name]
        loss = defense.trainings[-1].loss
        t_train = time.perf_counter() - t0
        result = defense.evaluate(x, y, attacks(P), batch_size=500)
        print(result)
        record = {"model": name, "loss": repr(loss), "profile": args.profile, "n_train": len(train_set),
                  "n_test": len(y), "epochs": P.epochs, "accuracy": result.accuracy(),
                  "attack_seconds": result.seconds,
                  "wall_seconds_this_call": time.perf_counter() - t0, "train_seconds_this_call": t_train,
                  "lambda": loss.lam.item() if hasattr(loss, "lam") else None,
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                  "commit": commit()}
        path = args.out / f"{name.replace(' ', '_')}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
