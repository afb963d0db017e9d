"""The README's quick start is what CI runs, and it names the real entry points."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_commands_install_and_run():
    run, test = quick_start_commands()
    assert "dataset-fashion-mnist" in run and run.endswith("python -m cohort.run")
    assert "dataset-fashion-mnist" in test and test.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci


def test_docs_the_readme_links_exist():
    readme = (ROOT / "README.md").read_text()
    for doc in re.findall(r"`(docs/[\w./-]+\.md)`", readme):
        assert (ROOT / doc).is_file(), doc


def test_cluster_section_shows_the_commands_tests_exercise():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## On a Ray cluster", 1)[1].split("\n## ", 1)[0]
    assert "ray get-auth-token --generate" in section and "RAY_AUTH_MODE=token ray start --head" in section
    assert "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . --" in section
    job_test = (ROOT / "tests" / "test_job_submit.py").read_text()
    assert '"RAY_AUTH_MODE": "token"' in job_test and '"--working-dir"' in job_test
