"""README's opening commands and CI stay in step."""

import os
import re

from conftest import ROOT


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    return [line.strip() for line in re.findall(r"^    (\S.*)$", text, flags=re.M)]


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    assert commands[0] == "bash launch/digits_pipeline.sh"
    test_command = commands[1]
    assert "pytest" in test_command
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert test_command in ci


def test_readme_commands_point_at_existing_files():
    for command in _readme_commands()[:2]:
        for token in command.split():
            if token.endswith((".sh", ".py")):
                assert os.path.isfile(os.path.join(ROOT, token)), token
