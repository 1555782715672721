"""The repository is formatted by its one formatter (pyproject.toml: ruff, two-space
indents, double quotes) with sorted imports."""

import importlib.util
import subprocess
import sys

import helpers


def _ruff(*args):
  # The interpreter's own ruff, found whether or not its environment is activated.
  assert importlib.util.find_spec("ruff"), "ruff is a test requirement: pip install -e '.[test]'"
  command = [sys.executable, "-m", "ruff", *args]
  return subprocess.run(command, cwd=helpers.ROOT, capture_output=True, text=True)


def test_code_is_formatted():
  result = _ruff("format", "--check", ".")
  assert result.returncode == 0, result.stdout + result.stderr + "\nRun: ruff format ."


def test_imports_are_sorted():
  result = _ruff("check", ".")
  assert result.returncode == 0, result.stdout + result.stderr + "\nRun: ruff check --fix ."
