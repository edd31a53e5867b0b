"""The training examples' latents: every photo encoded by the (frozen) VAE once, and each step a fresh draw from
its posterior (exactly what encoding every step would give), mirrored for --flip; beside each draw, where its
square came from, which SDXL is conditioned on (its micro-conditioning, as diffusers' DreamBooth-SDXL script)."""
from typing import NamedTuple

import torch


class Encoded(NamedTuple):
    """One subject's (or class's) photos through the VAE: posterior mean and log-variance [N, 2·4, h, w], the same
    of the mirrored photos (for --flip), and each photo's crop [N, 3, 2]: original size, corner, mirrored corner
    (photos.Crop); and the VAE's scaling factor (SD 0.18215, SDXL 0.13025), which z is multiplied by."""
    moments: torch.Tensor
    moments_flipped: torch.Tensor
    crops: torch.Tensor
    scale: float


class Draw(NamedTuple):
    z: torch.Tensor        # [n, 4, h, w], times the VAE's scaling factor
    rows: list             # which photo each row is
    crops: tuple           # (original sizes [n, 2], crop corners [n, 2]): SDXL's micro-conditioning of each row


@torch.no_grad()
def encode(model, images, crops, flip: bool) -> Encoded:
    p = next(model.vae.parameters())
    chunks = [torch.stack(images[i:i + 4]).to(p.device, p.dtype) for i in range(0, len(images), 4)]  # 4 at a time
    moments = [torch.cat(model.vae.encode(x), 1) for x in chunks]
    flipped = [torch.cat(model.vae.encode(x.flip(-1)), 1) for x in chunks] if flip else moments
    return Encoded(torch.cat(moments).float(), torch.cat(flipped).float(), torch.tensor(crops),
                   model.vae.cfg.scaling_factor)


def draw(encoded: Encoded, a, gen) -> Draw:
    """a.batch_size random (photo, flip) draws, z = mean + σ·ε, from one generator on the CPU (so that every
    device draws the same); a flipped draw's corner is the mirrored photo's."""
    n = a.batch_size
    idx = torch.randint(len(encoded.moments), (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5 if a.flip else torch.zeros(n, dtype=torch.bool)
    m = torch.where(flip[:, None, None, None].to(encoded.moments.device), encoded.moments_flipped[idx],
                    encoded.moments[idx])
    mean, logvar = m.chunk(2, dim=1)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(mean.device)
    crops = encoded.crops[idx]
    return Draw(z * encoded.scale, idx.tolist(), (crops[:, 0], torch.where(flip[:, None], crops[:, 2], crops[:, 1])))


def whole(a):
    """A Cut-Mix collage is an image made at the target size: original (R, R), corner (0, 0) (its halves come from
    crops of two photos; no one original size describes it)."""
    return torch.full((a.batch_size, 2), a.resolution), torch.zeros(a.batch_size, 2, dtype=torch.long)


def micro_conditioning(sizes, a) -> dict:
    """sd.encode_prompts' SDXL sizes for the batch's rows (ignored by SD 1.x/2.x): each row's own photo's."""
    return dict(original_size=torch.cat([o for o, _ in sizes]), crop_top_left=torch.cat([c for _, c in sizes]),
                target_size=(a.resolution, a.resolution))
