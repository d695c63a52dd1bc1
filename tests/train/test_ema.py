"""The EMA callback: exact update maths, CPU residency, equivalence with diffusers' EMAModel."""

import torch
from diffusers.training_utils import EMAModel

from ov_sd_trainer.train.ema import EMACallback, ema_decay


def test_decay_schedule_matches_diffusers():
    ref = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999)
    ref_warm = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999, use_ema_warmup=True, power=0.75)
    for step in range(1, 200):
        assert ema_decay(step, 0.999) == ref.get_decay(step)
        assert ema_decay(step, 0.999, use_warmup=True, power=0.75) == ref_warm.get_decay(step)
    assert ema_decay(1, 0.999) == 0.0  # the first update copies the parameters
    assert ema_decay(3, 0.999) == (1 + 2) / (10 + 2)
    assert ema_decay(10**6, 0.999) == 0.999  # capped at decay, not overwritten by it


def test_update_maths_on_known_tensors():
    m = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMACallback(m, decay=0.9)
    assert ema.shadow["weight"].device.type == "cpu"
    expected = torch.tensor([[1.0, 2.0]])
    for step, new in enumerate([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], start=1):
        with torch.no_grad():
            m.weight.copy_(torch.tensor([new]))
        ema.step()
        d = 0.0 if step == 1 else min((1 + step - 1) / (10 + step - 1), 0.9)
        expected = expected - (1 - d) * (expected - torch.tensor([new]))
        assert torch.allclose(ema.shadow["weight"], expected, atol=0, rtol=1e-6), step
    # step 1 copies, step 2 uses decay 2/11, step 3 uses 3/12
    assert ema.optimization_step == 3


def test_same_as_diffusers_emamodel_and_copy_to():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    ours = EMACallback(m, decay=0.95)
    ref = EMAModel(m.parameters(), decay=0.95)
    for _ in range(30):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ours.step()
        ref.step(m.parameters())
    for s_ours, s_ref in zip(ours.shadow.values(), ref.shadow_params, strict=True):
        assert torch.allclose(s_ours, s_ref, atol=1e-7)
    snapshot = [p.detach().clone() for p in m.parameters()]
    ours.copy_to()
    after = [p.detach().clone() for p in m.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(snapshot, after))
    for a, s in zip(after, ours.shadow.values()):
        assert torch.equal(a, s)


def test_warmup_and_power_updates_as_diffusers_emamodel():
    """`ema_use_warmup` / `ema_power`: the callback's shadow follows diffusers' EMAModel with the same warm-up."""
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    ours = EMACallback(m, decay=0.999, use_warmup=True, power=0.75)
    ref = EMAModel(m.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    plain = EMACallback(m, decay=0.999)
    for _ in range(20):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ours.step()
        ref.step(m.parameters())
        plain.step()
    for s_ours, s_ref in zip(ours.shadow.values(), ref.shadow_params, strict=True):
        assert torch.allclose(s_ours, s_ref, atol=1e-7)
    assert any(not torch.allclose(a, b) for a, b in zip(ours.shadow.values(), plain.shadow.values()))


def test_only_trainable_parameters_and_save_load(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    m[0].requires_grad_(False)
    ema = EMACallback(m, decay=0.5)
    assert set(ema.shadow) == {"1.weight", "1.bias"}
    ema.step()
    ema.step()
    ema.save(tmp_path)
    other = EMACallback(m, decay=0.5)
    other.load(tmp_path)
    assert other.optimization_step == 2
    for k in ema.shadow:
        assert torch.equal(ema.shadow[k], other.shadow[k])
