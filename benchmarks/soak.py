r"""Soak run: does a long pre-training run leak memory, files, threads or time?

Runs the real entry point (`python -m splitmask_jax.main`) as a child process for
a few thousand steps of a small config, evaluating and checkpointing every
`--every` steps, and samples the child from /proc twice a second: resident
memory (VmRSS), open file descriptors, threads and child processes. Samples are
aligned with the steps by reading the run's `metrics.jsonl` as it grows. A leak
of anything created per evaluation or per checkpoint (orbax's async-save threads
and managers, grain iterators and their buffers, TensorBoard writers, event or
checkpoint files left open, worker processes) grows over the run's 60 or so
evaluations and checkpoints; a slowdown shows as a longer step, or a longer wall
time per 1000 steps, at the end than at the start.

  python -m benchmarks.soak --out=benchmarks/soak.json   # 3000 steps, eval + save every 50
  python -m benchmarks.soak --steps=300                  # a quick check of the script
  python -m benchmarks.soak --config=configs/fashion_mnist.py:beit,test \
      --override=data.num_workers=2                      # any config key: repeat --override

How to read it. The run is cut into intervals of `--every` steps; each holds one
evaluation and one (asynchronous) save at its start and `--every` training
steps, so intervals are alike and comparable. A save in flight holds a few
threads and files open for a second or so, so within an interval the counts
move; their minimum is what the process holds at rest, and a leak raises it.

- first / warm / end: the interval after the first checkpoint (the evaluation
  step compiles and the first save creates orbax's and tensorstore's thread
  pools in it), the first after warm-up (`--warmup_steps`, by default three
  checkpoints or a tenth of the run, which also covers the first deletions of old
  checkpoints) and the last whole interval before the final step, each as min-max
  over its samples. The fd targets and thread names more numerous at the end's
  rest than at warm-up's are listed.
- `rss slope`: least-squares MiB per 1000 steps over every sample after warm-up,
  and the same over each interval's minimum. RSS moves by some MiB within an
  interval (allocator, save buffers), so a slope of a few MiB per 1000 steps,
  against a process of several hundred MiB, is flat; a buffer leaked per
  checkpoint grows by 20 of them per 1000 steps at the default interval.
- step time: from `metrics.jsonl` (`batch_size / images_per_sec`), training
  alone (evaluation and saving fall outside its windows), over the first
  `--window` steps after the second checkpoint (the evaluation step compiled)
  and the last `--window` steps; `wall` is seconds per 1000 steps over the same
  windows, evaluations and saves included. Both move with the machine's load.

Linux only (it reads /proc). The child's output goes to `<workdir>/soak.log`. The
k-NN evaluation after the last step is off (`--knn` keeps it): it runs once, so
it cannot show a leak, and it would only delay the end.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

from splitmask_jax.runtime import metric_log

_STEPS = flags.DEFINE_integer("steps", 3000, "Training steps (config.num_steps).")
_EVERY = flags.DEFINE_integer("every", 50, "Steps between evaluations and checkpoints.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Steps between metrics.jsonl records.")
_CONFIG = flags.DEFINE_string("config", "configs/fashion_mnist.py:test", "The run's config.")
_OVERRIDE = flags.DEFINE_multi_string(
  "override", [], "More config keys for the run, KEY=VALUE (passed as --config.KEY=VALUE)."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "The run's workdir, new or empty (default: a new temporary folder)."
)
_OUT = flags.DEFINE_string("out", None, "Write the summary, intervals and samples here (JSON).")
_INTERVAL = flags.DEFINE_float("interval", 0.5, "Seconds between samples.")
_WARMUP = flags.DEFINE_integer(
  "warmup_steps", None, "Steps left out of the slopes (default: max(3 * every, steps / 10))."
)
_WINDOW = flags.DEFINE_integer(
  "window", None, "Steps of the first and last timing windows (default: a tenth of the run)."
)
_KNN = flags.DEFINE_bool("knn", False, "Keep the k-NN evaluation after the last step.")

SAMPLE_KEYS = ("t", "step", "rss_mib", "fds", "threads", "children")


def read_proc(pid: int) -> dict | None:
  """RSS (MiB), open fds, threads and child processes of `pid`; None once it is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      status = dict(line.split(":", 1) for line in f if ":" in line)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    children = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
      with open(f"/proc/{pid}/task/{tid}/children") as f:
        children += len(f.read().split())
  except (FileNotFoundError, ProcessLookupError):  # it exited between two reads
    return None
  if "VmRSS" not in status:  # a zombie: exited, not yet reaped
    return None
  return {
    "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
    "fds": fds,
    "threads": int(status["Threads"]),
    "children": children,
  }


def fd_targets(pid: int, workdir: str) -> collections.Counter:
  """What the open fds point at; socket and pipe numbers dropped, so that two
  snapshots compare."""
  targets = collections.Counter()
  try:
    fds = os.listdir(f"/proc/{pid}/fd")
  except FileNotFoundError:
    return targets
  for fd in fds:
    try:
      target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:  # closed since the listing
      continue
    if target.startswith(("socket:", "pipe:")):
      target = target.split(":")[0]
    targets[target.replace(workdir, "<workdir>")] += 1
  return targets


def thread_names(pid: int) -> collections.Counter:
  """Threads by their OS name (Python 3.11's own threads are all `python`)."""
  names = collections.Counter()
  try:
    tids = os.listdir(f"/proc/{pid}/task")
  except FileNotFoundError:
    return names
  for tid in tids:
    try:
      with open(f"/proc/{pid}/task/{tid}/comm") as f:
        names[f.read().strip()] += 1
    except FileNotFoundError:
      continue
  return names


def grown(before: collections.Counter, after: collections.Counter) -> dict[str, int]:
  """The keys more numerous in `after`, with how many more."""
  return {k: after[k] - before[k] for k in sorted(after) if after[k] > before[k]}


class MetricTail:
  """The latest step in a growing metrics.jsonl, read a complete line at a time."""

  def __init__(self, path: str):
    self._path, self._offset, self._partial = path, 0, ""
    self.step = -1

  def poll(self) -> None:
    try:
      with open(self._path) as f:
        f.seek(self._offset)
        text = f.read()
        self._offset = f.tell()
    except FileNotFoundError:
      return
    lines = (self._partial + text).split("\n")
    self._partial = lines.pop()  # '' or a record still being written
    for line in lines:
      if line.strip():
        self.step = max(self.step, int(json.loads(line)["step"]))


class Rest:
  """The snapshot (fd targets, thread names) of an interval's sample with the fewest
  fds and threads: what the process holds when no save is in flight."""

  def __init__(self):
    self.key, self.fd_targets, self.thread_names = None, None, None

  def offer(self, sample: dict, pid: int, workdir: str) -> None:
    key = (sample["fds"], sample["threads"])
    if self.key is None or key < self.key:
      self.key = key
      self.fd_targets, self.thread_names = fd_targets(pid, workdir), thread_names(pid)


def interval_stats(samples: list[dict], every: int, steps: int) -> list[dict]:
  """Per interval k (the latest logged step in [k * every, (k + 1) * every)):
  min and max of each measure, k from 1 (after the first checkpoint) to the last
  before the final step."""
  groups = collections.defaultdict(list)
  for s in samples:
    if s["step"] >= 0:
      groups[s["step"] // every].append(s)
  stats = []
  for k in sorted(groups):
    if not 1 <= k < steps // every:
      continue
    group = groups[k]
    entry = {"step": k * every, "t": group[0]["t"], "samples": len(group)}
    for key in ("rss_mib", "fds", "threads", "children"):
      values = [s[key] for s in group]
      entry[key] = [min(values), max(values)]
    stats.append(entry)
  return stats


def slope_per_1000(steps, values) -> float | None:
  """Least-squares growth of `values` per 1000 steps; None with too few distinct steps."""
  steps, values = np.asarray(steps, float), np.asarray(values, float)
  if len(np.unique(steps)) < 2:
    return None
  return float(np.polyfit(steps, values, 1)[0] * 1000)


def step_times(records: list[dict], batch_size: int, lo: int, hi: int) -> dict:
  """Training step time over the log records of steps (lo, hi]."""
  rates = [r["images_per_sec"] for r in records if "images_per_sec" in r and lo < r["step"] <= hi]
  if not rates:
    return {"steps": [lo, hi], "records": 0}
  seconds = batch_size / np.asarray(rates)
  return {
    "steps": [lo, hi],
    "records": len(rates),
    "step_ms_mean": float(seconds.mean() * 1000),
    "step_ms_median": float(np.median(seconds) * 1000),
    "images_per_sec": float(batch_size / seconds.mean()),
  }


def wall_per_1000(samples: list[dict], lo: int, hi: int) -> float | None:
  """Wall seconds per 1000 steps from the first sample that saw step `lo` logged to
  the first that saw `hi`: both just before an evaluation, so the steps between
  hold (hi - lo) / every evaluations and saves."""
  first = next((s for s in samples if s["step"] >= lo), None)
  last = next((s for s in samples if s["step"] >= hi), None)
  if first is None or last is None or last["step"] <= first["step"]:
    return None
  return (last["t"] - first["t"]) / (last["step"] - first["step"]) * 1000


def summarize(samples, intervals, records, rests, run) -> dict:
  steps, every, batch_size = run["steps"], run["every"], run["batch_size"]
  warmup, window = run["warmup_steps"], run["window"]
  steady = [s for s in samples if warmup <= s["step"] < steps]
  steady_intervals = [i for i in intervals if i["step"] >= warmup]
  # The interval whose rest `rests["warm"]` is.
  warm = next(i for i in intervals if i["step"] == run["warm_interval"])
  start, end = intervals[0], intervals[-1]
  return {
    "steps": steps,
    "every": every,
    "batch_size": batch_size,
    "samples": len(samples),
    "steady_samples": len(steady),
    "warmup_steps": warmup,
    "first": start,
    "warm": warm,
    "end": end,
    "rss_mib_peak": max(s["rss_mib"] for s in samples),
    "rss_mib_per_1000_steps": slope_per_1000(
      [s["step"] for s in steady], [s["rss_mib"] for s in steady]
    ),
    "rss_min_mib_per_1000_steps": slope_per_1000(
      [i["step"] for i in steady_intervals], [i["rss_mib"][0] for i in steady_intervals]
    ),
    "fds_min_per_1000_steps": slope_per_1000(
      [i["step"] for i in steady_intervals], [i["fds"][0] for i in steady_intervals]
    ),
    "threads_min_per_1000_steps": slope_per_1000(
      [i["step"] for i in steady_intervals], [i["threads"][0] for i in steady_intervals]
    ),
    "fds_range_steady": [min(s["fds"] for s in steady), max(s["fds"] for s in steady)],
    "threads_range_steady": [min(s["threads"] for s in steady), max(s["threads"] for s in steady)],
    "fd_targets_at_rest_end": dict(sorted(rests["end"].fd_targets.items())),
    "fd_targets_grown": grown(rests["warm"].fd_targets, rests["end"].fd_targets),
    "thread_names_grown": grown(rests["warm"].thread_names, rests["end"].thread_names),
    "fd_targets_grown_since_first": grown(rests["first"].fd_targets, rests["end"].fd_targets),
    "thread_names_grown_since_first": grown(rests["first"].thread_names, rests["end"].thread_names),
    # The first interval holds the compilation of the evaluation step.
    "first_window": step_times(records, batch_size, 2 * every, 2 * every + window),
    "last_window": step_times(records, batch_size, steps - window, steps),
    "wall_s_per_1000_steps_first": wall_per_1000(samples, 2 * every, 2 * every + window),
    "wall_s_per_1000_steps_last": wall_per_1000(samples, steps - window, steps),
  }


def _range(pair, spec="d") -> str:
  return f"{pair[0]:{spec}}-{pair[1]:{spec}}"


def print_interval(i: dict) -> None:
  print(
    f"  step {i['step']:6d}  {i['t']:7.1f} s  RSS {_range(i['rss_mib'], '.1f')} MiB"
    f"  fds {_range(i['fds'])}  threads {_range(i['threads'])}"
    f"  children {_range(i['children'])}  ({i['samples']} samples)",
    flush=True,
  )


def print_summary(s: dict) -> None:
  def fmt(x, spec="+.2f"):
    return "-" if x is None else format(x, spec)

  first, warm, end = s["first"], s["warm"], s["end"]
  print(f"\nSoak: {s['steps']} steps, eval + save every {s['every']}, batch {s['batch_size']}")
  print(f"  samples: {s['samples']}, {s['steady_samples']} after step {s['warmup_steps']}")
  print(
    f"  intervals after steps {first['step']} (first checkpoint), {warm['step']} (warm-up) "
    f"and {end['step']} (end):"
  )
  for key, unit in (("rss_mib", " MiB"), ("fds", ""), ("threads", ""), ("children", "")):
    spec = ".1f" if key == "rss_mib" else "d"
    ranges = " -> ".join(f"{_range(i[key], spec)}{unit}" for i in (first, warm, end))
    print(f"    {key}: {ranges}")
  print(
    f"  RSS slope after warm-up: {fmt(s['rss_mib_per_1000_steps'])} MiB / 1000 steps "
    f"(all samples), {fmt(s['rss_min_mib_per_1000_steps'])} (interval minima); "
    f"peak {s['rss_mib_peak']:.1f} MiB"
  )
  print(
    f"  fds after warm-up: {_range(s['fds_range_steady'])}, minima "
    f"{fmt(s['fds_min_per_1000_steps'])} / 1000 steps; threads "
    f"{_range(s['threads_range_steady'])}, minima {fmt(s['threads_min_per_1000_steps'])} "
    "/ 1000 steps"
  )
  print(f"  fd targets more numerous at rest, end vs warm-up: {s['fd_targets_grown'] or 'none'}")
  print(
    f"  thread names more numerous at rest, end vs warm-up: {s['thread_names_grown'] or 'none'}"
  )
  print(
    f"  (end vs first checkpoint: fds {s['fd_targets_grown_since_first'] or 'none'}; threads ",
    end="",
  )
  print(f"{s['thread_names_grown_since_first'] or 'none'})")
  for name in ("first", "last"):
    w, wall = s[f"{name}_window"], s[f"wall_s_per_1000_steps_{name}"]
    lo, hi = w["steps"]
    if not w["records"]:
      print(f"  {name} window ({lo}, {hi}]: no records")
      continue
    print(
      f"  {name} window ({lo}, {hi}]: step {w['step_ms_mean']:.1f} ms mean, "
      f"{w['step_ms_median']:.1f} ms median, {w['images_per_sec']:.0f} img/s; "
      f"wall {fmt(wall, '.1f')} s / 1000 steps with evaluations and saves"
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  steps, every = _STEPS.value, _EVERY.value
  if steps // every < 4:
    raise app.UsageError("--steps must cover at least 4 intervals of --every steps.")
  warmup = _WARMUP.value if _WARMUP.value is not None else max(3 * every, steps // 10)
  window = _WINDOW.value or max(every, steps // 10 // every * every)
  if warmup >= steps - every:
    raise app.UsageError(f"--warmup_steps={warmup} leaves no interval of {steps} steps.")
  workdir = os.path.abspath(_WORKDIR.value or tempfile.mkdtemp(prefix="soak_"))
  if os.path.isdir(workdir) and os.listdir(workdir):
    # A workdir holding a checkpoint would be resumed: a shorter run than asked.
    raise app.UsageError(f"--workdir={workdir} is not empty; a soak run starts from scratch.")
  os.makedirs(workdir, exist_ok=True)
  keys = {
    "num_steps": steps,
    "log_every": _LOG_EVERY.value,
    "eval_every": every,
    "checkpoint_every": every,
    "knn.enabled": _KNN.value,
  }
  keys.update(item.split("=", 1) for item in _OVERRIDE.value)
  command = [
    sys.executable,
    "-m",
    "splitmask_jax.main",
    f"--config={_CONFIG.value}",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in keys.items()),
  ]
  print("python " + " ".join(command[1:]), flush=True)
  print(f"The run's output: {workdir}/soak.log", flush=True)

  tail = MetricTail(os.path.join(workdir, metric_log.METRICS_FILE))
  samples = []
  rests = {}  # interval index -> Rest: the first, the first after warm-up, the latest
  report_every = max(every, steps // 10 // every * every)
  launched = time.monotonic()
  with open(os.path.join(workdir, "soak.log"), "w") as log_file:
    child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
      while child.poll() is None:
        tail.poll()
        sample = read_proc(child.pid)
        if sample is not None:
          sample = {"t": round(time.monotonic() - launched, 2), "step": tail.step, **sample}
          samples.append(sample)
          k = sample["step"] // every
          if 1 <= k < steps // every:
            if k not in rests:
              finished = max(rests, default=None)
              if finished is not None:
                done = interval_stats(samples, every, steps)
                if done[-2]["step"] % report_every == 0 or finished == 1:
                  print_interval(done[-2])
                warm_k = min((j for j in rests if j * every >= warmup), default=None)
                if finished not in (min(rests), warm_k):
                  del rests[finished]
              rests[k] = Rest()
            rests[k].offer(sample, child.pid, workdir)
        time.sleep(_INTERVAL.value)
    except BaseException:
      child.kill()
      child.wait()
      raise
  elapsed = time.monotonic() - launched
  if child.returncode != 0:
    with open(os.path.join(workdir, "soak.log")) as f:
      print("".join(f.readlines()[-30:]), file=sys.stderr)
    raise SystemExit(f"The run failed with status {child.returncode}; its log: {workdir}/soak.log")
  intervals = interval_stats(samples, every, steps)
  if len(intervals) < 2 or intervals[-1]["step"] != (steps // every - 1) * every:
    raise SystemExit(
      f"Some intervals have no sample ({len(intervals)} of {steps // every - 1}): sample more "
      "often (--interval) or checkpoint less often (--every)."
    )
  print_interval(intervals[-1])
  warm_k = min(j for j in rests if j * every >= warmup)
  rests = {"first": rests[min(rests)], "warm": rests[warm_k], "end": rests[max(rests)]}
  run_warm = warm_k * every

  with open(os.path.join(workdir, "config.json")) as f:
    batch_size = json.load(f)["batch_size"]
  records = metric_log.read_metrics(workdir)
  run = {
    "command": ["python", *command[1:]],
    "workdir": workdir,
    "steps": steps,
    "every": every,
    "batch_size": batch_size,
    "warmup_steps": warmup,
    "window": window,
    "interval_s": _INTERVAL.value,
    "warm_interval": run_warm,
  }
  summary = summarize(samples, intervals, records, rests, run)
  summary["elapsed_s"] = elapsed
  print_summary(summary)
  print(f"  elapsed: {elapsed:.0f} s, load average after: {os.getloadavg()}")
  if _OUT.value:
    result = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": platform.node(),
      "cpus": os.cpu_count(),
      "load_average_after": os.getloadavg(),
      "run": run,
      "summary": summary,
      "intervals": intervals,
      "sample_keys": SAMPLE_KEYS,
      "samples": [[s[k] for k in SAMPLE_KEYS] for s in samples],
    }
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)
    print(f"Wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
