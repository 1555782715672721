"""The entry point's flag parsing: one clear message for a bad config flag.

absl's own parsing shows ml_collections' traceback for a config file that does
not exist, an invalid config argument (`configs/x.py:tset`) and a
`--config.<key>` that names no key; `parse_flags` says instead what exists (the
config files beside it, the file's options, the closest keys), before anything
is loaded or compiled.
"""

import difflib
import pathlib
import re
import sys
import textwrap
from typing import NoReturn

from absl import flags

from splitmask_jax import config_args


def _config_flag_args(argv: list[str]) -> tuple[str | None, list[str]]:
  """The value of --config in `argv` and the keys its --config.<key> flags set."""
  value, keys = None, []
  for i, arg in enumerate(argv):
    if arg == "--":  # what follows is positional
      break
    if re.match(r"--?config(=|$)", arg):
      value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
    elif override := re.match(r"--?(?:no)?config\.([^=]+)", arg):
      keys.append(override.group(1))
  return value, keys


def _missing_config_file(value: str) -> str | None:
  """The error for a --config value whose file does not exist, listing the config
  files beside where it was looked for; None when it exists."""
  path = pathlib.Path(value.split(":", 1)[0])
  if path.is_file():
    return None
  folder = path.parent
  if folder.is_dir():
    names = sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py")
    where = (
      f"the config files in {folder}/ are {', '.join(names)}"
      if names
      else f"{folder}/ holds no config file (*.py)"
    )
  else:
    where = f"no folder {folder}/ exists either (a relative path starts at {pathlib.Path.cwd()})"
  return f"flag --config={value}: there is no config file {path}; {where}."


def _dotted_keys(tree: dict, prefix: str = "") -> tuple[set[str], set[str]]:
  """(the dotted keys of a nested dict's values, those of its groups)."""
  values, groups = set(), set()
  for key, value in tree.items():
    if isinstance(value, dict):
      groups.add(prefix + key)
      sub_values, sub_groups = _dotted_keys(value, f"{prefix}{key}.")
      values |= sub_values
      groups |= sub_groups
    else:
      values.add(prefix + key)
  return values, groups


def _close_keys(key: str, values: set[str]) -> list[str]:
  """Up to three keys that `key` may be a typo of: the same name in another group
  first (`model.scan` for `scan`), then the closest dotted keys and names."""
  name = key.rsplit(".", 1)[-1]
  same_name = sorted(k for k in values if k.rsplit(".", 1)[-1] == name)
  # Above difflib's default cutoff: dotted keys share their group's prefix.
  close = difflib.get_close_matches(key, sorted(values), n=3, cutoff=0.8)
  close_name = sorted(
    k for k in values if difflib.get_close_matches(name, [k.rsplit(".", 1)[-1]], cutoff=0.8)
  )
  return list(dict.fromkeys(same_name + close + close_name))[:3]


def _unknown_keys_error(value: str, keys: list[str]) -> str | None:
  """The error for --config.<key> flags that name no key of the config file's
  config, with the closest keys; None when every key exists."""
  try:
    # The config flag's own parser: it loads the file as the flag did.
    config = flags.FLAGS["config"].parser.parse(value)
    values, groups = _dotted_keys(config.to_dict())
  except Exception:  # pylint: disable=broad-except
    return None  # the error lies elsewhere: absl's own report says where
  lines = []
  for key in keys:
    if key in values | groups:
      continue
    parts = key.split(".")
    # The first component that names no key, and the group it was looked up in.
    depth = next(i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in values | groups)
    parent = ".".join(parts[: depth - 1])
    if parent in values:
      lines.append(f"flag --config.{key}: config.{parent} is a value, not a group of keys.")
      continue
    level = f"{parent}." if parent else ""
    names = sorted({k[len(level) :].split(".")[0] for k in values if k.startswith(level)})
    close = [f"config.{k}" for k in _close_keys(key, values)]
    hint = ""
    if close:
      options = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
      hint = f" (did you mean {options}?)"
    where = f"in config.{parent}" if parent else "at the top level"
    lines.append(
      f"flag --config.{key}: config.{key} is not a key of the config {value}{hint}; "
      f"the keys {where} are {', '.join(names)}."
    )
  return "\n".join(lines) or None


def _argument_error(error: BaseException) -> config_args.ArgumentError | None:
  """The error of the config file's argument behind a flag error, if it is one."""
  found = None
  while error is not None:
    if isinstance(error, config_args.ArgumentError):
      found = error  # the innermost one holds the message alone
    error = error.__cause__ or error.__context__
  return found


def _flags_error(message: str) -> NoReturn:
  """Exits as absl does on a flag it cannot parse: one message, status 1."""
  if "\n" in message:
    message = "\n" + textwrap.indent(message, "  ")
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
  sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flag parser: absl's, with one clear message for the config flags.

  A config file that does not exist, an invalid config argument, or a
  --config.<key> that names no key fails with what exists instead (the config
  files beside it, the file's options, the closest keys); absl's default shows
  ml_collections' traceback for all three.
  """
  try:
    expanded = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
  except flags.Error:
    expanded = argv[1:]  # FLAGS(argv) reports the flag file
  value, keys = _config_flag_args(expanded)
  if value is not None and (missing := _missing_config_file(value)):
    _flags_error(missing)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    argument = _argument_error(e)
    _flags_error(f"flag --config={value}: {argument}" if argument else str(e))
  except (AttributeError, KeyError):
    # How ml_collections rejects an override of a key the config lacks.
    unknown = _unknown_keys_error(value, keys) if value is not None else None
    if unknown is None:
      raise
    _flags_error(unknown)
