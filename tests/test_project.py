"""The project's files agree with each other: environment.yml mirrors pyproject.toml, chapters are
stored executed, the table of contents lists every chapter, CI runs the README's command."""

import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_mirrors_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert len(pip) == 1, "environment.yml's pip block installs the project itself, nothing else"
    extras = re.fullmatch(r"-e \.\[(.*)\]", pip[0]).group(1).split(",")
    assert sorted(extras) == sorted(_pyproject()["project"]["optional-dependencies"])
    major_minor = tuple(int(v) for v in python.split("=")[1].split("."))
    floor = tuple(int(v) for v in re.search(r">=([\d.]+)", _pyproject()["project"]["requires-python"]).group(1).split("."))
    assert major_minor >= floor


def test_constraints_pin_every_declared_dependency():
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    project = _pyproject()["project"]
    declared = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]
    for dep in declared:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower())
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned in requirements/constraints.txt"


def test_chapters_are_stored_executed():
    assert CHAPTERS, "no chapters found in book/"
    for nb_path in CHAPTERS:
        cells = [c for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
        assert all(c.get("execution_count") for c in cells), f"{nb_path.name}: a code cell was never executed"
        assert sum(bool(c.get("outputs")) for c in cells) >= len(cells) // 2, f"{nb_path.name}: outputs are not stored"
        errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{nb_path.name}: a stored error output"


def test_toc_lists_every_chapter():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = {c["file"] for c in toc["chapters"]}
    for nb_path in CHAPTERS:
        assert f"book/{nb_path.stem}" in files, f"{nb_path.name} is missing from _toc.yml"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make book" in readme
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert re.search(r"^test: .*\n\t\$\(BIN\)/pytest --nbval$", (ROOT / "Makefile").read_text(), re.M)


def _code_cells(nb_path):
    return ["".join(c["source"]) for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code"]


def test_every_chapter_states_its_claims_through_the_helper():
    for nb_path in CHAPTERS:
        cells = _code_cells(nb_path)
        assert any("Claims(" in c and c.rstrip().endswith("claims.check()") for c in cells), \
            f"{nb_path.name}: no claims cell ending with claims.check()"
        bare = [line for c in cells for line in c.splitlines() if line.lstrip().startswith("assert ")]
        assert not bare, f"{nb_path.name}: a claim asserted by hand instead of through Claims: {bare[0].strip()}"
