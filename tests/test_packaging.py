"""Packaging and layout rules of DESIGN.md, checked on the real tree and the installed package."""

import ast
import configparser
import importlib.metadata
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAPPED = {"keras_mm": "keras_mm", "pipelines": "keras_mm.pipelines",
          "beam_jobs": "keras_mm.beam_jobs"}


def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_every_package_folder_is_listed_in_setup_cfg():
    listed = {p.strip() for p in _setup_cfg()["options"]["packages"].split() if p.strip()}
    found = set()
    for folder, package in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package,) + rel))
    assert found == listed, f"missing in setup.cfg: {found - listed}; stale: {listed - found}"


def test_nothing_generic_at_the_top_of_site_packages():
    dist = importlib.metadata.distribution("keras-mm")
    top = (dist.read_text("top_level.txt") or "keras_mm").split()
    assert top == ["keras_mm"]
    # Outside the repo, the folders import only under the package name.
    code = ("import importlib.util as u, keras_mm.pipelines.features, keras_mm.beam_jobs.records;"
            "print(u.find_spec('pipelines'), u.find_spec('beam_jobs'))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["None", "None"]


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def test_beam_jobs_and_pipelines_never_import_keras_mm_models_or_keras():
    for folder in ("beam_jobs", "pipelines"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imports(path):
                assert not (name == "keras" or name.startswith("keras.")), (path, name)
                if name.startswith("keras_mm"):
                    assert name.startswith(("keras_mm.pipelines", "keras_mm.beam_jobs")), (
                        path, name)
                if folder == "pipelines":
                    assert not name.startswith("keras_mm.beam_jobs"), (path, name)


def test_importing_the_package_is_cheap():
    code = "import sys, keras_mm; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in readme and "<!-- test-command -->" in ci
    lines = readme.splitlines()
    i = lines.index("<!-- test-command -->")
    assert lines[i + 1].startswith("```") and "pytest" in lines[i + 2]
    assert "venv" in lines[i + 2]
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
