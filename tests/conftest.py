"""Test-session setup: 8 fake CPU devices, so sharded code paths run on a laptop.

XLA reads the flag once, when the CPU backend starts: it must be set before
anything initialises JAX's backends.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
