"""OpenVINO conversion of a (quantized) diffusers UNet under optimum-intel's SD UNet IR interface, and IR counts.

A quantized UNet keeps its FakeQuantize ops through `openvino.convert_model`; `openvino.save_model` then stores the
weights that feed them as int8, and OpenVINO runs them as int8 kernels.
"""

from __future__ import annotations

import torch

from .. import families
from ..errors import UserError
from .quantize import UNET_INPUT_NAMES, unwrap_model

UNET_OUTPUT_NAME = "out_sample"  # optimum-intel's name for the UNet IR's output


def unet_input_names(config) -> tuple[str, ...]:
    """The UNet IR's inputs in optimum-intel's order: (sample, timestep, encoder_hidden_states) and the family's
    extra ones (`families.extra_input_names`: LCM's `timestep_cond`)."""
    return UNET_INPUT_NAMES + families.extra_input_names(config)


class _UNetForExport(torch.nn.Module):
    """Positional (sample, timestep, encoder_hidden_states, *extra inputs) -> noise prediction tensor."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.extra_names = families.extra_input_names(unet.config)

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        kwargs = families.unet_kwargs(dict(zip(self.extra_names, extra, strict=True)))
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]


def unet_example_inputs(
    unet: torch.nn.Module, batch: int = 2, height: int = 16, width: int = 16, text_len: int = 77
) -> dict[str, torch.Tensor]:
    """Random UNet inputs of the right shapes and dtypes (for tracing and parity checks)."""
    config = unwrap_model(unet).config
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(batch, config.in_channels, height, width, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch, text_len, config.cross_attention_dim, generator=generator),
    }
    for name, dim in families.extra_input_dims(config).items():
        inputs[name] = torch.randn(batch, dim, generator=generator)
    return inputs


def convert_unet_to_openvino(
    unet: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor] | None = None,
    batch: int = 2,
    height: int = 16,
    width: int = 16,
    text_len: int = 77,
):
    """Convert an FP32 or NNCF-quantized UNet to an `openvino.Model` with optimum-intel's SD UNet interface:
    inputs `sample` (f32 [-1,C,-1,-1]), `timestep` (i64 [-1]), `encoder_hidden_states` (f32 [-1,-1,D]), and for an
    LCM UNet `timestep_cond` (f32 [-1,time_cond_proj_dim]); output `out_sample`. A quantized UNet keeps its
    FakeQuantize ops (`openvino.save_model` stores their weights as int8)."""
    import openvino as ov

    model = unwrap_model(unet)
    if example_inputs is None:
        example_inputs = unet_example_inputs(model, batch, height, width, text_len)
    names = unet_input_names(model.config)
    missing = [k for k in names if k not in example_inputs]
    if missing:
        raise UserError(f"example_inputs lacks {missing}; it needs {list(names)}")
    example, inputs = unet_trace_inputs(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            wrapper = _UNetForExport(model)
            decoder = torchscript_decoder(wrapper, example)
            if decoder is wrapper:
                ov_model = ov.convert_model(wrapper, example_input=example, input=inputs)
            else:
                ov_model = ov.convert_model(decoder, input=inputs)
    finally:
        model.train(was_training)
    for port, name in zip(ov_model.inputs, names, strict=True):
        port.get_tensor().set_names({name})
    ov_model.outputs[0].get_tensor().set_names({UNET_OUTPUT_NAME})
    return ov_model


def torchscript_decoder(module: torch.nn.Module, example: tuple):
    """OpenVINO's TorchScript decoder with torch.jit.trace's check_trace off: the check re-runs the model twice
    (slow through NNCF's hooks) and, for a quantized UNet, only reports that NNCF's export-time FakeQuantize
    rounds a few ties differently from its training-time quantizer."""
    try:
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

        return TorchScriptPythonDecoder(module, example_input=example, trace_kwargs={"check_trace": False})
    except (ImportError, TypeError):  # older/newer OpenVINO without trace_kwargs: let convert_model trace
        return module


def count_fake_quantize(ov_model) -> int:
    """Number of FakeQuantize ops in an `openvino.Model`."""
    return sum(op.get_type_name() == "FakeQuantize" for op in ov_model.get_ops())


def int8_constant_stats(ov_model) -> tuple[int, int]:
    """(count, total bytes) of 8-bit integer Constants in an `openvino.Model`. Meaningful on an IR read back
    after `openvino.save_model`, which is where FakeQuantize-fed weights are compressed to int8."""
    import openvino as ov

    count = nbytes = 0
    for op in ov_model.get_ops():
        if op.get_type_name() == "Constant" and op.get_output_element_type(0) in (ov.Type.i8, ov.Type.u8):
            count += 1
            nbytes += op.get_byte_size()
    return count, nbytes


def count_int8_constants(ov_model) -> int:
    """Number of 8-bit integer Constants in an `openvino.Model` (see `int8_constant_stats`)."""
    return int8_constant_stats(ov_model)[0]


def unet_trace_inputs(model, example_inputs: dict) -> tuple[tuple, list]:
    """The UNet's example tensors (on the model's device, optimum's dtypes) and OpenVINO input specs (dynamic batch,
    size and text length) for `ov.convert_model`, in optimum-intel's input order."""
    import openvino as ov

    config = model.config
    param = next(model.parameters())
    example = (
        example_inputs["sample"].to(param.device, torch.float32),
        example_inputs["timestep"].to(param.device, torch.long).reshape(-1),
        example_inputs["encoder_hidden_states"].to(param.device, torch.float32),
    )
    inputs = [
        (ov.PartialShape([-1, config.in_channels, -1, -1]), ov.Type.f32),
        (ov.PartialShape([-1]), ov.Type.i64),
        (ov.PartialShape([-1, -1, config.cross_attention_dim]), ov.Type.f32),
    ]
    for name, dim in families.extra_input_dims(config).items():
        example += (example_inputs[name].to(param.device, torch.float32),)
        inputs.append((ov.PartialShape([-1, dim]), ov.Type.f32))
    return example, inputs
