"""`compress.kernels`: NNCF's compiled fake-quantize extension vs its pure-torch reference functions.

On this CPU the default path is NNCF's compiled CPU extension (`QuantizedFunctionsCPULoader` builds it with
`torch.utils.cpp_extension.load`; only when that raises does NNCF fall back to its reference functions, which
`test_nncf_falls_back_on_cpu_only_when_the_build_fails` reproduces). The reference path is forced with
`select_quantize_kernels("reference")` and compared with it on a quantized tiny UNet: same input, loss and every
gradient (weights and quantizer ranges), with and without gradient checkpointing. A CUDA build failure is simulated
by making NNCF's own CUDA loader fail the way torch fails without nvcc.
"""

from __future__ import annotations

import collections
import copy
import logging
import math
import os
import subprocess

import pytest
import torch
from torch.utils import cpp_extension  # what NNCF's loaders call (torch.utils.cpp_extension.load)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ov_sd_trainer.assets.builders import TinySDConfig, build_components  # noqa: E402
from ov_sd_trainer.compress import checkpointing, kernels, quantize  # noqa: E402
from ov_sd_trainer.errors import UserError  # noqa: E402

CFG = TinySDConfig(unet_channels=(16, 32, 32), text_hidden=32, attention_heads=2)


def unet_inputs(generator, batch=2, size=16, dtype=torch.float32):
    return {
        "sample": torch.randn(batch, 4, size, size, generator=generator).to(dtype),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
        "encoder_hidden_states": torch.randn(batch, 77, CFG.text_hidden, generator=generator).to(dtype),
    }


@pytest.fixture(scope="module")
def qunet():
    """A quantized tiny UNet. overflow_fix="disable": with "enable" (the project default) NNCF places every output
    channel's largest weight exactly on a rounding tie, which the two kernels break differently; see
    `test_overflow_fix_puts_weights_on_rounding_ties`."""
    torch.manual_seed(0)
    unet = build_components(CFG)[3].eval()
    calibration = [unet_inputs(torch.Generator().manual_seed(1)) for _ in range(2)]
    return quantize.quantize_unet(unet, calibration, overflow_fix="disable").eval()


@pytest.fixture(autouse=True)
def nncf_dispatch_restored(monkeypatch):
    """Every test leaves NNCF's dispatch as it found it (this teardown runs before monkeypatch's own undo)."""
    yield
    kernels.restore_quantize_kernels()


@pytest.fixture
def calls(monkeypatch):
    """Counts `get` calls on NNCF's extension namespaces and on the reference namespace (one per fake-quant op)."""
    from nncf.torch.extensions import ExtensionNamespace

    counts = collections.Counter()
    ext_get, ref_get = ExtensionNamespace.get, kernels.ReferenceNamespace.get

    def counting_ext(self, name):
        counts["extension"] += 1
        return ext_get(self, name)

    def counting_ref(self, name):
        counts["reference"] += 1
        return ref_get(self, name)

    monkeypatch.setattr(ExtensionNamespace, "get", counting_ext)
    monkeypatch.setattr(kernels.ReferenceNamespace, "get", counting_ref)
    return counts


def _train_step(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**x).sample.square().mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    return loss.item(), grads


def _global_rel(a: dict, b: dict, names) -> float:
    num = math.sqrt(sum(((a[n] - b[n]).double() ** 2).sum().item() for n in names))
    den = math.sqrt(sum((a[n].double() ** 2).sum().item() for n in names))
    return num / den


def _worst_rel(a: dict, b: dict, names) -> float:
    """Worst per-tensor relative difference; a tensor's norm is floored at 1 % of the median tensor's, since
    tensors with ~1e-5 of the typical gradient (measured: 6e-9 vs a median 3e-4) are mostly cancellation."""
    norms = sorted(a[n].norm().item() for n in names)
    floor = max(0.01 * norms[len(norms) // 2], 1e-30)
    return max(((a[n] - b[n]).norm() / max(a[n].norm().item(), floor)).item() for n in names)


def test_default_cpu_path_is_what_nncf_loaded(qunet):
    """NNCF decides at the first CPU fake-quant op (quantize_unet already ran some): its loader's
    `torch.utils.cpp_extension.load` result, or `ReferenceQuantizedFunctions` when that raised."""
    import nncf.torch.quantization.quantize_functions as qf
    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

    loaded = qf.QuantizedFunctionsCPU._loaded_namespace
    assert loaded is not None, "quantize_unet ran quantized forwards, so NNCF must have loaded its CPU functions"
    expected = "reference" if loaded is ReferenceQuantizedFunctions else "extension"
    assert kernels.current_path("cpu") == expected
    assert kernels.select_quantize_kernels("auto", "cpu") == expected
    # this machine has g++ and ninja (the project's install needs them): NNCF compiled its extension
    assert expected == "extension", f"NNCF fell back to its reference functions here: {loaded}"
    assert str(getattr(loaded, "__file__", "")).endswith(".so")


# Tolerances. The extension and the reference use the same formulas but compute the scale (levels - 1) / range
# differently (ATen's C++ scalar / tensor is a true division; the reference's Python `/` is reciprocal() * levels),
# so ~20 % of fake-quant outputs differ by 1 ulp. In float64 that leaves the whole step equal to ~1e-15 (measured:
# loss equal, gradients 4e-15 relative, worst tensor 5e-13), so any real difference in a formula (a missing
# gradient term, a wrong range) would show far above 1e-9. In float32 the same 1-ulp (6e-8) differences, carried
# through ~30 layers of backward, give 5e-6 relative on the quantizer gradients and 7e-7 on the weights (measured;
# worst single tensor 1.6e-4): the bounds below leave a 10-20x margin.
TOLERANCES = {
    torch.float64: dict(loss=1e-12, weights=1e-10, quantizers=1e-10, worst=1e-9),
    torch.float32: dict(loss=1e-5, weights=1e-5, quantizers=1e-4, worst=1e-3),
}


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_reference_path_matches_the_extension(qunet, calls, dtype, checkpointed):
    model = copy.deepcopy(qunet).to(dtype)
    if checkpointed:
        checkpointing.enable_gradient_checkpointing(model)
    x = unet_inputs(torch.Generator().manual_seed(2), batch=1, size=8, dtype=dtype)

    loss_ext, grads_ext = _train_step(model, x)
    ext_calls, calls["extension"] = calls["extension"], 0
    assert ext_calls > 0 and calls["reference"] == 0
    with kernels.quantize_kernels("reference", "cpu") as path:
        assert path == "reference" and kernels.current_path("cpu") == "reference"
        loss_ref, grads_ref = _train_step(model, x)
    assert kernels.current_path("cpu") == "extension", "the context manager must give NNCF's dispatch back"
    assert calls["extension"] == 0, "the forced reference path must not reach NNCF's extension"
    # forward + backward of every fake-quant op (plus, with checkpointing, the recomputed forwards)
    assert calls["reference"] == ext_calls

    tol = TOLERANCES[dtype]
    assert abs(loss_ref - loss_ext) <= tol["loss"] * abs(loss_ext), (loss_ref, loss_ext)
    assert grads_ref.keys() == grads_ext.keys()
    qnames = {n for n, _ in quantize.quantizer_parameters(model)} & grads_ext.keys()
    wnames = grads_ext.keys() - qnames
    assert len(qnames) > 300 and len(wnames) > 300  # every weight and every quantizer range got a gradient
    assert _global_rel(grads_ext, grads_ref, wnames) <= tol["weights"]
    assert _global_rel(grads_ext, grads_ref, qnames) <= tol["quantizers"]
    assert _worst_rel(grads_ext, grads_ref, grads_ext.keys()) <= tol["worst"]


def test_checkpointing_recomputes_through_the_reference_functions(qunet, calls):
    model = copy.deepcopy(qunet)
    x = unet_inputs(torch.Generator().manual_seed(2), batch=1, size=8)
    with kernels.quantize_kernels("reference"):
        _train_step(model, x)
        plain, calls["reference"] = calls["reference"], 0
        checkpointing.enable_gradient_checkpointing(model)
        _train_step(model, x)
    # the recomputation in backward runs the checkpointed blocks' fake-quant forwards again
    assert calls["reference"] > plain > 0
    assert calls["extension"] == 0


class _TwoConvs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(16, 64, 3), torch.nn.Conv2d(64, 64, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_overflow_fix_puts_weights_on_rounding_ties():
    """Why the UNet comparison uses overflow_fix="disable": NNCF's half-range weights (overflow_fix="enable") use
    7-bit levels, then stretch the range x2 onto the 8-bit grid [-127, 127], so each output channel's max |w| lands
    exactly on level 63.5 and the last bit of the scale arithmetic decides how it rounds. The two kernels differ
    exactly there (one level) and nowhere else: the calibrated start of a default QAT run depends on the kernel in
    those weights (training moves them off the ties after the first step)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    torch.manual_seed(0)
    net = _TwoConvs().eval()
    data = nncf.Dataset([torch.randn(1, 16, 8, 8) for _ in range(2)])
    qnet = nncf.quantize(
        net, data, subset_size=2, advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
    )
    ties = flips = 0
    for conv_name in ("conv1", "conv2"):
        quantizer = qnet.get_submodule(f"{quantize.HOOK_STORAGE_ATTR}.pre_hooks.{conv_name}/conv2d/0__1.0")  # weight
        w = getattr(qnet, conv_name).weight.detach()
        with torch.no_grad():
            ext = quantizer(w)
            with kernels.quantize_kernels("reference"):
                ref = quantizer(w)
        step = (quantizer.scale.detach().abs() + quantizer.eps) / quantizer.level_high
        levels = w / step
        on_tie = ((levels - levels.floor()) - 0.5).abs() < 1e-4
        assert on_tie.flatten(1).any(1).all(), "every output channel's max |w| should sit on a tie (level 63.5)"
        diff = (ext - ref).abs() / step  # in quantization levels
        flipped = diff > 0.5
        assert not (flipped & ~on_tie).any(), "away from ties the kernels round alike"
        assert diff[~flipped].max() < 1e-5, "and agree to float rounding (the 1-ulp scale difference)"
        assert torch.allclose(diff[flipped], torch.ones_like(diff[flipped]), atol=1e-4), "a tie flips by one level"
        ties += int(on_tie.sum())
        flips += int(flipped.sum())
    assert ties >= 128 and flips > 0, (ties, flips)  # >= one tie per output channel of each conv


# --- errors and the CUDA decision (simulated: this machine has no GPU) --------------------------------------------


def test_bad_mode_lists_the_choices():
    with pytest.raises(UserError) as info:
        kernels.select_quantize_kernels("fast", "cpu")
    message = str(info.value)
    assert "\n" not in message and all(m in message for m in ("auto", "extension", "reference")), message
    with pytest.raises(UserError, match="not a torch device"):
        kernels.select_quantize_kernels("auto", "gpu0")


def _fresh_loader_namespace(monkeypatch, kind: str):
    """NNCF's own lazy namespace with NNCF's own loader, not yet loaded, in NNCF's dispatch for `kind`."""
    import nncf.torch.quantization.extensions as ext
    import nncf.torch.quantization.quantize_functions as qf
    from nncf.torch.extensions import ExtensionNamespace

    loader = ext.QuantizedFunctionsCUDALoader() if kind == "cuda" else ext.QuantizedFunctionsCPULoader()
    namespace = ExtensionNamespace(loader)
    name = "QuantizedFunctionsCUDA" if kind == "cuda" else "QuantizedFunctionsCPU"
    monkeypatch.setattr(qf, name, namespace)
    return qf, name, namespace


def _failing_build(error):
    def load(*args, **kwargs):
        raise error

    return load


def test_nncf_falls_back_on_cpu_only_when_the_build_fails(monkeypatch):
    """NNCF's CPU loader: a failed `cpp_extension.load` (no compiler) gives its reference functions, no error."""
    qf, name, namespace = _fresh_loader_namespace(monkeypatch, "cpu")
    monkeypatch.setattr(cpp_extension, "load", _failing_build(RuntimeError("Error building extension")))
    assert kernels.select_quantize_kernels("auto", "cpu") == "reference"
    assert getattr(qf, name) is namespace, "auto on the CPU keeps NNCF's own decision"
    assert kernels.current_path("cpu") == "reference"
    with pytest.raises(UserError) as info:
        kernels.select_quantize_kernels("extension", "cpu")
    assert "\n" not in str(info.value) and "--quantize_kernels reference" in str(info.value)


def _link_failure(*args, **kwargs):
    """What torch raised here when nvcc compiled NNCF's CUDA sources but CUDA_HOME pointed at the wrong root."""
    try:
        raise subprocess.CalledProcessError(1, ["ninja", "-v"])
    except subprocess.CalledProcessError as e:
        raise RuntimeError(
            "Error building extension 'quantized_functions_cuda': [1/3] c++ -MMD -MF functions_cuda.o.d ...\n"
            "FAILED: quantized_functions_cuda.so\n/usr/bin/ld: cannot find -lcudart: No such file or directory\n"
            "collect2: error: ld returned 1 exit status\nninja: build stopped: subcommand failed."
        ) from e


CUDA_BUILD_FAILURES = {
    "no-nvcc": (_failing_build(OSError("CUDA_HOME environment variable is not set. Please set it to your CUDA "
                                       "install root.")), "OSError: CUDA_HOME environment variable is not set"),
    "link": (_link_failure, "RuntimeError: /usr/bin/ld: cannot find -lcudart"),
}  # fmt: skip


@pytest.fixture(params=sorted(CUDA_BUILD_FAILURES))
def failing_cuda_build(request, monkeypatch):
    """NNCF's CUDA loader on a CUDA machine where the build fails: torch's build raises, NNCF turns that into
    nncf.InstallationError (its except branch asserts torch.cuda.is_available(), hence that patch)."""
    build, reason = CUDA_BUILD_FAILURES[request.param]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", build)
    qf, name, namespace = _fresh_loader_namespace(monkeypatch, "cuda")
    return qf, name, namespace, reason


def test_nncf_itself_raises_without_nvcc(failing_cuda_build):
    import nncf

    namespace = failing_cuda_build[2]
    with pytest.raises(nncf.InstallationError, match="nvcc"):
        namespace.get("Quantize_forward")


def test_auto_on_cuda_falls_back_to_reference_with_one_warning(failing_cuda_build, caplog):
    qf, name, namespace, reason = failing_cuda_build
    cpu_before = qf.QuantizedFunctionsCPU
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert kernels.select_quantize_kernels("auto", "cuda:0") == "reference"
    records = [r for r in caplog.records if r.name == kernels.__name__]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "\n" not in message
    for words in ("reference", "slower", "memory", reason, "--quantize_kernels reference"):
        assert words in message, message
    assert isinstance(getattr(qf, name), kernels.ReferenceNamespace)
    assert qf.QuantizedFunctionsCPU is cpu_before, "a CUDA fallback leaves the CPU dispatch alone"
    assert kernels.current_path("cuda") == "reference"
    kernels.restore_quantize_kernels()
    assert getattr(qf, name) is namespace


def test_extension_on_cuda_without_nvcc_is_a_user_error(failing_cuda_build):
    with pytest.raises(UserError) as info:
        kernels.select_quantize_kernels("extension", "cuda")
    message = str(info.value)
    assert "\n" not in message and failing_cuda_build[3] in message
    assert "CUDA toolkit" in message and f"CUDA {torch.version.cuda}" in message
    assert "--quantize_kernels reference" in message


def test_auto_on_cuda_uses_the_extension_when_it_builds(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    built = type("quantized_functions_cuda", (), {"Quantize_forward": object(), "Quantize_backward": object()})
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: built)
    qf, name, namespace = _fresh_loader_namespace(monkeypatch, "cuda")
    assert kernels.select_quantize_kernels("auto", "cuda") == "extension"
    assert kernels.select_quantize_kernels("extension", "cuda") == "extension"
    assert getattr(qf, name) is namespace and kernels.current_path("cuda") == "extension"


def test_reference_mode_is_reversible():
    import nncf.torch.quantization.quantize_functions as qf

    before = (qf.QuantizedFunctionsCPU, qf.QuantizedFunctionsCUDA)
    assert kernels.select_quantize_kernels("reference", "cpu") == "reference"
    assert isinstance(qf.QuantizedFunctionsCPU, kernels.ReferenceNamespace)
    assert isinstance(qf.QuantizedFunctionsCUDA, kernels.ReferenceNamespace), "reference means every device"
    kernels.restore_quantize_kernels()
    assert (qf.QuantizedFunctionsCPU, qf.QuantizedFunctionsCUDA) == before
    with kernels.quantize_kernels("reference"):
        with kernels.quantize_kernels("reference"):  # nested: the inner exit restores the outer state
            pass
        assert isinstance(qf.QuantizedFunctionsCPU, kernels.ReferenceNamespace)
    assert (qf.QuantizedFunctionsCPU, qf.QuantizedFunctionsCUDA) == before


def test_extension_mode_on_other_devices_is_a_user_error():
    with pytest.raises(UserError, match="cpu and cuda only"):
        kernels.select_quantize_kernels("extension", "meta")
    assert kernels.select_quantize_kernels("auto", "meta") == "reference"
