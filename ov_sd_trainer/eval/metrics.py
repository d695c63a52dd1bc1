"""Fidelity metrics of a variant against the FP32 teacher: image PSNR/SSIM (torchmetrics), UNet noise-prediction error
on fixed inputs, CLIP score (a local CLIP model only), and prompt accuracy by the judge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import families
from ..compress.quantize import UNET_INPUT_NAMES
from ..errors import UserError
from ..pipeline_folder import UNET_XML

# Metrics of a variant against the teacher, in table order: key, column title, format, higher is better.
FIDELITY_METRICS = (
    ("psnr", "PSNR (dB)", "{:.2f}", True),
    ("ssim", "SSIM", "{:.4f}", True),
    ("latent_mse", "latent MSE", "{:.3g}", False),
    ("noise_pred_mse", "UNet noise MSE", "{:.3g}", False),
)


ACCURACY_KEYS = ("shape", "color", "background", "all")


def images_to_uint8(images) -> torch.Tensor:
    """PIL images -> uint8 tensor (N, 3, H, W)."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def image_fidelity(reference: torch.Tensor, images: torch.Tensor) -> dict:
    """PSNR/SSIM of uint8 (N, 3, H, W) images against the reference images (torchmetrics, data range 1)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    if reference.shape != images.shape:
        raise ValueError(f"image sets differ in shape: {tuple(reference.shape)} vs {tuple(images.shape)}")
    ref, img = reference.float() / 255.0, images.float() / 255.0
    psnr, ssim = PeakSignalNoiseRatio(data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0)
    psnr.update(img, ref)
    ssim.update(img, ref)
    per_psnr = peak_signal_noise_ratio(img, ref, data_range=1.0, reduction="none", dim=(1, 2, 3))
    per_ssim = structural_similarity_index_measure(img, ref, data_range=1.0, reduction="none")
    return dict(
        psnr=float(psnr.compute()),
        ssim=float(ssim.compute()),
        psnr_mean_per_image=float(per_psnr.mean()),
        per_image=dict(psnr=per_psnr.tolist(), ssim=per_ssim.tolist()),
    )


def unet_inputs(teacher, jobs: list[dict], final_latents: torch.Tensor, num: int) -> dict:
    """`num` fixed UNet inputs: teacher final latents of evenly spaced jobs, noised at evenly spread timesteps
    (DDPM forward process of the teacher's noise schedule), with the teacher's text embeddings of their prompts.

    Returns numpy arrays sample (num, C, h, w) f32, timestep (num,) i64, encoder_hidden_states (num, 77, D) f32."""
    from diffusers import DDPMScheduler

    num = min(num, len(jobs))
    pick = [int(i * len(jobs) / num) for i in range(num)]
    ddpm = DDPMScheduler.from_config(teacher.scheduler.config)
    n_train = ddpm.config.num_train_timesteps
    timesteps = torch.tensor([int((i + 0.5) * n_train / num) for i in range(num)], dtype=torch.long)
    noise = torch.randn(num, *final_latents.shape[1:], generator=torch.Generator().manual_seed(2024))
    sample = ddpm.add_noise(final_latents[pick], noise, timesteps)
    prompts = [jobs[i]["prompt"] for i in pick]
    if families.is_sdxl(teacher.unet.config):  # SDXL: pooled text embeddings and the uncropped native-size time ids
        with torch.no_grad():
            embeds, _, pooled, _ = teacher.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                         do_classifier_free_guidance=False)  # fmt: skip
        size = tuple(int(d) * int(teacher.vae_scale_factor) for d in final_latents.shape[-2:])
        extra = {families.TEXT_EMBEDS: pooled, families.TIME_IDS: families.sdxl_time_ids(size, (0, 0), size, num)}
    else:
        with torch.no_grad():
            embeds, _ = teacher.encode_prompt(prompts, "cpu", 1, False)
        extra = families.heldout_extra(teacher.unet.config, num, "cpu")  # LCM: a fixed guidance embedding
    return dict(
        sample=sample.float().numpy(),
        timestep=timesteps.numpy().astype(np.int64),
        encoder_hidden_states=embeds.float().numpy(),
        **{k: v.float().numpy() for k, v in extra.items()},
        jobs=pick,
    )


@torch.no_grad()
def teacher_noise(teacher, inputs: dict, batch_size: int = 16) -> np.ndarray:
    out = []
    extra_names = families.extra_input_names(teacher.unet.config)
    for s in range(0, len(inputs["sample"]), batch_size):
        sl = slice(s, s + batch_size)
        extra = families.unet_kwargs({k: torch.from_numpy(inputs[k][sl]) for k in extra_names})
        out.append(
            teacher.unet(
                torch.from_numpy(inputs["sample"][sl]),
                torch.from_numpy(inputs["timestep"][sl]),
                encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"][sl]),
                **extra,
            ).sample.numpy()
        )
    return np.concatenate(out)


def ov_unet_noise(folder: Path, inputs: dict, ov_config: dict) -> np.ndarray:
    """Run a variant's UNet IR (`unet/openvino_model.xml`) on `inputs`, one sample per request.

    The IR is reshaped to batch 1 first, so static and dynamic exports are handled alike."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(folder / UNET_XML)
    # a family's extra inputs (LCM: timestep_cond; SDXL: text_embeds, time_ids)
    names = UNET_INPUT_NAMES + tuple(n for n in families.SDXL_EXTRA + (families.TIMESTEP_COND,) if n in inputs)
    order, shapes = [], {}
    for port in model.inputs:
        name = next((n for n in names if n in port.get_names()), None)  # a port can carry several names
        if name is None:
            raise UserError(f"{folder}: UNet input {port.get_any_name()!r} is not one of {names}; not an SD UNet")
        scalar = port.get_partial_shape().rank.get_length() == 0
        order.append((name, port.get_element_type().to_dtype(), scalar))
        shapes[port] = ov.PartialShape([] if scalar else list(inputs[name][:1].shape))
    model.reshape(shapes)
    request = core.compile_model(model, "CPU", ov_config).create_infer_request()
    out = []
    for i in range(len(inputs["sample"])):
        feed = []
        for name, dtype, scalar in order:  # by position, cast to the port's type (e.g. an f32 timestep input)
            x = inputs[name][i : i + 1].astype(dtype)
            feed.append(x.reshape(()) if scalar else x)
        request.infer(feed)
        out.append(request.get_output_tensor(0).data.copy())
    return np.concatenate(out)


def noise_fidelity(reference: np.ndarray, pred: np.ndarray) -> dict:
    diff = pred.astype(np.float64) - reference.astype(np.float64)
    per = (diff**2).reshape(len(diff), -1).mean(1)
    return dict(
        noise_pred_mse=float(per.mean()),
        noise_pred_rel_l2=float(np.linalg.norm(diff) / max(np.linalg.norm(reference), 1e-30)),
        per_sample_noise_mse=per.tolist(),
    )


class _CLIPFeatures(torch.nn.Module):
    """A `CLIPModel` whose get_image_features / get_text_features return the projected embeddings (N, D).

    transformers 5 returns a `BaseModelOutputWithPooling` (embeddings in `pooler_output`) where torchmetrics 1.9's
    CLIPScore expects the tensor itself and fails with "'BaseModelOutputWithPooling' object has no attribute 'norm'"."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config  # CLIPScore reads text_config.max_position_embeddings from it

    @staticmethod
    def _embeds(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embeds(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embeds(self.model.get_text_features(*args, **kwargs))


def clip_scorer(clip_dir: str | Path):
    """A torchmetrics `CLIPScore` on a local CLIP folder (`CLIPModel` + `CLIPProcessor` files), never a download.

    torchmetrics 1.9 accepts only its listed Hub names as a path (others raise ValueError), so the model and
    processor are loaded here, offline, and handed over through its callable form."""
    from torchmetrics.multimodal import CLIPScore

    clip_dir = Path(clip_dir).expanduser()
    if not (clip_dir / "config.json").is_file():
        raise UserError(f"--clip-model {str(clip_dir)!r} is not a local CLIP model folder (no config.json)")

    def load():
        from transformers import CLIPModel, CLIPProcessor

        try:
            return (
                _CLIPFeatures(CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()),
                CLIPProcessor.from_pretrained(clip_dir, local_files_only=True),
            )
        except Exception as exc:  # a half-saved folder, a non-CLIP model, a processor missing
            raise UserError(
                f"--clip-model {str(clip_dir)!r} cannot be loaded as CLIPModel + CLIPProcessor "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None

    return CLIPScore(model_name_or_path=load)


@torch.no_grad()
def clip_score(scorer, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> float:
    scorer.reset()
    for s in range(0, len(prompts), batch_size):
        scorer.update(list(images[s : s + batch_size]), prompts[s : s + batch_size])
    return float(scorer.compute())


def judge_accuracy(judge, images, jobs: list[dict]) -> dict:
    """The judge's accuracy on `images` (as `accuracy.prompt_accuracy` scores it) and per-image correctness."""
    from .judge import ATTRIBUTES, accuracy_by_value, score

    preds = judge.predict(images)
    expected = [{a: j[a] for a in ATTRIBUTES} for j in jobs]
    acc = score(preds, expected)
    correct = {a: [int(p[a] == e[a]) for p, e in zip(preds, expected)] for a in ATTRIBUTES}
    correct["all"] = [int(all(p[a] == e[a] for a in ATTRIBUTES)) for p, e in zip(preds, expected)]
    return dict(accuracy={k: acc[k] for k in ACCURACY_KEYS}, by_value=accuracy_by_value(jobs, preds), correct=correct)
