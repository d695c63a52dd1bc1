"""Installed as a user installs it: a wheel (not editable) in a fresh virtualenv, run from a folder outside the
checkout. `ov-sd demo` (which trains with the shipped recipe by name), `ov-sd export` of its checkpoint, `ov-sd generate`
and the `python -m ov_sd_trainer.train` entry must work with nothing read from the repository.

The wheel is built once from the checkout; the new virtualenv sees the already-installed dependencies through a
path entry (the test environment's site-packages, whose own .pth files, such as the editable install's finder, are
not run), so nothing is downloaded. About 3 minutes on 2 cores, so it is marked `slow`: `make test-install` runs it,
and CI runs it with every other test (`make ci-test`)."""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=900):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
         root, os.environ)  # fmt: skip
    (wheel,) = wheels.glob("ov_sd_trainer-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, os.environ)
    py = venv / "bin" / "python"
    purelib = Path(
        subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                       text=True, check=True).stdout.strip()
    )  # fmt: skip
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)], root, os.environ)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    work = root / "elsewhere"  # not the checkout
    work.mkdir()
    return {"venv": venv, "py": py, "env": env, "work": work, "wheel": wheel}


@pytest.mark.slow
def test_the_wheel_carries_its_data_and_runs_outside_the_checkout(installed):
    py, env, work = installed["py"], installed["env"], installed["work"]
    r = _run([py, "-c", "import ov_sd_trainer, ov_sd_trainer.train.config as c, ov_sd_trainer.assets as a; "
              "print(ov_sd_trainer.__file__); print(sorted(c.shipped_recipes())); "
              "print(a.reference_model_path().is_dir(), a.judge_path().is_dir())"], work, env)  # fmt: skip
    file, recipes, data = r.stdout.strip().splitlines()
    assert not Path(file).is_relative_to(ROOT), file  # the installed copy, not the checkout
    assert "reference-int8" in recipes and "sd15-pokemon-int8" in recipes
    assert data == "True True"


@pytest.mark.slow
def test_train_export_generate_demo_from_the_installed_package(installed):
    env, work = installed["env"], installed["work"]
    ov_sd = str(installed["venv"] / "bin" / "ov-sd")
    # demo: QAT of the bundled model with the shipped recipe (short), export, one image through optimum-intel
    _run([ov_sd, "demo", "--output", str(work / "demo"), "--max-steps", "1", "--calibration-samples", "4",
          "--steps", "2"], work, env)  # fmt: skip
    assert (work / "demo" / "sample.png").is_file() and (work / "demo" / "run" / "openvino" / "README.md").is_file()
    # the demo's run is `ov-sd train --recipe reference-int8` by name (shortened): `ov-sd export` of its checkpoint
    info = json.loads((work / "demo" / "run" / "final" / "training_info.json").read_text())
    assert info["global_step"] == 1 and info["base_model"] == "reference"
    _run([ov_sd, "export", "--checkpoint", str(work / "demo" / "run" / "final"), "--output", str(work / "ov")], work,
         env)  # fmt: skip
    assert (work / "ov" / "unet" / "openvino_model.xml").is_file()
    r = _run([ov_sd, "generate", "--model", str(work / "ov"), "--prompt", "a red circle on a blue background",
              "--steps", "2", "--output", str(work / "img.png")], work, env)  # fmt: skip
    assert (work / "img.png").is_file() and "ms/step" in r.stdout
    # the module form (what `accelerate launch -m ov_sd_trainer.train` runs) and the one error path
    bad = subprocess.run([installed["py"], "-m", "ov_sd_trainer.train", "--recipe", "nope"], cwd=work, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("ov-sd: error: recipe 'nope'")
