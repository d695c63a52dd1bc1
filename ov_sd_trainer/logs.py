"""What an `ov-sd` command prints: the project's own output (results, errors, its progress bars) and, unless
`--verbose`, none of the known third-party chatter around it.

`configure` is the one place that sets warnings and logging up, for every command: `cli.main` calls it before the
command's module is even imported (some libraries speak while they import), and `train.py`, `python -m
ov_sd_trainer.train` and `accelerate launch` go through `cli.main` too. Silenced unless `--verbose` (`ov-sd demo`
printed 86 lines with them, 17 without):

- torch's `TracerWarning`s while optimum-intel and OpenVINO trace the models for export (a dozen, two lines each);
- transformers' and diffusers' warnings: `loss_type=None`, deprecations of arguments their own code passes, "Multiple
  distributions found for package optimum" (diffusers, at import), the safety-checker notice and unexpected
  `subfolder` keyword of every optimum-intel pipeline load;
- optimum-intel's "Could not infer whether the model was already converted ... [Errno 2] ... models----tmp..."
  (offline, optimum-intel reads a local folder as a Hub id first; the project always says whether to export);
- bitsandbytes' "Failed to load CPU gemm_4bit_forward" (AVX512-BF16 CPUs without the `kernels` package) and torch's
  "No CUDA runtime is found" while NNCF builds its CPU extension;
- NNCF's INFO lines;
- the progress bars of library internals: transformers' "Loading weights", diffusers' "Loading pipeline components",
  Hub downloads.

With `--verbose` OpenVINO's converter also prints its conversion report (it looks for `--verbose` in `sys.argv` itself).

Kept: errors of every library, the project's own warnings and progress bars, the Trainer's progress bar and logged
metrics, NNCF's calibration progress (the longest step of a run) and a pipeline's denoising bar.

Each library is quieted through its own switch (`set_verbosity_error`, `disable_progress_bar`, NNCF's
`set_log_level`, a warnings filter on torch's warning class, a `logging` level), applied right after the library is
imported: these libraries set their own levels when they load, and importing them all up front would cost seconds
for commands that need none of them.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import warnings
from collections.abc import Callable

VERBOSE_FLAG = "--verbose"
VERBOSE_HELP = "show every library's warnings, logs and progress bars (quiet by default)"
PROJECT_LOGGER = "ov_sd_trainer"


def _transformers(logging_module) -> None:
    logging_module.set_verbosity_error()
    logging_module.disable_progress_bar()  # also the Hub's download bars


def _diffusers(logging_module) -> None:
    logging_module.set_verbosity_error()
    logging_module.disable_progress_bar()  # "Loading pipeline components"; a pipeline's own denoising bar stays


def _optimum(logging_module) -> None:
    logging_module.set_verbosity_error()


def _nncf(logger_module) -> None:
    logger_module.set_log_level(logging.WARNING)


def _torch_tracer(trace_module) -> None:
    warnings.filterwarnings("ignore", category=trace_module.TracerWarning)
    # OpenVINO's converter traces with `torch.jit.trace` / `trace_method` (the tiny decoder's export): torch 2.14
    # deprecates both
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace(_method)?` is deprecated", category=FutureWarning)


# module -> what quiets it, run once the module is imported
QUIET_AFTER_IMPORT: dict[str, Callable] = {
    "transformers.utils.logging": _transformers,
    "diffusers.utils.logging": _diffusers,
    "optimum.utils.logging": _optimum,
    "nncf.common.logging.logger": _nncf,
    "torch.jit._trace": _torch_tracer,
}
# Plain `logging` loggers that no library resets, set to ERROR before anything is imported (the last two speak while
# their module is imported)
QUIET_LOGGERS = (
    "optimum.intel",  # optimum-intel's own modules (optimum.utils.logging covers optimum's exporters)
    "torch.utils.cpp_extension",  # "No CUDA runtime is found" on a CPU host
    "bitsandbytes",  # "Failed to load CPU gemm_4bit_forward"
)


def configure(verbose: bool = False) -> None:
    """Quiet the known third-party noise (see the module doc), or with `verbose` leave every library as it is and
    show the project's own INFO logs too. Safe to call more than once."""
    if verbose:
        project = logging.getLogger(PROJECT_LOGGER)
        if not project.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s: %(message)s"))
            project.addHandler(handler)
        project.setLevel(logging.INFO)
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, quiet in QUIET_AFTER_IMPORT.items():
        after_import(name, quiet)


def after_import(name: str, apply: Callable) -> None:
    """`apply(module)` now if module `name` is imported, else right after its import runs (once)."""
    if name in sys.modules:
        _apply(name, apply, sys.modules[name])
        return
    finder = next((f for f in sys.meta_path if isinstance(f, _AfterImport)), None)
    if finder is None:
        finder = _AfterImport()
        sys.meta_path.insert(0, finder)
    finder.pending[name] = apply


class _AfterImport(importlib.abc.MetaPathFinder):
    """An import hook that lets the usual finders find a pending module, then runs its `apply` after the module's own
    code (which sets the library's default levels) has run."""

    def __init__(self):
        self.pending: dict[str, Callable] = {}

    def find_spec(self, fullname, path=None, target=None):
        apply = self.pending.pop(fullname, None)
        if apply is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_apply(module):
            exec_module(module)
            _apply(fullname, apply, module)

        spec.loader.exec_module = exec_then_apply  # this spec's own loader instance: only this import is affected
        return spec


def _apply(name: str, apply: Callable, module) -> None:
    try:
        apply(module)
    except Exception as e:  # a library that changed its switches: say so, but never fail the command or the import
        logging.getLogger(__name__).warning("could not quiet %s (%s); --verbose shows everything anyway", name, e)
