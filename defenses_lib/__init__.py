"""defenses_lib: the library behind the book on five adversarial-robustness defenses.

Modules, by what a reader looks for: ``data`` (real data sets), ``models`` (networks with their
normalisation inside), ``attacks`` (FGSM, PGD, EOT, BPDA), ``evaluation`` (robust accuracy,
AutoAttack, sanity checks), ``training`` (one loop, baseline losses, checkpoints), ``profiles``
(quick and paper settings), ``plots`` and ``widgets``.
"""

__version__ = "0.1.0"
