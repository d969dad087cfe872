"""The documentation: the site builds in strict mode, every page is reachable, the README stays short and starts with
the two commands, no machine's absolute path is written anywhere, and every results page names its commit."""

import importlib.util
import os
import posixpath
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bdsafety.report.docs_page import nav_pages

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MAIN_JOB = "./scripts/setup.sh && .venv/bin/bdsafety demo --out runs/demo"
# A results page's commit line (docs/results/index.md defines it): a commit hash, or, where the run did not record
# one, "unknown (measured before <hash>" of the commit that added the numbers.
COMMIT_LINE = re.compile(r"^commit: (?:[0-9a-f]{7,40}\b|unknown \(measured before [0-9a-f]{7,40}\b)", re.MULTILINE)
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|home|tmp|root|Users)/")
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")


def docs_pages() -> set[str]:
    return {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}


def test_the_site_builds_in_strict_mode(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]' (scripts/setup.sh installs it)")
    # Not --quiet: it hides the warnings that --strict counts.
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_page_is_in_the_nav_and_reachable_from_the_index():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs" and config["strict"] is True
    pages = docs_pages()
    assert nav_pages(config["nav"]) == pages
    reached, todo = set(), ["index.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        for target in LINK.findall((DOCS / page).read_text()):
            if "://" not in target:
                todo.append(posixpath.normpath(posixpath.join(posixpath.dirname(page), target)))
    assert reached == pages, f"not linked from the index: {sorted(pages - reached)}"


def test_readme_is_short_and_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 220, f"README.md has {len(readme)} lines"
    tests = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]  # the command CI runs
    assert tests == "./scripts/setup.sh && .venv/bin/python -m pytest -q"
    first_screen = readme[:40]
    assert MAIN_JOB in first_screen and tests in first_screen


def test_no_file_names_an_absolute_path_of_a_machine():
    files = [ROOT / "README.md", ROOT / "mkdocs.yml", *DOCS.rglob("*.md"), *(ROOT / "src").rglob("*")]
    offenders = []
    for path in files:
        if not path.is_file() or path.suffix not in {".md", ".py", ".yml", ".yaml", ".j2", ".html", ".txt"} or \
                any(part.endswith(".egg-info") or part == "__pycache__" for part in path.parts):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if MACHINE_PATH.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_every_results_page_names_its_commit():
    pages = [path for path in (DOCS / "results").rglob("*.md") if path.name != "index.md"]
    assert pages
    for path in [*pages, DOCS / "calibration.md"]:
        assert COMMIT_LINE.search(path.read_text()), f"{path.relative_to(ROOT)} has no 'commit: ...' line"
