"""The tiny SD1 / SD2 families and the LDM converter (benchmarks/ldm.py, shared with the benchmarks), and the tiny
SDXL family, built on conftest.make_sdxl_dir. The SDXL family keeps the rules a loader reads from shapes, as the
others do (64-dim heads, 32 groups, 256 features per size id)."""
import os

from benchmarks.ldm import FAMILIES, TEXT, VAE, make_family_dir, save_ldm, to_ldm  # noqa: F401 -- the tests' names for them

# SDXL: no attention on the first level, a transformer depth per level ([1, 2, 10] in SDXL base; 1 where a level does
# not attend; the mid block has the last level's), a context of both encoders' widths (128 + 192), the added
# embedding of [pooled (96); 6 ids x 256]; bigG's projection is narrower than its width, so that a projection read
# untransposed cannot load.
XL_TEXT = dict(TEXT, num_hidden_layers=3, bos_token_id=0, eos_token_id=2, pad_token_id=1)  # SDXL's ids
SDXL = dict(unet=dict(sample_size=8, block_out_channels=(64, 64, 128), layers_per_block=2, cross_attention_dim=320,
                      attention_head_dim=[1, 1, 2], transformer_layers_per_block=[1, 2, 1], use_linear_projection=True,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=96 + 6 * 256),
            vae=dict(VAE, scaling_factor=0.13025, force_upcast=True),
            text=dict(XL_TEXT, hidden_act="quick_gelu"),
            text_2=dict(XL_TEXT, hidden_size=192, intermediate_size=384, num_attention_heads=3, hidden_act="gelu",
                        projection_dim=96))
# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                  "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
                  "use_karras_sigmas": False}
SDXL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
              "feature_extractor": [None, None], "image_encoder": [None, None],
              "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
              "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
              "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def make_sdxl_family_dir(path, seed=0):
    """A diffusers SDXL folder of the tiny SDXL family (conftest.make_sdxl_dir's layout) with SDXL base's published
    scheduler config and model_index.json (which diffusers' from_single_file reads for the components); returns the
    reference modules as a namespace (unet, vae, text_encoder, text_encoder_2)."""
    import json
    from types import SimpleNamespace
    from conftest import make_sdxl_dir
    refs = make_sdxl_dir(path, seed, unet_kwargs=SDXL["unet"], vae_kwargs=SDXL["vae"], text_kwargs=SDXL["text"],
                         text_2_kwargs=SDXL["text_2"])
    for name, content in (("scheduler/scheduler_config.json", SDXL_SCHEDULER), ("model_index.json", SDXL_INDEX)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f)
    return SimpleNamespace(**refs)
