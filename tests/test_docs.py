"""The front door and the documentation site: a README of at most 300 lines whose links reach real
pages, and a mkdocs site that builds with --strict (every page in the navigation, every link valid)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_is_a_short_front_door_whose_links_reach_real_pages():
    text = (REPO / "README.md").read_text("utf-8")
    assert len(text.splitlines()) <= 300
    assert text.index("## Two commands") < text.index("## CLI tour") < text.index("## Python API")
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert {"docs/training.md", "docs/benchmarks.md", "docs/architecture.md"} <= set(links)
    missing = [link for link in links if not link.startswith("http") and not (REPO / link).exists()]
    assert not missing


def test_the_documentation_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(site)],
        capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    pages = {p.parent.name for p in site.rglob("index.html")}
    assert {"training", "benchmarks", "performance", "architecture", "serving"} <= pages
    # A broken link fails the build: the check is real.
    broken = tmp_path / "broken"
    (broken / "docs").mkdir(parents=True)
    (broken / "docs" / "index.md").write_text("[gone](nowhere.md)\n", encoding="utf-8")
    (broken / "mkdocs.yml").write_text("site_name: x\n", encoding="utf-8")
    failed = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(broken / "mkdocs.yml")], capture_output=True, text=True)  # fmt: skip
    assert failed.returncode != 0 and "nowhere.md" in failed.stderr
