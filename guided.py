"""NPO guidance (sec. 3.2 of the paper, eq. 10) on a loaded pipeline, and `generate`: the pipeline's modules turned into
the denoiser a sampler steps with. Eq. 10's weights of the two CFG branches are `sampler.npo_weights`, beside
`cfg_combine`; every guided path here (and in reward training) takes them from there.

    pipe = pipeline.load_pipeline("path/to/sd15")               # or pipeline.DEFAULT_MODEL, the embedded one
    guided.load_offset(pipe, [("dpo.safetensors", 1.0)], "eta")   # η, the preference offset (UNet + text encoder)
    guided.load_offset(pipe, [("npo.safetensors", 1.0)], "delta") # δ, the NPO offset
    images = guided.generate(pipe, ["a red circle"], seeds=[0], alpha=1.0, beta=1.0)   # (B, 3, H, W) in [-1, 1]
    videos = guided.generate(video_pipe, ["a red circle moving left"], [0], frames=16)  # (B, F, 3, H, W)

with g the guidance scale in diffusers' convention:

    ε = ε_neg + g · (ε_pos − ε_neg),   ε_pos = ε(x_t, c; θ + η),   ε_neg = ε(x_t, c'; θ + α·η + β·δ)

computed with one copy of θ: η and δ stay unmerged LoRA offsets whose multipliers differ per batch row, and each
step is one forward of [x_t; x_t] (`npo_multipliers`, `guided_denoiser`). `merged_unets` builds the authors'
two weight sets instead, as a reference. A LoRA with text-encoder keys makes η (or δ) a pair of offsets, on the
UNet and on the text encoder; the same multipliers apply to both, so c' is encoded by θ_te + α·η_te + β·δ_te and
c by θ_te + η_te (eq. 10 read for the whole model). A fully fine-tuned model as η (η = θ_ft − θ, dense) runs two
weight sets, θ_ft and θ + α·η (`attach_eta_model`, `dense_eta`); a whole NPO-tuned UNet as δ (δ = θ_δ − θ, dense)
two as well, θ + η and θ + α·η + β·δ, or θ_ft and θ + α·η + β·δ (`attach_npo_model`). The sampler (DDIM,
DPM-Solver++ 2M, Euler, ...) only sees the denoiser.
"""
import torch

from . import checkpoint
from . import lora
from . import pipeline
from . import sampler
from . import unet
from . import video
from .checkpoint import UserError


# ----------------------------------------------------------------------------------------------------------
# NPO guidance (sec. 3.2 of the paper): one small function per idea.

def npo_multipliers(batch, alpha, beta, device="cpu"):
    """Eq. 10's branch weights (`sampler.npo_weights`) as LoRA multipliers per row of one batched forward of
    [x_t (negative rows); x_t (positive rows)]: the negative rows run θ + α·η + β·δ, the positive rows θ + η,

        η: [α]*B + [1]*B,   δ: [β]*B + [0]*B.

    α and β may also hold one value per image (a sweep over α × β in one batch)."""
    def rows(value):
        return torch.as_tensor(value, dtype=torch.float32, device=device).expand(batch)
    return {name: torch.cat([rows(neg), rows(pos)]) for name, (neg, pos) in sampler.npo_weights(alpha, beta).items()}


def as_kwargs(conditioning):
    """A branch's conditioning as the UNet's keyword arguments: text embeddings alone (SD1/2) are
    `encoder_hidden_states`; a dict (`Pipeline.conditioning`, SDXL's with its pooled text and time ids) is one."""
    return conditioning if isinstance(conditioning, dict) else {"encoder_hidden_states": conditioning}


def run_unet(unet, x, t, conditioning):
    """ε_θ(x_t, t, c) for one conditioning: `unet(x, t, context)` as for SD1/2, SDXL's pooled text and time ids
    added as keyword arguments."""
    c = as_kwargs(conditioning)
    return unet(x, t, c["encoder_hidden_states"], **{k: v for k, v in c.items() if k != "encoder_hidden_states"})


def cat_conditioning(*branches):
    """The conditionings of several branches stacked along the batch, for one forward over all their rows."""
    branches = [as_kwargs(b) for b in branches]
    return {k: torch.cat([b[k] for b in branches]) for k in branches[0]}


def guided_denoiser(unet, neg_embeds, pos_embeds, guidance, weights):
    """ε(x_t, t) of classifier-free guidance with one copy of θ: a batched forward of [x_t; x_t] whose LoRA offsets
    run at `weights` ({name: multiplier}, a float or one value per row of the doubled batch); offsets the UNet
    does not carry are skipped. The multipliers are set inside each call, so a checkpointed call recomputed in
    the backward pass (reward training) sees them too. Each branch's conditioning is its text embeddings, or for
    SDXL a `Pipeline.conditioning` dict that carries its own pooled embedding and time ids."""
    context = cat_conditioning(neg_embeds, pos_embeds)
    present = set(lora.offset_names(unet))
    weights = {k: v for k, v in weights.items() if k in present}

    def denoise(x, t):
        with lora.multipliers(unet, **weights):
            eps_neg, eps_pos = run_unet(unet, torch.cat([x, x]), t, context).chunk(2)
        return sampler.cfg_combine(eps_neg, eps_pos, guidance)
    return denoise


def npo_denoiser(unet, neg_embeds, pos_embeds, guidance, alpha=1.0, beta=1.0):
    """The guided ε of NPO (eq. 10, `sampler.npo_weights`): η at [α, 1] and δ at [β, 0] over the [negative; positive]
    rows."""
    context = as_kwargs(pos_embeds)["encoder_hidden_states"]
    weights = npo_multipliers(len(context), alpha, beta, context.device)
    return guided_denoiser(unet, neg_embeds, pos_embeds, guidance, weights)


def merged_unets(unet, alpha=1.0, beta=1.0):
    """The authors' way, kept as a reference: two full weight sets, θ+α·η+β·δ for ε_neg and θ+η for ε_pos (the two
    branches of `sampler.npo_weights`).

    A `torch.compile`d UNet is merged from the module inside it, and the two weight sets are compiled too."""
    base = getattr(unet, "_orig_mod", unet)  # torch.compile's wrapper keeps the module as _orig_mod
    present = set(lora.offset_names(base))

    def build(weights):
        # an offset at 0 is left out, so that the layers only it touches stay shared with θ
        state = lora.merged_state_dict(base, {k: v for k, v in weights.items() if k in present and v != 0})
        model = checkpoint.build_on_meta(lambda: type(base)(base.config))
        model.load_state_dict(state, strict=True, assign=True)
        model = model.eval().requires_grad_(False)
        return torch.compile(model) if base is not unet else model
    weights = sampler.npo_weights(alpha, beta)
    return build(sampler.npo_branch(weights, 0)), build(sampler.npo_branch(weights, 1))


def merged_denoiser(unet_neg, unet_pos, neg_embeds, pos_embeds, guidance):
    """Two passes per step, one per weight set (what the authors' code runs)."""
    def denoise(x, t):
        return sampler.cfg_combine(run_unet(unet_neg, x, t, neg_embeds), run_unet(unet_pos, x, t, pos_embeds), guidance)
    return denoise


# ----------------------------------------------------------------------------------------------------------
# A fully fine-tuned model as η (the paper's DiffDPO and DreamShaper rows): η = θ_ft − θ is dense.

def check_same_architecture(model, tuned, what):
    """`tuned` must have `model`'s parameters, shapes and heads: a fine-tune of it, not another network."""
    ours = {k: tuple(v.shape) for k, v in lora.merged_state_dict(model, {}).items()}
    theirs = {k: tuple(v.shape) for k, v in tuned.state_dict().items()}
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    heads = [m.config.per_block("attention_head_dim") for m in (model, tuned)]
    if differ or heads[0] != heads[1]:
        detail = f"{len(differ)} weights differ in name or shape ({', '.join(differ[:3])})" if differ else \
            f"attention heads {heads[1]} vs {heads[0]}"
        raise UserError(f"{what} is not a fine-tune of the base model: {detail}; pass a model of the same "
                        "architecture (e.g. an SD1.5 fine-tune for an SD1.5 base).")


@torch.no_grad()
def dense_eta(model, tuned, alpha):
    """Eq. 10 with a dense η = θ_ft − θ (a fully fine-tuned UNet `tuned` as the preference model):

        ε_pos = ε(x_t, c; θ + η) = ε(x_t, c; θ_ft),   ε_neg = ε(x_t, c'; θ + α·η + β·δ)

    θ + α·η = θ + α·(θ_ft − θ) is written into `model` in place (a lerp per tensor, in fp32), so the two branches
    hold two weight sets, θ_ft and θ + α·η, and never a third: θ itself is not kept. δ stays `model`'s LoRA offset
    "delta", run at β per row (`dense_eta_denoiser`). Without δ (or β = 0) ε_neg is the paper's weight merge
    θ + γ·η (eq. 4, γ = α)."""
    reweigh(model, lambda theta, ft: theta.lerp(ft, alpha), tuned)


@torch.no_grad()
def reweigh(model, rule, *others):
    """Each floating weight W of `model` (its LoRA offsets aside) becomes rule(W, W_1, ...) in place, computed in
    float32 and rounded once to the model's dtype; W_k is the same weight of the k-th model of `others`. In place:
    the result costs no memory beyond the models themselves."""
    states = [lora.merged_state_dict(o, {}) for o in others]
    for key, weight in lora.merged_state_dict(model, {}).items():  # the model's own tensors, not copies
        if weight.is_floating_point():
            weight.copy_(rule(weight.float(), *(state[key].float() for state in states)))


def attach_eta_model(pipe, path, alpha):
    """Make the fully fine-tuned model at `path` (a diffusers folder, a `unet/` folder or a single file) the
    preference model: pipe.eta_unet = θ_ft and pipe.unet = θ + α·η (`dense_eta`), for `generate`."""
    if "eta" in lora.offset_names(pipe.unet):
        raise UserError("the model already carries a LoRA η; a fine-tuned --eta-model is η itself, so pass one of "
                        "the two.")
    p = next(pipe.unet.parameters())
    tuned = pipeline.load_unet(path, p.dtype, p.device)
    check_same_architecture(pipe.unet, tuned, f"--eta-model {path}")
    dense_eta(pipe.unet, tuned, alpha)
    pipe.eta_unet, pipe.eta_alpha = tuned, float(alpha)


def check_built_in(built, asked, name, offset, flag):
    """The multiplier `name` (α or β) that a dense η or δ put into the weights (`built`) must be the one sampled at
    (`asked`: a float or one per image)."""
    if built is not None and any(v != built for v in torch.as_tensor(asked, dtype=torch.float64).flatten().tolist()):
        raise UserError(f"the weights hold θ + {name}·{offset} for {name} = {built:g} ({flag}); sample at that {name}, "
                        "or load the model again for another.")


def two_sets_denoiser(unet_neg, unet_pos, neg_embeds, pos_embeds, guidance, alpha, beta):
    """Two passes per step, ε_neg from `unet_neg` and ε_pos from `unet_pos`. Each weight set runs the LoRA offsets it
    carries at its branch's multipliers of eq. 10 (`npo_multipliers`: η at [α, 1], δ at [β, 0], per row); what a
    dense η or δ adds is in the weights already, and is not an offset of that set."""
    rows = len(as_kwargs(pos_embeds)["encoder_hidden_states"])
    both = npo_multipliers(rows, alpha, beta, next(unet_neg.parameters()).device)  # [negative rows; positive rows]

    def branch(unet, i):
        present = lora.offset_names(unet)
        return {k: v[i * rows:(i + 1) * rows] for k, v in both.items() if k in present}
    w_neg, w_pos = branch(unet_neg, 0), branch(unet_pos, 1)

    def denoise(x, t):
        with lora.multipliers(unet_neg, **w_neg):  # the sets may share an offset (η of a dense δ): set it per pass
            eps_neg = run_unet(unet_neg, x, t, neg_embeds)
        with lora.multipliers(unet_pos, **w_pos):
            eps_pos = run_unet(unet_pos, x, t, pos_embeds)
        return sampler.cfg_combine(eps_neg, eps_pos, guidance)
    return denoise


def dense_eta_denoiser(pipe, neg_embeds, pos_embeds, guidance, alpha, beta):
    """Two passes per step: ε_neg from θ + α·η (pipe.unet) with δ at β per row, ε_pos from θ_ft (pipe.eta_unet).
    (η's α is in pipe.unet's weights (dense_eta) and its 1 is θ_ft; θ_ft carries no δ: δ's 0.)"""
    check_built_in(pipe.eta_alpha, alpha, "α", "η", "--eta-model")
    return two_sets_denoiser(pipe.unet, pipe.eta_unet, neg_embeds, pos_embeds, guidance, alpha, beta)


# ----------------------------------------------------------------------------------------------------------
# A whole NPO-tuned UNet as δ (some published NPO weights are not LoRAs): δ = θ_δ − θ is dense.

def attach_npo_model(pipe, path, beta, eta_model=None, alpha=1.0):
    """Make the NPO-tuned UNet at `path` (a diffusers folder, a `unet/` folder or a single file) δ = θ_δ − θ at
    `beta`, for `generate`: the negative branch runs θ + α·η + β·(θ_δ − θ). With η a LoRA (or no η) the positive
    branch keeps θ + η and the negative one gets a weight set of its own (`dense_delta`); with a fine-tuned η at
    `eta_model` (not attached yet: it would overwrite θ) the two sets are θ_ft and the negative one
    (`dense_eta_and_delta`). Either way one UNet's weights beside θ's, at every moment.

    β = 0 weighs δ by nothing: the file is not read, and the run is the one without δ, pixel for pixel. After a
    UserError the pipeline may hold half-made weights: load it again."""
    if "delta" in lora.offset_names(pipe.unet):
        raise UserError("the model already carries a LoRA δ; a whole NPO model is δ itself, so pass one of --npo and "
                        "--npo-model.")
    if pipe.eta_unet is not None:
        raise ValueError("attach_eta_model has made θ + α·η of θ; pass eta_model to attach_npo_model instead")
    # eq. 10's weights (sampler.npo_weights): the dense offsets go into the negative branch's weights at its
    # multipliers; the positive branch's set is θ + η or θ_ft, so it must weigh δ by 0 (and a dense η by 1)
    neg, pos = (sampler.npo_branch(sampler.npo_weights(alpha, beta), b) for b in (0, 1))
    if pos["delta"] != 0 or (eta_model is not None and pos["eta"] != 1):
        raise ValueError(f"a dense δ is built for a positive branch of δ at 0 (and η at 1), not {pos}")
    if neg["delta"] == 0:
        if eta_model is not None:
            attach_eta_model(pipe, eta_model, neg["eta"])
    elif eta_model is None:
        dense_delta(pipe, path, neg["delta"])
    else:
        dense_eta_and_delta(pipe, eta_model, path, neg["eta"], neg["delta"])
    pipe.npo_beta = float(beta)


def dense_delta(pipe, path, beta):
    """ε_neg = ε(x_t, c'; θ + α·η + β·(θ_δ − θ)) beside ε_pos = ε(x_t, c; θ + η), η a LoRA: θ_δ is read and turned
    into θ + β·(θ_δ − θ) in place (a lerp per tensor, in fp32), which becomes pipe.npo_unet; η's LoRA modules are
    put on it too (shared, not copied), to run at α there and at 1 on θ."""
    p = next(pipe.unet.parameters())
    model = pipeline.load_unet(path, p.dtype, p.device)
    check_same_architecture(pipe.unet, model, f"--npo-model {path}")
    reweigh(model, lambda npo, theta: theta.lerp(npo, beta), pipe.unet)
    if "eta" in lora.offset_names(pipe.unet):
        lora.share_offset(pipe.unet, model, "eta")
    pipe.npo_unet = model


def dense_eta_and_delta(pipe, eta_model, path, alpha, beta):
    """A fine-tuned η and a dense δ: ε_pos runs θ_ft, ε_neg θ + α·(θ_ft − θ) + β·(θ_δ − θ)
    = (1 − α − β)·θ + β·θ_δ + α·θ_ft, built in θ's own tensors in two steps, so that θ, θ_δ and θ_ft are never all
    in memory: θ ← (1 − α − β)·θ + β·θ_δ with θ_δ read, and let go; then θ_ft read (kept: ε_pos) and θ ← θ + α·θ_ft.
    Each step is computed in fp32; in a half dtype the middle result is rounded once more than `dense_eta`'s."""
    if "eta" in lora.offset_names(pipe.unet):
        raise UserError("the model already carries a LoRA η; a fine-tuned --eta-model is η itself, so pass one of "
                        "the two.")
    p = next(pipe.unet.parameters())
    npo = pipeline.load_unet(path, p.dtype, p.device)
    check_same_architecture(pipe.unet, npo, f"--npo-model {path}")
    reweigh(pipe.unet, lambda theta, d: theta.lerp(d, beta) - alpha * theta, npo)
    del npo  # before θ_ft is read: two UNets at most
    tuned = pipeline.load_unet(eta_model, p.dtype, p.device)
    check_same_architecture(pipe.unet, tuned, f"--eta-model {eta_model}")
    reweigh(pipe.unet, lambda w, ft: w + alpha * ft, tuned)
    pipe.eta_unet, pipe.eta_alpha = tuned, float(alpha)


def dense_delta_denoiser(pipe, neg_embeds, pos_embeds, guidance, alpha, beta):
    """Two passes per step: ε_neg from θ + β·δ (pipe.npo_unet) with η at α per row, ε_pos from θ + η (pipe.unet, η
    at 1). (With --eta-model the negative set is pipe.unet itself, and `dense_eta_denoiser` runs it.)"""
    check_built_in(pipe.npo_beta, beta, "β", "δ", "--npo-model")
    return two_sets_denoiser(pipe.npo_unet, pipe.unet, neg_embeds, pos_embeds, guidance, alpha, beta)


def load_offset(pipe, files, name):
    """η or δ from LoRA files, `files` = [(path, weight), ...]: their weighted sum as the offset `name`, on the UNet
    and, for files with text-encoder keys, on the text encoder (eq. 10 then weighs both parts alike)."""
    return lora.load_loras({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, files, name)


def latents_and_sampler(pipe, seeds, height, width, sampler_name, steps, ddim_eta, callback, frames=None):
    """x_T for each seed (diffusers' draw from a seeded CPU generator per image; with `frames`, per video), and
    `run(denoise)` -> x_0 with the sampler `sampler_name` on the model's scheduler config (the generators go on
    feeding the noise of DDIM at η > 0 and of Euler ancestral, as diffusers' pipeline passes its generators to the
    scheduler's step). The samplers' updates are elementwise, so a video's 5-D latents step as an image's do."""
    dtype, device = next(pipe.unet.parameters()).dtype, next(pipe.unet.parameters()).device
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    latents = sampler.initial_latents(gens, height, width, pipe.unet.config.in_channels, device, dtype,
                                      pipe.vae.downscale, frames)

    def run(denoise):
        return sampler.sample(sampler_name, denoise, latents, pipe.scheduler_config, steps, ddim_eta, gens, callback,
                              fix_old=not (pipe.is_sdxl or pipe.is_video))
    return run


def branch_conditioning(pipe, prompts, negative_prompt, alpha, beta, clip_skip, time_ids):
    """(c', c): the conditionings of the unconditional and the conditional branch. The text encoder's offsets follow
    eq. 10 as the UNet's do, so both are encoded in one pass whose rows run [α·η + β·δ; η] (SD1/2; SDXL's text
    encoders carry no offsets, and its negative branch may be zeros: `Pipeline.negative_conditioning`)."""
    if pipe.is_sdxl:
        pos = pipe.conditioning(prompts, time_ids)
        return same_length(pipe, pipe.negative_conditioning(negative_prompt, pos), pos)
    negatives = pipeline.negative_rows(negative_prompt, len(prompts))
    weights = npo_multipliers(len(prompts), alpha, beta, pipe.text_encoder_device)
    both = pipe.conditioning(negatives + prompts, None, weights, clip_skip)["encoder_hidden_states"]
    return tuple({"encoder_hidden_states": c} for c in both.chunk(2))


def takes_fps(model):
    """Whether a video UNet conditions on the frame rate: VideoCrafter2's has an `fps_embedding`, ModelScope's not."""
    return hasattr(getattr(model, "_orig_mod", model), "fps_embedding")  # through torch.compile's wrapper


def with_fps(pipe, conditionings, fps):
    """The branches' conditionings with VideoCrafter2's frame rate, "fps" (B,), beside the text, as SDXL's time ids
    travel: `run_unet` passes it to the UNet as `fps=`. A UNet without an fps embedding (ModelScope's) gets none."""
    if fps is None or not takes_fps(pipe.unet):
        return conditionings

    def add(c):
        c = as_kwargs(c)
        rows = len(c["encoder_hidden_states"])
        return {**c, "fps": torch.full((rows,), fps, dtype=torch.long, device=c["encoder_hidden_states"].device)}
    return tuple(add(c) for c in conditionings)


def conditional_denoiser(pipe, prompts, time_ids, clip_skip, fps=None):
    """ε(x_t, t) of guidance g ≤ 1, which runs the conditional branch alone, as diffusers does: ε(x_t, c; θ + η), with
    that branch's weights of eq. 10 (`sampler.npo_weights`: η at 1, δ at 0) on the text encoder and the UNet, other
    UNet offsets off; θ_ft itself for a fine-tuned η."""
    positive = sampler.npo_branch(sampler.npo_weights(), 1)  # α and β weigh the unconditional branch only
    pos, = with_fps(pipe, [pipe.conditioning(prompts, time_ids, positive, clip_skip)], fps)
    unet = pipe.eta_unet if pipe.eta_unet is not None else pipe.unet  # θ_ft, or θ with η as a LoRA
    weights = {k: positive.get(k, 0.0) for k in lora.offset_names(pipe.unet)}

    def denoise(x, t):
        with lora.multipliers(pipe.unet, **weights):
            return run_unet(unet, x, t, pos)
    return denoise


def same_length(pipe, neg, pos):
    """(c', c) with as many 77-token chunks each (only `prompt_syntax` "a1111" makes more than one), so that one
    batched forward takes both: the shorter gets the empty prompt's encoding appended, as A1111 pads them with its
    "Pad prompt/negative prompt" setting. (SD1/2 encode both branches in one call, which pads them alike.)"""
    lengths = [c["encoder_hidden_states"].shape[1] for c in (neg, pos)]
    if lengths[0] == lengths[1]:
        return neg, pos
    k = lengths.index(min(lengths))
    short = (neg, pos)[k]
    context = short["encoder_hidden_states"]
    empty = pipe.conditioning([""] * len(context), short.get("time_ids"))["encoder_hidden_states"]
    padded = {**short, "encoder_hidden_states": torch.cat([context] + [empty] * ((max(lengths) - min(lengths))
                                                                             // empty.shape[1]), dim=1)}
    return (padded, pos) if k == 0 else (neg, padded)


@torch.no_grad()
def generate(pipe, prompts, seeds, negative_prompt=None, steps=50, guidance=None, ddim_eta=0.0, alpha=1.0, beta=1.0,
             height=None, width=None, mode="batched", unets=None, callback=None, sampler="ddim", clip_skip=0,
             original_size=None, crop_top_left=(0, 0), target_size=None, guider=None, frames=None, fps=None,
             decode_chunk=video.DECODE_CHUNK):
    """Prompts -> images (B, 3, H, W) in [-1, 1] (on a video model, with `frames` F, videos (B, F, 3, H, W)), with NPO
    guidance from the offsets named "eta" / "delta" on the UNet (and on the text encoder, for LoRAs with text-encoder
    keys).

    Image i starts from `initial_latents(seeds[i])`, as diffusers' pipeline with a list of seeded CPU generators.
    `negative_prompt`: one for all images or one per image; None is "", or zeros for SDXL. `sampler`: "ddim",
    "dpmpp-2m", "dpmpp-2m-karras", "euler" or "euler-a" (sampler.SAMPLERS). guidance None is the model's default (7.5, SDXL 5).
    mode "batched" (default): one forward of [x_t; x_t] per step with per-row LoRA multipliers (one copy of θ).
    mode "merged": the authors' two weight sets and two passes (pass `unets=merged_unets(...)` to reuse them).
    The text encoder's offsets follow eq. 10 in both: c' is encoded with α·η + β·δ, c with η. With a fine-tuned η
    attached (`attach_eta_model`), or a whole NPO model as δ (`attach_npo_model`), both modes run their two weight
    sets (`dense_eta_denoiser`, `dense_delta_denoiser`).
    guidance <= 1 runs the positive branch alone (θ+η), as diffusers does. SDXL's size conditioning
    (`Pipeline.time_ids`) defaults to original = target = (height, width) and crop (0, 0). `guider`: SEG or
    autoguidance beside NPO (`guiders.Guider`, its `denoiser`; None is plain CFG), with η as a LoRA.
    A video is eq. 10 unchanged on latents (B, C, F, h, w): the video UNet folds frames into its batch b-major, so
    the per-row multipliers of η and δ follow each video's rows (`lora`); `fps` conditions VideoCrafter2's UNet
    (`with_fps`), and the VAE decodes the frames `decode_chunk` at a time (`video.decode_frames`)."""
    if bool(frames) != video.is_video(pipe.unet):
        raise ValueError(f"frames={frames} for a {'video' if video.is_video(pipe.unet) else 'image'} UNet")
    height, width = height or pipe.image_size, width or pipe.image_size
    guidance = pipe.default_guidance if guidance is None else guidance
    prompts = list(prompts)
    time_ids = pipe.time_ids(height, width, original_size, crop_top_left, target_size)
    run = latents_and_sampler(pipe, seeds, height, width, sampler, steps, ddim_eta, callback, frames)
    if guider is not None:  # SEG or autoguidance (guiders.Guider), beside eq. 10
        neg, pos = branch_conditioning(pipe, prompts, negative_prompt, alpha, beta, clip_skip, time_ids)
        latents = run(guider.denoiser(pipe, neg, pos, guidance, alpha, beta))
    elif guidance <= 1:
        latents = run(conditional_denoiser(pipe, prompts, time_ids, clip_skip, fps))
    else:
        neg, pos = with_fps(pipe, branch_conditioning(pipe, prompts, negative_prompt, alpha, beta, clip_skip,
                                                      time_ids), fps)
        check_built_in(pipe.npo_beta, beta, "β", "δ", "--npo-model")  # a dense δ's β is in the weights
        if pipe.npo_unet is not None:
            denoise = dense_delta_denoiser(pipe, neg, pos, guidance, alpha, beta)
        elif pipe.eta_unet is not None:
            denoise = dense_eta_denoiser(pipe, neg, pos, guidance, alpha, beta)
        elif mode == "merged":
            unet_neg, unet_pos = unets or merged_unets(pipe.unet, alpha, beta)
            denoise = merged_denoiser(unet_neg, unet_pos, neg, pos, guidance)
        else:
            denoise = npo_denoiser(pipe.unet, neg, pos, guidance, alpha, beta)
        latents = run(denoise)
    latents = latents.to(next(pipe.vae.parameters()).dtype)
    if frames:
        return video.decode_frames(pipe.vae, latents, decode_chunk)  # divides by the scaling factor itself
    return pipe.vae.decode(latents / pipe.vae.scaling_factor)
