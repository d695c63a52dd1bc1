"""Recipes and the config: every shipped recipe loads; bad keys/types are one-line errors."""

import json

import pytest

from ov_sd_trainer.errors import UserError
from ov_sd_trainer.train.config import (
    RECIPES_DIR,
    QATConfig,
    load_recipe,
    parse_config,
    resolve_recipe,
    shipped_recipes,
)

RECIPES = list(shipped_recipes().values())


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {
        "reference-int8.json",
        "reference-tome-int8.json",
        "sd15-pokemon-int8.json",
        "sd15-pokemon-tome-int8.json",
    } <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(recipe):
    cfg, raw = parse_config(["--recipe", str(recipe)])
    assert isinstance(cfg, QATConfig)
    for key, value in raw.items():
        got = getattr(cfg, key)
        got = getattr(got, "value", got)  # str enums
        if key == "report_to":
            got = got if isinstance(got, str) else got[0] if got else "none"
        assert got == value, key


def test_recipes_by_name_or_path_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: shipped recipes are package data
    want = RECIPES_DIR / "reference-int8.json"
    for spec in ("reference-int8", "reference-int8.json", "recipes/reference-int8.json"):
        assert resolve_recipe(spec) == want, spec
    own = tmp_path / "reference-int8.json"  # a user's own file of the same name wins when it exists
    own.write_text("{}")
    assert resolve_recipe("reference-int8.json").resolve() == own
    with pytest.raises(UserError, match="shipped recipe name"):
        resolve_recipe("other/reference-int8.json")  # a path that does not exist is not taken for a name
    cfg, raw = parse_config(["--recipe=reference-int8", "--max-steps", "3"])  # `=` form, kebab-case flag
    assert cfg.max_steps == 3 and raw["pretrained_model_name_or_path"] == "reference"


def test_sd15_recipes_follow_the_published_workflow():
    cfg, _ = parse_config(["--recipe", "recipes/sd15-pokemon-int8.json"])
    assert cfg.max_steps == 4096 and cfg.learning_rate == 1e-5 and cfg.resolution == 512
    assert cfg.per_device_train_batch_size == 1 and cfg.gradient_accumulation_steps == 4
    assert cfg.num_calibration_samples == 300 and cfg.ema_device == "cpu" and cfg.gradient_checkpointing
    assert cfg.distillation_weight > 0 and cfg.dataset_name == "lambdalabs/pokemon-blip-captions"


def test_consistency_recipes_follow_the_measurements_and_the_diffusers_example():
    """reference-lcm-int8: the bundled model, the measured-best order (docs/few-step.md): 300 float steps at lr 3e-5
    (1e-4 and above make the 4-step gap worse), then 100 full-int8 QAT steps at lr 3e-6 with the float student as the
    teacher (at 3e-5 QAT drifted below its calibrated start), best checkpoint by the few-step PSNR, trained at the one
    guidance it samples at;
    sd15-pokemon-lcm-int8: the diffusers LCM example's settings (batch 12, lr 1e-6, Huber, 50 DDIM steps, w 5..15,
    target decay 0.95, checkpointing, 8-bit Adam)."""
    ref, _ = parse_config(["--recipe", "reference-lcm-int8"])
    assert ref.objective == "consistency" and ref.quantization_scheme == "full" and ref.learning_rate == 3e-6
    assert (ref.float_steps, ref.float_learning_rate, ref.qat_teacher) == (300, 3e-5, "init_student")
    assert ref.pretrained_model_name_or_path == "reference" and ref.use_cpu and ref.max_steps <= 300
    assert ref.metric_for_best_model == "few_step_psnr" and ref.greater_is_better
    # trained at the one guidance it samples at (w = scale - 1): 59.1 % against 51.5 % for the w range 5..15
    assert ref.w_min == ref.w_max == ref.few_step_guidance_scale - 1
    sd, _ = parse_config(["--recipe", "sd15-pokemon-lcm-int8"])
    assert sd.objective == "consistency" and sd.per_device_train_batch_size == 12 and sd.learning_rate == 1e-6
    assert sd.consistency_loss_type == "huber" and sd.num_ddim_timesteps == 50 and (sd.w_min, sd.w_max) == (5, 15)
    assert sd.target_decay == 0.95 and sd.gradient_checkpointing and sd.optim == "adamw_bnb_8bit"


def test_consistency_defaults_are_the_cores_constants_and_float_mode_is_consistency_only():
    from ov_sd_trainer import lcm as L
    from ov_sd_trainer.train import consistency as C

    cfg, _ = parse_config(["--output_dir", "x", "--objective", "consistency", "--quantization_scheme", "none"])
    assert not cfg.quantized
    assert (cfg.time_cond_proj_dim, cfg.num_ddim_timesteps, cfg.w_min, cfg.w_max, cfg.consistency_loss_type,
            cfg.huber_c, cfg.target_decay, cfg.few_step_steps) == (L.TIME_COND_PROJ_DIM, L.NUM_DDIM_TIMESTEPS,
            C.W_MIN, C.W_MAX, C.DEFAULT_LOSS_TYPE, C.HUBER_C, C.TARGET_DECAY, C.GAP_STEPS)  # fmt: skip
    assert parse_config(["--output_dir", "x"])[0].objective == "distillation"


def test_flags_override_recipe():
    cfg, _ = parse_config(["--recipe", "recipes/reference-int8.json", "--max_steps", "7", "--ema_decay", "0.5"])
    assert cfg.max_steps == 7 and cfg.ema_decay == 0.5


def _write(tmp_path, data):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(p)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"learning_rat": 1e-5}, r"unknown key 'learning_rat'"),
        ({"max_steps": "ten"}, r"key 'max_steps' has value 'ten' of type str, expected int"),
        ({"use_ema": "yes"}, r"key 'use_ema' .* expected bool"),
        ({"ignored_scope": "conv_in"}, r"key 'ignored_scope' .* expected"),
        ("{not json", r"not valid JSON"),
        ([1, 2], r"must hold a JSON object"),
    ],
)
def test_recipe_errors(tmp_path, data, message):
    with pytest.raises(UserError, match=message):
        load_recipe(_write(tmp_path, data))


def test_missing_recipe_file():
    with pytest.raises(UserError, match="not found"):
        parse_config(["--recipe", "recipes/nope.json"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tome_ratio", "0.9"], "tome_ratio=0.9: must be between 0 and 0.75"),
        (["--resolution", "100"], "multiple of 8"),
        (["--quantization_preset", "fast"], "quantization_preset='fast'"),
        (["--teacher_dtype", "fp16"], r"teacher_dtype='fp16': use one of \('auto', 'float32', 'bfloat16'\)"),
        (["--fp16", "true", "--use_cpu", "true"], "fp16=true needs a GPU"),
        (["--calibration_draws", "0"], "calibration_draws=0: must be >= 1"),
        (["--max_steps", "x"], "invalid int value"),
        (["--max_steps", "0"], r"max_steps=0: must be >= 1, or -1 to train num_train_epochs"),
        (["--max_steps", "-5"], r"max_steps=-5: must be >= 1, or -1"),
        (["--no_such_flag", "1"], "unrecognized arguments"),
        (["--objective", "lcm"], r"objective='lcm': use one of \('distillation', 'consistency'\)"),
        (["--quantization_scheme", "none"], r"quantization_scheme='none': use one of \('full', 'hybrid'\)"),
        (["--objective", "consistency", "--w_min", "9", "--w_max", "5"], "w_min=9.0, w_max=5.0: need 0 <= w_min"),
        (["--objective", "consistency", "--consistency_loss_type", "l1"], "consistency_loss_type='l1': use one of"),
        (["--objective", "consistency", "--target_decay", "1"], r"target_decay=1.0: must be in \[0, 1\)"),
        (["--objective", "consistency", "--huber_c", "0"], "huber_c=0.0: must be > 0"),
        (["--objective", "consistency", "--num_ddim_timesteps", "0"], "num_ddim_timesteps=0: must be >= 1"),
        (["--objective", "consistency", "--time_cond_proj_dim", "0"], "time_cond_proj_dim=0: must be >= 1"),
        (["--objective", "consistency", "--few_step_steps", "0"], "few_step_steps=0: must be >= 1"),
        (["--objective", "consistency", "--few_step_guidance_scale", "0.5"], "few_step_guidance_scale=0.5"),
        (["--objective", "consistency", "--calibration_source", "training"], "calibration_source='training': a"),
        (["--objective", "consistency", "--calibration_draws", "2"], "calibration_draws=2: a consistency run"),
        (["--objective", "consistency", "--task_weight", "1"], "task_weight=1.0: the consistency loss is the only"),
        (["--init_student", "runs/float"], "init_student and float_steps start a consistency student; set objective"),
        (["--objective", "consistency", "--qat_teacher", "ema"], "qat_teacher='ema': use one of"),
        (["--objective", "consistency", "--qat_teacher", "init_student"], "qat_teacher=init_student quantizes a"),
        (["--float_steps", "5"], "init_student and float_steps start a consistency student"),
        (["--objective", "consistency", "--float_steps", "-1"], "float_steps=-1: must be >= 0"),
        (["--objective", "consistency", "--float_learning_rate", "0"], "float_learning_rate=0.0: must be > 0"),
        (["--objective", "consistency", "--float_steps", "5", "--quantization_scheme", "none"], "float_steps=5 trains"),
        (["--objective", "consistency", "--float_steps", "5", "--init_student", "f"], "and no init_student"),
        (
            [
                "--objective",
                "consistency",
                "--qat_teacher",
                "init_student",
                "--init_student",
                "f",
                "--quantization_scheme",
                "none",
            ],
            "pass init_student .* and quantization_scheme full or hybrid",
        ),
    ],
)
def test_cli_value_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_config(["--output_dir", "x"] + argv)


def test_8bit_adam_flag_sets_optimizer():
    cfg, _ = parse_config(["--output_dir", "x", "--use_8bit_adam", "true"])
    assert cfg.optim == "adamw_bnb_8bit"


def test_trainingarguments_conflicts_are_one_line_with_both_strategies():
    argv = ["--recipe", "reference-int8", "--output_dir", "x", "--save_strategy", "no"]
    with pytest.raises(UserError) as e:
        parse_config(argv)
    msg = str(e.value)
    assert "\n" not in msg and "load_best_model_at_end" in msg and "Save strategy: SaveStrategy.NO" in msg


def test_demo_flags_parse_with_the_shipped_recipe(tmp_path):
    import argparse

    from ov_sd_trainer import demo

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args(["--max-steps", "1", "--calibration-samples", "4"])
    cfg, _ = parse_config(demo.train_argv(args, tmp_path / "run"))
    assert (cfg.max_steps, cfg.num_calibration_samples, cfg.save_strategy) == (1, 4, "no")
    assert not cfg.load_best_model_at_end and cfg.eval_strategy == "steps"
    args = p.parse_args(["--recipe", "reference-lcm-int8", "--max-steps", "1"])  # the few-step demo
    cfg, _ = parse_config(demo.train_argv(args, tmp_path / "lcm"))
    assert cfg.objective == "consistency" and cfg.max_steps == 1 and args.steps is None


def test_defaults_are_the_measured_best_and_both_weights_zero_is_an_error():
    """Pure distillation (task_weight 0) and calibration on the teacher's trajectories are the defaults
    (docs/fidelity.md); with the task loss off by default, turning distillation off too leaves nothing to train."""
    cfg, _ = parse_config(["--output_dir", "x"])
    assert (cfg.task_weight, cfg.distillation_weight, cfg.calibration_source) == (0.0, 1.0, "trajectories")
    with pytest.raises(UserError, match="distillation_weight and task_weight are both 0: nothing to train on"):
        parse_config(["--output_dir", "x", "--distillation_weight", "0"])
    cfg, _ = parse_config(["--output_dir", "x", "--distillation_weight", "0", "--task_weight", "1"])
    assert (cfg.task_weight, cfg.distillation_weight) == (1.0, 0.0)  # task loss alone is a valid choice


def test_output_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a folder")
    with pytest.raises(UserError, match=r"output_dir '.*taken' is a file; pass a folder") as e:
        parse_config(["--output_dir", str(path)])
    assert "\n" not in str(e.value)
    cfg, _ = parse_config(["--output_dir", str(tmp_path / "new"), "--max_steps", "-1"])  # a new folder; -1: epochs
    assert cfg.max_steps == -1


def test_every_tome_field_reaches_the_token_merging_config():
    """The tomesd parity knobs (`tome_sx`, `tome_sy`, `tome_merge_*`, `tome_max_downsample`) are what the student's
    token merging is built from (`TomeConfig.from_training_config`), each from its own field, none left at its
    default."""
    from ov_sd_trainer.compress.tome_config import TomeConfig

    argv = ["--output_dir", "x", "--tome_ratio", "0.3", "--tome_mode", "todo", "--tome_max_downsample", "2",
            "--tome_sx", "4", "--tome_sy", "1", "--tome_merge_attn", "false", "--tome_merge_crossattn", "true",
            "--tome_merge_mlp", "true"]  # fmt: skip
    cfg, _ = parse_config(argv)
    want = dict(ratio=0.3, mode="todo", max_downsample=2, sx=4, sy=1, merge_attn=False, merge_crossattn=True,
                merge_mlp=True)  # fmt: skip
    tome = TomeConfig.from_training_config(cfg)
    assert {k: getattr(tome, k) for k in want} == want
    assert all(getattr(TomeConfig(), k) != v for k, v in want.items())  # each value differs from its default
