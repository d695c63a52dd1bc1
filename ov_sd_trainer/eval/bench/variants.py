"""The bench's variant registry: every form of the pipeline `ov-sd bench` can measure, by name.

A variant says how it runs (PyTorch or OpenVINO, at which precision, with step caching or not) and which prepared
folder it loads (`folder_key`): the diffusers folder, optimum-intel's FP32 export, an optimum-intel PTQ peer, a QAT
export, each optionally with its text encoder and VAE weights compressed to int8 (`+w8tv`). The order here is the
order of the report's rows. Adding a variant is one entry here (and, for a new `source`, its builder in `prepare`).

Every int8 variant has a `+w8tv` twin: the same folder with the text encoder and VAE weights compressed to int8 the
way optimum-intel's pipeline quantization does it (`OVWeightQuantizationConfig(bits=8)` on every model but the
UNet: what `optimum-cli export openvino --quant-mode int8` and its hybrid mode ship). The twin sits right after its
base, so the report shows what int8 text encoder and VAE weights buy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...errors import UserError

W8TV = "+w8tv"  # name suffix of a twin: text encoder and VAE with int8 weights
DEEPCACHE_INTERVAL = 3  # qat-int8-deepcache3: a full UNet call every 3rd, shallow ones between (docs/step-caching.md)


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    runtime: str  # "pytorch" (diffusers) or "openvino" (optimum-intel's OVStableDiffusionPipeline)
    # the folder it loads: diffusers | openvino-fp32 | ptq-full | ptq-hybrid | qat | qat-hybrid | qat-tome |
    # qat-deepcache
    source: str
    bf16: bool = False  # PyTorch: under torch.autocast("cpu", bfloat16)
    f32: bool = False  # OpenVINO: INFERENCE_PRECISION_HINT=f32 whatever --ov-config says
    flag: str | None = None  # the bench option that passes an existing folder for `source` instead of building it
    cache_interval: int = 1  # OpenVINO step caching (unet_deepcache/ IRs): a full UNet call every N-th call
    int8_text_vae: bool = False  # the text encoder and VAE weights compressed to int8 (a `+w8tv` twin)
    int8: bool = False  # an int8 UNet (the variants that get a `+w8tv` twin)

    @property
    def is_pytorch(self) -> bool:
        return self.runtime == "pytorch"

    @property
    def is_project(self) -> bool:
        """This project's own int8 pipelines (QAT): the candidates of the per-image targets."""
        return self.source.startswith("qat")

    @property
    def folder_key(self) -> str:
        """What `prepare.Prepared.folders` holds its folder under: the source, `+w8tv` for a twin."""
        return self.source + (W8TV if self.int8_text_vae else "")


def _with_twins(variants: tuple[Variant, ...]) -> tuple[Variant, ...]:
    out = []
    for v in variants:
        out.append(v)
        if v.int8:
            label = v.label + " + int8-weight text encoder and VAE"
            out.append(replace(v, name=v.name + W8TV, label=label, flag=None, int8_text_vae=True))
    return tuple(out)


VARIANTS: tuple[Variant, ...] = _with_twins((
    Variant("pytorch-fp32", "PyTorch FP32 eager (diffusers)", "pytorch", "diffusers"),
    Variant("pytorch-bf16", "PyTorch bf16 autocast", "pytorch", "diffusers", bf16=True),
    Variant("openvino-fp32", "OpenVINO FP32 (INFERENCE_PRECISION_HINT=f32)", "openvino", "openvino-fp32", f32=True),
    Variant("openvino-default", "OpenVINO default precision", "openvino", "openvino-fp32"),
    Variant("optimum-hybrid-ptq", "optimum-intel hybrid PTQ (int8 weights, int8 convolutions)", "openvino",
            "ptq-hybrid", flag="--ptq-hybrid", int8=True),
    Variant("optimum-int8-ptq", "optimum-intel INT8 PTQ (full int8 UNet)", "openvino", "ptq-full", flag="--ptq",
            int8=True),
    Variant("qat-int8", "QAT INT8 (this project)", "openvino", "qat", flag="--qat", int8=True),
    Variant("qat-int8-hybrid", "QAT hybrid (int8 weights, int8 convolutions; this project)", "openvino",
            "qat-hybrid", flag="--qat-hybrid", int8=True),
    Variant("qat-int8-tome", "QAT INT8 + ToMe", "openvino", "qat-tome", flag="--qat-tome", int8=True),
    Variant(f"qat-int8-deepcache{DEEPCACHE_INTERVAL}", f"QAT INT8 + step caching (DeepCache, interval "
            f"{DEEPCACHE_INTERVAL})", "openvino", "qat-deepcache", flag="--qat-deepcache",
            cache_interval=DEEPCACHE_INTERVAL, int8=True),
))  # fmt: skip
BY_NAME = {v.name: v for v in VARIANTS}
PYTORCH_FP32 = "pytorch-fp32"  # the baseline of every speed-up
OPENVINO_FP32 = "openvino-fp32"  # the FP32 UNet size when there is no PyTorch row
OPTIMUM_INT8 = "optimum-int8-ptq"  # the full-int8 peer
OPTIMUM_HYBRID = "optimum-hybrid-ptq"  # the hybrid peer (optimum-intel's recommended 8-bit mode for diffusion)
QAT = "qat-int8"
QAT_HYBRID = "qat-int8-hybrid"
QAT_TOME = "qat-int8-tome"
QAT_DEEPCACHE = f"qat-int8-deepcache{DEEPCACHE_INTERVAL}"


def forms(name: str) -> list[str]:
    """A variant and its `+w8tv` twin (the per-image peer baselines take the faster of the two)."""
    return [n for n in (name, name + W8TV) if n in BY_NAME]


def parse_variants(spec: str | None) -> list[str]:
    """'pytorch-fp32,optimum-int8-ptq' -> those names in registry order; None -> all."""
    if spec is None:
        return [v.name for v in VARIANTS]
    names = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item not in BY_NAME:
            raise UserError(f"unknown variant {item!r}; choose from {', '.join(BY_NAME)}")
        names.add(item)
    if not names:
        raise UserError(f"--variants is empty; name at least one of {', '.join(BY_NAME)}")
    return [v.name for v in VARIANTS if v.name in names]
