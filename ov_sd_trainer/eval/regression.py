"""The CI regression run: QAT of the reference model on a short schedule, export, PTQ peers, eval, checked.

    ov-sd regression --output outputs/regression        (`make regression`)

Every stage runs the command a user would run (`accelerate launch -m ov_sd_trainer.train`, `ov-sd ptq`,
`ov-sd eval`) as a subprocess, so the run exercises the real entry points (installed or not: nothing
is read from a checkout). The run fails (exit 1) when any stage errors or when a check against the thresholds file
(`regression_thresholds.json` beside this module, shipped with the package) fails:

- prompt accuracy of the QAT model more than `max_accuracy_drop` below the FP32 model's (per attribute);
- QAT fidelity to the FP32 teacher against each peer in `peers`: optimum-intel's full-int8 PTQ (`ptq`), its hybrid
  PTQ (`ptq-hybrid`) and the QAT student as calibrated, before any training (`qat-start`). For every metric the
  margin (QAT better by: PSNR/SSIM difference, or MSE difference peer - QAT) must be at least the file's
  `min_margin` for that peer and metric;
- the int8 UNet larger than `max_unet_size_ratio` x the FP32 UNet;
- the few-step student (`few_step`, stage `lcm`: the few-step recipe shortened, float phase then QAT in one run):
  the float phase must bring its held-out 4-step samples at least `min_float_gain_db` closer to the teacher's ODE
  endpoints (PSNR, the run's own eval at its start and end), and the int8 student must end within
  `max_int8_drop_db` of the float student and at least at `min_int8_psnr_db`.

The stages run `--jobs` at a time (default 2, one per core of the reference machine; each stage uses one thread), in
the order listed, each once the stages it reads have finished.

The thresholds file also records the values measured when the thresholds were set. The report
(`regression.json`, `regression.md`) lists every check with its value and limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..assets import reference_model_path
from ..errors import UserError
from ..pipeline_folder import RESULTS_FILE
from ..run_folder import FINAL_DIR, FLOAT_PHASE_DIR, OPENVINO_DIR, TRAINING_INFO_FILE

DEFAULT_THRESHOLDS = Path(__file__).resolve().parent / "regression_thresholds.json"
DEFAULT_JOBS = 2  # stages at once: one per core of the 2-core reference machine


def _run_stages(stages: list[tuple[str, list[str], tuple[str, ...]]], jobs: int, logs: Path, env: dict,
                report: dict, cwd: Path) -> bool:  # fmt: skip
    """Run `stages` (name, command, the names it needs first), up to `jobs` at once, in list order as each becomes
    ready. After a failure nothing new starts; the running stages finish. Returns True when all passed."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pending, done, running, ok = list(stages), set(), {}, True
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            ready = [st for st in pending if set(st[2]) <= done] if ok else []
            for st in ready[: jobs - len(running)]:
                pending.remove(st)
                running[pool.submit(_stage, st[0], st[1], logs, env, report, cwd)] = st[0]
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                if future.result():
                    done.add(name)
                else:
                    ok = False
    return ok and not pending


def _stage(name: str, cmd: list[str], log_dir: Path, env: dict, report: dict, cwd: Path) -> bool:
    """Run one stage; its output goes to `log_dir/<name>.log`. Returns True on success."""
    print(f"[regression] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    log = log_dir / f"{name}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = round(time.perf_counter() - t0, 1)
    report["stages"].append(dict(name=name, command=" ".join(cmd), returncode=rc, seconds=seconds, log=str(log)))
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        print(f"[regression] {name} FAILED (exit {rc}) after {seconds} s; last lines of {log}:", flush=True)
        print("\n".join("    " + line for line in tail), flush=True)
        return False
    print(f"[regression] {name}: ok ({seconds} s)", flush=True)
    return True


def _check(report: dict, name: str, value, limit, ok: bool, note: str = "") -> None:
    report["checks"].append(dict(check=name, value=value, limit=limit, passed=bool(ok), note=note))


def run_checks(report: dict, thresholds: dict, eval_result: dict, export_results: dict) -> None:
    """Compare the QAT row of `ov-sd eval` with the FP32 row and the PTQ row, and the export's size ratio."""
    rows = {v["name"]: v for v in eval_result["variants"]}
    fp32, qat = rows["fp32"], rows["qat"]
    drop = thresholds["max_accuracy_drop"]
    for attr in thresholds["accuracy_attributes"]:
        base, got = fp32["accuracy"][attr], qat["accuracy"][attr]
        _check(
            report, f"qat {attr} accuracy >= fp32 - {drop}", round(got, 4), round(base - drop, 4), got >= base - drop
        )
    for peer, min_margins in thresholds["peers"].items():
        for metric, min_margin in min_margins.items():
            q, p = qat[metric], rows[peer][metric]
            margin = q - p if thresholds["fidelity_metrics"][metric] == "higher" else p - q
            _check(report, f"qat {metric} better than {peer} by >= {min_margin:g}", round(margin, 6), min_margin,
                   margin >= min_margin, note=f"qat {q:.6g}, {peer} {p:.6g}")  # fmt: skip
    ratio = export_results["unet_size_ratio"]
    limit = thresholds["max_unet_size_ratio"]
    _check(report, f"int8 unet size ratio <= {limit}", ratio, limit, ratio <= limit)


def few_step_psnr(training_info: dict) -> tuple[float, float]:
    """The held-out few-step PSNR of a consistency run at its first and its last evaluation (training_info.json)."""
    values = [h["eval_few_step_psnr"] for h in training_info["log_history"] if "eval_few_step_psnr" in h]
    if len(values) < 2:
        raise ValueError(f"a consistency run evaluated {len(values)} time(s); the check needs the start and the end")
    return float(values[0]), float(values[-1])


def run_few_step_checks(report: dict, limits: dict, float_info: dict, int8_info: dict) -> None:
    """The few-step student's checks on the `lcm` run's float phase and QAT phase training_info.json."""
    start, end = few_step_psnr(float_info)
    gain = limits["min_float_gain_db"]
    _check(report, f"float consistency 4-step psnr gain >= {gain:g} dB", round(end - start, 3), gain,
           end - start >= gain, note=f"{start:.2f} -> {end:.2f} dB")  # fmt: skip
    _, int8 = few_step_psnr(int8_info)
    drop = limits["max_int8_drop_db"]
    _check(report, f"int8 consistency 4-step psnr >= float - {drop:g} dB", round(int8, 3), round(end - drop, 3),
           int8 >= end - drop, note=f"int8 {int8:.2f}, float {end:.2f} dB")  # fmt: skip
    floor = limits["min_int8_psnr_db"]
    _check(report, f"int8 consistency 4-step psnr >= {floor:g} dB", round(int8, 3), floor, int8 >= floor)


def markdown(report: dict) -> str:
    lines = ["| stage | exit | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['returncode']} | {s['seconds']} |" for s in report["stages"]]
    lines += ["", "| check | value | limit | result |", "|---|---|---|---|"]
    lines += [
        f"| {c['check']} | {c['value']} | {c['limit']} | {'pass' if c['passed'] else 'FAIL'} |"
        for c in report["checks"]
    ]
    lines += ["", f"**{'PASSED' if report['passed'] else 'FAILED'}** in {report['seconds']} s"]
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--output", default="outputs/regression", help="work and report folder (replaced each run)")
    p.add_argument("--thresholds", default=str(DEFAULT_THRESHOLDS), help="JSON file of limits and measured values")
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="stages run at once (each uses one thread)")


def main(args) -> int:
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    try:
        thresholds = json.loads(Path(args.thresholds).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read thresholds {args.thresholds}: {e}") from None
    out = Path(args.output).resolve()
    if out.exists():  # the folder is this run's scratch space: only ever replace a previous regression run
        if not (out / "regression.json").exists() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not a regression folder; pass another --output")
        import shutil

        shutil.rmtree(out)
    logs = out / "logs"
    logs.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", str(thresholds.get("threads", 1)))
    py = sys.executable
    ov_sd = [py, "-m", "ov_sd_trainer.cli"]
    s = thresholds["schedule"]
    qat_dir, start_dir, eval_dir = out / "qat", out / "qat-start", out / "eval"
    ptq_dir, hybrid_dir = out / "ptq", out / "ptq-hybrid"
    reference = str(reference_model_path())
    train = [py, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ov_sd_trainer.train", "--disable_tqdm", "true"]  # fmt: skip
    launch = [*train, "--recipe", s["recipe"], "--num_calibration_samples", str(s["calibration_samples"])]
    ptq = [
        "--model",
        reference,
        "--num-samples",
        str(s["ptq_samples"]),
        "--steps",
        str(s["ptq_steps"]),
        "--threads",
        "1",
    ]
    fs = thresholds["few_step"]
    lcm_dir = out / "lcm"
    lcm = [*train, "--recipe", fs["recipe"], "--float_steps", str(fs["float_steps"]), "--max_steps",
           str(fs["int8_steps"]), "--eval_steps", str(fs["eval_steps"]), "--save_steps", str(fs["eval_steps"]),
           "--export", "false", "--output_dir", str(lcm_dir)]  # fmt: skip
    stages = [  # (name, command, the stages it reads)
        ("qat", [*launch, "--output_dir", str(qat_dir), "--max_steps", str(s["qat_steps"]),
                 "--save_steps", str(s["qat_steps"]), "--eval_steps", str(s["qat_steps"])], ()),
        # the calibrated student before any training: one step at learning rate 0, no EMA
        ("qat-start", [*launch, "--output_dir", str(start_dir), "--max_steps", "1", "--learning_rate", "0",
                       "--use_ema", "false", "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no",
                       "--load_best_model_at_end", "false"], ()),
        ("ptq", [*ov_sd, "ptq", "--mode", "full", *ptq, "--output", str(ptq_dir)], ()),
        ("ptq-hybrid", [*ov_sd, "ptq", "--mode", "hybrid", *ptq, "--output", str(hybrid_dir)], ()),
        ("lcm", lcm, ()),  # after the short stages: it and eval then overlap
        ("eval", [*ov_sd, "eval", "--reference", reference, "--model", f"qat={qat_dir / OPENVINO_DIR}",
                  "--model", f"qat-start={start_dir / OPENVINO_DIR}", "--model", f"ptq={ptq_dir}",
                  "--model", f"ptq-hybrid={hybrid_dir}", "--output", str(eval_dir), "--subset", str(s["eval_prompts"]),
                  "--seeds", str(s["eval_seeds"]), "--threads", "1", "--no-progress"],
         ("qat", "qat-start", "ptq", "ptq-hybrid")),
    ]  # fmt: skip
    report: dict = dict(thresholds_file=str(args.thresholds), thresholds=thresholds, stages=[], checks=[])
    t0 = time.perf_counter()
    ok = _run_stages(stages, args.jobs, logs, env, report, cwd=out)
    if ok:
        try:
            eval_result = json.loads((eval_dir / "eval.json").read_text())
            export_results = json.loads((qat_dir / OPENVINO_DIR / RESULTS_FILE).read_text())
            run_checks(report, thresholds, eval_result, export_results)
            infos = [json.loads((d / FINAL_DIR / TRAINING_INFO_FILE).read_text())
                     for d in (lcm_dir / FLOAT_PHASE_DIR, lcm_dir)]  # fmt: skip
            run_few_step_checks(report, fs, *infos)
        except (OSError, KeyError, ValueError) as e:
            _check(report, "read stage outputs", repr(e), "readable", False)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["passed"] = ok and all(c["passed"] for c in report["checks"])
    (out / "regression.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "regression.md").write_text(text + "\n")
    print(text)
    return 0 if report["passed"] else 1
