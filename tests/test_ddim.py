"""ddim.py equals diffusers' DDIMScheduler / DDIMInverseScheduler configured as SD ships them."""
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

import ddim
import svdiff
import tiny

A = ddim.alphas_cumprod()


def scheduler(cls=DDIMScheduler, **kw):
    cfg = {k: v for k, v in tiny.SCHEDULER.items() if not k.startswith("_")}
    return cls(**{**cfg, **kw})


def test_schedule_equals_diffusers():
    assert (A - scheduler().alphas_cumprod).abs().max() <= 1e-7


@pytest.mark.parametrize("n", [1, 7, 10, 30, 50, 999])
def test_timesteps_equal_diffusers(n):
    s = scheduler(timestep_spacing="leading")
    s.set_timesteps(n)
    assert ddim.timesteps(n).tolist() == s.timesteps.tolist()


def test_a_thousand_steps_visit_every_timestep_once():
    """diffusers' leading spacing with offset 1 would ask for t = 1000, past the schedule, and fail."""
    assert ddim.timesteps(1000).tolist() == list(range(999, -1, -1))
    x = torch.randn(1, 4, 2, 2)
    assert torch.isfinite(ddim.sample(toy_denoiser, x, 1000, A, progress=False)).all()


@pytest.mark.parametrize("bad", [0, 1001])
def test_step_count_out_of_range_is_an_error(bad):
    with pytest.raises(ValueError, match="between 1 and 1000"):
        ddim.timesteps(bad)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_step_equals_diffusers_including_the_last(prediction_type, eta):
    s = scheduler(prediction_type=prediction_type)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    for t in s.timesteps.tolist():
        x, out, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        ref = s.step(out, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
        ours = ddim.ddim_step(out, x, t, t - 100, A, eta, noise if eta else None, prediction_type)
        assert (ours - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inverse_step_equals_diffusers(prediction_type):
    s = scheduler(DDIMInverseScheduler, prediction_type=prediction_type)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    for t in s.timesteps.tolist():
        x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        ref = s.step(out, t, x).prev_sample
        assert (ddim.ddim_inverse_step(out, x, t, t - 100, A, prediction_type) - ref).abs().max() <= 1e-6


def toy_denoiser(x, t):
    return torch.tanh(x) * (t / 1000) + 0.1 * x


def test_sampling_loop_with_eta_draws_noise_like_diffusers():
    s = scheduler()
    s.set_timesteps(20)
    g = torch.Generator().manual_seed(42)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ref = x.clone()
    for t in s.timesteps:
        ref = s.step(toy_denoiser(ref, int(t)), t, ref, eta=0.5, generator=g).prev_sample
    g2 = torch.Generator().manual_seed(42)
    x2 = torch.randn(2, 4, 8, 8, generator=g2)
    ours = ddim.sample(toy_denoiser, x2, 20, A, eta=0.5, generator=g2, progress=False)
    assert (ours - ref).abs().max() <= 1e-5  # 20 steps of fp32 rounding on values up to ~8


def test_inversion_loop_equals_diffusers():
    s = scheduler(DDIMInverseScheduler)
    s.set_timesteps(25)
    x = torch.randn(1, 4, 8, 8)
    ref = x.clone()
    for t in s.timesteps:
        ref = s.step(toy_denoiser(ref, int(t)), t, ref).prev_sample
    assert (svdiff.ddim_invert(toy_denoiser, x, 25, A, progress=False, model_at="target") - ref).abs().max() <= 1e-6
    ref = x.clone()  # the same scheduler steps, the model evaluated at each step's source level
    for t in s.timesteps:
        ref = s.step(toy_denoiser(ref, max(int(t) - 40, 0)), t, ref).prev_sample
    assert (svdiff.ddim_invert(toy_denoiser, x, 25, A, progress=False) - ref).abs().max() <= 1e-6


def test_training_targets_equal_diffusers():
    s = scheduler()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    assert (ddim.add_noise(x0, noise, t, A) - s.add_noise(x0, noise, t)).abs().max() <= 1e-6
    assert (ddim.velocity(x0, noise, t, A) - s.get_velocity(x0, noise, t)).abs().max() <= 1e-6
