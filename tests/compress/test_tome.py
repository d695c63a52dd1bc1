"""Token merging (ov_sd_trainer.compress.tome): exactness at ratio 0 and after removal, agreement with tomesd, the merge
itself, OpenVINO conversion (deterministic, any resolution), NNCF quantization, and QAT + export end to end."""

from __future__ import annotations

import collections
import copy
import json
import os
import pickle

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ov_sd_trainer.assets.builders import TinySDConfig, build_components  # noqa: E402
from ov_sd_trainer.compress import convert, quantize  # noqa: E402
from ov_sd_trainer.compress.checkpointing import enable_gradient_checkpointing  # noqa: E402
from ov_sd_trainer.compress.tome import (  # noqa: E402
    TomeConfig,
    apply_tome,
    bipartite_soft_matching,
    downsample_tokens,
    is_patched,
    partition,
    remove_tome,
    tome_config,
    transformer_levels,
)
from ov_sd_trainer.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def unet():
    return build_components(TinySDConfig())[3].eval()


def inputs(unet, height=16, width=16):
    return convert.unet_example_inputs(unet, batch=2, height=height, width=width)


def run(unet, x):
    with torch.no_grad():  # positional: tomesd's pre-hook reads the sample from args[0]
        return unet(x["sample"], x["timestep"], x["encoder_hidden_states"], return_dict=False)[0]


def rel(a, b) -> float:
    return float(((a - b).norm() / b.norm()).item())


def block_classes(unet):
    from diffusers.models.attention import BasicTransformerBlock

    return [type(m).__name__ for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


# --- exactness -------------------------------------------------------------------------------------------------------


def test_ratio_zero_is_identical_to_the_unpatched_unet(unet):
    x = inputs(unet)
    ref = run(unet, x)
    patched = apply_tome(copy.deepcopy(unet), ratio=0.0, max_downsample=8)
    assert "ToMeBasicTransformerBlock" in block_classes(patched)
    assert torch.equal(run(patched, x), ref)


def test_patch_then_remove_restores_the_exact_unet(unet):
    model = copy.deepcopy(unet)
    x = inputs(unet)
    ref = run(model, x)
    keys = list(model.state_dict())
    hooks = {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()}
    apply_tome(model, ratio=0.5, max_downsample=2, merge_mlp=True)
    assert is_patched(model) and list(model.state_dict()) == keys  # no module added or renamed
    merged = run(model, x)
    assert rel(merged, ref) > 1e-3  # merging really changes the output
    apply_tome(model, ratio=0.3)  # re-patching replaces the settings
    assert tome_config(model) == TomeConfig(ratio=0.3)
    remove_tome(model)
    assert not is_patched(model)
    assert set(block_classes(model)) == {"BasicTransformerBlock"}
    assert {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()} == hooks
    assert not any(k.startswith("_tome") for m in model.modules() for k in vars(m))
    assert torch.equal(run(model, x), ref)
    remove_tome(model)  # idempotent


def test_levels_follow_max_downsample(unet):
    levels = transformer_levels(unet)
    # tiny UNet: one transformer down and two up at the full and half resolution, one in the middle block
    assert sorted(f for f, _ in levels) == [1, 1, 1, 2, 2, 2, 4]
    for max_downsample, expected in ((1, 3), (2, 6), (8, 7)):
        model = apply_tome(copy.deepcopy(unet), ratio=0.5, max_downsample=max_downsample)
        assert block_classes(model).count("ToMeBasicTransformerBlock") == expected


def test_patched_unet_deep_copies_and_pickles(unet):
    model = apply_tome(copy.deepcopy(unet), ratio=0.5)
    x = inputs(unet)
    ref = run(model, x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert tome_config(clone) == TomeConfig(ratio=0.5)
        assert torch.equal(run(clone, x), ref)


# --- agreement with tomesd -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,size",
    [
        ({"ratio": 0.5}, (16, 16)),  # tomesd's defaults otherwise: sx=sy=2, max_downsample=1, attn only
        ({"ratio": 0.4, "max_downsample": 2, "merge_crossattn": True, "merge_mlp": True}, (16, 16)),
        ({"ratio": 0.5, "sx": 3, "sy": 2}, (24, 20)),  # strides that do not divide the grid
    ],
    ids=["defaults", "all-sublayers-2-levels", "odd-strides"],
)
def test_unet_output_equals_tomesd_without_randomness(unet, kwargs, size):
    tomesd = pytest.importorskip("tomesd")
    x = inputs(unet, *size)
    ours = run(apply_tome(copy.deepcopy(unet), **kwargs), x)
    theirs_model = copy.deepcopy(unet)
    tomesd.apply_patch(theirs_model, use_rand=False, **kwargs)
    theirs = run(theirs_model, x)
    exact = run(unet, x)
    # Same merges; the merged tokens are in another order (attention sums in another order): float rounding only.
    assert rel(ours, theirs) < 1e-5, rel(ours, theirs)
    assert rel(theirs, exact) > 1e-3  # and merging does change the output


@pytest.mark.parametrize("h,w,sx,sy,ratio", [(16, 16, 2, 2, 0.5), (15, 13, 2, 2, 0.4), (12, 12, 3, 2, 0.6)])
def test_merge_and_unmerge_equal_tomesd(h, w, sx, sy, ratio):
    pytest.importorskip("tomesd")
    from tomesd.merge import bipartite_soft_matching_random2d

    x = torch.randn(2, h * w, 24, generator=torch.Generator().manual_seed(h))
    m_ref, u_ref = bipartite_soft_matching_random2d(x, w, h, sx, sy, int(h * w * ratio), no_rand=True)
    merge, unmerge = bipartite_soft_matching(x, h, w, sx, sy, ratio)
    ours, theirs = merge(x), m_ref(x)
    assert ours.shape == theirs.shape == (2, h * w - int(h * w * ratio), 24)
    # the same merged tokens (up to order), and unmerge gives every token the same value, bit for bit
    for b in range(2):
        assert torch.equal(_sorted_rows(ours[b]), _sorted_rows(theirs[b]))
    assert torch.equal(unmerge(ours), u_ref(theirs))


def _sorted_rows(t: torch.Tensor) -> torch.Tensor:
    order = np.lexsort(t.numpy().T[::-1])
    return t[torch.from_numpy(order)]


# --- the merge itself ------------------------------------------------------------------------------------------------


def test_partition_covers_the_grid_once_with_top_left_dst():
    for h, w, sx, sy in ((8, 8, 2, 2), (7, 5, 2, 2), (9, 10, 3, 2)):
        a_pos, b_pos = partition(h, w, sx, sy)
        assert sorted(torch.cat([a_pos, b_pos]).tolist()) == list(range(h * w))
        expected_dst = [y * w + x for y in range(0, (h // sy) * sy, sy) for x in range(0, (w // sx) * sx, sx)]
        assert b_pos.tolist() == expected_dst
        assert a_pos.tolist() == sorted(a_pos.tolist())  # raster order


@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_duplicate_tokens_merge_and_unmerge_exactly(ratio):
    """Every 2x2 cell holds four copies of one token: merging averages copies and unmerging restores the input
    bit for bit (small integers: the sums are exact)."""
    h = w = 8
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(-8, 9, (2, h // 2, w // 2, 16), generator=g).float()
    x = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(2, h * w, 16)
    merge, unmerge = bipartite_soft_matching(x, h, w, 2, 2, ratio)
    merged = merge(x)
    assert merged.shape == (2, h * w - int(h * w * ratio), 16)
    assert torch.equal(unmerge(merged), x)
    if ratio == 0.75:  # everything merged: exactly the distinct cell tokens are left
        assert torch.equal(_sorted_rows(merged[0]), _sorted_rows(cells[0].reshape(-1, 16)))
    # distinct tokens do not survive the round trip: the check above can fail
    y = torch.randn(2, h * w, 16, generator=g)
    m2, u2 = bipartite_soft_matching(y, h, w, 2, 2, ratio)
    assert not torch.equal(u2(m2(y)), y)


def test_merge_is_deterministic_and_has_gradients():
    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    merge, unmerge = bipartite_soft_matching(x, 8, 8, 2, 2, 0.5)
    out = unmerge(merge(x * 2))
    merge2, unmerge2 = bipartite_soft_matching(x, 8, 8, 2, 2, 0.5)
    assert torch.equal(out, unmerge2(merge2(x * 2)))
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_todo_downsamples_keys_and_values_by_cell_means():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # a 4x4 grid
    pooled = downsample_tokens(x, 4, 4, 2, 2)
    assert pooled.shape == (2, 4, 3)
    grid = x.reshape(2, 4, 4, 3)
    assert torch.equal(pooled[:, 0], grid[:, :2, :2].reshape(2, 4, 3).mean(1))
    odd = downsample_tokens(torch.randn(1, 15, 3), 5, 3, 2, 2)  # partial cells at the edges
    assert odd.shape == (1, 6, 3)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"ratio": 0.9}, "ratio=0.9: must be between 0 and 0.75"),
        ({"ratio": 0.6, "sx": 2, "sy": 1}, "at most 0.5 of the tokens"),
        ({"max_downsample": 3}, "power of two"),
        ({"sx": 0}, "sx=0: must be a positive integer"),
        ({"mode": "random"}, "mode='random'"),
        ({"merge_attn": False}, "nothing would be merged"),
    ],
)
def test_bad_settings_are_one_line_errors(unet, kwargs, words):
    with pytest.raises(UserError, match=words):
        apply_tome(copy.deepcopy(unet), **kwargs)


def test_not_a_unet_is_an_error():
    with pytest.raises(UserError, match="UNet2DConditionModel"):
        apply_tome(torch.nn.Linear(2, 2), ratio=0.5)


def test_training_config_fields(tmp_path):
    from ov_sd_trainer.train.config import parse_config

    cfg, _ = parse_config(["--recipe", "recipes/reference-tome-int8.json", "--output_dir", str(tmp_path)])
    tome = TomeConfig.from_training_config(cfg)
    assert tome.active and tome.ratio == cfg.tome_ratio
    assert TomeConfig.from_training_config({"tome_ratio": 0.0}) == TomeConfig(ratio=0.0)  # older config.json
    with pytest.raises(UserError, match="tome_sy=0: must be a positive integer"):
        parse_config(["--tome_ratio", "0.4", "--tome_sy", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match="tome_mode='x'"):
        parse_config(["--tome_mode", "x", "--output_dir", str(tmp_path)])


# --- OpenVINO and NNCF -----------------------------------------------------------------------------------------------


def _op_counts(ov_model) -> collections.Counter:
    return collections.Counter(op.get_type_name() for op in ov_model.get_ops())


@pytest.mark.parametrize("mode", ["tome", "todo"])
def test_openvino_ir_is_deterministic_and_works_at_other_resolutions(unet, mode):
    import openvino as ov

    model = apply_tome(copy.deepcopy(unet), ratio=0.5, max_downsample=2, merge_mlp=True, mode=mode)
    ov_model = convert.convert_unet_to_openvino(model)  # traced at 16x16
    ops = _op_counts(ov_model)
    assert ops["RandomUniform"] == 0 and ops["Multinomial"] == 0
    if mode == "tome":
        assert ops["TopK"] > 0 and ops["ScatterNDUpdate"] > 0 and ops["Gather"] > 0, ops
    else:
        assert ops["AvgPool"] > 0 and ops["TopK"] == 0, ops
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    for size in ((16, 16), (24, 20)):  # the second is not the traced size: nothing was frozen to it
        x = inputs(unet, *size)
        ref = run(model, x)
        got = torch.from_numpy(compiled({k: v.numpy() for k, v in x.items()})[0])
        assert rel(got, ref) < 1e-4, (size, rel(got, ref))
        assert rel(got, run(unet, x)) > 1e-3  # the IR merges


@pytest.fixture(scope="module")
def quantized(unet):
    patched = apply_tome(copy.deepcopy(unet), ratio=0.5)
    calibration = [convert.unet_example_inputs(unet, batch=2)]  # ranges do not matter here, only where quantizers go
    student = quantize.quantize_unet(patched, calibration, overflow_fix="enable").eval()
    plain = quantize.quantize_unet(unet, calibration, overflow_fix="enable").eval()
    return patched, student, plain


def test_nncf_quantizes_the_merged_unet(unet, quantized):
    patched, student, plain = quantized
    assert is_patched(student) and quantize.is_quantized(student)
    assert not quantize.is_quantized(patched)
    # The matching is hidden from NNCF (no quantizers on the similarity); the quantizers are those of the plain
    # UNet, now on the merged attention.
    assert quantize.count_quantizers(student) == quantize.count_quantizers(plain)
    with pytest.raises(UserError, match="NNCF-quantized"):  # the graph under NNCF's quantizers must not change
        remove_tome(student)
    with pytest.raises(UserError, match="NNCF-quantized"):
        apply_tome(plain, ratio=0.5)
    x = inputs(unet)
    with torch.no_grad():
        out = student(**x, return_dict=False)[0]
    assert 0 < rel(out, run(patched, x)) < 0.2  # quantized, close to the FP32 merged UNet
    ov_model = convert.convert_unet_to_openvino(student)
    ops = _op_counts(ov_model)
    assert convert.count_fake_quantize(ov_model) > 0 and ops["TopK"] > 0 and ops["RandomUniform"] == 0


def test_gradient_checkpointing_through_the_merged_quantized_unet(unet, quantized):
    """QAT of SD 1.5 needs checkpointing: the recomputed merged blocks must match the original forward."""
    _, student, _ = quantized
    model = copy.deepcopy(student).train()
    x = inputs(unet)
    grads = []
    for use_checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        if use_checkpointing:
            enable_gradient_checkpointing(model)
        model(**x, return_dict=False)[0].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-8), n


def test_quantized_merged_student_saves_and_loads_exactly(unet, quantized, tmp_path):
    _, student, _ = quantized
    quantize.save_quantized(student, tmp_path / "s")
    loaded = quantize.load_quantized(apply_tome(copy.deepcopy(unet), ratio=0.5), tmp_path / "s").eval()
    x = inputs(unet)
    with torch.no_grad():
        assert torch.equal(loaded(**x, return_dict=False)[0], student(**x, return_dict=False)[0])


# --- training and export ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from ov_sd_trainer.assets.builders import build_tiny_pipeline
    from ov_sd_trainer.train.config import parse_config
    from ov_sd_trainer.train.run import run as train

    root = tmp_path_factory.mktemp("tome-train")
    base = root / "base"
    build_tiny_pipeline(base, TinySDConfig(seed=3))
    argv = [
        "--pretrained_model_name_or_path", str(base), "--dataset_name", "synthetic:8",
        "--output_dir", str(root / "run"), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--num_calibration_samples", "2", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--disable_tqdm", "true", "--learning_rate", "1e-4", "--tome_ratio", "0.5", "--tome_max_downsample", "2",
    ]  # fmt: skip
    cfg, _ = parse_config(argv)
    out = train(cfg, {"tome_ratio": 0.5, "tome_max_downsample": 2})
    return {"base": base, "out": out}


@pytest.mark.slow  # the merged QAT run (85 s contended): merging and NNCF on the merged UNet stay in the default run
def test_training_merges_the_student_only_and_exports_it(trained):
    import openvino as ov

    from ov_sd_trainer.export.openvino import load_student_from_checkpoint
    from ov_sd_trainer.pipeline_folder import RESULTS_FILE
    from ov_sd_trainer.run_folder import FINAL_DIR, OPENVINO_DIR

    out = trained["out"]
    info = json.loads((out / FINAL_DIR / "training_info.json").read_text())
    assert info["global_step"] == 2
    student, cfg, _, _ = load_student_from_checkpoint(out / FINAL_DIR)
    assert cfg["tome_ratio"] == 0.5 and tome_config(student) == TomeConfig(ratio=0.5, max_downsample=2)
    results = json.loads((out / OPENVINO_DIR / RESULTS_FILE).read_text())
    assert results["token_merging"]["ratio"] == 0.5 and results["fake_quantize_ops"] > 0
    ir = ov.Core().read_model(out / OPENVINO_DIR / "unet" / "openvino_model.xml")
    ops = _op_counts(ir)
    assert ops["TopK"] > 0 and ops["RandomUniform"] == 0
    assert convert.count_int8_constants(ir) > 0
    assert (out / OPENVINO_DIR / "samples" / "sample_0.png").is_file()  # rendered by the exported folder itself


@pytest.mark.slow  # the merged QAT run (85 s contended): merging and NNCF on the merged UNet stay in the default run
def test_teacher_stays_exact_during_training(trained, tmp_path):
    from ov_sd_trainer.train.config import parse_config
    from ov_sd_trainer.train.run import build

    argv = [
        "--pretrained_model_name_or_path", str(trained["base"]), "--dataset_name", "synthetic:4",
        "--output_dir", str(tmp_path), "--num_calibration_samples", "2", "--report_to", "none", "--use_cpu", "true",
        "--tome_ratio", "0.5", "--export", "false",
    ]  # fmt: skip
    cfg, _ = parse_config(argv)
    model, _, _ = build(cfg)
    assert not is_patched(model.teacher) and is_patched(model.student)
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.from_pretrained(trained["base"], subfolder="unet").eval()
    x = inputs(original)
    assert torch.equal(run(model.teacher, x), run(original, x))


@pytest.mark.slow  # the merged QAT run (85 s contended): merging and NNCF on the merged UNet stay in the default run
def test_exported_folder_loads_in_optimum_and_generates(trained):
    from optimum.intel import OVStableDiffusionPipeline

    from ov_sd_trainer.run_folder import OPENVINO_DIR

    pipe = OVStableDiffusionPipeline.from_pretrained(trained["out"] / OPENVINO_DIR, compile=False)
    pipe.reshape(batch_size=1, height=64, width=64, num_images_per_prompt=1)
    pipe.compile()
    image = pipe("a red circle on a blue background", num_inference_steps=3).images[0]
    assert image.size == (64, 64)
