"""The project's files agree with each other: environment.yml mirrors pyproject.toml, chapters are
stored executed, the table of contents lists every chapter, CI runs the README's command, the
chapters' code cells are short and narrow, the code they show exists, and ruff finds nothing."""

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
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
    requires = _pyproject()["project"]["requires-python"]
    floor = tuple(int(v) for v in re.search(r">=([\d.]+)", requires).group(1).split("."))
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
        cells = [c for c in json.loads(nb_path.read_text())["cells"]
                 if c["cell_type"] == "code" and "".join(c["source"]).strip()]
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
        start = next((i for i, c in enumerate(cells) if "Claims(" in c), None)
        assert start is not None, f"{nb_path.name}: no cell makes a Claims table"
        assert any(c.rstrip().endswith("claims.check()") for c in cells[start:]), \
            f"{nb_path.name}: no cell after the Claims table ends with claims.check()"
        bare = [line for c in cells for line in c.splitlines() if line.lstrip().startswith("assert ")]
        assert not bare, f"{nb_path.name}: a claim asserted by hand instead of through Claims: {bare[0].strip()}"


MAX_LINES, MAX_WIDTH = 20, 80   # a code cell fits the book's code column without scrolling


def test_code_cells_are_short_and_fit_the_books_code_column():
    for nb_path in CHAPTERS:
        for i, cell in enumerate(_code_cells(nb_path)):
            lines = cell.splitlines()
            assert len(lines) <= MAX_LINES, f"{nb_path.name}, code cell {i}: {len(lines)} lines"
            wide = [line for line in lines if len(line) > MAX_WIDTH]
            assert not wide, f"{nb_path.name}, code cell {i}: {len(wide[0])} characters: {wide[0]}"


def _objects(path: Path) -> set[str]:
    """The functions and classes of a module, methods as Class.method."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{m.name}" for m in node.body if isinstance(m, ast.FunctionDef)}
    return names


INCLUDE = re.compile(r"```\{literalinclude\} (\S+)\n:pyobject: (\S+)")


def test_every_method_chapter_shows_its_code_and_the_code_exists():
    for nb_path in CHAPTERS:
        text = "".join("".join(c["source"]) for c in json.loads(nb_path.read_text())["cells"]
                       if c["cell_type"] == "markdown")
        shown = INCLUDE.findall(text)
        assert shown or "comparison" in nb_path.name, f"{nb_path.name} shows none of the library's code"
        for path, obj in shown:
            source = ROOT / path.lstrip("/")
            assert source.is_file(), f"{nb_path.name}: {path} does not exist"
            assert obj in _objects(source), f"{nb_path.name}: {path} has no {obj}"


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    out = subprocess.run([ruff, "check", "defenses_lib", "tests", "experiments", "book/execute.py",
                          "book/conftest.py"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _repository() -> str:
    return _pyproject()["project"]["urls"]["Repository"]


def test_the_repository_address_is_written_once_and_used_everywhere():
    """_config.yml, every install cell and every source link use pyproject's address, and the
    install cell installs the tagged release of this version (v<version>), not a moving branch."""
    url, version = _repository(), _pyproject()["project"]["version"]
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["url"] == url
    texts = {p.name: p.read_text() for p in [*CHAPTERS, ROOT / "README.md", ROOT / "book" / "intro.md"]}
    for name, text in texts.items():
        for link in re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", text):
            assert link == url, f"{name} links to {link}, not the repository {url}"
    for nb_path in CHAPTERS:
        cell = next(c for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code")
        src = "".join(cell["source"])
        assert f'REPO = "{url}"' in src and f'REF = "v{version}"' in src, nb_path.name
        assert 'find_spec("defenses_lib") is None' in src and "DEFENSES_RUNS" in src, nb_path.name


def test_the_running_page_shows_the_readmes_own_text():
    page = (ROOT / "book" / "running.md").read_text()
    readme = (ROOT / "README.md").read_text()
    start = re.search(r":start-after: (.*)", page).group(1)
    end = re.search(r":end-before: (.*)", page).group(1)
    assert start in readme and end in readme and readme.index(start) < readme.index(end)
    assert "book/running" in (ROOT / "_toc.yml").read_text()
