"""What a pipeline folder is. Every module that reads or loads a Stable Diffusion folder asks this one.

Two kinds exist:

- a **diffusers folder** (`StableDiffusionPipeline.save_pretrained`): `model_index.json`, `unet/` with
  `diffusion_pytorch_model.*`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; PyTorch runs it;
- an **OpenVINO folder** as optimum-intel writes it: `model_index.json`, `unet/openvino_model.xml|.bin`,
  `text_encoder/`, `vae_decoder/`, `vae_encoder/`, `tokenizer/`, `scheduler/`; `OVStableDiffusionPipeline` runs it.
  Every OpenVINO folder this project writes is also ready for OpenVINO GenAI's `Text2ImagePipeline`
  (`write_genai_files`): it holds the tokenizer as OpenVINO IRs (`tokenizer/openvino_tokenizer.xml|.bin`,
  `tokenizer/openvino_detokenizer.xml|.bin`), which GenAI needs to run at all, and its scheduler config lists the
  beta schedule (`trained_betas`), so that GenAI's schedulers use diffusers' betas (they compute their own slightly
  differently: `pin_scheduler_betas`). optimum and diffusers read both the same as before. Neither is required for a
  folder to count as an OpenVINO folder: older exports and plain optimum exports stay loadable by optimum, and
  `check_genai_folder` names the fix (`ov-sd prepare-genai --model DIR`) where GenAI needs the tokenizer.

Folders written by this project carry one file that says who wrote them: `results.json` + `training_recipe.json`
(a QAT export) or `ptq_info.json` (an optimum-intel PTQ peer). A folder's native image size is the UNet's
`sample_size` times the VAE factor (2 ** (VAE blocks - 1)).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import UserError

UNET_XML = Path("unet") / "openvino_model.xml"
# The tokenizer as OpenVINO IRs (openvino_tokenizers), the file names optimum-cli and OpenVINO GenAI use.
OV_TOKENIZER_XML = Path("tokenizer") / "openvino_tokenizer.xml"
OV_DETOKENIZER_XML = Path("tokenizer") / "openvino_detokenizer.xml"
GENAI_TOKENIZER_FILES = (OV_TOKENIZER_XML, OV_DETOKENIZER_XML)  # each with its .bin
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
PREPARE_GENAI_COMMAND = "ov-sd prepare-genai --model"  # the fix for a folder written before (or by optimum-intel)
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
RESULTS_FILE = "results.json"  # a QAT export: sizes, FakeQuantize count, training summary
RECIPE_FILE = "training_recipe.json"  # a QAT export (and its run folder): the recipe's own keys
PTQ_INFO_FILE = "ptq_info.json"  # an optimum-intel PTQ peer: settings, timings, sizes
FALLBACK_SIZE = 512  # when a folder's configs cannot be read (a Hub id not downloaded yet): SD 1.x's size


def looks_local(name_or_path: str) -> bool:
    """Whether a model argument means a local path (else it is taken for a Hub id)."""
    return Path(name_or_path).expanduser().exists() or name_or_path.startswith((".", "/", "~"))


def is_openvino_folder(path: str | Path) -> bool:
    return (Path(path) / UNET_XML).is_file()


def has_openvino_tokenizer(path: str | Path) -> bool:
    """Whether the folder holds the tokenizer and detokenizer IRs (.xml and .bin) that OpenVINO GenAI loads."""
    files = [Path(path) / f for f in GENAI_TOKENIZER_FILES]
    return all(f.is_file() and f.with_suffix(".bin").is_file() for f in files)


def is_diffusers_folder(path: str | Path) -> bool:
    unet = Path(path) / "unet"
    return (Path(path) / "model_index.json").is_file() and any(unet.glob("diffusion_pytorch_model*"))


def unet_config(folder: str | Path) -> dict:
    """The UNet's config.json ({} if unreadable)."""
    try:
        return json.loads((Path(folder) / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def geometry(folder: str | Path) -> dict[str, int]:
    """Native image size, VAE factor, latent channels and text width, from the folder's configs."""
    folder = Path(folder)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae_dir = folder / ("vae_decoder" if is_openvino_folder(folder) else "vae")
        vae = json.loads((vae_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{str(folder)!r} lacks a readable unet/vae config.json ({e}); is it an SD pipeline?") from e
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return {
        "size": int(unet.get("sample_size", 64)) * factor,
        "vae_factor": factor,
        "in_channels": int(unet.get("in_channels", 4)),
        "text_dim": int(unet["cross_attention_dim"]),
    }


def native_size(folder: str | Path) -> tuple[int, int]:
    """(height, width) the pipeline was trained for; `FALLBACK_SIZE` when its configs cannot be read."""
    try:
        side = geometry(folder)["size"]
    except (UserError, KeyError):
        return FALLBACK_SIZE, FALLBACK_SIZE
    return side, side


def folder_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def unet_bytes(folder: str | Path) -> int:
    """Bytes of the UNet on disk: the OpenVINO IR (.xml + .bin) or the diffusers weights (+ config)."""
    unet = Path(folder) / "unet"
    xml = Path(folder) / UNET_XML
    if xml.is_file():
        return sum(f.stat().st_size for f in (xml, xml.with_suffix(".bin")) if f.is_file())
    return sum(f.stat().st_size for f in unet.glob("diffusion_pytorch_model*") if f.is_file())


def unet_rt_info(folder: str | Path) -> dict:
    """The runtime info of an OpenVINO folder's UNet IR (NNCF records its quantization there)."""
    import openvino as ov

    return dict(ov.Core().read_model(Path(folder) / UNET_XML).get_rt_info())


def written_by(folder: str | Path) -> str | None:
    """'qat' for this project's QAT export, 'ptq' for its optimum-intel PTQ peer, None otherwise."""
    folder = Path(folder)
    if (folder / RECIPE_FILE).is_file():
        return "qat"
    if (folder / PTQ_INFO_FILE).is_file():
        return "ptq"
    return None


# --------------------------------------------------------------------------------------------------------------------
# Checks with one-line errors
# --------------------------------------------------------------------------------------------------------------------


def check_pipeline_source(name_or_path: str) -> None:
    """Fail early with a clear message for a local path that is missing or not an SD pipeline.

    Anything that does not look like a local path is taken for a Hub id and left to diffusers."""
    path = Path(name_or_path).expanduser()
    if not (looks_local(name_or_path) or name_or_path.count("/") > 1):
        return
    if not path.exists():
        raise UserError(f"model path {name_or_path!r} does not exist; pass a diffusers pipeline folder or a Hub id")
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(
            f"{name_or_path!r} is not a Stable Diffusion pipeline folder (no model_index.json); "
            "pass the folder written by StableDiffusionPipeline.save_pretrained"
        )
    components = json.loads(index.read_text())
    missing = [c for c in SD_COMPONENTS if c not in components]
    if missing:
        raise UserError(f"{name_or_path!r} is not a Stable Diffusion pipeline: model_index.json lacks {missing}")


def check_openvino_folder(path: str, flag: str) -> Path:
    """An existing OpenVINO pipeline folder given with `flag`, resolved."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{flag} {path!r} does not exist; pass an exported OpenVINO pipeline folder")
    if not is_openvino_folder(p):
        raise UserError(f"{flag} {path!r} is not an OpenVINO pipeline folder (no {UNET_XML.as_posix()})")
    return p.resolve()


def check_genai_folder(path: str, flag: str = "--model") -> Path:
    """An OpenVINO pipeline folder that OpenVINO GenAI's `Text2ImagePipeline` can load (tokenizer IRs included)."""
    p = check_openvino_folder(path, flag)
    if not has_openvino_tokenizer(p):
        raise UserError(
            f"{flag} {path!r} lacks the OpenVINO tokenizer IRs that OpenVINO GenAI needs "
            f"({OV_TOKENIZER_XML.as_posix()}, {OV_DETOKENIZER_XML.as_posix()}); add them with "
            f"`{PREPARE_GENAI_COMMAND} {path}` or export the folder again"
        )
    return p


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def write_genai_files(folder: str | Path) -> None:
    """Make an OpenVINO pipeline folder ready for OpenVINO GenAI: the tokenizer IRs and the pinned beta schedule."""
    write_openvino_tokenizer(folder)
    pin_scheduler_betas(folder)


def pin_scheduler_betas(folder: str | Path) -> bool:
    """Write the scheduler's beta schedule into its config as `trained_betas`. Returns whether the config changed.

    diffusers computes `beta_schedule` "linear"/"scaled_linear" with `torch.linspace` (end point included); OpenVINO
    GenAI 2026.4's schedulers use their own linspace, which leaves the end point out (`numpy_utils::linspace`,
    endpoint=false), so their betas run 0.1% short of `beta_end` and every step's coefficients differ by ~1e-3
    relative. Both read `trained_betas` first: listing diffusers' own float32 betas there changes nothing for diffusers
    and optimum (the same values, bit for bit) and gives GenAI the same schedule. A config that already has
    `trained_betas`, or a scheduler without betas (flow matching), is left as it is."""
    import diffusers

    path = Path(folder) / SCHEDULER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {str(path)!r} ({e}); is it a Stable Diffusion pipeline folder?") from e
    scheduler_cls = getattr(diffusers, str(config.get("_class_name")), None)
    if config.get("trained_betas") is not None or "beta_schedule" not in config or scheduler_cls is None:
        return False
    betas = getattr(scheduler_cls.from_config(config), "betas", None)
    if betas is None:
        return False
    config["trained_betas"] = [float(b) for b in betas.tolist()]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return True


# Checked on every conversion: the IR must give the ids the folder's own tokenizer gives (an empty prompt is the
# unconditional input of classifier-free guidance).
_PROBE_PROMPTS = ("a photo of an astronaut riding a horse on mars", "")


def write_openvino_tokenizer(folder: str | Path) -> tuple[Path, Path]:
    """Convert `folder/tokenizer` (a Hugging Face tokenizer) to OpenVINO tokenizer and detokenizer IRs with
    `openvino_tokenizers.convert_tokenizer` and save them next to it. Returns the two .xml paths.

    The conversion is checked (`_check_tokenizer_ir`): the IR must give the Hugging Face tokenizer's ids for probe
    prompts and its pad id. The files are written into a temporary folder and moved in (.bin before .xml), so a
    failure leaves no half-written IR; existing ones are replaced."""
    import openvino as ov

    folder = Path(folder)
    tok_dir = folder / "tokenizer"
    if not tok_dir.is_dir():
        raise UserError(f"{str(folder)!r} has no tokenizer/ folder; pass a Stable Diffusion pipeline folder")
    try:
        from openvino_tokenizers import convert_tokenizer
    except ImportError as e:
        raise UserError(
            f"openvino-tokenizers is not importable ({e}); {openvino_addon_pip_hint('openvino-tokenizers')}"
        ) from e
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer in {str(tok_dir)!r}: {str(e).splitlines()[0]}") from e
    try:
        tokenizer, detokenizer = convert_tokenizer(hf, with_detokenizer=True)
    except Exception as e:  # openvino_tokenizers raises its own types (OVTypeError, NotImplementedError, ...)
        raise UserError(
            f"openvino_tokenizers cannot convert the {type(hf).__name__} in {str(tok_dir)!r}: {str(e).splitlines()[0]}"
        ) from e
    _check_tokenizer_ir(tokenizer, hf, tok_dir)
    targets = [folder / f for f in GENAI_TOKENIZER_FILES]
    with tempfile.TemporaryDirectory(prefix=".ov-tokenizer-", dir=tok_dir) as tmp:
        for model, target in zip((tokenizer, detokenizer), targets):
            ov.save_model(model, Path(tmp) / target.name)
        for target in targets:
            os.replace(Path(tmp) / target.with_suffix(".bin").name, target.with_suffix(".bin"))
            os.replace(Path(tmp) / target.name, target)
    return targets[0], targets[1]


def openvino_addon_pip_hint(package: str) -> str:
    """How to install an OpenVINO add-on matching the installed OpenVINO (they must share its year.minor)."""
    from importlib.metadata import version

    year_minor = ".".join(version("openvino").split(".")[:2])
    return f"`pip install '{package}=={year_minor}.*'` (it must match openvino {version('openvino')})"


def _check_tokenizer_ir(tokenizer, hf, tok_dir: Path) -> None:
    """The converted tokenizer gives `hf`'s ids on the probe prompts, and pads with `hf`'s pad id (GenAI pads prompts
    to the maximum length with the IR's `pad_token_id`)."""
    import numpy as np
    import openvino as ov

    compiled = ov.Core().compile_model(tokenizer, "CPU")
    for prompt in _PROBE_PROMPTS:
        want = hf(prompt).input_ids
        got = np.asarray(compiled([prompt])["input_ids"])[0].tolist()
        if got != want:
            raise UserError(
                f"the OpenVINO tokenizer converted from {str(tok_dir)!r} gives other ids than the tokenizer itself for "
                f"{prompt!r} ({got[:8]} vs {want[:8]}); report this with the tokenizer files"
            )
    pad = int(tokenizer.get_rt_info("pad_token_id").astype(int)) if tokenizer.has_rt_info("pad_token_id") else None
    if hf.pad_token_id is not None and pad != hf.pad_token_id:
        raise UserError(
            f"the OpenVINO tokenizer converted from {str(tok_dir)!r} pads with id {pad}, the tokenizer itself with "
            f"{hf.pad_token_id}; report this with the tokenizer files"
        )


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def load_pipeline(name_or_path: str, revision: str | None = None, dtype=None):
    """A diffusers `StableDiffusionPipeline` from a local folder or a Hub id (FP32 unless `dtype`)."""
    import torch
    from diffusers import StableDiffusionPipeline

    check_pipeline_source(name_or_path)
    return StableDiffusionPipeline.from_pretrained(
        name_or_path,
        revision=revision,
        torch_dtype=dtype or torch.float32,
        safety_checker=None,
        requires_safety_checker=False,
    )


def load_ov_pipeline(model: str | Path, height: int, width: int, batch_size: int = 1, export: bool | None = None,
                     ov_config: dict | None = None):  # fmt: skip
    """Load, reshape to static shapes (prompt batch, height, width) and compile an `OVStableDiffusionPipeline`.

    A diffusers folder or Hub id is exported to OpenVINO on the fly (`export=True`)."""
    from optimum.intel import OVStableDiffusionPipeline

    model = str(Path(model).resolve()) if Path(model).expanduser().exists() else str(model)  # not read as a Hub id
    if export is None:
        export = not is_openvino_folder(model)
    kwargs = {"ov_config": ov_config} if ov_config else {}
    pipe = OVStableDiffusionPipeline.from_pretrained(model, export=export, compile=False, **kwargs)
    pipe.reshape(batch_size=batch_size, height=height, width=width, num_images_per_prompt=1)
    match_vae_decoder_batch(pipe, batch_size, height, width)
    pipe.compile()
    return pipe


def static_batch(part) -> int | None:
    """The static batch of an OpenVINO pipeline part's first input, or None if dynamic."""
    try:
        dim = part.model.inputs[0].get_partial_shape()[0]
        return dim.get_length() if dim.is_static else None
    except (AttributeError, IndexError):
        return None


def match_vae_decoder_batch(pipe, batch_size: int, height: int, width: int) -> None:
    """optimum-intel's `reshape` gives the VAE decoder a static batch of `num_images_per_prompt`,
    while diffusers decodes the whole prompt batch at once: reshape the decoder to the prompt batch."""
    if static_batch(pipe.vae_decoder) in (None, batch_size):
        return
    try:
        pipe.vae_decoder.model = pipe._reshape_vae_decoder(pipe.vae_decoder.model, height, width, batch_size)
    except ValueError as exc:  # compile_only pipelines cannot be reshaped
        raise UserError(
            f"the OpenVINO pipeline's VAE decoder cannot take batches of {batch_size}; load it with compile=False "
            f"(or reshape it with num_images_per_prompt={batch_size})"
        ) from exc
    pipe.vae_decoder.clear_requests()


def is_openvino_pipeline(pipe) -> bool:
    """Whether a loaded pipeline is optimum-intel's (else diffusers')."""
    return type(pipe).__module__.startswith("optimum.intel")


def image_size(pipe) -> tuple[int, int]:
    """(height, width) of a loaded pipeline: its static shape if reshaped, else its native size."""
    h = getattr(pipe, "height", -1)
    w = getattr(pipe, "width", -1)
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return h, w
    side = int(pipe.unet.config["sample_size"]) * int(pipe.vae_scale_factor)
    return side, side
