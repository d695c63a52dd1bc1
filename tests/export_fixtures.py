"""Session fixtures shared by the export, eval and bench tests (registered by conftest.py's `pytest_plugins`)."""

import pytest


@pytest.fixture(scope="session")
def fp32_export(tmp_path_factory, tiny_pipeline):
    """optimum-intel's FP32 OpenVINO export of `tiny_pipeline`, made once for the session: the export every test that
    needs one reads (parity, `ov-sd generate` on an optimum folder, `ov-sd eval` variants, `ov-sd bench`'s
    openvino-fp32). It is `eval.bench.prepare.export_openvino_fp32`: optimum's export plus the GenAI tokenizer files,
    as every OpenVINO folder the project writes. Read-only: a test that writes into an export copies it first."""
    from ov_sd_trainer.eval.bench.prepare import export_openvino_fp32

    out = tmp_path_factory.mktemp("fp32-export") / "openvino-fp32"
    export_openvino_fp32(str(tiny_pipeline), out)
    return out


@pytest.fixture(scope="session")
def lcm_export(tmp_path_factory, tiny_pipeline):
    """An untrained LCM OpenVINO folder of `tiny_pipeline` (no training: the student UNet with its zero-initialised
    guidance embedding, `LCMScheduler`, `LatentConsistencyModelPipeline`), through optimum's FP32 export: what eval and
    bench need of a few-step folder (loading, its own scheduler and steps, the guidance input), at export cost only."""
    from ov_sd_trainer.eval.bench.prepare import export_openvino_fp32
    from ov_sd_trainer.lcm import lcm_base_folder

    root = tmp_path_factory.mktemp("lcm-export")
    lcm_base_folder(str(tiny_pipeline), root / "diffusers", time_cond_proj_dim=8, num_ddim_timesteps=10)
    export_openvino_fp32(str(root / "diffusers"), root / "openvino")
    return root / "openvino"
