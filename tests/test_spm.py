"""SPO's step-aware preference model (`spm:PATH`, scorers.StepAwarePreference) against a reference built here: a
transformers CLIPModel on tiny random weights, with the timestep embedder and the adaLN modulation written out in
this file from SPO's description (DiT's adaLN in each vision layer, a (shift, scale) of the pooled output), loaded
from a .bin in the published key layout (`model.` + the CLIP's keys, `model.t_embedder.mlp.*`,
`model.vision_model.encoder.layers.N.adaLN_modulation.1.*`, `model.vision_model.adaLN_modulation.1.*`); the
timestep keyword of rewards.py through its wrappers; a malformed file through the CLI."""
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from npo import clip
import npo
from npo import rewards
from npo import scorers
from conftest import randomize
from test_evaluate import write_folder

# widths whose heads follow OpenCLIP's rule (64 per head; the image tower at most 16), as PickScore's CLIP-H does:
# the text tower 128 wide has 2 heads, the image tower 192 wide 3; 224 px input at patch 32 is 7 x 7 patches
TEXT = dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="gelu", eos_token_id=2)
VISION = dict(hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=3, image_size=224,
              patch_size=32, hidden_act="gelu")
PROMPTS = ["a red circle", "a blue square on a table"]


class Reference:
    """transformers' CLIPModel plus SPO's time conditioning, each piece written here: t_embedder (sinusoid by
    diffusers' get_timestep_embedding, cos first, then Linear-SiLU-Linear), per layer Linear(SiLU(c)) → 6 chunks
    (shift, scale, gate for attention, then for the MLP), and Linear(SiLU(c)) → (shift, scale) of the pooled output."""

    def __init__(self, seed=0):
        from transformers import CLIPConfig, CLIPModel
        torch.manual_seed(seed)
        self.clip = randomize(CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=64)), seed).eval()
        g = torch.Generator().manual_seed(seed + 1)
        d, n = VISION["hidden_size"], VISION["num_hidden_layers"]

        def linear(fan_in, fan_out, gain=1.0):
            return (torch.randn(fan_out, fan_in, generator=g) * gain / fan_in ** 0.5, torch.randn(fan_out, generator=g) * 0.3)
        self.t_mlp = [linear(256, d), linear(d, d)]
        self.layer_mod = [linear(d, 6 * d, 0.3) for _ in range(n)]
        self.final_mod = linear(d, 2 * d, 0.3)

    def extra_state(self):
        """The time-conditioning weights under the published file's keys."""
        state = {}
        for i, (w, b) in zip((0, 2), self.t_mlp):
            state[f"model.t_embedder.mlp.{i}.weight"], state[f"model.t_embedder.mlp.{i}.bias"] = w, b
        for k, (w, b) in enumerate(self.layer_mod):
            prefix = f"model.vision_model.encoder.layers.{k}.adaLN_modulation.1"
            state[f"{prefix}.weight"], state[f"{prefix}.bias"] = w, b
        state["model.vision_model.adaLN_modulation.1.weight"], state["model.vision_model.adaLN_modulation.1.bias"] = \
            self.final_mod
        return state

    def write_bin(self, path, drop=(), reshape=None):
        """torch.save of a plain state dict in the published layout (old transformers' position_ids included)."""
        state = {f"model.{k}": v for k, v in self.clip.state_dict().items()}
        state["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        state.update(self.extra_state())
        for k in drop:
            del state[k]
        if reshape:
            state[reshape] = state[reshape][:-1]
        torch.save(state, path)
        return str(path)

    @torch.no_grad()
    def score(self, pixels, input_ids, t):
        from diffusers.models.embeddings import get_timestep_embedding
        m = self.clip
        features = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)  # [cos, sin]
        c = F.linear(F.silu(F.linear(features, *self.t_mlp[0])), *self.t_mlp[1])
        v = m.vision_model
        x = v.pre_layrnorm(v.embeddings(pixels))
        for layer, mod in zip(v.encoder.layers, self.layer_mod):
            b1, s1, g1, b2, s2, g2 = (u[:, None] for u in F.linear(F.silu(c), *mod).chunk(6, dim=1))
            x = x + g1 * layer.self_attn(layer.layer_norm1(x) * (1 + s1) + b1, attention_mask=None)[0]
            x = x + g2 * layer.mlp(layer.layer_norm2(x) * (1 + s2) + b2)
        shift, scale = F.linear(F.silu(c), *self.final_mod).chunk(2, dim=1)
        image = m.visual_projection(v.post_layernorm(x[:, 0]) * (1 + scale) + shift)
        text = m.get_text_features(input_ids=input_ids).pooler_output
        image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
        return m.logit_scale.exp() * (image * text).sum(-1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference()
    return ref, ref.write_bin(tmp_path_factory.mktemp("spm") / "sd-v1-5_step-aware_preference_model.bin")


def reference_pixels(images, h_new, w_new):
    """SPO's preprocessing with its sizes worked out by hand: bicubic (no antialias) to (h_new, w_new), the center
    224 x 224, clamp, CLIP's mean and std."""
    x = F.interpolate(images, size=(h_new, w_new), mode="bicubic", align_corners=False)
    top, left = round((h_new - 224) / 2), round((w_new - 224) / 2)
    x = x[..., top:top + 224, left:left + 224].clamp(0, 1)
    mean, std = torch.tensor(clip.CLIP_MEAN).view(3, 1, 1), torch.tensor(clip.CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def token_ids(prompts):
    return clip.load_tokenizer(scorers.BUNDLED_TOKENIZER)(prompts)


# SPO's scores are logits, exp(logit_scale) · cos; a float32 CLIP on 224 px agrees with another to ~1e-5 of them
ATOL = 2e-4


@pytest.mark.parametrize("size, resized", [((224, 224), (224, 224)), ((32, 48), (224, 336)), ((305, 200), (342, 224)),
                                          ((640, 512), (280, 224))])
def test_scores_match_the_reference_at_several_timesteps(reference, size, resized):
    ref, path = reference
    spm = rewards.load(f"spm:{path}")
    assert rewards.takes_timesteps(spm) and isinstance(spm, scorers.StepAwarePreference)
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 1.2 - 0.1  # also outside [0, 1]
    pixels, ids = reference_pixels(images, *resized), token_ids(PROMPTS)
    seen = []
    for t in ([0, 0], [500, 500], [999, 999], [20, 741]):
        t = torch.tensor(t)
        expected = ref.score(pixels, ids, t)
        torch.testing.assert_close(spm(images, PROMPTS, timesteps=t), expected, rtol=0, atol=ATOL)
        seen.append(expected)
    # the timestep matters: a model that ignored it could not match all four
    assert min((a - b).abs().max().item() for a, b in zip(seen, seen[1:])) > 100 * ATOL
    # no timesteps, or one int for all: t = 0 (how SPO scores its finished images), or that t for every row
    torch.testing.assert_close(spm(images, PROMPTS), seen[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(spm(images, PROMPTS, timesteps=999), seen[2], rtol=0, atol=ATOL)


def test_score_pil_is_the_processor_path_at_t_zero(reference):
    """`npo.py evaluate` scores PIL images with CLIPImageProcessor's preprocessing (clip.pixels_from_pil) at t = 0."""
    ref, path = reference
    spm = scorers.load("spm", path)
    g = torch.Generator().manual_seed(2)
    pictures = [Image.fromarray((torch.rand(40, 30, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]
    expected = ref.score(clip.pixels_from_pil(pictures), token_ids(PROMPTS), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(spm.score_pil(pictures, PROMPTS), expected, rtol=0, atol=ATOL)


def test_the_timestep_passes_through_the_reward_wrappers(reference):
    """rewards.score gives a timestep-aware reward its t through checked / affine / sigmoid / negate, and calls a
    reward without the property as r(images, prompts)."""
    _, path = reference
    spm = scorers.load("spm", path)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([100, 900])
    raw = spm(images, PROMPTS, timesteps=t)
    low, high = raw.min().item() - 1, raw.max().item() + 1
    mapped = rewards.affine(spm, low, high)
    assert rewards.takes_timesteps(mapped) and rewards.takes_timesteps(rewards.negate(mapped))
    torch.testing.assert_close(rewards.score(rewards.checked(spm), images, PROMPTS, t), raw)
    torch.testing.assert_close(rewards.score(rewards.negate(mapped), images, PROMPTS, t), 1 - (raw - low) / (high - low))
    torch.testing.assert_close(rewards.score(rewards.sigmoid(spm, 10.0), images, PROMPTS, t), torch.sigmoid(raw / 10))
    assert not torch.allclose(rewards.score(mapped, images, PROMPTS, t), rewards.score(mapped, images, PROMPTS))

    def blind(images, prompts):  # takes no timesteps keyword: calling it with one would raise TypeError
        return images.mean(dim=(1, 2, 3))
    assert not rewards.takes_timesteps(rewards.checked(blind))
    torch.testing.assert_close(rewards.score(rewards.checked(blind), images, PROMPTS, t), images.mean(dim=(1, 2, 3)))
    assert rewards.probe(spm, PROMPTS) is True  # differentiable in the pixels, as PickScore


def test_a_malformed_file_is_one_sentence_exit_2(reference, tiny_model, tmp_path, capsys):
    """A file missing the adaLN layers (PickScore's plain CLIP under `model.`), one with a misshaped modulation, and
    one in another key layout: one sentence each, exit 2, from train and from evaluate."""
    ref, _ = reference
    plain = ref.write_bin(tmp_path / "plain.bin", drop=[k for k in ref.extra_state() if "adaLN" in k])
    misshaped = ref.write_bin(tmp_path / "misshaped.bin", reshape="model.vision_model.adaLN_modulation.1.bias")
    unprefixed = tmp_path / "unprefixed.bin"
    torch.save(ref.clip.state_dict(), unprefixed)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    folders = [write_folder(tmp_path / name, [10, 20, 30, 40]) for name in ("a", "b")]
    for bad, words in ((plain, "missing keys"), (misshaped, "misshaped keys"), (unprefixed, "not a step-aware")):
        train = ["train", "--model", tiny_model[0], "--method", "reward", "--reward", f"spm:{bad}", "--prompts-file",
                 str(prompts), "--out", str(tmp_path / "run"), "--steps", "1", "--resolution", "16", "--device", "cpu"]
        for argv in (train, ["evaluate", *folders, "--scorer", f"spm:{bad}", "--out", str(tmp_path / "report")]):
            assert npo.main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert words in err and "step-aware" in err and "Traceback" not in err and len(err.splitlines()) == 1
        assert not (tmp_path / "run").exists()


def test_timestep_features_are_dits_sinusoid():
    """features(t)_i = cos(t · 10000^(−i/128)), then the sines, written out for one t."""
    t = torch.tensor([37])
    i = torch.arange(128, dtype=torch.float64)
    angles = 37 * torch.exp(-math.log(10000) * i / 128)
    torch.testing.assert_close(scorers.timestep_features(t)[0].double(), torch.cat([angles.cos(), angles.sin()]),
                               rtol=0, atol=1e-5)
