"""The bench's few-step rows and tiny VAE decoder timings (issues 26 and 27), measured in the same run as the 50-step
rows.

- **Tiny decoder**: the default tiny decoder (TAESD's architecture with global-context blocks) sized for the
  pipeline's VAE (`tiny_decoder.TinyDecoder(decoder_config(...))`,
  random weights) converted with the export's own interface (`export.tiny_decoder.convert_tiny_decoder`), in f32 and
  full int8 (NNCF PTQ on random latents). Timed with the same latents, warm-up and repeats as the VAE decode, each
  with the same postprocessing to PIL; every per-image row then also gets its image latency with the tiny decoder
  (`image_tiny_s`: full int8 tiny decode for int8 UNets, f32 otherwise).
- **Few-step int8 student**: the pipeline's UNet plus LCM's guidance embedding (`time_cond_proj_dim`), random weights,
  in a `LatentConsistencyModelPipeline` with diffusers' `LCMScheduler`, exported by optimum and given the project's
  full int8 UNet (the QAT graph with random calibration, `prepare.build_qat_folder`): latency does not depend on the
  weights, so a random student times as a trained one. Batch 1, no classifier-free guidance (the guidance is the
  `timestep_cond` input). Per image at K in FEW_STEPS: text encoder + K UNet calls + decode (full and tiny), and one
  measured CHECK_STEPS-step pipeline run checks the composition.
- **The same student with ToDo** (key/value pooling, `--tome-ratio` / `--tome-max-downsample` as for the 50-step
  ToMe row, mode todo): its own int8 UNet (ToDo applied before quantization, as training applies it), timed with
  the same inputs in the same process; its rows (`lcm-int8-todo-Kstep`) share the text encoder and decode times.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ... import families
from ...lcm import lcm_base_folder
from .measure import median_or_none, ov_config_for, time_calls, unet_config, unet_inputs
from .monitor import free_memory
from .settings import BenchSettings
from .variants import BY_NAME, QAT

FEW_STEPS = (2, 4, 8)
CHECK_STEPS = families.SAMPLING_STEPS["LatentConsistencyModelPipeline"]  # the measured LCM pipeline run (4)
TINY_CALIBRATION = 4  # random latents for the tiny decoder's full-int8 PTQ (speed only)
TINY_F32, TINY_INT8 = "tiny-f32", "tiny-int8"


def build_tiny_decoders(vae_config: dict, out: Path, latent_hw: tuple[int, int], seed: int = 0,
                        **options) -> dict[str, Any]:  # fmt: skip
    """f32 and full-int8 IRs of a random tiny decoder sized for `vae_config` (`out/tiny-f32.xml`, `tiny-int8.xml`);
    `options`: `decoder_config`'s width / blocks / global_context (default: the default decoder's)."""
    import numpy as np
    import openvino as ov
    import torch

    from ...export.tiny_decoder import compress_int8, convert_tiny_decoder
    from ...tiny_decoder import TinyDecoder, decoder_config

    torch.manual_seed(seed)
    tiny = TinyDecoder(decoder_config(vae_config, **options)).eval()
    model = convert_tiny_decoder(tiny)
    ov.save_model(model, out / f"{TINY_F32}.xml", compress_to_fp16=False)
    rng = np.random.default_rng(seed)
    channels = tiny.config["latent_channels"]
    calibration = rng.standard_normal((TINY_CALIBRATION, channels, *latent_hw)).astype(np.float32)
    ov.save_model(compress_int8(model, "full", calibration), out / f"{TINY_INT8}.xml", compress_to_fp16=False)
    return {"parameters": sum(p.numel() for p in tiny.parameters()), "config": tiny.config,
            "calibration": f"{TINY_CALIBRATION} random latents (speed only)"}  # fmt: skip


def _decode_fns(pipe, tiny_dir: Path, ov_config: dict, latents, images: int):
    """name -> a call decoding `latents` to PIL: the pipeline's VAE decoder and each tiny IR (the same input the
    pipelines feed their decoder, latents / scaling_factor, and the same postprocessing)."""
    import openvino as ov
    import torch

    scaled = latents / pipe.vae.config.scaling_factor
    denorm = [True] * images

    def full():
        image = pipe.vae.decode(scaled, return_dict=False)[0]
        pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=denorm)

    fns = {"full": full}
    core = ov.Core()
    feed = scaled.numpy()
    for name in (TINY_F32, TINY_INT8):
        compiled = core.compile_model(tiny_dir / f"{name}.xml", "CPU", ov_config)

        def tiny(compiled=compiled):
            image = torch.from_numpy(compiled(feed)[0])
            pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=denorm)

        fns[name] = tiny
    return fns


def time_tiny_decoders(pipe, tiny_dir: Path, settings: BenchSettings, ov_config: dict, latent_shape, progress) -> dict:
    """Median seconds of the full VAE decode and each tiny decoder IR, on one prompt batch's latents, on `pipe`."""
    import torch

    images = latent_shape[0]
    latents = torch.randn(*latent_shape, generator=torch.Generator().manual_seed(settings.seed + 1))
    out = {}
    for name, fn in _decode_fns(pipe, tiny_dir, ov_config, latents, images).items():
        times = time_calls(fn, settings.warmup, settings.repeats, f"decode {name}", progress, settings.warmup_s)
        out[name] = {"s": median_or_none(times), "times_s": [round(t, 4) for t in times]}
    return out


def add_tiny_image_latency(rows: list[dict], tiny: dict) -> None:
    """Each per-image row's latency with the tiny decoder in place of its VAE decode: full int8 tiny for int8 UNets."""
    for row in rows:
        which = TINY_INT8 if BY_NAME[row["name"]].int8 else TINY_F32
        row["tiny_decoder"] = which
        row["tiny_decode_s"] = tiny[which]["s"]
        row["image_tiny_s"] = row["image_s"] - row["vae_decode_s"] + tiny[which]["s"]


def todo_kwargs(settings: BenchSettings) -> dict[str, Any]:
    """`tome.apply_tome` arguments of the few-step ToDo student: the bench's token-merging settings in mode todo."""
    return settings.tome_kwargs() | {"mode": "todo"}


def measure_few_step(folder: Path, tiny_dir: Path, settings: BenchSettings, height: int, width: int,
                     progress: bool, todo_folder: Path | None = None) -> dict:  # fmt: skip
    """The LCM int8 folder's parts at batch 1 without CFG, its rows at FEW_STEPS and the measured check run; with
    `todo_folder` (the same student with ToDo) also its UNet step and rows."""
    import numpy as np

    from ...pipeline_folder import geometry, lcm_default_guidance, load_ov_pipeline

    guidance = lcm_default_guidance()
    ov_config = ov_config_for(BY_NAME[QAT], settings)
    # static shapes (batch 1: an LCM's UNet batch is the prompt batch), as optimum's README loads a pipeline
    pipe = load_ov_pipeline(folder, height, width, batch_size=1, ov_config=ov_config)
    pipe.set_progress_bar_config(disable=True)
    inputs = unet_inputs(replace(settings, batch_size=1), geometry(folder), height, width, unet_config(folder))
    feed = {k: v.numpy() for k, v in inputs.items()}

    def timed(fn, desc):
        return time_calls(fn, settings.warmup, settings.repeats, desc, progress, settings.warmup_s)

    def text():
        pipe.encode_prompt([settings.prompt], device=pipe._execution_device, num_images_per_prompt=1,
                           do_classifier_free_guidance=False)  # fmt: skip

    def run():
        pipe(settings.prompt, num_inference_steps=CHECK_STEPS, guidance_scale=guidance, height=height,
             width=width, generator=np.random.RandomState(settings.seed))  # fmt: skip

    unet_times = timed(lambda: pipe.unet(**feed), "LCM UNet steps")
    todo_times = None
    if todo_folder is not None:
        todo = load_ov_pipeline(todo_folder, height, width, batch_size=1, ov_config=ov_config)
        todo_times = timed(lambda: todo.unet(**feed), "LCM + ToDo UNet steps")
        del todo
    text_times = timed(text, "LCM text encoder")
    decode = time_tiny_decoders(pipe, tiny_dir, settings, ov_config, (1, *inputs["sample"].shape[1:]), progress)
    measured = time_calls(run, 0, settings.pipeline_repeats, "LCM pipeline runs", progress)
    unet_s, text_s = median_or_none(unet_times), median_or_none(text_times)
    todo_s = median_or_none(todo_times) if todo_times else None
    rows = []
    for name, step_s in (("lcm-int8", unet_s), ("lcm-int8-todo", todo_s)):
        if step_s is None:
            continue
        for k in FEW_STEPS:
            image = {which: text_s + k * step_s + d["s"] for which, d in decode.items()}
            rows.append({"name": f"{name}-{k}step", "steps": k, "unet_calls_per_image": k, "unet_step_s": step_s,
                         "image_s": image["full"], "image_tiny_f32_s": image[TINY_F32],
                         "image_tiny_s": image[TINY_INT8]})  # fmt: skip
    check_s = median_or_none(measured)
    composed = text_s + CHECK_STEPS * unet_s + decode["full"]["s"]
    return {
        "folder": str(folder),
        "batch": 1,
        "guidance_scale": guidance,
        "unet_inputs": {k: list(v.shape) for k, v in inputs.items()},
        "unet_step_s": unet_s,
        "text_encoder_s": text_s,
        "decode": decode,
        "unet_step_times_s": [round(t, 4) for t in unet_times],
        "todo": None
        if todo_s is None
        else {
            "folder": str(todo_folder),
            "settings": todo_kwargs(settings),
            "unet_step_s": todo_s,
            "unet_step_times_s": [round(t, 4) for t in todo_times],
            "speedup_vs_lcm_int8": unet_s / todo_s,
        },  # fmt: skip
        "rows": rows,
        "check": {
            "steps": CHECK_STEPS,
            "measured_s": check_s,
            "composed_s": composed,
            "composed_vs_measured": composed / check_s if check_s else None,
            "times_s": [round(t, 3) for t in measured],
        },  # fmt: skip
    }


def add_few_step_ratios(few_step: dict, rows: list[dict]) -> None:
    """Each few-step image (full and tiny decode) against the 50-step images of the same run: PyTorch FP32 and
    optimum's hybrid PTQ (the issues' targets), where those rows were measured."""
    from .variants import OPTIMUM_HYBRID, PYTORCH_FP32, forms

    by_name = {r["name"]: r for r in rows}
    baselines = {"pytorch_fp32": by_name.get(PYTORCH_FP32)}
    hybrid = [by_name[n] for n in forms(OPTIMUM_HYBRID) if n in by_name]
    baselines["optimum_hybrid_ptq"] = min(hybrid, key=lambda r: r["image_s"]) if hybrid else None
    for row in few_step["rows"]:
        for key, base in baselines.items():
            for which in ("image_s", "image_tiny_s"):
                row[f"{which[:-2]}_speedup_vs_{key}"] = base["image_s"] / row[which] if base else None


def few_step_section(result: dict) -> list[str]:
    """The few-step and tiny-decoder lines of bench.md."""
    few, tiny = result.get("few_step"), result.get("tiny_decoder")
    lines: list[str] = []
    if tiny:
        d = tiny["decode"]
        lines += ["## Tiny VAE decoder", "",
                  f"Random-weight tiny decoder ({tiny['parameters']:,} parameters) against the VAE decoder, one "
                  "image's latents, postprocessing included:", "",
                  "| decoder | s | x faster than the VAE decoder |", "|---|---|---|"]  # fmt: skip
        for name, v in d.items():
            lines.append(f"| {name} | {v['s']:.4f} | {d['full']['s'] / v['s']:.1f} |")
        with_tiny = [r for r in result["variants"] if r.get("image_tiny_s") is not None]
        if with_tiny:
            lines += ["", f"{result['settings']['image_steps']}-step images with the tiny decoder in place of the VAE "
                      "decode (full int8 tiny decoder for int8 UNets, f32 otherwise):", "",
                      "| variant | image s (VAE decode) | image s (tiny decode) | tiny decoder |", "|---|---|---|---|"]  # fmt: skip
            lines += [f"| {r['name']} | {r['image_s']:.3f} | {r['image_tiny_s']:.3f} | {r['tiny_decoder']} |"
                      for r in with_tiny]  # fmt: skip
        lines.append("")
    if few:
        todo = few.get("todo")
        with_todo = (f" With ToDo ({todo['settings']['mode']}, max_downsample {todo['settings']['max_downsample']}): "
                     f"UNet step {todo['unet_step_s']:.4f} s, {todo['speedup_vs_lcm_int8']:.2f}x." if todo else "")  # fmt: skip
        lines += ["## Few-step int8 student (LCM, batch 1, no CFG)", "",
                  f"UNet step {few['unet_step_s']:.4f} s, text encoder {few['text_encoder_s']:.4f} s (random-weight "
                  f"student: speed only).{with_todo}", "",
                  "| variant | steps | image s (VAE decode) | image s (tiny int8 decode) | x PyTorch FP32 50-step | "
                  "x optimum hybrid PTQ 50-step | x hybrid PTQ, tiny decode |", "|---|---|---|---|---|---|---|"]  # fmt: skip

        def x(v):
            return f"{v:.1f}" if v else "-"

        for r in few["rows"]:
            lines.append(f"| {r['name']} | {r['steps']} | {r['image_s']:.3f} | {r['image_tiny_s']:.3f} | "
                         f"{x(r.get('image_speedup_vs_pytorch_fp32'))} | {x(r.get('image_speedup_vs_optimum_hybrid_ptq'))} "
                         f"| {x(r.get('image_tiny_speedup_vs_optimum_hybrid_ptq'))} |")  # fmt: skip
        c = few["check"]
        if c["measured_s"]:
            lines += ["", f"Check: a measured {c['steps']}-step pipeline run took {c['measured_s']:.3f} s, composed "
                      f"{c['composed_s']:.3f} s ({c['composed_vs_measured']:.2f}x)."]  # fmt: skip
        lines.append("")
    return lines


def vae_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "vae_decoder" / "config.json").read_text())


def run_few_step(diffusers_dir: Path, work: Path, settings: BenchSettings, height: int, width: int, prep_log: dict,
                 progress: bool) -> tuple[dict, dict]:  # fmt: skip
    """Build (or reuse, in the work folder) the LCM int8 folder and the tiny decoder IRs, and measure them.
    Returns (the few-step section, the tiny-decoder section) of bench.json."""
    from ...pipeline_folder import geometry
    from .prepare import build_qat_folder, cached, export_openvino_fp32

    lcm_diffusers = cached(work / "lcm-diffusers", lambda d: lcm_base_folder(str(diffusers_dir), d), "lcm-diffusers",
                           prep_log)  # fmt: skip
    lcm_fp32 = cached(work / "lcm-openvino-fp32", lambda d: export_openvino_fp32(str(lcm_diffusers), d),
                      "lcm-openvino-fp32 export", prep_log)  # fmt: skip
    factor = geometry(lcm_fp32)["vae_factor"]
    latent_hw = (height // factor, width // factor)
    info: dict[str, Any] = {}

    def build_int8(d):
        info.update(build_qat_folder(lcm_diffusers, lcm_fp32, d, latent_hw=latent_hw, batch=1))

    lcm_int8 = cached(work / "lcm-int8", build_int8, "lcm-int8", prep_log)
    prep_log["lcm-int8"].update(info)
    todo_info: dict[str, Any] = {}

    def build_todo(d):
        kwargs = todo_kwargs(settings)
        todo_info.update(build_qat_folder(lcm_diffusers, lcm_fp32, d, latent_hw=latent_hw, batch=1, tome=kwargs))

    todo_name = "lcm-int8-todo-" + "-".join(f"{k}{v}" for k, v in todo_kwargs(settings).items())
    lcm_todo = cached(work / todo_name, build_todo, todo_name, prep_log)
    prep_log[todo_name].update(todo_info)
    tiny_info: dict[str, Any] = {}
    tiny_dir = cached(work / "tiny-decoder", lambda d: tiny_info.update(build_tiny_decoders(vae_config(lcm_fp32), d,
                      latent_hw, settings.seed)), "tiny-decoder", prep_log)  # fmt: skip
    few = measure_few_step(lcm_int8, tiny_dir, settings, height, width, progress, todo_folder=lcm_todo)
    free_memory()  # the pipeline went with measure_few_step's frame
    tiny = {"parameters": tiny_info.get("parameters"), "decode": few["decode"], "folder": str(tiny_dir)}
    return few, tiny
