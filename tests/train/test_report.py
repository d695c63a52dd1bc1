"""What a finished run reports (`train/report.py`): the loss plot."""


def test_one_loss_plot_for_every_kind_of_run(tmp_path, monkeypatch):
    """`train.report.plot_losses` draws the QAT, consistency and tiny-decoder runs' logs: the losses > 0 on a log
    axis, the held-out PSNR a run evaluates on a right axis; a log without losses or PSNR gives no plot."""
    import matplotlib.figure

    from ov_sd_trainer.train.report import PSNR_CURVES, plot_losses

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path: drawn.append(fig) or path.touch())
    logs = {
        "qat": [{"step": s, "loss": 1 / s, "task_loss": 0.0, "distillation_loss": 1 / s} for s in (1, 2)],
        "consistency": [{"step": 1, "loss": 0.5}, {"step": 2, "eval_few_step_psnr": 14.0}],
        "decoder": [{"step": 1, "loss": 0.5, "pixel_loss": 0.5}, {"step": 2, "eval_psnr": 15.8}],
    }
    for kind, log in logs.items():
        assert plot_losses(log, tmp_path / f"{kind}.png") == tmp_path / f"{kind}.png"
    axes = [fig.axes for fig in drawn]
    assert [len(a) for a in axes] == [1, 2, 2]  # a right axis only where a PSNR is logged
    assert [line.get_label() for line in axes[0][0].lines] == ["total", "distillation"]  # task 0: not drawn
    assert [a[1].lines[0].get_label() for a in axes[1:]] == [
        PSNR_CURVES["eval_few_step_psnr"],
        PSNR_CURVES["eval_psnr"],
    ]
    assert plot_losses([{"step": 1, "eval_teacher_mse": 0.1}], tmp_path / "none.png") is None
