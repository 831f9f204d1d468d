"""defenses_lib: the library behind the book on five adversarial-robustness defenses.

Where to look, by what you want:

* a defense: ``defenses`` (the registry, ``build(chapter, P, train_set)``) and one module per
  paper in it (``baselines``, ``ensembles``, ``purification``, ``smoothing``, ``armor``,
  ``drsl``), each returning :class:`defenses.base.Defense` objects;
* the settings of a chapter: ``profiles`` (frozen, typed ``quick`` and ``paper`` profiles);
* data and networks: ``data`` (real data sets, offline or downloaded), ``models``;
* attacking and evaluating: ``attacks`` (FGSM, PGD, EOT, rFGSM^k), ``evaluation`` (robust
  accuracy, the per-example worst case, AutoAttack, the gradient-masking sanity checks),
  ``curvature`` (input gradients and Hessian-vector products);
* how strong the attack must be: ``strength`` (accuracy as EOT draws and steps grow, the plateau);
* auditing any model in one call: ``audit`` (also ``python -m defenses_lib.audit``); the sanity
  checks' positive controls: ``masked`` (known gradient-masked models);
* saying what the numbers show: ``stats`` (intervals and paired tests) and ``claims``;
* training: ``training`` (the one loop, checkpoints named by everything that shapes the weights)
  and ``config`` (every constructor argument recorded);
* chapter 6: ``comparison``; figures and explorers: ``plots``, ``widgets``;
* running: ``runtime`` (device, seeds, progress, timing, the metrics file), ``run`` (the headless
  runner), ``distributed`` (torchrun), ``checks`` (argument checks).
"""

__version__ = "0.1.0"
