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

import ast
import difflib
import errno
import importlib.util
import io
import logging as py_logging
import os
import re
import shutil
import sys
import tokenize
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Call jax.distributed.initialize() first (SLURM, TPU pods, launch/local_multiprocess.sh; "
    "or env MRI_POISON_MULTIPROCESS=1).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config with each field's comment; exit.")
_CHATTY = ("/orbax/", "/grain/", "/tensorflow_datasets/")
_CONFIG_FLAG = "config"
_DEFAULT_CONFIG = [""]  # the launcher's default config spec, set by define_config


class _QuietLibraries(py_logging.Filter):
  """Drops INFO records from orbax/grain/tfds: per-save I/O statistics would bury the progress lines."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or not any(p in record.pathname for p in _CHATTY)


MULTIPROCESS_ENV = "MRI_POISON_MULTIPROCESS"  # "1": as --multiprocess
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _slurm_first_host(nodelist: str) -> str:
  """The first host name of a SLURM node list ("gpu[003-005,9],cpu1" -> "gpu003")."""
  first = re.match(r"[^,\[]*(\[[^\]]*\])?", nodelist.strip()).group(0)
  if "[" not in first:
    return first
  prefix, ranges = first.split("[", 1)
  return prefix + re.split(r"[-,]", ranges.rstrip("]"))[0]


def distributed_args(environ=None) -> dict:
  """Keyword arguments for jax.distributed.initialize() here: only what jax 0.10.2 does not detect by itself.

  - JAX_NUM_PROCESSES and JAX_PROCESS_ID (set by launch/local_multiprocess.sh; jax reads neither) with
    JAX_COORDINATOR_ADDRESS (host:port, which jax does read): passed explicitly; a loopback coordinator also
    binds to loopback only (jax's default binds every interface), unless JAX_COORDINATOR_BIND_ADDRESS says
    otherwise.
  - SLURM under srun (SLURM_STEP_NODELIST, SLURM_LOCALID, ... present): {} - jax's SlurmCluster reads them and
    gives each task the GPU of its SLURM_LOCALID (one process per GPU). Tasks started without srun lack the
    step variables; then coordinator (first host of SLURM_JOB_NODELIST, port JAX_COORDINATOR_PORT or a port
    derived from the job id, as jax does), num_processes (SLURM_NTASKS) and process_id (SLURM_PROCID) are filled.
  - Cloud TPU VMs (pods included), Open MPI, Kubernetes: {} - jax detects them.
  """
  env = os.environ if environ is None else environ
  if "JAX_NUM_PROCESSES" in env or "JAX_PROCESS_ID" in env:
    missing = [k for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
    if missing:
      raise ValueError(f"multi-process environment: {missing} not set (JAX_COORDINATOR_ADDRESS=host:port, "
                       "JAX_NUM_PROCESSES and JAX_PROCESS_ID go together; see launch/README.md)")
    address = env["JAX_COORDINATOR_ADDRESS"]
    args = {"coordinator_address": address, "num_processes": int(env["JAX_NUM_PROCESSES"]),
            "process_id": int(env["JAX_PROCESS_ID"])}
    host = address.rsplit(":", 1)[0]
    if host in _LOCAL_HOSTS and not env.get("JAX_COORDINATOR_BIND_ADDRESS"):
      args["coordinator_bind_address"] = address
    return args
  slurm_step = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in env for k in slurm_step):
    return {}
  nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
  if nodelist and all(k in env for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")):
    port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1))
    return {"coordinator_address": f"{_slurm_first_host(nodelist)}:{port}",
            "num_processes": int(env["SLURM_NTASKS"]), "process_id": int(env["SLURM_PROCID"])}
  return {}


def multiprocess_requested(environ=None) -> bool:
  """--multiprocess (when flags are parsed) or MRI_POISON_MULTIPROCESS=1."""
  env = os.environ if environ is None else environ
  flag = _MULTIPROCESS.value if flags.FLAGS.is_parsed() else False
  return bool(flag) or env.get(MULTIPROCESS_ENV, "0").strip().lower() in ("1", "true", "yes")


def init_processes(multiprocess: bool | None = None) -> None:
  """Quiets chatty library logs; with `multiprocess` (default: --multiprocess or MRI_POISON_MULTIPROCESS=1)
  starts JAX's multi-controller runtime: jax.distributed.initialize(**distributed_args()). Call it before any
  other JAX call; a second call does nothing."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if not (multiprocess_requested() if multiprocess is None else multiprocess):
    return
  import jax
  if jax.distributed.is_initialized():
    return
  args = distributed_args()
  logging.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v!r}" for k, v in args.items()))
  jax.distributed.initialize(**args)


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


def _dotted(node) -> tuple[str, bool] | None:
  """("a.b", True) for the expression `config.a.b`, ("t.a", False) for `t.a` (a local name), else None."""
  names = []
  while isinstance(node, ast.Attribute):
    names.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return ".".join(reversed(names if node.id == "config" else names + [node.id])), node.id == "config"


def _sections(tree) -> list[tuple[tuple[int, int], int, str, bool]]:
  """((first line, column), last line, section, under `config`) of each `<x>.<section> =
  ml_collections.ConfigDict(...)` value and each `<x>.<section>.update(...)` call."""
  spans = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and len(node.targets) == 1:
      section, call = _dotted(node.targets[0]), node.value
      if section and section[0] and getattr(call.func, "attr", getattr(call.func, "id", None)) == "ConfigDict":
        spans.append(((call.lineno, call.col_offset), call.end_lineno, *section))
    elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "update":
      section = _dotted(node.func.value)
      if section and section[0]:
        spans.append(((node.lineno, node.col_offset), node.end_lineno, *section))
  return spans


def field_comments(path: str) -> dict[str, str]:
  """{field: the comment on its line} from a config file's source (`name=value,  # comment`), read with
  `tokenize` and `ast`: a comment belongs to the last `name =` on its line.

  Inside a `config.<section> = ml_collections.ConfigDict(...)` or `config.<section>.update(...)` call a
  comment is keyed "section.name" (so that fields of one name in two sections keep their own comments),
  elsewhere (e.g. a library's default config) by the bare name; inside a local name's (`t.update(...)` after
  `t = config.train`, a library's `gan = ConfigDict(...)`) by both, since the local name may be any section.
  """
  try:
    with open(path) as f:
      source = f.read()
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    spans = _sections(ast.parse(source))
  except (OSError, SyntaxError, tokenize.TokenError):
    return {}
  names, comments = {}, {}
  for prev, tok in zip(tokens, tokens[1:]):
    if tok.type == tokenize.OP and tok.string == "=" and prev.type == tokenize.NAME:
      names.setdefault(tok.start[0], []).append((prev.start, prev.string))
    elif tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
  out = {}
  for line, comment in comments.items():
    if not comment or line not in names:
      continue
    start, name = names[line][-1]
    inside = sorted((last - first[0], section, under_config) for first, last, section, under_config in spans
                    if first < start and line <= last)
    if inside:
      out.setdefault(f"{inside[0][1]}.{name}", comment)
    if not inside or not inside[0][2]:
      out.setdefault(name, comment)
  return out


def config_comments(path: str) -> dict[str, str]:
  """Field comments of a config file and of the library modules it builds on (e.g. default_data_config).

  A config made of other config files (the main job's reproduce.py: `STUDY_CONFIGS = {stage: module}`) also
  gets each stage's comments, keyed "stage:field" so that two studies' fields of one name keep their own.
  """
  import inspect
  module = _config_module(path)
  sources = [path] + sorted({inspect.getsourcefile(v) for v in vars(module).values()
                             if (inspect.ismodule(v) or inspect.isfunction(v))
                             and getattr(v, "__module__", getattr(v, "__name__", "")).startswith(
                                 ("mri_poison", "experiments.configs"))})
  comments = {}
  for source in sources:
    for k, v in field_comments(source).items():
      comments.setdefault(k, v)
  for stage, sub in getattr(module, "STUDY_CONFIGS", {}).items():
    for k, v in config_comments(inspect.getsourcefile(sub)).items():
      comments[f"{stage}:{k}"] = v
  return comments


def format_config(config, comments: dict[str, str], prefix: str = "") -> list[str]:
  lines = []
  for key in sorted(config.keys()):
    value = config[key]
    name = f"{prefix}{key}"
    if hasattr(value, "keys") and hasattr(value, "to_dict"):
      lines += format_config(value, comments, name + ".")
    else:
      stage, _, rest = name.partition(".")
      candidates = (f"{stage}:{rest}", name, f"{stage}:{key}", key)
      note = next((comments[c] for c in candidates if comments.get(c)), "")
      lines.append(f"{name} = {value!r}" + (f"  # {note}" if note else ""))
  return lines


def _field_paths(config, prefix: str = "") -> list[str]:
  out = []
  for key in config.keys():
    value, name = config[key], f"{prefix}{key}"
    out.append(name)
    if hasattr(value, "keys") and hasattr(value, "to_dict"):
      out += _field_paths(value, name + ".")
  return out


def unknown_override_hint(argv, spec: str) -> str:
  """For each --config.a.b=value in argv that names no field of the config `spec`: a sentence saying so, with
  the closest field names ("did you mean"). Empty when every override names a field (or the file won't load)."""
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  path, _, variant = spec.partition(":")
  try:
    fields = _field_paths(_config_module(path).get_config(variant or None))
  except Exception:  # pylint: disable=broad-except
    return ""
  hints = []
  for name in (o for o in overrides if o not in fields):
    close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
    hints.append(f"--config.{name} names no field of {path}"
                 + (f"; did you mean {' or '.join('--config.' + c for c in close)}?" if close else
                    " (--print_config lists them)"))
  return " ".join(hints)


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


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(e: BaseException) -> tuple[bool, str | None]:
  """(whether `e` or an exception it wraps is a full disk or quota, the path it names if any). Checkpoint
  libraries re-raise ENOSPC as their own error types, with the OS's words in the message."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
      return True, e.filename
    if any(os.strerror(code) in str(e) for code in _DISK_FULL):
      return True, None
    e = e.__cause__ or e.__context__
  return False, None


def _workdir_arg(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _disk_full_message(path: str | None) -> str:
  path = os.path.abspath(path or _workdir_arg(sys.argv) or ".")
  existing = path
  while not os.path.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  free = shutil.disk_usage(existing).free / 2**20
  return (f"error: the disk is full writing {path} ({free:.0f} MiB free there): free some space or give another "
          "--workdir; re-running the same command resumes from the last checkpoint")


def _fail(kind: str, e: BaseException) -> None:
  if _debug():
    traceback.print_exception(e)
  full, path = _disk_full(e)
  if full:
    print(_disk_full_message(path), file=sys.stderr)
    sys.exit(1)
  hint = "" if _debug() else "  (full traceback: --verbosity=1 or MRI_POISON_TRACEBACK=1)"
  message = _root_message(e)
  if kind == "config error" and isinstance(e, (KeyError, AttributeError)) and "did you mean" not in message.lower():
    message = unknown_override_hint(sys.argv[1:], _config_arg(sys.argv, _DEFAULT_CONFIG[0])) or message
  print(f"{kind}: {type(e).__name__}: {message}{hint}", file=sys.stderr)
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


def run_plain(main) -> None:
  """app.run(main) for a command without a config file: --help prints its doc and flags and exits 0; an error
  is one line (the traceback with --verbosity=1)."""
  if any(a in ("--help", "-h", "-?") for a in sys.argv[1:]):
    print((sys.modules["__main__"].__doc__ or "").strip() + "\n")
    print("Flags:\n" + flags.FLAGS.main_module_help())
    sys.exit(0)

  def wrapped(argv):
    try:
      return main(argv)
    except (SystemExit, KeyboardInterrupt, app.UsageError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      _fail("error", e)
  app.run(wrapped)


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
