"""Test-wide settings (offline, one intra-op thread) and the fixtures several test modules share.

One thread: tiny models gain nothing from a second one, and on a 2-core machine with any other load an OpenMP team
of 2 spin-waits (a small conv measured 32 ms with 2 threads vs 1.1 ms with 1)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the CLI / accelerate subprocesses

# Under pytest-xdist (`make test`: two workers) each worker gets its own share of the CPUs, before any thread pool
# exists: OpenVINO sizes its CPU threads from the process's affinity (torch's intra-op threads are 1 anyway), so
# each worker runs one thread per core instead of two teams competing for both cores. Its subprocesses inherit it;
# the multi-process tests get every CPU back (`multiprocess_cpus`).
ALL_CPUS = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
_worker, _workers = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if ALL_CPUS and _worker and 1 < _workers <= len(ALL_CPUS):
    os.sched_setaffinity(0, sorted(ALL_CPUS)[int(_worker.removeprefix("gw")) :: _workers])

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Fixtures of the export / eval / bench tests (a shared FP32 export, ...) live in their own module.
pytest_plugins = ["export_fixtures"]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """One tiny diffusers SD pipeline folder (64 px, seed 0), shared read-only by every test that needs a base model."""
    from ov_sd_trainer.assets.builders import TinySDConfig, build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny") / "pipe"
    build_tiny_pipeline(path, TinySDConfig(seed=0))
    return path


def tiny_run_argv(base, out, *extra) -> list[str]:
    """The flags of the shared tiny QAT runs (`qat_run`, `hybrid_run`, `family_run`): 4 steps of batch 2 at a constant
    learning rate (so a shorter run of the same flags trains its first steps exactly alike), a loss logged every step,
    checkpoints every 2 steps; `extra` flags override."""
    return [
        "--pretrained_model_name_or_path", str(base), "--dataset_name", "synthetic:12", "--output_dir", str(out),
        "--max_steps", "4", "--per_device_train_batch_size", "2", "--num_calibration_samples", "4",
        "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--report_to", "none",
        "--use_cpu", "true", "--disable_tqdm", "true", "--learning_rate", "1e-4", "--lr_scheduler_type", "constant",
        "--weight_decay", "0.01", "--seed", "0", *extra,
    ]  # fmt: skip


def train_tiny(argv: list[str], recipe: dict | None = None, run_first=None) -> dict:
    """`ov-sd train` with `argv` through `train.run`'s own wiring (`build_trainer`, `trainer.train()`, `finish`), keeping
    what tests look at: the `Training` (trainer, model, EMA, ...), the student's parameters before training, the run
    folder and its export."""
    from ov_sd_trainer.run_folder import OPENVINO_DIR
    from ov_sd_trainer.train.config import parse_config
    from ov_sd_trainer.train.run import build_trainer, finish

    cfg, parsed = parse_config(argv)
    recipe = parsed if recipe is None else recipe
    if run_first is not None:  # what `train.run.run` does before the build (`run_float_phase`)
        run_first(cfg, recipe)
    training = build_trainer(cfg, recipe)
    before = {n: p.detach().clone() for n, p in training.model.student.named_parameters()}
    result = training.trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    finish(cfg, recipe, training, result)
    out = Path(cfg.output_dir)
    return {"training": training, "before": before, "cfg": cfg, "out": out, "ov": out / OPENVINO_DIR}


@pytest.fixture(scope="session")
def qat_run(tmp_path_factory, tiny_pipeline):
    """The shared plain tiny QAT run (full scheme, the default losses and calibration, `tiny_run_argv`: 4 steps, export
    at the end, a recorded Hub push): its run folder, export, Trainer and student before training.

    Shared by the trainer, export, model-card, push, CLI and bad-input tests; they read it and write elsewhere."""
    root = tmp_path_factory.mktemp("qat-run")
    argv = tiny_run_argv(tiny_pipeline, root / "run", "--push_to_hub", "true", "--hub_model_id", "me/tiny-int8",
                         "--hub_token", "t0k")  # fmt: skip
    pushed = []
    with pytest.MonkeyPatch.context() as mp:  # the recipe's push goes through export.hub.push_to_hub: record it
        mp.setattr("ov_sd_trainer.export.hub.push_to_hub", lambda folder, repo, **kw: pushed.append((folder, repo, kw)))
        run = train_tiny(argv, {"pretrained_model_name_or_path": str(tiny_pipeline), "max_steps": 4})
    return {**run, "base": tiny_pipeline, "root": root, "pushed": pushed, "argv": argv}


@pytest.fixture(scope="session")
def hybrid_run(tmp_path_factory, tiny_pipeline):
    """The shared tiny QAT run of the hybrid scheme (2 steps, no checkpoints, export at the end)."""
    root = tmp_path_factory.mktemp("hybrid-run")
    argv = tiny_run_argv(tiny_pipeline, root / "run", "--quantization_scheme", "hybrid", "--max_steps", "2",
                         "--save_strategy", "no")  # fmt: skip
    return {**train_tiny(argv), "base": tiny_pipeline, "root": root}


@pytest.fixture(scope="session")
def family_run(tmp_path_factory):
    """family -> its shared tiny QAT run (3 steps, teacher-gap evaluation at the end, export), made on first use."""
    from ov_sd_trainer.assets.builders import TinySDConfig, build_tiny_pipeline

    done = {}

    def get(family):
        if family not in done:
            root = tmp_path_factory.mktemp(f"family-{family}")
            build_tiny_pipeline(root / "base", TinySDConfig(family=family))
            # calibration on the family's own short (4-step) trajectories; the held-out teacher gap (an LCM's inputs
            # carry a guidance embedding too)
            argv = tiny_run_argv(root / "base", root / "run", "--max_steps", "3", "--save_strategy", "no",
                                 "--calibration_steps", "4", "--eval_strategy", "steps", "--eval_steps", "3",
                                 "--teacher_gap_samples", "4")  # fmt: skip
            done[family] = {**train_tiny(argv, {"family": family}), "base": root / "base", "root": root}
        return done[family]

    return get


@pytest.fixture(scope="session")
def lcm_run(tmp_path_factory, tiny_pipeline):
    """The shared tiny consistency-distillation QAT run (`objective consistency`, full int8 from the start) on
    `tiny_pipeline`: 4 steps, checkpoints every 2, the few-step gap evaluated at the start and the end, export to an
    LCM OpenVINO folder."""
    root = tmp_path_factory.mktemp("lcm-run")
    argv = lcm_run_argv(tiny_pipeline, root / "run")
    return {**train_tiny(argv), "base": tiny_pipeline, "root": root, "argv": argv}


def lcm_run_argv(base, out, *extra) -> list[str]:
    """`tiny_run_argv` for a consistency run: a small guidance embedding, calibration on the student's own 4-step
    sampling, the held-out few-step gap on 2 prompts at the start and every 4 steps."""
    return tiny_run_argv(base, out, "--objective", "consistency", "--time_cond_proj_dim", "8",
                         "--num_ddim_timesteps", "10", "--eval_strategy", "steps", "--eval_steps", "4",
                         "--eval_on_start", "true", "--teacher_gap_samples", "2", *extra)  # fmt: skip


# `pytest -n 2 --dist loadgroup` (`make test`, `make ci-test`): the tests that share a costly session fixture run on
# one worker, so each fixture is built once per session, not once per worker; the multi-process tests share one
# worker too (torchrun's default port, and each takes both cores). The first matching rule names the group.
XDIST_GROUPS = (
    ("multiprocess", lambda item: item.path.name == "test_reliability.py"),
    ("qat-run", lambda item: "qat_run" in item.fixturenames or "hybrid_run" in item.fixturenames),
    ("lcm", lambda item: "lcm_run" in item.fixturenames or "lcm_export" in item.fixturenames),
    ("family", lambda item: "family_run" in item.fixturenames),
    ("fp32-export", lambda item: "fp32_export" in item.fixturenames),
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = next((name for name, matches in XDIST_GROUPS if matches(item)), None)
        if group is None and _uses_module_fixture(item):  # a module's own costly fixture: that module on one worker
            group = item.path.stem
        if group and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group))
    # the multi-process tests first: they use both cores while the other worker starts on its own list
    items.sort(key=lambda item: _group(item) != "multiprocess")


def pytest_configure(config):
    """Refuse `--dist loadgroup` where pytest-xdist would ignore the groups: it marks a grouped test by appending
    '@group' to its node id, which pytest 9.2 no longer reads (pytest-xdist issue 1386, open for 3.8). Nothing fails
    then: every worker builds every shared fixture (measured: the bench module's 110-s run built on both workers),
    and the multi-process tests run side by side."""
    from importlib.metadata import version

    if config.getoption("dist", None) != "loadgroup":
        return
    pytest_v = tuple(int(x) for x in version("pytest").split(".")[:2])
    xdist_v = tuple(int(x) for x in version("pytest-xdist").split(".")[:2])
    if pytest_v >= (9, 2) and xdist_v <= (3, 8):
        raise pytest.UsageError(
            f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')} ignores --dist loadgroup's "
            "groups: install the pinned versions (`make install`, setup.cfg: pytest<9.2)"
        )


def _group(item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0] if mark and mark.args else None


@pytest.fixture(autouse=True)
def multiprocess_cpus(request):
    """A multi-process test's launches may use every CPU, not only its worker's share."""
    if not (ALL_CPUS and _group(request.node) == "multiprocess"):
        yield
        return
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, ALL_CPUS)
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


def _uses_module_fixture(item) -> bool:
    defs = getattr(item, "_fixtureinfo", None)
    return bool(defs) and any(d[-1].scope == "module" for d in defs.name2fixturedefs.values())
