"""VideoCrafter2: its pieces against references written here from the authors' formulas (AILab-CVC/VideoCrafter, lvdm/),
its key layout against an enumeration of their construction order (vc2_layout.py), a tiny synthetic model.ckpt
loaded and sampled, and the files npo refuses."""
import numpy as np
import pytest
import torch

from npo import sampler

import vc2_layout


# ----------------------------------------------------------------------------------------------------------
# The x̂0 rescale: lvdm's DDIMSampler (lvdm/models/samplers/ddim.py, lvdm/models/utils_diffusion.py), rewritten here.

def lvdm_ddim(eps_fn, x, steps, eta, noises, scale_a=1.0, scale_b=0.7, mid_step=400):
    """lvdm's DDIM loop with use_scale, in float64 numpy schedules as there: timesteps range(0, 1000, 1000 // S) + 1;
    ᾱ_prev = [ᾱ_0] + ᾱ[ts[:-1]]; scale_arr = [linspace(a, b, mid_step); b ...]; pred_x0 /= s_t;
    x_prev = √ᾱ_prev s_prev pred_x0 + √(1 − ᾱ_prev − σ²) e_t + σ z."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    ac = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32).numpy()  # lvdm registers it as float32
    ts = np.asarray(list(range(0, 1000, 1000 // steps))) + 1
    alphas, alphas_prev = ac[ts], np.asarray([ac[0]] + ac[ts[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    scale_arr = np.concatenate((np.linspace(scale_a, scale_b, mid_step), np.full(1000, scale_b)))
    scale_arr = torch.tensor(scale_arr, dtype=torch.float32).numpy()
    s, s_prev = scale_arr[ts], np.asarray([scale_arr[0]] + scale_arr[ts[:-1]].tolist())
    for i, step in enumerate(np.flip(ts)):
        index = len(ts) - i - 1
        e_t = eps_fn(x, int(step))
        pred_x0 = (x - float(np.sqrt(1 - alphas[index])) * e_t) / float(np.sqrt(alphas[index]))
        pred_x0 = pred_x0 / float(s[index])
        dir_xt = float(np.sqrt(1 - alphas_prev[index] - sigmas[index] ** 2)) * e_t
        noise = float(sigmas[index]) * noises[i] if eta else 0
        x = float(np.sqrt(alphas_prev[index]) * s_prev[index]) * pred_x0 + dir_xt + noise
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_rescale_is_lvdms(eta):
    """VideoCrafter2's scheduler config (videocrafter.SCHEDULER) in sampler.ddim_sample gives lvdm's DDIM, x̂0 rescale
    and all, for a fixed ε function (steps that cross mid_step = 400)."""
    from npo import videocrafter
    steps, shape = 10, (1, 4, 2, 3, 3)
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3

    def eps_fn(x, t):  # any smooth function of (x, t)
        return torch.einsum("oc,bcfhw->bofhw", weight, x) * (1 + t / 1000)

    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    noises = [torch.randn(shape, generator=gen) for _ in range(steps)]
    expected = lvdm_ddim(eps_fn, x_T, steps, eta, noises)
    cfg = sampler.pipeline_config(videocrafter.SCHEDULER)
    got = sampler.ddim_sample(lambda x, t: eps_fn(x, int(t)), x_T, cfg, steps, eta,
                              generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    plain = sampler.ddim_sample(lambda x, t: eps_fn(x, int(t)), x_T, sampler.pipeline_config(
        {**videocrafter.SCHEDULER, "use_scale": False}), steps, eta, generator=torch.Generator().manual_seed(2))
    assert (plain - expected).abs().max() > 1e-2  # the rescale matters at this size


def test_other_samplers_refuse_the_rescale():
    from npo import videocrafter
    from npo.checkpoint import UserError
    for name in ("dpmpp-2m", "euler"):
        with pytest.raises(UserError, match="--sampler ddim"):
            sampler.sampler_config(name, videocrafter.SCHEDULER)
