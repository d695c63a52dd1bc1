"""Which fake-quantize kernels NNCF uses: its compiled extension or its pure-torch reference functions.

NNCF 3.4 (`nncf.torch.quantization.quantize_functions`) sends every fake-quantize forward/backward of a CUDA tensor
to `QuantizedFunctionsCUDA` and every other tensor to `QuantizedFunctionsCPU`, two lazily loaded
`ExtensionNamespace`s that compile C++/CUDA code with `torch.utils.cpp_extension.load` at the first quantized forward.
On the CPU a failed build falls back to `ReferenceQuantizedFunctions` (pure torch) with a warning; on CUDA it raises
`nncf.InstallationError` (no `nvcc`, mismatched toolkit) and training stops. `select_quantize_kernels` decides up
front, before quantization:

* ``auto``: on CUDA build/load the extension; if that fails, point NNCF's CUDA dispatch at the reference functions
  (one warning line: slower fake-quant ops, more temporary memory). On the CPU: whatever NNCF does (its compiled
  CPU extension, or its own reference fallback when no C++ compiler works).
* ``extension``: the compiled extension or a one-line `UserError` naming the fix.
* ``reference``: the reference functions for every device (CPU included), nothing is compiled.

The switch replaces only the two dispatch names in `quantize_functions` (the only NNCF module that calls them) with
a namespace whose `get` returns NNCF's own `ReferenceQuantize` (torch backend) functions, run eagerly: NNCF's
`ReferenceQuantizedFunctions` wraps the same functions in `torch.compile`, which recompiles per quantizer shape and
dtype (measured here: 76 s of compilation on the first step of the tiny UNet, then dynamo's recompile limit).
`restore_quantize_kernels()` puts NNCF's originals back; `quantize_kernels(mode, device)` is the scoped form.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import UserError

logger = logging.getLogger(__name__)

MODES = ("auto", "extension", "reference")
DEFAULT_MODE = "auto"
EXTENSION = "extension"  # the return values: which path the device's fake-quantize ops take
REFERENCE = "reference"
_DISPATCH_NAMES = {"cpu": "QuantizedFunctionsCPU", "cuda": "QuantizedFunctionsCUDA"}
_FUNCTIONS = {"Quantize_forward": "forward", "Quantize_backward": "backward"}
_originals: dict[str, Any] = {}  # dispatch name -> NNCF's own object, saved before the first replacement


class ReferenceNamespace:
    """Stands in for NNCF's `ExtensionNamespace`: `get(name)` returns the matching method of NNCF's
    `ReferenceQuantize(TORCH)` (the pure-torch formulas its CPU fallback uses), looked up at each call."""

    def __init__(self) -> None:
        from nncf.torch.quantization.reference import ReferenceBackendType, ReferenceQuantize

        self.executor = ReferenceQuantize(backend_type=ReferenceBackendType.TORCH)

    def get(self, fn_name: str):
        if fn_name not in _FUNCTIONS:
            raise AttributeError(f"NNCF's reference quantize functions have no {fn_name!r}")
        return getattr(self.executor, _FUNCTIONS[fn_name])

    def __repr__(self) -> str:
        return "ReferenceNamespace(nncf ReferenceQuantize, torch, eager)"


def _dispatch_module():
    import nncf.torch.quantization.quantize_functions as qf

    missing = [n for n in _DISPATCH_NAMES.values() if not hasattr(qf, n)]
    if missing:
        import nncf

        raise UserError(
            f"nncf {nncf.__version__} has no {', '.join(missing)} in nncf.torch.quantization.quantize_functions; "
            "quantize_kernels needs nncf>=3.4,<3.5 (pip install 'nncf>=3.4,<3.5')"
        )
    return qf


def _set(kind: str, namespace: Any) -> None:
    qf = _dispatch_module()
    name = _DISPATCH_NAMES[kind]
    _originals.setdefault(name, getattr(qf, name))
    setattr(qf, name, namespace)


def restore_quantize_kernels() -> None:
    """Undo `select_quantize_kernels`: NNCF's own dispatch objects (and its lazy extension loading) come back."""
    if not _originals:
        return
    qf = _dispatch_module()
    for name, original in _originals.items():
        setattr(qf, name, original)
    _originals.clear()


def current_path(device: str | torch.device = "cpu") -> str | None:
    """The path NNCF's fake-quantize ops on `device` take now: "reference", "extension", or None when NNCF's
    extension for that device is not loaded yet (it would be built at the first quantized forward)."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    namespace = getattr(_dispatch_module(), _DISPATCH_NAMES[kind])
    if isinstance(namespace, ReferenceNamespace):
        return REFERENCE
    try:
        loaded = namespace._loaded_namespace  # NNCF's ExtensionNamespace caches what its loader returned
    except Exception:  # NNCF's CudaNotAvailableStub raises on any attribute
        return None
    if loaded is None:
        return None
    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

    return REFERENCE if loaded is ReferenceQuantizedFunctions else EXTENSION


def _load(kind: str):
    """Build/load NNCF's extension for `kind` through its own dispatch object (as the first quantized forward would).
    Returns what NNCF hands out for Quantize_forward; raises what NNCF raises."""
    return getattr(_dispatch_module(), _DISPATCH_NAMES[kind]).get("Quantize_forward")


_SYMPTOM = re.compile(r"cannot find|fatal|error:|not set|no such file|not found|unsupported", re.IGNORECASE)


def _reason(error: BaseException) -> str:
    """One line saying why NNCF's extension did not load. NNCF's own message is generic, so the causes under it
    are searched for the telling line of a failed build (torch's "Error building extension" carries the ninja
    output, e.g. `/usr/bin/ld: cannot find -lcudart`), else the first line of the innermost cause."""
    chain, e = [], error
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    causes = chain[1:] or chain
    text = None
    for exc in causes:
        for line in str(exc).splitlines():
            line = line.strip()
            if _SYMPTOM.search(line) and not line.startswith(("FAILED", "Error building extension")):
                text = f"{type(exc).__name__}: {line}"
                break
        if text:
            break
    if text is None:
        inner = causes[-1]
        lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
        text = f"{type(inner).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 200 else text[:197] + "..."


def _toolkit_hint() -> str:
    cuda = torch.version.cuda
    return f"install a CUDA toolkit matching torch {torch.__version__} (CUDA {cuda}) with CUDA_HOME set to its root"


def select_quantize_kernels(mode: str = DEFAULT_MODE, device: str | torch.device | None = None) -> str:
    """Choose NNCF's fake-quantize kernels for training on `device` (default: cuda when available, else cpu) and
    return the path its ops now take there: "extension" (NNCF's compiled CPU/CUDA extension) or "reference"
    (NNCF's pure-torch functions). Call it before `quantize_unet`; `restore_quantize_kernels` undoes it."""
    if mode not in MODES:
        raise UserError(f"quantize_kernels={mode!r}: use one of {', '.join(MODES)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise UserError(f"quantize_kernels: {device!r} is not a torch device ({e})") from None

    if mode == REFERENCE:
        namespace = ReferenceNamespace()
        for kind in _DISPATCH_NAMES:
            _set(kind, namespace)
        return REFERENCE

    if device_type not in ("cpu", "cuda"):
        # NNCF sends every non-CUDA tensor to its CPU extension, which rejects other devices' tensors (CHECK_CPU)
        if mode == EXTENSION:
            raise UserError(
                f"quantize_kernels=extension: NNCF has compiled kernels for cpu and cuda only, not {device_type}; "
                "use --quantize_kernels reference (or auto)"
            )
        _set("cpu", ReferenceNamespace())
        logger.info(
            "quantize_kernels=auto: NNCF has no %s kernels; using its pure-torch reference functions", device_type
        )
        return REFERENCE

    kind = device_type
    if isinstance(getattr(_dispatch_module(), _DISPATCH_NAMES[kind]), ReferenceNamespace):
        restore_quantize_kernels()  # an earlier "reference" choice: NNCF's own dispatch decides again
    try:
        function = _load(kind)
    except Exception as e:  # nncf.InstallationError (no nvcc / no CUDA), the load timeout, a broken build
        if mode == EXTENSION:
            if kind == "cuda":
                fix = f"{_toolkit_hint()}, or use --quantize_kernels reference"
            else:
                fix = "install a C++ compiler (g++) and ninja, or use --quantize_kernels reference"
            raise UserError(
                f"quantize_kernels=extension: NNCF's {kind.upper()} quantization extension cannot be built or loaded "
                f"({_reason(e)}); {fix}"
            ) from e
        _set(kind, ReferenceNamespace())
        logger.warning(
            "quantize_kernels=auto: NNCF's %s quantization extension cannot be built or loaded (%s); using NNCF's "
            "pure-torch reference fake-quantize functions instead: same formulas, but slower fake-quant ops (several "
            "unfused elementwise kernels per quantizer) and more temporary memory; to get the extension %s, or pass "
            "--quantize_kernels reference to silence this",
            kind.upper(),
            _reason(e),
            _toolkit_hint() if kind == "cuda" else "install a C++ compiler (g++) and ninja",
        )
        return REFERENCE

    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

    if function is ReferenceQuantizedFunctions.Quantize_forward:  # NNCF's own CPU fallback (its build failed)
        if mode == EXTENSION:
            raise UserError(
                "quantize_kernels=extension: NNCF could not compile its CPU quantization extension and fell back to "
                "its reference functions; install a C++ compiler (g++) and ninja, or use --quantize_kernels reference"
            )
        return REFERENCE
    return EXTENSION


@contextlib.contextmanager
def quantize_kernels(mode: str = DEFAULT_MODE, device: str | torch.device | None = None) -> Iterator[str]:
    """`select_quantize_kernels` for the duration of a `with` block (yields the path); NNCF's dispatch as it was
    before comes back afterwards."""
    qf = _dispatch_module()
    before = {name: getattr(qf, name) for name in _DISPATCH_NAMES.values()}
    saved_originals = dict(_originals)
    try:
        yield select_quantize_kernels(mode, device)
    finally:
        for name, obj in before.items():
            setattr(qf, name, obj)
        _originals.clear()
        _originals.update(saved_originals)
