"""Put a trained tiny VAE decoder (`ov-sd train-decoder`) into an OpenVINO pipeline folder, and switch decoders.

    ov-sd tiny-decoder --model outputs/ref-int8/openvino --decoder outputs/ref-tiny-decoder [--int8 weights]
    ov-sd tiny-decoder --model outputs/ref-int8/openvino --activate full     # back to the VAE decoder

The tiny decoder becomes the folder's `vae_decoder/` IR with optimum-intel's VAE-decoder interface (input
`latent_sample` f32 [-1, C, -1, -1], output `sample`) and the full decoder's own `config.json`, so that
`OVStableDiffusionPipeline`, `OVLatentConsistencyModelPipeline` and OpenVINO GenAI's `Text2ImagePipeline` load the
folder unchanged and read the same VAE factor and scaling factor. The pipelines divide the UNet's latents by the
config's `scaling_factor` (and add `shift_factor`) before the decoder; the tiny decoder takes the UNet's latents
themselves (TAESD's convention), so the IR multiplies that back first: `tiny((latent_sample - shift) * scaling)`.
The folder's original decoder is kept beside it, and whichever is not active lives in `vae_decoder_full/` or
`vae_decoder_tiny/` (optimum and GenAI ignore those folders). `vae_decoder.json` records which one is active, how
each was made and the tiny IR's PSNR against the full IR on the run's held-out latents; the model card (README.md)
gets a "VAE decoder" section saying the same.

`--int8 weights` compresses the tiny IR's weights to int8 (NNCF `compress_weights`); `--int8 full` quantizes weights
and activations (NNCF `quantize`, calibrated on the run's held-out latents). Their PSNR and speed are in
docs/tiny-decoder.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..outputs import atomic_output_dir
from ..pipeline_folder import check_openvino_folder
from ..tiny_decoder import (
    HELD_OUT_FILE,
    TinyDecoder,
    decoder_config,
    find_decoder_folder,
    latent_space,
    same_latent_space,
)

ACTIVE_DIR = "vae_decoder"  # what optimum and GenAI load
STORED_DIR = {"full": "vae_decoder_full", "tiny": "vae_decoder_tiny"}  # the inactive decoder's folder
DECODERS = tuple(STORED_DIR)
RECORD_FILE = "vae_decoder.json"
DECODER_XML = "openvino_model.xml"
INPUT_NAME, OUTPUT_NAME = "latent_sample", "sample"  # optimum-intel's VAE-decoder IR interface
TINY_CONFIG = "tiny_decoder.json"  # in the tiny decoder's folder: its own config (the VAE's config.json stays)
INT8_MODES = ("none", "weights", "full")
CARD_HEADING = "## VAE decoder"

# held_out_latents.safetensors key -> the record's key prefix: held-out image latents, held-out sampling endpoints
HELD_OUT_SETS = (("latents", "held_out"), ("endpoints", "held_out_endpoint"))


class _ForExport(torch.nn.Module):
    """`latent_sample` as the pipelines pass it (latents / scaling_factor + shift) -> image in [-1, 1]."""

    def __init__(self, decoder: TinyDecoder):
        super().__init__()
        self.decoder = decoder
        self.scaling, self.shift = decoder.config["scaling_factor"], decoder.config["shift_factor"]

    def forward(self, latent_sample):
        return self.decoder((latent_sample - self.shift) * self.scaling)


def convert_tiny_decoder(decoder: TinyDecoder):
    """An `openvino.Model` of the tiny decoder with optimum's VAE-decoder interface (dynamic batch and size)."""
    import openvino as ov

    c = decoder.config["latent_channels"]
    example = torch.zeros(1, c, 8, 8)
    with torch.no_grad():
        model = ov.convert_model(_ForExport(decoder.eval()), example_input=example,
                                 input=[(ov.PartialShape([-1, c, -1, -1]), ov.Type.f32)])  # fmt: skip
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    return model


def compress_int8(model, mode: str, calibration: np.ndarray | None = None):
    """`weights`: NNCF int8 weight compression; `full`: NNCF post-training quantization on `calibration` inputs."""
    import nncf

    if mode == "none":
        return model
    if mode == "weights":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    if calibration is None or not len(calibration):
        raise UserError("--int8 full needs calibration latents: the train-decoder run's held_out_latents.safetensors")
    data = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    return nncf.quantize(model, data, subset_size=len(calibration), ignored_scope=global_context_scope(model))


def global_context_scope(model):
    """NNCF's ignored scope for a tiny decoder IR's `GlobalContext` blocks (mean, both 1x1 convolutions and the add
    back), found by the torch module name each ReduceMean carries: quantized with the rest, they cost 2.0 dB
    on held-out sampling endpoints against the f32 IR, kept float 0.8 dB (docs/tiny-decoder.md). Their convolutions
    work on one vector per image. Empty for TAESD's architecture."""
    import re

    import nncf

    means = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "ReduceMean"]
    blocks = [name.split("/aten::mean")[0] for name in means if "/aten::mean" in name]
    if len(blocks) != len(means):
        raise RuntimeError(f"a ReduceMean without its torch module name in the tiny decoder IR: {means}")
    return nncf.IgnoredScope(patterns=[re.escape(b) + r"[./].*" for b in blocks], validate=False)


def _record(folder: Path) -> dict:
    path = folder / RECORD_FILE
    if not path.is_file():
        return {"active": "full"}
    return json.loads(path.read_text())


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def active_decoder(folder: str | Path) -> str:
    """'tiny' or 'full': which decoder the folder's `vae_decoder/` holds."""
    return _record(Path(folder))["active"]


def _recover(folder: Path, record: dict) -> None:
    """A switch interrupted between its two renames leaves no `vae_decoder/`: put the recorded one back."""
    if not (folder / ACTIVE_DIR).is_dir():
        stored = folder / STORED_DIR[record["active"]]
        if not stored.is_dir():
            raise UserError(f"{str(folder)!r} has no {ACTIVE_DIR}/ and no {stored.name}/; export the folder again")
        stored.rename(folder / ACTIVE_DIR)


def activate_decoder(folder: str | Path, which: str) -> Path:
    """Make `which` ('tiny' or 'full') the folder's `vae_decoder/`, the other one stored beside it."""
    folder = check_openvino_folder(str(folder), "--model")
    if which not in DECODERS:
        raise UserError(f"decoder {which!r}: use one of {DECODERS}")
    record = _record(folder)
    _recover(folder, record)
    if record["active"] == which:
        return folder
    if not (folder / STORED_DIR[which]).is_dir():
        raise UserError(f"{str(folder)!r} has no {which} decoder ({STORED_DIR[which]}/); add one with --decoder")
    (folder / ACTIVE_DIR).rename(folder / STORED_DIR[record["active"]])
    (folder / STORED_DIR[which]).rename(folder / ACTIVE_DIR)
    record["active"] = which
    _write_json(folder / RECORD_FILE, record)
    _update_card(folder, record)
    return folder


def decoder_dir(folder: str | Path, which: str) -> Path:
    """The folder's IR folder of the `which` decoder ('tiny' or 'full'), wherever it lives now."""
    folder = Path(folder)
    if which not in DECODERS:
        raise UserError(f"--decoder {which!r}: use one of {DECODERS}")
    record = _record(folder)
    path = folder / (ACTIVE_DIR if record["active"] == which else STORED_DIR[which])
    if not (path / DECODER_XML).is_file():
        raise UserError(
            f"{str(folder)!r} has no {which} decoder ({STORED_DIR[which]}/); add one with `ov-sd tiny-decoder`"
        )
    return path


@contextlib.contextmanager
def decoder_view(folder: str | Path, which: str | None):
    """The pipeline folder as the pipelines would see it with `which` decoder active, leaving the folder itself as it
    is: the folder when that decoder is already active (or `which` is None), else a temporary folder of symbolic
    links to its parts with `vae_decoder/` pointing at the other decoder (copies where links cannot be made).
    A view and not `activate_decoder`: a generation must not change the user's folder, nor race another process
    that reads it; the links cost nothing and optimum and GenAI load them as they load the folder."""
    folder = check_openvino_folder(str(folder), "--model")
    if which is None or _record(folder)["active"] == which:
        if which is not None:
            decoder_dir(folder, which)  # an unknown decoder name is an error here too
        yield folder
        return
    chosen = decoder_dir(folder, which)
    with tempfile.TemporaryDirectory(prefix="ov-sd-decoder-view-") as tmp:
        view = Path(tmp) / folder.name
        view.mkdir()
        for entry in folder.iterdir():
            if entry.name in (ACTIVE_DIR, *STORED_DIR.values()):
                continue
            _link(entry, view / entry.name)
        _link(chosen, view / ACTIVE_DIR)
        yield view


def _link(src: Path, dst: Path) -> None:
    try:
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
    except OSError:  # no symlinks (some Windows accounts): copy
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


@torch.no_grad()
def ir_psnr(tiny_xml: Path, full_xml: Path, latents: np.ndarray) -> float:
    """PSNR (pooled, images in [0, 1]) of the tiny IR's images against the full decoder IR's, one latent at a time."""
    import openvino as ov

    core = ov.Core()
    tiny, full = (core.compile_model(x, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}) for x in (tiny_xml, full_xml))
    se = n = 0.0
    for z in latents:
        a = np.clip((tiny(z[None])[0] + 1) / 2, 0, 1)
        b = np.clip((full(z[None])[0] + 1) / 2, 0, 1)
        se += float(((a - b) ** 2).sum())
        n += b.size
    return float(-10 * np.log10(max(se / n, 1e-12)))


def add_tiny_decoder(folder: str | Path, decoder: str | Path, int8: str = "none", activate: bool = True) -> dict:
    """Write the tiny decoder of a train-decoder output (`decoder`) into the OpenVINO pipeline `folder`, replacing a
    previous tiny one, and make it active (`activate`). Returns the folder's decoder record."""
    import openvino as ov
    from safetensors.torch import load_file

    folder = check_openvino_folder(str(folder), "--model")
    if int8 not in INT8_MODES:
        raise UserError(f"--int8 {int8!r}: use one of {INT8_MODES}")
    source = find_decoder_folder(decoder)
    tiny = TinyDecoder.load(source)
    record = _record(folder)
    _recover(folder, record)
    full_dir = folder / (ACTIVE_DIR if record["active"] == "full" else STORED_DIR["full"])
    vae_config = json.loads((full_dir / "config.json").read_text())
    _check_matches(tiny.config, vae_config, folder)
    held_out_file = source.parent / HELD_OUT_FILE
    held_out = load_file(str(held_out_file)) if held_out_file.is_file() else {}  # latents; endpoints where sampled
    # what the pipelines feed the IR: latents / scaling_factor + shift
    pipeline_latents = {k: (v / tiny.config["scaling_factor"] + tiny.config["shift_factor"]).numpy()
                        for k, v in held_out.items()}  # fmt: skip
    calibration = np.concatenate(list(pipeline_latents.values())) if pipeline_latents else None
    model = compress_int8(convert_tiny_decoder(tiny), int8, calibration)
    if record["active"] == "tiny":  # the previous tiny decoder goes: the full one becomes active first
        activate_decoder(folder, "full")
        record = _record(folder)
    full_dir = folder / ACTIVE_DIR
    with atomic_output_dir(folder / STORED_DIR["tiny"], overwrite=True) as tmp:
        ov.save_model(model, tmp / DECODER_XML, compress_to_fp16=False)
        shutil.copy2(full_dir / "config.json", tmp / "config.json")  # the pipelines read the VAE's geometry here
        (tmp / TINY_CONFIG).write_text(json.dumps(tiny.config, indent=2))
    info = {
        "source": str(source.resolve()),
        "parameters": sum(p.numel() for p in tiny.parameters()),
        "global_context": bool(tiny.config.get("global_context")),
        "int8": int8,
        "ir_bytes": (folder / STORED_DIR["tiny"] / DECODER_XML).with_suffix(".bin").stat().st_size,
    }
    for key, prefix in HELD_OUT_SETS:
        if key in pipeline_latents:
            latents = pipeline_latents[key]
            info[f"{prefix}_psnr_vs_full_db"] = round(
                ir_psnr(folder / STORED_DIR["tiny"] / DECODER_XML, full_dir / DECODER_XML, latents), 3
            )
            info[f"{prefix}_latents"] = len(latents)
    record = {"format": "ov-sd-trainer/vae-decoders", "active": record["active"], "tiny": info,
              "full": {"ir_bytes": (full_dir / DECODER_XML).with_suffix(".bin").stat().st_size}}  # fmt: skip
    _write_json(folder / RECORD_FILE, record)
    if activate:
        activate_decoder(folder, "tiny")
    else:
        _update_card(folder, record)
    return _record(folder)


def _check_matches(tiny: dict, vae: dict, folder: Path) -> None:
    """The tiny decoder was trained for this folder's VAE: same latent channels, factor and latent scale."""
    if not same_latent_space(decoder_config(vae), tiny):
        raise UserError(
            f"the tiny decoder was trained for another VAE (latent channels, factor, scaling, shift = "
            f"{latent_space(tiny)}) than {str(folder)!r}'s {latent_space(decoder_config(vae))}; train one on this "
            "model's pipeline"
        )


def card_section(record: dict) -> str:
    tiny = record.get("tiny") or {}
    lines = [CARD_HEADING, ""]
    if record["active"] == "tiny":
        architecture = "TAESD architecture" + (" with global-context blocks" if tiny.get("global_context") else "")
        lines.append(
            f"`vae_decoder/` is a distilled tiny decoder ({architecture}, {tiny.get('parameters', '?'):,} "
            f"parameters, int8: {tiny.get('int8', 'none')}) trained on this model's VAE decoder by `ov-sd "
            "train-decoder`; the original VAE decoder is kept in `vae_decoder_full/`."
        )
    else:
        lines.append("`vae_decoder/` is the model's own VAE decoder" + (
            "; a distilled tiny decoder is kept in `vae_decoder_tiny/`." if tiny else "."))  # fmt: skip
    if "held_out_psnr_vs_full_db" in tiny:
        lines.append(
            f"The tiny decoder's images are {tiny['held_out_psnr_vs_full_db']:.2f} dB PSNR from the full decoder's "
            f"on {tiny['held_out_latents']} held-out image latents"
            + (f", and {tiny['held_out_endpoint_psnr_vs_full_db']:.2f} dB on the final latents of "
               f"{tiny['held_out_endpoint_latents']} held-out samplings (closer to what the pipeline decodes)."
               if "held_out_endpoint_psnr_vs_full_db" in tiny else ".")
        )  # fmt: skip
    if tiny:
        lines.append("Switch with `ov-sd tiny-decoder --model <this folder> --activate tiny|full`.")
    return "\n".join(lines)


def _update_card(folder: Path, record: dict) -> None:
    """Add or replace the model card's "VAE decoder" section (a folder without a card is left without one)."""
    from .card import CARD_FILE, replace_section

    card = folder / CARD_FILE
    if not card.is_file():
        return
    text = replace_section(card.read_text(), CARD_HEADING, card_section(record))
    tmp = card.with_name(f".{CARD_FILE}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, card)


# --------------------------------------------------------------------------------------------------------------------
# `ov-sd tiny-decoder`
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="an OpenVINO pipeline folder (changed in place)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--decoder", help="a `ov-sd train-decoder` output_dir: add its tiny decoder and activate it")
    what.add_argument("--activate", choices=DECODERS, help="switch the folder's active decoder")
    p.add_argument("--int8", choices=INT8_MODES, default="none", help="with --decoder: int8 weights / full int8")
    p.add_argument("--keep-active", action="store_true", help="with --decoder: add it but leave the active one")


def main(args) -> int:
    if args.activate:
        activate_decoder(args.model, args.activate)
        print(f"{args.model}: the {args.activate} decoder is active")
        return 0
    record = add_tiny_decoder(args.model, args.decoder, args.int8, activate=not args.keep_active)
    psnr, ends = (record["tiny"].get(f"{prefix}_psnr_vs_full_db") for _, prefix in HELD_OUT_SETS)
    print(f"{args.model}: tiny decoder added ({record['active']} active)"
          + (f", {psnr:.2f} dB PSNR from the full decoder on held-out image latents" if psnr is not None else "")
          + (f", {ends:.2f} dB on held-out sampling endpoints" if ends is not None else ""))  # fmt: skip
    return 0
