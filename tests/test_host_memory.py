"""The entry point's huge pages for large host buffers: when the process is started
again with glibc's tunable, that it keeps its PID, arguments and environment, and the
cases it leaves alone."""

import os
import subprocess
import sys
import textwrap

import pytest

from splitmask_jax.runtime import host_memory

from helpers import ROOT

PROGRAM = textwrap.dedent("""
  import os, sys
  print(os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], os.environ["KEPT"], flush=True)
  from splitmask_jax.runtime import host_memory
  host_memory.reexec_with_huge_pages()
  print("after", flush=True)
""")


def _run(**env):
  environ = {
    k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)
  }
  environ.update(env, KEPT="yes")
  result = subprocess.run(
    [sys.executable, "-c", PROGRAM, "--flag=1", "x"],
    cwd=ROOT,
    env=environ,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


@pytest.mark.skipif(
  host_memory.tunables_with_huge_pages({}) is None,
  reason="this machine's C library or kernel has no huge pages to advise",
)
def test_the_process_restarts_once_with_the_tunable_and_keeps_pid_and_arguments():
  first, second, after = _run()
  pid = first.split(" ", 1)[0]
  assert first == f"{pid} None ['--flag=1', 'x'] yes"
  assert second == f"{pid} glibc.malloc.hugetlb=1 ['--flag=1', 'x'] yes"
  assert after == "after"


def test_an_existing_setting_and_the_opt_out_are_left_alone():
  lines = _run(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  assert len(lines) == 2 and "glibc.malloc.hugetlb=0 " in lines[0] and lines[1] == "after"
  lines = _run(**{host_memory.OPT_OUT: "0"})
  assert len(lines) == 2 and " None " in lines[0]


def test_tunables_are_appended_to_the_callers(monkeypatch):
  monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 36))
  monkeypatch.setattr(host_memory, "_thp_mode", lambda: "madvise")
  monkeypatch.setattr(host_memory.platform, "system", lambda: "Linux")
  assert host_memory.tunables_with_huge_pages({}) == "glibc.malloc.hugetlb=1"
  assert (
    host_memory.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  )
  monkeypatch.setattr(host_memory, "_thp_mode", lambda: "never")
  assert host_memory.tunables_with_huge_pages({}) is None
  monkeypatch.setattr(host_memory, "_thp_mode", lambda: "always")
  monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 31))
  assert host_memory.tunables_with_huge_pages({}) is None
  monkeypatch.setattr(host_memory, "_glibc_version", lambda: None)  # musl, say
  assert host_memory.tunables_with_huge_pages({}) is None
