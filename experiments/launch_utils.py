"""What every absl launcher shares: config flags with discoverable variants, one-line errors, --multiprocess.

A launcher is:
  _CONFIG = launch_utils.define_config("experiments/configs/robustify.py")
  _WORKDIR = flags.DEFINE_string("workdir", ...)
  def main(argv): ...
  if __name__ == "__main__": launch_utils.run(main)

`run` adds: `--help` listing the config file's variants and exiting 0; `--print_config` printing the resolved
config with each field's comment from the config file; errors as one line naming the problem (the whole
traceback with --verbosity=1 or MRI_POISON_TRACEBACK=1); Ctrl-C as one line saying how to resume.
"""
from __future__ import annotations

import importlib.util
import logging as py_logging
import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Call jax.distributed.initialize() first (SLURM, TPU pods, launch/local_multiprocess.sh).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config with each field's comment; exit.")
_CHATTY = ("/orbax/", "/grain/", "/tensorflow_datasets/")
_CONFIG_FLAG = "config"
_DEFAULT_CONFIG = [""]  # the launcher's default config spec, set by define_config


class _QuietLibraries(py_logging.Filter):
  """Drops INFO records from orbax/grain/tfds: per-save I/O statistics would bury the progress lines."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or not any(p in record.pathname for p in _CHATTY)


def init_processes() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _MULTIPROCESS.value:
    import jax
    jax.distributed.initialize()


def run_study(study_run, config, workdir, argv, summary=None):
  """What every study launcher's main does: check the arguments, run `study_run(config, workdir)`, print where
  the report is and the lines `summary(result)` returns."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not workdir:
    raise app.UsageError("--workdir is required (where models, results, figures and report.md go)")
  init_processes()
  logging.set_verbosity(logging.INFO)
  result = study_run(config, workdir)
  print(f"report: {workdir}/report.md")
  for line in (summary(result) if summary else ()):
    print(line)
  return result


# ------------------------------------------------------------------------------------------------ config files


def _config_arg(argv, default: str) -> str:
  """The --config value on the command line (file.py[:variant]), else `default`."""
  for i, a in enumerate(argv):
    if a.startswith(f"--{_CONFIG_FLAG}="):
      return a.split("=", 1)[1]
    if a == f"--{_CONFIG_FLAG}" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def _config_module(path: str):
  spec = importlib.util.spec_from_file_location("_launcher_config", path)
  if spec is None or not os.path.exists(path):
    return None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def describe_config_file(spec: str) -> str:
  """The config file's docstring (commands, variants) and its VARIANTS, for --help."""
  path = spec.split(":", 1)[0]
  try:
    module = _config_module(path)
  except Exception as e:  # pylint: disable=broad-except
    return f"(could not read config file {path}: {e})"
  if module is None:
    return f"(config file {path} not found)"
  variants = getattr(module, "VARIANTS", ())
  head = f"Config file {path}" + (f"; variants (file.py:variant): {', '.join(variants)}" if variants else "")
  return head + "\n" + (module.__doc__ or "").strip()


def define_config(default: str, help_text: str = "Config file (file.py:variant); fields via --config.a.b=value."):
  _DEFAULT_CONFIG[0] = default
  try:  # with a default, ml_collections loads the file and applies --config.* overrides right here
    return config_flags.DEFINE_config_file(_CONFIG_FLAG, default, help_text, lock_config=True)
  except Exception as e:  # pylint: disable=broad-except
    _fail("config error", e)


def field_comments(path: str) -> dict[str, str]:
  """{field name: the comment on its line} from a config file's source (`name=value,  # comment`)."""
  out = {}
  try:
    lines = open(path).read().splitlines()
  except OSError:
    return out
  for line in lines:
    if "#" not in line:
      continue
    code, comment = line.split("#", 1)
    names = re.findall(r"(\w+)\s*=", code)
    if names:
      out.setdefault(names[-1], comment.strip())
  return out


def config_comments(path: str) -> dict[str, str]:
  """Field comments of a config file and of the library modules it builds on (e.g. default_data_config)."""
  import inspect
  comments = {}
  module = _config_module(path)
  sources = [path] + sorted({inspect.getsourcefile(v) for v in vars(module).values()
                             if (inspect.ismodule(v) or inspect.isfunction(v))
                             and getattr(v, "__module__", getattr(v, "__name__", "")).startswith("mri_poison")})
  for source in sources:
    for k, v in field_comments(source).items():
      comments.setdefault(k, v)
  return comments


def format_config(config, comments: dict[str, str], prefix: str = "") -> list[str]:
  lines = []
  for key in sorted(config.keys()):
    value = config[key]
    name = f"{prefix}{key}"
    if hasattr(value, "keys") and hasattr(value, "to_dict"):
      lines += format_config(value, comments, name + ".")
    else:
      note = comments.get(key, "")
      lines.append(f"{name} = {value!r}" + (f"  # {note}" if note else ""))
  return lines


# ------------------------------------------------------------------------------------------------ running


def _root_message(e: BaseException) -> str:
  # ml_collections wraps a KeyError in an AttributeError; str() of either quotes and escapes the message.
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  return msg.replace("\n", " ").strip()


def _debug() -> bool:
  if os.environ.get("MRI_POISON_TRACEBACK"):
    return True
  return any(a.startswith(("--verbosity=1", "--verbosity=2", "-v=1", "-v=2")) for a in sys.argv)


def _fail(kind: str, e: BaseException) -> None:
  if _debug():
    traceback.print_exception(e)
  hint = "" if _debug() else "  (full traceback: --verbosity=1 or MRI_POISON_TRACEBACK=1)"
  print(f"{kind}: {type(e).__name__}: {_root_message(e)}{hint}", file=sys.stderr)
  sys.exit(1)


def _wrap_main(main):
  def wrapped(argv):
    if _PRINT_CONFIG.value:
      spec = _config_arg(sys.argv, _DEFAULT_CONFIG[0])
      config = flags.FLAGS[_CONFIG_FLAG].value
      print("\n".join(format_config(config, config_comments(spec.split(":", 1)[0]))))
      return 0
    try:
      return main(argv)
    except KeyboardInterrupt:
      print("\ninterrupted: re-run the same command to resume from the last checkpoint and cached results",
            file=sys.stderr)
      sys.exit(130)
    except SystemExit:
      raise
    except Exception as e:  # pylint: disable=broad-except
      _fail("error", e)
  return wrapped


def run(main) -> None:
  """app.run(main) with discoverable --help, --print_config, one-line errors and a resume hint on Ctrl-C."""
  if any(a in ("--help", "-h", "--helpfull", "-?") for a in sys.argv[1:]):
    flag = flags.FLAGS[_CONFIG_FLAG]
    print((sys.modules["__main__"].__doc__ or "").strip() + "\n")
    print(describe_config_file(_config_arg(sys.argv, _DEFAULT_CONFIG[0])) + "\n")
    print("Flags:\n  --config=FILE.py[:VARIANT]   " + (flag.help or "")
          + "\n  --print_config               print the resolved config with comments, then exit"
          + "\n  --workdir=DIR                where everything goes; re-running resumes"
          + "\n  --multiprocess               call jax.distributed.initialize() first"
          + "\n  --verbosity=1                full tracebacks on errors")
    sys.exit(0)
  try:
    app.run(_wrap_main(main))
  except SystemExit:
    raise
  except KeyboardInterrupt:
    print("\ninterrupted: re-run the same command to resume", file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    _fail("config error", e)  # raised while parsing flags, e.g. a misspelt --config.a.b override
