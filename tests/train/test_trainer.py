"""QAT training end to end on a tiny pipeline, built through `train.run`'s own wiring (`build_trainer` / `run`, as
`ov-sd train`): losses, weights and scales move, EMA, resume, 8-bit Adam, bf16, the teacher gap, the hybrid scheme,
calibration. The shared runs (`qat_run`, `hybrid_run`) come from tests/conftest.py; a test trains its own only for a
setting no shared run has."""

import json
import math

import pytest
import torch
from conftest import tiny_run_argv, train_tiny

from ov_sd_trainer.compress import quantize
from ov_sd_trainer.errors import UserError
from ov_sd_trainer.run_folder import FINAL_DIR
from ov_sd_trainer.train.config import parse_config
from ov_sd_trainer.train.losses import QATModel
from ov_sd_trainer.train.run import build_trainer, run


@pytest.fixture
def tiny_model(tiny_pipeline):
    return str(tiny_pipeline)


def losses(trainer, *keys):
    """The per-step logged values of `keys` (default: the loss)."""
    keys = keys or ("loss",)
    rows = [h for h in trainer.state.log_history if "loss" in h]
    return [h[keys[0]] for h in rows] if len(keys) == 1 else [tuple(h[k] for k in keys) for h in rows]


def test_training_moves_weights_and_scales_and_logs_separate_losses(qat_run):
    """The shared plain run (full scheme, default losses: pure distillation): 4 steps move quantizer scales and
    weights, the teacher stays frozen, each step logs its task and distillation losses (the loss is the distillation
    loss; the task loss is logged, not trained on), and the EMA lives on the CPU apart from the student."""
    training, before = qat_run["training"], qat_run["before"]
    model, ema = training.model, training.ema
    after = dict(model.student.named_parameters())
    qnames = {n for n, _ in quantize.quantizer_parameters(model.student)}
    wnames = {n for n, _ in quantize.weight_parameters(model.student)}
    assert qnames and wnames and not (qnames & wnames)
    assert any(not torch.equal(before[n], after[n]) for n in qnames), "no quantizer scale changed"
    assert any(not torch.equal(before[n], after[n]) for n in wnames), "no weight changed"
    # the teacher is untouched and frozen
    assert all(not p.requires_grad for p in model.teacher.parameters())
    logs = [h for h in training.trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for h in logs:
        for key in ("loss", "task_loss", "distillation_loss"):
            assert math.isfinite(h[key]), (key, h)
        assert h["task_loss"] != h["distillation_loss"]
        assert h["distillation_loss"] > 0 and h["task_loss"] > 0
        assert h["loss"] == pytest.approx(h["distillation_loss"], abs=1e-4)  # Trainer rounds "loss"
    # the EMA lives on the CPU and differs from the student
    assert ema.optimization_step == 4
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ema.shadow.values())
    final = dict(model.student.named_parameters())  # the EMA was copied into the student at the end (`finish`)
    assert all(torch.equal(ema.shadow[n], final[n].detach().cpu()) for n in ema.shadow)
    assert any(not torch.equal(ema.shadow[n], before[n].cpu()) for n in ema.shadow)


def test_no_weight_decay_on_quantizer_parameters(qat_run):
    trainer, model = qat_run["training"].trainer, qat_run["training"].model
    assert qat_run["cfg"].weight_decay > 0  # precondition
    decay_ids = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay_ids, "some weights should decay"
    assert not decay_ids & {id(p) for _, p in quantize.quantizer_parameters(model.student)}


def test_tune_quantizers_only_keeps_weights_and_the_task_loss_adds(tiny_pipeline, tmp_path):
    """tune_quantizers_only: weights frozen, scales train. With task_weight 1 the loss is task + distillation."""
    r = train_tiny(tiny_run_argv(tiny_pipeline, tmp_path / "run", "--max_steps", "2", "--save_strategy", "no",
                                 "--export", "false", "--tune_quantizers_only", "true", "--task_weight", "1",
                                 "--ema_use_warmup", "true", "--ema_power", "0.75"))  # fmt: skip
    model, before = r["training"].model, r["before"]
    ema = r["training"].ema  # the EMA warm-up fields reach the callback (its maths: tests/train/test_ema.py)
    assert (ema.use_warmup, ema.power) == (True, 0.75)
    after = dict(model.student.named_parameters())
    for n, _ in quantize.weight_parameters(model.student):
        assert torch.equal(before[n], after[n]), n
    assert any(not torch.equal(before[n], after[n]) for n, _ in quantize.quantizer_parameters(model.student))
    rows = losses(r["training"].trainer, "loss", "task_loss", "distillation_loss")
    assert len(rows) == 2 and all(loss == pytest.approx(task + distill, abs=1e-4) for loss, task, distill in rows)


def test_noise_offset_and_min_snr_weighting(qat_run):
    """`noise_offset` adds one seeded constant per image and channel to the noise (as diffusers' examples);
    `snr_gamma` weights each image's task MSE by min(SNR, gamma) / SNR (epsilon prediction, Min-SNR as in diffusers'
    train_text_to_image.py). On the shared run's model, restored after."""
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    from ov_sd_trainer.train.data import collate

    model = qat_run["training"].model
    ds = qat_run["training"].trainer.train_dataset
    latents = torch.randn(2, 4, 16, 16)
    model.set_noise_seed(0, 0, 0)
    _, plain, _ = model.noisy_inputs(latents)
    try:
        model.noise_offset = 0.1
        model.set_noise_seed(0, 0, 0)
        _, offset, _ = model.noisy_inputs(latents)
    finally:
        model.noise_offset = 0.0
    diff = offset - plain
    assert diff.abs().max() > 0 and torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    assert diff.std().item() > 0.01  # a different constant per image and channel

    batch = collate([ds[0], ds[1]])
    assert model.prediction_type == "epsilon"
    with torch.no_grad():
        model.set_noise_seed(0, 0, 5)  # what the forward will draw: latents, noise, timesteps
        lat, states, _ = model.encode(batch["pixel_values"], batch["input_ids"])
        noisy, noise, t = model.noisy_inputs(lat)
        per_image = F.mse_loss(model.unet(model.student, noisy, t, states).float(), noise, reduction="none")
        per_image = per_image.mean(dim=(1, 2, 3))
        snr = compute_snr(model.noise_scheduler, t)
        weighted = (per_image * torch.minimum(snr, torch.full_like(snr, 5.0)) / snr).mean()
        try:
            model.snr_gamma = 5.0
            model.set_noise_seed(0, 0, 5)
            task = model(**batch)["task_loss"]
        finally:
            model.snr_gamma = None
        model.set_noise_seed(0, 0, 5)
        unweighted = model(**batch)["task_loss"]
    assert task.item() == pytest.approx(weighted.item(), rel=1e-5)
    assert unweighted.item() == pytest.approx(per_image.mean().item(), rel=1e-5) and task.item() != unweighted.item()


def test_resume_after_two_of_four_steps_matches_uninterrupted_and_same_seed_same_losses(qat_run, tmp_path):
    """A 2-step run of the shared run's flags trains its first 2 steps exactly alike (same seed, same losses, constant
    LR); resumed from its checkpoint-2 to 4 steps it ends at the shared run's final student."""
    base = qat_run["base"]
    part = train_tiny(tiny_run_argv(base, tmp_path / "part", "--max_steps", "2", "--export", "false"))
    keys = ("loss", "task_loss", "distillation_loss")
    assert losses(part["training"].trainer, *keys) == losses(qat_run["training"].trainer, *keys)[:2]
    # a fresh process would re-parse the same flags with max_steps 4 and resume from checkpoint-2
    cfg, _ = parse_config(tiny_run_argv(base, tmp_path / "part", "--resume_from_checkpoint", "latest",
                                        "--export", "false"))  # fmt: skip
    resumed = run(cfg)
    from safetensors.torch import load_file

    sa = load_file(str(qat_run["out"] / FINAL_DIR / "student" / quantize.STATE_SAFETENSORS))
    sb = load_file(str(resumed / FINAL_DIR / "student" / quantize.STATE_SAFETENSORS))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-7), k
    info = json.loads((resumed / FINAL_DIR / "training_info.json").read_text())
    assert info["global_step"] == 4
    # resumed once more at its end (a run cut off after its last save, e.g. in the export): no step more (transformers'
    # loop alone would train a fifth), and the same final student
    cfg, _ = parse_config(tiny_run_argv(base, tmp_path / "part", "--resume_from_checkpoint", "latest",
                                        "--export", "false"))  # fmt: skip
    again = run(cfg)
    assert not (again / "checkpoint-5").exists()
    assert json.loads((again / FINAL_DIR / "training_info.json").read_text())["global_step"] == 4
    sc = load_file(str(again / FINAL_DIR / "student" / quantize.STATE_SAFETENSORS))
    assert all(torch.equal(sb[k], sc[k]) for k in sb)


def test_8bit_adam_and_bf16_train(tiny_pipeline, tmp_path):
    """One run with both: bitsandbytes' 8-bit AdamW (uint8 optimizer states) under bf16 autocast; losses finite,
    parameters move."""
    r = train_tiny(tiny_run_argv(tiny_pipeline, tmp_path / "run", "--max_steps", "2", "--save_strategy", "no",
                                 "--export", "false", "--use_8bit_adam", "true", "--bf16", "true"))  # fmt: skip
    trainer, model, before = r["training"].trainer, r["training"].model, r["before"]
    assert trainer.args.bf16
    import bitsandbytes as bnb

    assert isinstance(trainer.optimizer.optimizer, bnb.optim.AdamW8bit | bnb.optim.AdamW)
    states = [s for s in trainer.optimizer.optimizer.state.values() if "state1" in s]
    assert states and any(s["state1"].dtype == torch.uint8 for s in states)
    assert len(losses(trainer)) == 2 and all(math.isfinite(x) for x in losses(trainer))
    after = dict(model.student.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_bfloat16_teacher_distils_close_to_the_float32_one(qat_run, tmp_path):
    """teacher_dtype bfloat16: the frozen teacher is held in bf16 after calibration; the first step's distillation
    loss (the student still equals the calibrated start) is close to the float32 teacher's (the shared run's) but not
    equal to it."""
    r = train_tiny(tiny_run_argv(qat_run["base"], tmp_path / "run", "--max_steps", "1", "--save_strategy", "no",
                                 "--export", "false", "--teacher_dtype", "bfloat16"))  # fmt: skip
    first = {"bfloat16": losses(r["training"].trainer, "distillation_loss")[0],
             "auto": losses(qat_run["training"].trainer, "distillation_loss")[0]}  # fmt: skip
    assert math.isfinite(first["bfloat16"]) and first["bfloat16"] != first["auto"]
    assert first["bfloat16"] == pytest.approx(first["auto"], rel=0.1)
    # the teacher under the option, and the model's UNet call casting float32 inputs to it
    model = r["training"].model
    assert {p.dtype for p in model.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.student.parameters() if p.is_floating_point()} == {torch.float32}
    x = torch.randn(2, 4, 8, 8)
    states = torch.randn(2, 77, model.teacher.config.cross_attention_dim)
    assert QATModel.unet(model.teacher, x, torch.tensor([10, 10]), states).dtype == torch.bfloat16


def test_gradient_checkpointing_through_trainer(qat_run, tmp_path):
    """The same 2 steps as the shared run's first 2, with gradient checkpointing: the same losses."""
    r = train_tiny(tiny_run_argv(qat_run["base"], tmp_path / "run", "--max_steps", "2", "--save_strategy", "no",
                                 "--export", "false", "--gradient_checkpointing", "true"))  # fmt: skip
    assert r["training"].trainer.args.gradient_checkpointing
    assert losses(r["training"].trainer) == pytest.approx(losses(qat_run["training"].trainer)[:2], rel=1e-5)


def test_accelerate_launch_train_py(tiny_model, tmp_path):
    """The real launcher: `accelerate launch train.py --recipe ...` with flags overriding the recipe."""
    import subprocess
    import sys
    from pathlib import Path

    recipe = tmp_path / "r.json"
    recipe.write_text(
        json.dumps(
            {
                "pretrained_model_name_or_path": tiny_model,
                "dataset_name": "synthetic:8",
                "max_steps": 50,
                "per_device_train_batch_size": 2,
                "num_calibration_samples": 2,
                "calibration_steps": 4,
                "report_to": "none",
                "use_cpu": True,
                "export": False,
                "save_strategy": "no",
                "logging_steps": 1,
            }
        )  # fmt: skip
    )
    root = Path(__file__).resolve().parents[2]  # the checkout: its train.py is the mission's launch line
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(root / "train.py"), "--recipe", str(recipe), "--max_steps", "2", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "o" / FINAL_DIR / "training_info.json").read_text())
    assert info["global_step"] == 2  # the flag beat the recipe's 50
    assert (tmp_path / "o" / "loss.png").is_file()
    # bad input through the same entry point: one line, exit 2, nothing written
    r = subprocess.run([sys.executable, str(root / "train.py"), "--recipe", str(recipe), "--tome_ratio", "2",
                        "--output_dir", str(tmp_path / "bad")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("ov-sd: error: tome_ratio=2.0")
    assert not (tmp_path / "bad").exists()


def test_teacher_gap_eval_is_logged_and_keeps_the_best_student(tiny_pipeline, tmp_path):
    """The Trainer's own evaluation loop runs the teacher-gap set; `load_best_model_at_end` with
    metric_for_best_model=teacher_mse restores the best checkpoint (student and EMA), and that is what is saved."""
    from ov_sd_trainer.export.openvino import load_student_from_checkpoint

    out = tmp_path / "run"
    eval_flags = ["--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                  "--load_best_model_at_end", "true", "--metric_for_best_model", "teacher_mse",
                  "--greater_is_better", "false", "--teacher_gap_samples", "4", "--save_total_limit", "10"]  # fmt: skip
    # a learning rate large enough to push the student away from its teacher, so the best is not the last step
    cfg, _ = parse_config(tiny_run_argv(tiny_pipeline, out, *eval_flags, "--learning_rate", "3e-2",
                                        "--ema_decay", "0.5", "--export", "false"))  # fmt: skip
    run(cfg)
    info = json.loads((out / FINAL_DIR / "training_info.json").read_text())
    gap = info["teacher_gap"]
    assert [g["step"] for g in gap] == [1, 2, 3, 4]
    assert all(g["teacher_mse"] > 0 and g["task_loss"] > 0 for g in gap)
    best = min(gap, key=lambda g: g["teacher_mse"])
    assert info["best_metric"] == pytest.approx(best["teacher_mse"])
    assert info["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert best["step"] < 4, "precondition: the last step is not the best (else the restore would be untested)"
    final, *_ = load_student_from_checkpoint(out / FINAL_DIR)
    kept, *_ = load_student_from_checkpoint(info["best_checkpoint"])  # with its EMA applied, as training saves
    for (n, a), (_, b) in zip(final.state_dict().items(), kept.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert (out / "loss.png").is_file()


@pytest.mark.slow  # the hybrid scheme's own run (~45 s): CI; its unit tests stay (tests/compress/test_quantize.py)
def test_the_hybrid_scheme_trains_and_exports(hybrid_run):
    """The shared hybrid run (pure distillation, the default: the task loss is logged, not used) trains, exports int8
    weights (UNet <= 0.30x FP32 on this tiny model) and loads in optimum-intel (the export renders its sample)."""
    assert hybrid_run["cfg"].quantization_scheme == "hybrid"
    rows = losses(hybrid_run["training"].trainer, "loss", "task_loss", "distillation_loss")
    assert len(rows) == 2
    assert all(loss == pytest.approx(distill, abs=1e-4) and task > 0 for loss, task, distill in rows)
    results = json.loads((hybrid_run["ov"] / "results.json").read_text())
    assert results["unet_size_ratio"] <= 0.30 and results["fake_quantize_ops"] > 0
    assert (hybrid_run["ov"] / "samples" / "sample_0.png").is_file()


def test_trajectory_calibration_records_the_pipelines_own_unet_calls(tiny_model):
    """calibration_source=trajectories: the FP32 pipeline's UNet inputs while it samples captions (CFG batch 2, the
    scheduler's timesteps in order), as optimum-intel's PTQ collects them; a full run calibrates from them."""
    from ov_sd_trainer.pipeline_folder import load_pipeline
    from ov_sd_trainer.train.unet_inputs import collect_trajectory_inputs

    pipe = load_pipeline(tiny_model)
    items = collect_trajectory_inputs(pipe, ["a red circle on a blue background", "a cross"], 7, 64, seed=0, steps=4)
    assert len(items) == 7  # the first prompt's trajectory, then the second's until full
    for item in items:
        assert item["sample"].shape == (2, 4, 16, 16) and item["encoder_hidden_states"].shape[:2] == (2, 77)
        assert item["timestep"].shape == (2,) and item["timestep"][0] == item["timestep"][1]
    ts = [int(i["timestep"][0]) for i in items]
    restart = next(k for k in range(1, len(ts)) if ts[k] > ts[k - 1])  # the second trajectory starts from noise again
    assert ts[:restart] == sorted(ts[:restart], reverse=True) and ts[restart] == ts[0] and restart >= 4, ts
    again = collect_trajectory_inputs(pipe, ["a red circle on a blue background", "a cross"], 7, 64, seed=0, steps=4)
    assert all(torch.equal(a["sample"], b["sample"]) for a, b in zip(items, again))  # seeded
    # the teacher's output is recorded with its inputs: the recorded inputs are the ones the UNet was called with
    pred = pipe.unet(items[3]["sample"], items[3]["timestep"], items[3]["encoder_hidden_states"], return_dict=False)[0]
    assert torch.allclose(items[3]["teacher_pred"], pred, atol=1e-5)
    assert set(items[0]) == {"sample", "timestep", "encoder_hidden_states", "teacher_pred"}
    single = collect_trajectory_inputs(pipe, ["a cross"], 2, 64, seed=0, steps=2, guidance_scale=0.0)  # SD-Turbo
    assert [i["sample"].shape[0] for i in single] == [1, 1]  # no CFG batch: one input per call


def test_rollout_samples_exactly_as_the_pipeline_and_scores_the_students_drift(tiny_model):
    """rollouts.Rollout (the calibration draws' held-out score): the teacher's latent after the whole schedule is the
    pipeline's own (same scheduler, CFG, noise), and so are its decoded images; a student equal to the teacher has
    zero gap, a perturbed one a gap > 0."""
    import copy

    from ov_sd_trainer.pipeline_folder import load_pipeline
    from ov_sd_trainer.train.rollouts import decode, make_rollout, to_unit, tokenize

    pipe = load_pipeline(tiny_model)
    rollout = make_rollout(pipe, 64, steps=5)
    prompts = ["a red circle on a blue background", "a green cross"]
    ids = tokenize(pipe.tokenizer, prompts)
    noise = rollout.noise([3, 4], "cpu")
    model = QATModel(pipe.unet, pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler,
                     distillation_weight=1.0, task_weight=0)  # fmt: skip
    with torch.no_grad():
        states = pipe.text_encoder(ids, return_dict=False)[0]
        ours = rollout.sample(model, model.teacher, states, noise)
        theirs = pipe(prompts, num_inference_steps=5, guidance_scale=7.5, latents=noise.clone(), output_type="latent",
                      height=64, width=64).images  # fmt: skip
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    held_out = rollout.gap(model, ids, torch.tensor([3, 4]))
    assert held_out["rollout_mse"].item() == 0.0 and held_out["rollout_image_mse"].item() == 0.0
    # the decoded final images are the pipeline's own (its VAE decode and [0, 1] range)
    with torch.no_grad():
        image = pipe.vae.decode(theirs / pipe.vae.config.scaling_factor).sample
        ref = pipe.image_processor.postprocess(image, output_type="pt")
        assert torch.allclose(to_unit(decode(pipe.vae, ours)), ref, atol=1e-5)
    student = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        student.conv_out.bias.add_(0.05)  # a small bias, the same at every step: it compounds
    model.student = student
    gap = rollout.gap(model, ids, torch.tensor([3, 4]))
    assert gap["rollout_mse"].item() > 0 and gap["rollout_image_mse"].item() > 0


def test_calibration_draws_are_refused_for_unets_with_extra_inputs(tmp_path):
    """The draws' rollouts sample with CFG and no extra UNet inputs: an LCM (timestep_cond) gets a one-line error,
    before any calibration work."""
    from ov_sd_trainer.assets.builders import TinySDConfig, build_tiny_pipeline

    build_tiny_pipeline(tmp_path / "lcm", TinySDConfig(family="lcm"))
    cfg, _ = parse_config(tiny_run_argv(tmp_path / "lcm", tmp_path / "run", "--calibration_draws", "2"))
    with pytest.raises(UserError, match="calibration_draws=2 scores each draw on rollouts.*timestep_cond") as e:
        build_trainer(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # three calibrations and a training run (~35 s): CI
def test_calibration_draws_keep_the_student_closest_on_held_out_rollouts(tiny_pipeline, tmp_path):
    """calibration_draws 2: two calibrations on different input draws, each scored on held-out rollouts; the kept
    student is the higher-PSNR draw's, exactly (the same quantizers as that draw calibrated on its own)."""
    from ov_sd_trainer.train import calibration
    from ov_sd_trainer.train.report import quantizer_digest

    flags = ["--calibration_draws", "2", "--calibration_steps", "3", "--teacher_gap_samples", "2"]
    cfg, _ = parse_config(tiny_run_argv(tiny_pipeline, tmp_path / "run", *flags))
    training = build_trainer(cfg)
    model, ds = training.model, training.trainer.train_dataset
    scores = model.calibration_scores
    assert [d["seed"] for d in scores["draws"]] == [0, calibration.DRAW_SEED_STRIDE] and scores["held_out"] == 2
    psnrs = [d["rollout_psnr"] for d in scores["draws"]]
    assert all(math.isfinite(p) for p in psnrs) and psnrs[0] != psnrs[1]
    assert scores["chosen"] == psnrs.index(max(psnrs))
    # each draw again, on its own: different quantizers per draw; the kept one is the winner's
    digests = []
    for d in scores["draws"]:
        calls = calibration.calibration_calls(cfg, model.pipeline, ds, d["seed"])
        student = calibration.calibrate_draw(cfg, model, model.teacher, ds, "cpu", calls, d["seed"])
        digests.append(quantizer_digest(student))
    assert digests[0] != digests[1]
    assert quantizer_digest(model.student) == digests[scores["chosen"]]
