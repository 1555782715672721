"""The argument of a config file: `--config=configs/x.py:beit,test,share=0.1`.

Every file in `configs/` declares the options it takes and reads its argument with
`parse`, so that they all share one syntax and one set of errors: options are
comma-separated; a flag is its name (`beit`, or `beit=false`), any other option
is `name=value` with a typed value (`share=0.1`); an unknown option fails with the
list of the file's options (and the closest one to a typo). The options used by
several files are defined once here, with one meaning everywhere: `test` is
`recipes.use_test_settings` in every file.

ml_collections passes the text after the colon as one string; it has no parser of
its own for it, hence this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Sequence
from typing import Any

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ArgumentError(ValueError):
  """A config file's argument that `parse` cannot read; the message says what it allows.

  Its own class so that the command line can print the message alone: ml_collections
  wraps errors raised while loading a config file into a traceback.
  """


@dataclasses.dataclass(frozen=True)
class Option:
  """One option of a config file's argument.

  Attributes:
    name: how it is written.
    type: bool for a flag; int, float or str for `name=value`.
    default: its value when absent.
    help: what it does, for the file's docstring and the error listing.
    placeholder: the value's name in the usage line (`share=<fraction>`).
  """

  name: str
  type: type
  default: Any
  help: str
  placeholder: str = "value"
  example: str | None = None  # a value for the error message; None: the default

  @property
  def usage(self) -> str:
    return self.name if self.type is bool else f"{self.name}=<{self.placeholder}>"

  def convert(self, text: str | None, item: str) -> Any:
    """The value of `item` (`name` or `name=text`); raises ArgumentError naming the option."""
    if self.type is bool:
      if text is None or text.lower() in _TRUE:
        return True
      if text.lower() in _FALSE:
        return False
      raise ArgumentError(
        f"Config argument {item!r}: {self.name} is a flag; write "
        f"{self.name} (or {self.name}=false)."
      )
    if text is None or not text:
      raise ArgumentError(f"Config argument {item!r}: {self.name} takes a value, {self.usage}.")
    try:
      return self.type(text)
    except ValueError:
      kind = {int: "an integer", float: "a number"}.get(self.type, self.type.__name__)
      example = self.default if self.example is None else self.example
      raise ArgumentError(
        f"Config argument {item!r}: {self.usage} needs {kind}, e.g. {self.name}={example}."
      ) from None


# The options several config files take, one meaning each.
BEIT = Option("beit", bool, False, "the BEiT objective instead of SplitMask")
MAE = Option("mae", bool, False, "the MAE objective (pixels of the masked patches)")
SIMMIM = Option("simmim", bool, False, "the SimMIM objective ([MASK] tokens, L1 on pixels)")
DINO = Option("dino", bool, False, "the DINO objective (self-distillation, multi-crop)")
# Each names its objective; SplitMask when none is given.
OBJECTIVE_OPTIONS = (BEIT, MAE, SIMMIM, DINO)
TEST = Option("test", bool, False, "a tiny model for a few steps: the smoke test of a config")
SHARE = Option(
  "share",
  float,
  1.0,
  "train on a class-balanced share of the training split, with as many updates as on all of it",
  placeholder="fraction",
  example="0.1",
)
FINETUNE = Option("finetune", bool, False, "fine-tune with Table 9's recipe")
PROBE = Option("probe", bool, False, "linear probes on every block of the encoder")
SMALL_DATA = Option(
  "small_data",
  bool,
  False,
  "the small-data recipe: uniform 75% masking and photometric augmentation",
)


def usage(options: Sequence[Option]) -> str:
  """`beit, share=<fraction>, test`: the options as they are written."""
  return ", ".join(o.usage for o in options)


def parse(
  arg: str | None, options: Sequence[Option], *, exclusive: Sequence[tuple[str, str]] = ()
) -> types.SimpleNamespace:
  """Reads a config file's argument.

  Args:
    arg: the text after the colon of `--config=file.py:...`, or None.
    options: the options the file takes.
    exclusive: pairs of options that cannot be given together.

  Returns:
    A namespace with one attribute per option: its value, or its default.

  Raises:
    ArgumentError: an unknown or repeated option, a value of the wrong type, or
      two exclusive options; the message lists the allowed options.
  """
  by_name = {o.name: o for o in options}
  values = {o.name: o.default for o in options}
  given = set()
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    name, _, text = item.partition("=")
    name = name.strip()
    if name not in by_name:
      close = difflib.get_close_matches(name, list(by_name), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ArgumentError(
        f"Unknown config argument {item!r}{hint}; allowed: "
        f"{usage(options)}, comma-separated after the config file "
        "(e.g. configs/<name>.py:test)."
      )
    if name in given:
      raise ArgumentError(f"Config argument {name!r} is given twice in {arg!r}.")
    given.add(name)
    values[name] = by_name[name].convert(text.strip() if "=" in item else None, item)
  for first, second in exclusive:
    if values[first] is True and values[second] is True:
      raise ArgumentError(f"Config arguments {first!r} and {second!r} exclude each other.")
  return types.SimpleNamespace(**values)


def objective(args: types.SimpleNamespace) -> str:
  """The objective that `parse`'s result names ('splitmask' when no objective option is
  set); raises ArgumentError when several are set."""
  chosen = [o.name for o in OBJECTIVE_OPTIONS if getattr(args, o.name, False)]
  if len(chosen) > 1:
    raise ArgumentError(f"Config arguments {' and '.join(map(repr, chosen))} exclude each other.")
  return chosen[0] if chosen else "splitmask"
