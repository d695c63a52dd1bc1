"""QAT training end to end on a tiny pipeline: losses, weights and scales move, EMA, resume, 8-bit Adam, bf16."""

import json
import math
import os

import pytest
import torch

from ov_sd_trainer.compress import quantize
from ov_sd_trainer.errors import UserError
from ov_sd_trainer.run_folder import FINAL_DIR
from ov_sd_trainer.train.config import parse_config
from ov_sd_trainer.train.data import collate
from ov_sd_trainer.train.ema import EMACallback
from ov_sd_trainer.train.losses import QATModel
from ov_sd_trainer.train.run import build, run
from ov_sd_trainer.train.trainer import QATTrainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_model(tiny_pipeline):
    return str(tiny_pipeline)


def make_cfg(tiny_model, out, *extra):
    argv = [
        "--pretrained_model_name_or_path", tiny_model,
        "--dataset_name", "synthetic:16",
        "--output_dir", str(out),
        "--resolution", "64",
        "--max_steps", "4",
        "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3",  # large so that 4 steps move quantizer scales measurably
        "--num_calibration_samples", "4",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu", "true",
        "--ema_decay", "0.9",
        "--export", "false",
        "--seed", "0",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip
    cfg, _ = parse_config(argv)
    return cfg


def train_direct(cfg):
    """Build + train with access to the trainer (run() hides it)."""
    cfg.remove_unused_columns = False
    torch.manual_seed(cfg.seed)
    model, ds, augmentation = build(cfg)
    ema = EMACallback(model.student, cfg.ema_decay, cfg.ema_device) if cfg.use_ema else None
    trainer = QATTrainer(
        model=model, args=cfg, train_dataset=ds, data_collator=collate, ema=ema, augmentation=augmentation
    )
    before = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    trainer.train()
    return trainer, model, ema, before


def test_four_steps_move_weights_scales_and_log_separate_losses(tiny_model, tmp_path):
    trainer, model, ema, before = train_direct(make_cfg(tiny_model, tmp_path / "run"))
    after = dict(model.student.named_parameters())
    qnames = {n for n, _ in quantize.quantizer_parameters(model.student)}
    wnames = {n for n, _ in quantize.weight_parameters(model.student)}
    assert qnames and wnames and not (qnames & wnames)
    assert any(not torch.equal(before[n], after[n]) for n in qnames), "no quantizer scale changed"
    assert any(not torch.equal(before[n], after[n]) for n in wnames), "no weight changed"
    # the teacher is untouched and frozen
    assert all(not p.requires_grad for p in model.teacher.parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for h in logs:
        for key in ("loss", "task_loss", "distillation_loss"):
            assert math.isfinite(h[key]), (key, h)
        assert h["task_loss"] != h["distillation_loss"]
        assert h["distillation_loss"] > 0
    # the EMA lives on the CPU and differs from the student
    assert ema.optimization_step == 4
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ema.shadow.values())
    diffs = [not torch.equal(ema.shadow[n], after[n].detach().cpu()) for n in ema.shadow]
    assert any(diffs)


def test_no_weight_decay_on_quantizer_parameters(tiny_model, tmp_path):
    cfg = make_cfg(tiny_model, tmp_path / "run", "--max_steps", "1", "--weight_decay", "0.1")
    trainer, model, _, _ = train_direct(cfg)
    decay_ids = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay_ids, "some weights should decay"
    assert not decay_ids & {id(p) for _, p in quantize.quantizer_parameters(model.student)}


def test_tune_quantizers_only_keeps_weights(tiny_model, tmp_path):
    cfg = make_cfg(tiny_model, tmp_path / "run", "--max_steps", "2", "--tune_quantizers_only", "true")
    _, model, _, before = train_direct(cfg)
    after = dict(model.student.named_parameters())
    for n, _ in quantize.weight_parameters(model.student):
        assert torch.equal(before[n], after[n]), n
    assert any(not torch.equal(before[n], after[n]) for n, _ in quantize.quantizer_parameters(model.student))


def test_resume_after_two_of_four_steps_matches_uninterrupted(tiny_model, tmp_path):
    # constant LR: a 2-step run then has the same first two steps as the 4-step run it stands in for
    save = ["--save_strategy", "steps", "--save_steps", "2", "--lr_scheduler_type", "constant"]
    full = run(make_cfg(tiny_model, tmp_path / "full", *save))
    first = make_cfg(tiny_model, tmp_path / "part", *save, "--max_steps", "2")
    run(first)
    # a fresh process would re-parse the same recipe with max_steps 4 and resume from checkpoint-2
    resumed = run(make_cfg(tiny_model, tmp_path / "part", *save, "--resume_from_checkpoint", "latest"))
    from safetensors.torch import load_file

    sa = load_file(str(full / FINAL_DIR / "student" / quantize.STATE_SAFETENSORS))
    sb = load_file(str(resumed / FINAL_DIR / "student" / quantize.STATE_SAFETENSORS))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-7), k
    info = json.loads((resumed / FINAL_DIR / "training_info.json").read_text())
    assert info["global_step"] == 4


@pytest.mark.parametrize("extra", [["--use_8bit_adam", "true"], ["--bf16", "true"]], ids=["adamw8bit", "bf16"])
def test_8bit_adam_and_bf16_train(tiny_model, tmp_path, extra):
    trainer, model, _, before = train_direct(make_cfg(tiny_model, tmp_path / "run", "--max_steps", "2", *extra))
    if "--use_8bit_adam" in extra:
        import bitsandbytes as bnb

        assert isinstance(trainer.optimizer.optimizer, bnb.optim.AdamW8bit | bnb.optim.AdamW)
        states = [s for s in trainer.optimizer.optimizer.state.values() if "state1" in s]
        assert states and any(s["state1"].dtype == torch.uint8 for s in states)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["loss"]) for h in logs)
    after = dict(model.student.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_bfloat16_teacher_distils_close_to_the_float32_one(tiny_model, tmp_path):
    """teacher_dtype bfloat16: the frozen teacher is held in bf16 after calibration; the first step's distillation
    loss (the student still equals the calibrated start) is close to the float32 teacher's but not equal to it."""
    first = {}
    for dtype in ("auto", "bfloat16"):
        out = run(make_cfg(tiny_model, tmp_path / dtype, "--max_steps", "1", "--teacher_dtype", dtype))
        info = json.loads((out / FINAL_DIR / "training_info.json").read_text())
        first[dtype] = next(h for h in info["log_history"] if "loss" in h)["distillation_loss"]
    assert math.isfinite(first["bfloat16"]) and first["bfloat16"] != first["auto"]
    assert first["bfloat16"] == pytest.approx(first["auto"], rel=0.1)
    # the teacher under the option, and the model's UNet call casting float32 inputs to it
    cfg = make_cfg(tiny_model, tmp_path / "direct", "--teacher_dtype", "bfloat16")
    model, _, _ = build(cfg)
    model.cast_teacher(torch.bfloat16)
    assert {p.dtype for p in model.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.student.parameters() if p.is_floating_point()} == {torch.float32}
    x = torch.randn(2, 4, 8, 8)
    states = torch.randn(2, 77, model.teacher.config.cross_attention_dim)
    assert QATModel.unet(model.teacher, x, torch.tensor([10, 10]), states).dtype == torch.bfloat16


def test_gradient_checkpointing_through_trainer(tiny_model, tmp_path):
    a, _, _, _ = train_direct(make_cfg(tiny_model, tmp_path / "a", "--max_steps", "2"))
    b, _, _, _ = train_direct(
        make_cfg(tiny_model, tmp_path / "b", "--max_steps", "2", "--gradient_checkpointing", "true")
    )
    la = [h["loss"] for h in a.state.log_history if "loss" in h]
    lb = [h["loss"] for h in b.state.log_history if "loss" in h]
    assert la == pytest.approx(lb, rel=1e-5)


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


def test_teacher_gap_eval_is_logged_and_keeps_the_best_student(tiny_model, tmp_path):
    """The Trainer's own evaluation loop runs the teacher-gap set; `load_best_model_at_end` with
    metric_for_best_model=teacher_mse restores the best checkpoint (student and EMA), and that is what is saved."""
    from ov_sd_trainer.export.openvino import load_student_from_checkpoint

    out = tmp_path / "run"
    eval_flags = ["--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                  "--load_best_model_at_end", "true", "--metric_for_best_model", "teacher_mse",
                  "--greater_is_better", "false", "--teacher_gap_samples", "4", "--save_total_limit", "10"]  # fmt: skip
    # a learning rate large enough to push the student away from its teacher, so the best is not the last step
    run(make_cfg(tiny_model, out, *eval_flags, "--learning_rate", "3e-2", "--ema_decay", "0.5"))
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


def test_pure_distillation_and_the_hybrid_scheme_train_and_export(tiny_model, tmp_path):
    """task_weight 0 trains on the teacher alone (the task loss is logged, not used); the hybrid scheme trains,
    exports int8 weights (UNet <= 0.30x FP32 on this tiny model) and loads in optimum-intel (the export renders)."""
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model, out, "--max_steps", "2", "--task_weight", "0", "--quantization_scheme", "hybrid",
                   "--export", "true")  # fmt: skip
    trainer, model, _, before = train_direct(cfg)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["loss"] == pytest.approx(h["distillation_loss"], abs=1e-4) for h in logs)  # Trainer rounds "loss"
    assert all(h["task_loss"] > 0 for h in logs)
    run(make_cfg(tiny_model, tmp_path / "run2", "--max_steps", "1", "--quantization_scheme", "hybrid",
                 "--export", "true"))  # fmt: skip
    results = json.loads((tmp_path / "run2" / "openvino" / "results.json").read_text())
    assert results["unet_size_ratio"] <= 0.30 and results["fake_quantize_ops"] > 0
    assert (tmp_path / "run2" / "openvino" / "samples" / "sample_0.png").is_file()


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
    model = QATModel(pipe.unet, pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler, task_weight=0)
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
    cfg = make_cfg(str(tmp_path / "lcm"), tmp_path / "run", "--calibration_draws", "2", "--task_weight", "0")
    with pytest.raises(UserError, match="calibration_draws=2 scores each draw on rollouts.*timestep_cond") as e:
        build(cfg)
    assert "\n" not in str(e.value)


def test_calibration_draws_keep_the_student_closest_on_held_out_rollouts(tiny_model, tmp_path):
    """calibration_draws 2: two calibrations on different input draws, each scored on held-out rollouts; the kept
    student is the higher-PSNR draw's, exactly (the same quantizers as that draw calibrated on its own)."""
    from ov_sd_trainer.train import run as run_module

    flags = ["--calibration_draws", "2", "--calibration_source", "trajectories", "--calibration_steps", "3",
             "--teacher_gap_samples", "2", "--task_weight", "0"]  # fmt: skip
    cfg = make_cfg(tiny_model, tmp_path / "run", *flags)
    model, ds, _ = build(cfg)
    scores = model.calibration_scores
    assert [d["seed"] for d in scores["draws"]] == [0, run_module.DRAW_SEED_STRIDE] and scores["held_out"] == 2
    psnrs = [d["rollout_psnr"] for d in scores["draws"]]
    assert all(math.isfinite(p) for p in psnrs) and psnrs[0] != psnrs[1]
    assert scores["chosen"] == psnrs.index(max(psnrs))
    # each draw again, on its own: different quantizers per draw; the kept one is the winner's
    digests = []
    for d in scores["draws"]:
        calls = run_module.collect_trajectory_inputs(model.pipeline, list(ds.with_format(None)["text"]), 4, 64,
                                                     d["seed"], steps=3)  # fmt: skip
        student = run_module._calibrate_draw(cfg, model, model.teacher, ds, "cpu", calls, d["seed"])
        digests.append(run_module.quantizer_digest(student))
    assert digests[0] != digests[1]
    assert run_module.quantizer_digest(model.student) == digests[scores["chosen"]]
