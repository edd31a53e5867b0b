"""The Stable Diffusion noise schedule and the DDIM sampler (Song et al. 2021), as SD ships them; DDIM run backwards
is one step here (`ddim_inverse_step`), and the inversion loop of SVDiff's Eq. 6 is svdiff.ddim_invert.

Matches diffusers' DDIMScheduler / DDIMInverseScheduler with SD's configuration: scaled_linear betas
0.00085 -> 0.012 over 1000 steps, "leading" timesteps with offset 1, set_alpha_to_one False, no clipping.
Facts: shared/reference/sd_weights_and_sampling.md §5. ᾱ_t below is `alphas_cumprod[t]`.
"""
import torch
from tqdm import tqdm


def alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012) -> torch.Tensor:
    """ᾱ_t = Π(1 - β_s), with β linear in sqrt space ("scaled_linear"); fp32 as diffusers computes it."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def timesteps(num_steps: int, num_train_timesteps=1000):
    """The descending timesteps of an N-step sampler, SD's "leading" spacing: 0, r, 2r, ... + 1 with r = 1000 // N
    (what the samplers' step t -> t - r assumes)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"the number of steps must be between 1 and {num_train_timesteps}, got {num_steps}")
    r = num_train_timesteps // num_steps
    # the offset 1 may not push the last step past the schedule: N = 1000 gives 0..999 (diffusers fails there)
    offset = min(1, num_train_timesteps - 1 - (num_steps - 1) * r)
    return (torch.arange(num_steps) * r + offset).flip(0).long()


def add_noise(x0, noise, t, alphas_cumprod):
    """Forward process q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (DDPM eq. 4). t: [B] timesteps."""
    a = alphas_cumprod.to(x0.device)[t].to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def velocity(x0, noise, t, alphas_cumprod):
    """The v-prediction target v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022), SD 2.x 768-v models."""
    a = alphas_cumprod.to(x0.device)[t].to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def to_eps_and_x0(model_output, x_t, alpha_t, prediction_type):
    """The model's output as (ε, x_0) at noise level ᾱ_t, for ε- or v-prediction."""
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - (1 - alpha_t) ** 0.5 * eps) / alpha_t ** 0.5
    elif prediction_type == "v_prediction":
        x0 = alpha_t ** 0.5 * x_t - (1 - alpha_t) ** 0.5 * model_output
        eps = alpha_t ** 0.5 * model_output + (1 - alpha_t) ** 0.5 * x_t
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r}; use epsilon or v_prediction")
    return eps, x0


def guidance(out_uncond, out_cond, scale):
    """Classifier-free guidance (Ho & Salimans 2022): out_u + s (out_c - out_u)."""
    return out_uncond + scale * (out_cond - out_uncond)


def _alpha(alphas_cumprod, t):
    # a negative index means "before the first step": ᾱ[0], since SD sets set_alpha_to_one=False
    return alphas_cumprod[t] if t >= 0 else alphas_cumprod[0]


def ddim_step(model_output, x_t, t, t_prev, alphas_cumprod, eta=0.0, noise=None, prediction_type="epsilon"):
    """x_t -> x_{t_prev} (DDIM eq. 12): √ᾱ' x̂_0 + √(1-ᾱ'-σ²) ε̂ + σ z, σ = η √((1-ᾱ')/(1-ᾱ)) √(1-ᾱ/ᾱ')."""
    a_t, a_prev = _alpha(alphas_cumprod, t), _alpha(alphas_cumprod, t_prev)
    eps, x0 = to_eps_and_x0(model_output, x_t, a_t, prediction_type)
    sigma = eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_inverse_step(model_output, x, t, t_src, alphas_cumprod, prediction_type="epsilon"):
    """DDIM run backwards, x_{t_src} -> x_t (SVDiff Eq. 6 builds on it): x̂_0 from the source level, then
    √ᾱ_t x̂_0 + √(1-ᾱ_t) ε̂, as diffusers' DDIMInverseScheduler.step."""
    a_src, a_t = _alpha(alphas_cumprod, t_src), _alpha(alphas_cumprod, t)
    eps, x0 = to_eps_and_x0(model_output, x, a_src, prediction_type)
    return a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps


def sample(denoise, latents, num_steps, alphas_cumprod, eta=0.0, generator=None, prediction_type="epsilon",
           progress=True):
    """The DDIM sampling loop. denoise(x, t) -> model output (with guidance already applied). With η > 0 each
    step draws its noise from `generator` on the generator's device, in the model output's dtype, like diffusers."""
    ts = timesteps(num_steps).tolist()
    step = 1000 // num_steps
    alphas_cumprod = alphas_cumprod.to(latents.device)
    x = latents
    for t in tqdm(ts, desc="sampling", disable=not progress):
        out = denoise(x, t)
        noise = None
        if eta > 0:
            gen_device = generator.device if generator is not None else x.device
            noise = torch.randn(out.shape, generator=generator, device=gen_device, dtype=out.dtype).to(x.device)
        x = ddim_step(out, x, t, t - step, alphas_cumprod, eta, noise, prediction_type).to(latents.dtype)
    return x
