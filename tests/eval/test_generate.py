"""`ov-sd generate`'s defaults follow what a folder was trained for (`pipeline_folder.trained_sampling`)."""

import json

from ov_sd_trainer.pipeline_folder import RESULTS_FILE, trained_sampling


def folder(root, class_name, few_step=None):
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": class_name, "unet": ["diffusers", "U"]}))
    if few_step is not None:
        (root / RESULTS_FILE).write_text(json.dumps({"few_step": few_step, "fake_quantize_nodes": 3}))
    return root


def test_trained_sampling(tmp_path):

    sd = folder(tmp_path / "sd", "StableDiffusionPipeline")
    assert trained_sampling(sd) is None and trained_sampling("someone/a-hub-id") is None
    lcm = folder(tmp_path / "lcm", "LatentConsistencyModelPipeline")
    assert trained_sampling(lcm) | {"source": None} == {"steps": 4, "guidance_scale": 8.5, "source": None}
    student = folder(tmp_path / "student", "LatentConsistencyModelPipeline", {"steps": 2, "guidance_scale": 6.0})
    assert (trained_sampling(student)["steps"], trained_sampling(student)["guidance_scale"]) == (2, 6.0)
    # a QAT export's results.json without a few_step record: the usual defaults
    assert trained_sampling(folder(tmp_path / "qat", "StableDiffusionPipeline", few_step={})) is None
