"""The bench's variant registry: every form of the pipeline `ov-sd bench` can measure, by name.

A variant says how it runs (PyTorch or OpenVINO, at which precision) and which prepared folder it loads
(`source`): the diffusers folder, optimum-intel's FP32 export, an optimum-intel PTQ peer, or a QAT export. The order
here is the order of the report's rows. Adding a variant is one entry here (and, for a new `source`, its builder in
`prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UserError


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    runtime: str  # "pytorch" (diffusers) or "openvino" (optimum-intel's OVStableDiffusionPipeline)
    source: str  # the folder it loads: diffusers | openvino-fp32 | ptq-full | ptq-hybrid | qat | qat-hybrid | qat-tome
    bf16: bool = False  # PyTorch: under torch.autocast("cpu", bfloat16)
    f32: bool = False  # OpenVINO: INFERENCE_PRECISION_HINT=f32 whatever --ov-config says
    flag: str | None = None  # the bench option that passes an existing folder for `source` instead of building it

    @property
    def is_pytorch(self) -> bool:
        return self.runtime == "pytorch"


VARIANTS: tuple[Variant, ...] = (
    Variant("pytorch-fp32", "PyTorch FP32 eager (diffusers)", "pytorch", "diffusers"),
    Variant("pytorch-bf16", "PyTorch bf16 autocast", "pytorch", "diffusers", bf16=True),
    Variant("openvino-fp32", "OpenVINO FP32 (INFERENCE_PRECISION_HINT=f32)", "openvino", "openvino-fp32", f32=True),
    Variant("openvino-default", "OpenVINO default precision", "openvino", "openvino-fp32"),
    Variant(
        "optimum-hybrid-ptq",
        "optimum-intel hybrid PTQ (int8 weights, int8 convolutions)",
        "openvino",
        "ptq-hybrid",
        flag="--ptq-hybrid",
    ),  # fmt: skip
    Variant("optimum-int8-ptq", "optimum-intel INT8 PTQ (full int8 UNet)", "openvino", "ptq-full", flag="--ptq"),
    Variant("qat-int8", "QAT INT8 (this project)", "openvino", "qat", flag="--qat"),
    Variant(
        "qat-int8-hybrid",
        "QAT hybrid (int8 weights, int8 convolutions; this project)",
        "openvino",
        "qat-hybrid",
        flag="--qat-hybrid",
    ),  # fmt: skip
    Variant("qat-int8-tome", "QAT INT8 + ToMe", "openvino", "qat-tome", flag="--qat-tome"),
)
BY_NAME = {v.name: v for v in VARIANTS}
PYTORCH_FP32 = "pytorch-fp32"  # the baseline of every speed-up
OPENVINO_FP32 = "openvino-fp32"  # the FP32 UNet size when there is no PyTorch row
OPTIMUM_INT8 = "optimum-int8-ptq"  # the full-int8 peer
OPTIMUM_HYBRID = "optimum-hybrid-ptq"  # the hybrid peer (optimum-intel's recommended 8-bit mode for diffusion)
QAT = "qat-int8"
QAT_HYBRID = "qat-int8-hybrid"
QAT_TOME = "qat-int8-tome"


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
