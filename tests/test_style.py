"""The repository is formatted by its one formatter (pyproject.toml: ruff, two-space
indents, double quotes) with sorted imports."""

import shutil
import subprocess

import helpers


def _ruff(*args):
  ruff = shutil.which("ruff")
  assert ruff, "ruff is a test requirement: pip install -e '.[test]'"
  return subprocess.run([ruff, *args], cwd=helpers.ROOT, capture_output=True, text=True)


def test_code_is_formatted():
  result = _ruff("format", "--check", ".")
  assert result.returncode == 0, result.stdout + result.stderr + "\nRun: ruff format ."


def test_imports_are_sorted():
  result = _ruff("check", ".")
  assert result.returncode == 0, result.stdout + result.stderr + "\nRun: ruff check --fix ."
