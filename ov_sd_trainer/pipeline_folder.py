"""What a pipeline folder is. Every module that reads or loads a Stable Diffusion folder asks this one.

Two kinds exist:

- a **diffusers folder** (`StableDiffusionPipeline.save_pretrained`): `model_index.json`, `unet/` with
  `diffusion_pytorch_model.*`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; PyTorch runs it;
- an **OpenVINO folder** as optimum-intel writes it: `model_index.json`, `unet/openvino_model.xml|.bin`,
  `text_encoder/`, `vae_decoder/`, `vae_encoder/`, `tokenizer/`, `scheduler/`; `OVStableDiffusionPipeline` runs it.

Both kinds name their pipeline class in model_index.json (`_class_name`, the diffusers name in either kind); loading
dispatches on it (`families.PIPELINE_CLASSES`: `StableDiffusionPipeline` for SD 1.x/2.x,
`LatentConsistencyModelPipeline` for LCM, and optimum-intel's `OV...` class of each), and an unsupported class is a
one-line error.
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

import contextlib
import json
import os
import tempfile
from pathlib import Path

from . import families
from .errors import UserError

UNET_XML = Path("unet") / "openvino_model.xml"
# The tokenizer as OpenVINO IRs (openvino_tokenizers), the file names optimum-cli and OpenVINO GenAI use.
OV_TOKENIZER_XML = Path("tokenizer") / "openvino_tokenizer.xml"
OV_DETOKENIZER_XML = Path("tokenizer") / "openvino_detokenizer.xml"
GENAI_TOKENIZER_FILES = (OV_TOKENIZER_XML, OV_DETOKENIZER_XML)  # each with its .bin
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")  # SDXL has a second tokenizer: GenAI needs its IRs too
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


def _tokenizer_dirs(path: str | Path) -> list[str]:
    """`tokenizer`, and SDXL's `tokenizer_2` where the folder has one."""
    return [d for d in TOKENIZER_DIRS if d == "tokenizer" or (Path(path) / d).is_dir()]


def has_openvino_tokenizer(path: str | Path) -> bool:
    """Whether the folder holds the tokenizer and detokenizer IRs (.xml and .bin) that OpenVINO GenAI loads, for each
    of its tokenizers (SDXL: `tokenizer/` and `tokenizer_2/`)."""
    files = [Path(path) / d / f.name for d in _tokenizer_dirs(path) for f in GENAI_TOKENIZER_FILES]
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


def is_hub_id(name_or_path: str) -> bool:
    """Whether a model argument is taken for a Hub id: it does not look like a local path and has at most one `/`."""
    return not (looks_local(name_or_path) or name_or_path.count("/") > 1)


def check_model_source(name_or_path: str, revision: str | None = None) -> None:
    """The check every pipeline load starts with (`load_pipeline`, `load_ov_pipeline`, the PTQ peer's load): a local
    folder must be a Stable Diffusion pipeline folder, diffusers or OpenVINO (`check_pipeline_source`); anything else is
    a Hub id (`check_hub_id`)."""
    if is_hub_id(name_or_path):
        check_hub_id(name_or_path, revision)
    else:
        check_pipeline_source(name_or_path)


def check_hub_id(repo_id: str, revision: str | None = None) -> None:
    """A well-formed Hub id, and offline (`HF_HUB_OFFLINE=1`) one whose pipeline is in the Hugging Face cache: without
    this, diffusers and optimum-intel fail with a `LocalEntryNotFoundError` / `OSError` traceback."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(
            f"model {repo_id!r} is neither a folder nor a valid Hub id ({str(e).splitlines()[0]}); pass a pipeline "
            "folder or a Hub id"
        ) from e
    cached = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    if constants.HF_HUB_OFFLINE and not isinstance(cached, str):
        raise UserError(
            f"model {repo_id!r} is neither a local folder nor a Hub model in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
            f"forbids downloading it; pass a pipeline folder, or download it first (`hf download {repo_id}`)"
        )


@contextlib.contextmanager
def hub_load_errors(name_or_path: str):
    """Around a `from_pretrained` of `name_or_path`: a Hub id whose files cannot be had (no such repo or revision, a
    gated one, no network) is a one-line error; a local folder's errors pass as they are."""
    if not is_hub_id(name_or_path):
        yield
        return
    import httpx  # huggingface_hub's HTTP client: a failed connection is its ConnectError, not an OSError

    try:
        yield
    except (OSError, httpx.HTTPError) as e:  # huggingface_hub's errors and diffusers' wrappings are OSErrors
        reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"cannot load the Hub model {name_or_path!r}: {reason}") from e


def check_pipeline_source(name_or_path: str) -> None:
    """Fail early with a clear message for a local path that is missing or not an SD pipeline (diffusers or
    OpenVINO: both list the components in model_index.json).

    Anything that does not look like a local path is taken for a Hub id and left to `check_hub_id`."""
    path = Path(name_or_path).expanduser()
    if is_hub_id(name_or_path):
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
    families.pipeline_class_name(components)  # a supported family


def check_image_size(height: int | None, width: int | None) -> None:
    """An image size a pipeline can generate: positive multiples of 8 (diffusers' rule; None: the model's own)."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
            raise UserError(f"--{name} {value!r}: must be a positive multiple of 8 (the VAE factor)")


def pipeline_class_name(folder: str | Path) -> str:
    """The (supported) diffusers pipeline class a local folder's model_index.json names."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{str(folder)!r} lacks a readable model_index.json ({e}); is it a pipeline folder?") from e
    return families.pipeline_class_name(index)


FEW_STEP_KEY = "few_step"  # in a consistency student's results.json: the steps and guidance it was trained for
LCM_CLASS = "LatentConsistencyModelPipeline"


def few_step_record(folder: str | Path) -> dict | None:
    """A consistency student's export's (or its PTQ peer's) results.json `few_step` record: what it was trained for
    (`lcm.few_step_record`), or None."""
    try:
        return json.loads((Path(folder).expanduser() / RESULTS_FILE).read_text()).get(FEW_STEP_KEY) or None
    except (OSError, ValueError, AttributeError):
        return None


def trained_sampling(name_or_path: str | Path) -> dict | None:
    """The steps and guidance scale a local folder's model is meant to sample with, or None (use the usual ones).

    A consistency student's export records what it was trained for (results.json `few_step`); any other latent
    consistency folder gets its family's steps (`families.SAMPLING_STEPS`) and diffusers' LCM pipeline's default
    guidance scale."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        return None
    few_step = few_step_record(folder)
    if few_step:
        return {"steps": int(few_step["steps"]), "guidance_scale": float(few_step["guidance_scale"]),
                "source": f"{RESULTS_FILE} {FEW_STEP_KEY}"}  # fmt: skip
    if pipeline_class_name(folder) != LCM_CLASS:
        return None
    return {"steps": families.SAMPLING_STEPS[LCM_CLASS], "guidance_scale": lcm_default_guidance(), "source": LCM_CLASS}


def lcm_default_guidance() -> float:
    """diffusers' `LatentConsistencyModelPipeline` default guidance scale (8.5: w = 7.5 embedded), read from it."""
    import inspect

    from diffusers import LatentConsistencyModelPipeline

    return float(inspect.signature(LatentConsistencyModelPipeline.__call__).parameters["guidance_scale"].default)


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
    """Make an OpenVINO pipeline folder ready for OpenVINO GenAI: the tokenizer IRs (each tokenizer's) and the pinned
    beta schedule."""
    write_openvino_tokenizers(folder)
    pin_scheduler_betas(folder)


def write_openvino_tokenizers(folder: str | Path) -> list[Path]:
    """`write_openvino_tokenizer` for each tokenizer of the folder (SDXL: `tokenizer/` and `tokenizer_2/`). Returns
    the tokenizer .xml paths."""
    return [write_openvino_tokenizer(folder, d)[0] for d in _tokenizer_dirs(folder)]


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


def write_openvino_tokenizer(folder: str | Path, subfolder: str = "tokenizer") -> tuple[Path, Path]:
    """Convert `folder/subfolder` (a Hugging Face tokenizer) to OpenVINO tokenizer and detokenizer IRs with
    `openvino_tokenizers.convert_tokenizer` and save them next to it. Returns the two .xml paths.

    The conversion is checked (`_check_tokenizer_ir`): the IR must give the Hugging Face tokenizer's ids for probe
    prompts and its pad id. The files are written into a temporary folder and moved in (.bin before .xml), so a
    failure leaves no half-written IR; existing ones are replaced."""
    import openvino as ov

    folder = Path(folder)
    tok_dir = folder / subfolder
    if not tok_dir.is_dir():
        raise UserError(f"{str(folder)!r} has no {subfolder}/ folder; pass a Stable Diffusion pipeline folder")
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
    targets = [tok_dir / f.name for f in GENAI_TOKENIZER_FILES]
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
    """A diffusers pipeline of a supported family (`StableDiffusionPipeline`, `LatentConsistencyModelPipeline`,
    `StableDiffusionXLPipeline`) from
    a local folder or a Hub id, by the class its model_index.json names (FP32 unless `dtype`)."""
    check_model_source(name_or_path, revision)  # before the imports: a bad argument fails in a second
    import torch
    from diffusers import DiffusionPipeline

    no_checker = dict(safety_checker=None, requires_safety_checker=False)
    if Path(name_or_path).expanduser().is_dir() and pipeline_class_name(name_or_path) == "StableDiffusionXLPipeline":
        no_checker = {}  # SDXL has no safety checker (diffusers warns about the keywords)
    with hub_load_errors(name_or_path):
        pipe = DiffusionPipeline.from_pretrained(
            name_or_path, revision=revision, torch_dtype=dtype or torch.float32, **no_checker
        )
    families.pipeline_class_name({"_class_name": type(pipe).__name__})  # a Hub model's class, checked once known
    families.check_unet_config(pipe.unet.config)
    return pipe


def load_ov_pipeline(model: str | Path, height: int, width: int, batch_size: int = 1, export: bool | None = None,
                     ov_config: dict | None = None, guidance_scale: float | None = None):  # fmt: skip
    """Load, reshape to static shapes (prompt batch, height, width) and compile an optimum-intel pipeline of the
    folder's class (`OVStableDiffusionPipeline`, `OVLatentConsistencyModelPipeline`: `families.PIPELINE_CLASSES`).

    A diffusers folder or Hub id is exported to OpenVINO on the fly (`export=True`). The UNet's static batch is
    twice the prompt batch (classifier-free guidance) unless `guidance_scale` <= 1 (no CFG: SD-Turbo at guidance 0)
    or the UNet is an LCM's (its guidance is an input, `timestep_cond`)."""
    check_model_source(str(model))  # and a supported family, before the slow import and load
    from optimum.intel import OVDiffusionPipeline

    model = str(Path(model).resolve()) if Path(model).expanduser().exists() else str(model)  # not read as a Hub id
    if export is None:
        export = not is_openvino_folder(model)
    kwargs = {"ov_config": ov_config} if ov_config else {}
    with hub_load_errors(model):
        pipe = OVDiffusionPipeline.from_pretrained(model, export=export, compile=False, **kwargs)
    families.pipeline_class_name({"_class_name": type(pipe).auto_model_class.__name__})
    pipe.reshape(batch_size=batch_size, height=height, width=width, num_images_per_prompt=1)
    if guidance_scale is not None and guidance_scale <= 1:
        _unet_batch_without_cfg(pipe, batch_size)
    match_vae_decoder_batch(pipe, batch_size, height, width)
    pipe.compile()
    return pipe


def _unet_batch_without_cfg(pipe, batch_size: int) -> None:
    """Give the reshaped UNet the prompt batch itself (optimum-intel's `reshape` doubles it for CFG, which diffusers
    leaves out at guidance <= 1); `timestep` keeps its shape."""
    model = pipe.unet.model
    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        if port.get_any_name() != "timestep" and shape.rank.is_static and shape.rank.get_length() > 0:
            shape[0] = batch_size
        shapes[port] = shape
    model.reshape(shapes)
    pipe.unet.clear_requests()


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
    """Whether a loaded pipeline is optimum-intel's or a subclass of one (the step-caching pipeline), else diffusers'."""
    return any(c.__module__.startswith("optimum.intel") for c in type(pipe).__mro__)


def image_size(pipe) -> tuple[int, int]:
    """(height, width) of a loaded pipeline: its static shape if reshaped, else its native size."""
    h = getattr(pipe, "height", -1)
    w = getattr(pipe, "width", -1)
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return h, w
    side = int(pipe.unet.config["sample_size"]) * int(pipe.vae_scale_factor)
    return side, side
