"""Transparent huge pages for the large host buffers of an XLA:CPU step.

XLA:CPU allocates each step's temporaries as one buffer (177 MiB for the Mini/8@32
SplitMask step at batch 64) and frees it when the step ends. glibc's malloc serves an
allocation that large with a fresh `mmap` and returns it with `munmap`, so every step
faults the whole buffer in again, 4 KiB at a time: 44,000 page faults and about a quarter
of the step's CPU time spent in the kernel on a 2-core machine (benchmarks/RESULTS.md).
glibc 2.35 and later can advise the kernel to back such mappings with 2 MiB pages
(the `glibc.malloc.hugetlb=1` tunable), which turns those faults into a few hundred.
The kernel's default transparent-huge-page mode, `madvise`, honours that advice.

glibc reads its tunables once, when the process starts, from `GLIBC_TUNABLES`: there is
no call that sets this one later (`mallopt` has no equivalent), and no library does it
for a Python program. So `reexec_with_huge_pages` starts the same command again, once,
with the tunable set, before anything is imported. It does nothing where it would not
help or where the caller decided otherwise: not Linux with glibc 2.35+, huge pages
disabled by the kernel, `GLIBC_TUNABLES` already naming `glibc.malloc.hugetlb`, or
`SPLITMASK_JAX_HUGE_PAGES=0`.

This module must not import JAX: it runs before JAX is imported.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "SPLITMASK_JAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running glibc, or None for another C library."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, OSError, ValueError):
    return None
  if name != "glibc":
    return None
  major, minor = version.split(".")[:2]
  return int(major), int(minor)


def _thp_mode() -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), if known."""
  try:
    with open(THP_MODE_FILE) as f:
      text = f.read()
  except OSError:
    return None
  return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


def tunables_with_huge_pages(environ) -> str | None:
  """The `GLIBC_TUNABLES` value that adds huge pages for large allocations to
  `environ`'s, or None where the process should be left as it is (see the module's
  docstring for when)."""
  if environ.get(OPT_OUT, "1") == "0" or platform.system() != "Linux":
    return None
  version = _glibc_version()
  if version is None or version < (2, 35) or _thp_mode() not in ("madvise", "always"):
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in current:
    return None
  return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def reexec_with_huge_pages() -> None:
  """Replaces this process with the same command, huge pages enabled for large host
  allocations, where `tunables_with_huge_pages` says so; returns otherwise.

  Call it first thing in a program's `__main__`, before JAX or any thread exists. The
  process keeps its PID (launchers and preemption signals see the same process), its
  arguments and the rest of its environment. `SPLITMASK_JAX_HUGE_PAGES=0` turns it off.
  """
  tunables = tunables_with_huge_pages(os.environ)
  if tunables is None:
    return
  env = dict(os.environ, GLIBC_TUNABLES=tunables)
  # The original command line (`python -m splitmask_jax.main ...`, `python -c ...`),
  # which sys.argv no longer holds in full for -m and -c.
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
