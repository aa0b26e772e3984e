"""The README opens with the two commands, and CI runs the second one verbatim."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = text.split("```bash\n")[1:3]
    return [block.split("```")[0].strip() for block in blocks]


def test_readme_opens_with_install_run_and_test_commands():
    run, test = readme_commands()
    assert run.endswith("prefrun train") and "pip install" in run
    assert test.endswith("pytest") and "test" in test
    head = (REPO / "README.md").read_text().split("```bash")[0]
    assert head.strip() == "# prefrun"  # nothing before the two commands


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
