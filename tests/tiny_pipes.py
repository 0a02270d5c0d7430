"""Tiny random diffusers pipelines built locally (no download): the exactness tests of `pargen.diffusers` run on
them. Every builder seeds torch itself, so a pipeline is the same in every test."""
from __future__ import annotations

import torch


def clip_tokenizer(max_length: int = 16):
    """A byte-level CLIP tokenizer without merges (every character a token), built in memory."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def clip_text(projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=514, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_dim=hidden,
                         bos_token_id=512, eos_token_id=513, pad_token_id=513)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def vae(latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16, **kw).eval()


def unet2d(channels: int = 1, classes: int | None = None):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=classes).eval()


def ddpm(scheduler: str = "ddpm"):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    if scheduler == "ddpm":
        return _quiet(DDPMPipeline(unet=unet2d(), scheduler=DDPMScheduler(num_train_timesteps=1000)))
    return _quiet(DDIMPipeline(unet=unet2d(), scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False)))


def dit():
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(sample_size=4, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                               num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=1000,
                               norm_type="ada_norm_zero", norm_elementwise_affine=False).eval()
    torch.manual_seed(0)
    pipe = DiTPipeline(transformer=tr, vae=vae(), scheduler=DPMSolverMultistepScheduler(),
                       id2label={0: "zero", 1: "one", 2: "two"})
    return _quiet(pipe)


def sd(scheduler=None, inpaint: bool = False, img2img: bool = False):
    """A tiny Stable Diffusion pipeline (text-to-image, or img2img / in-painting on the same parts)."""
    from diffusers import (DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=4).eval()
    torch.manual_seed(0)
    parts = dict(unet=unet, vae=vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(),
                 scheduler=scheduler or DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                                                      steps_offset=1),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline if img2img else \
        StableDiffusionPipeline
    return _quiet(cls(**parts))


def sd_controlnet(nets: int = 1):
    """The tiny Stable Diffusion pipeline with tiny ControlNets (a second model on the noisy input every step;
    with nets > 1 diffusers wraps them in one MultiControlNetModel)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = sd()
    made = []
    for seed in range(nets):
        torch.manual_seed(seed)
        made.append(ControlNetModel(in_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32,
                                    attention_head_dim=4, norm_num_groups=4,
                                    conditioning_embedding_out_channels=(4, 8)).eval())
    parts = {k: v for k, v in base.components.items() if k != "image_encoder"}
    return _quiet(StableDiffusionControlNetPipeline(**parts, controlnet=made[0] if nets == 1 else made))


def sdxl():
    """A tiny Stable Diffusion XL pipeline: two CLIP text encoders, the pooled embedding and size / crop ids as
    added conditions (`added_cond_kwargs`, a dict batched per row), an Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8).eval()
    torch.manual_seed(0)
    return _quiet(StableDiffusionXLPipeline(
        vae=vae(), text_encoder=clip_text(), text_encoder_2=clip_text(projection=True), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1)))


def t5_tokenizer(max_length: int = 16):
    """A character-level T5 tokenizer (unigram over printable ASCII), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(chr(i), -1.0) for i in range(32, 127)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=max_length)


def flux():
    """A tiny FLUX.1 pipeline: packed latents, rotary image / text ids, the distilled guidance embedding, CLIP and
    T5 text encoders, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=98, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval()
    return _quiet(FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(),
                               vae=vae(shift_factor=0.0609, scaling_factor=1.5035), text_encoder=clip_text(),
                               tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer(),
                               transformer=tr))


def sd3():
    """A tiny Stable Diffusion 3 pipeline (flow matching, FlowMatchEulerDiscreteScheduler; no T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                               pooled_projection_dim=64, out_channels=4).eval()
    torch.manual_seed(0)
    te1, te2 = clip_text(projection=True), clip_text(projection=True)
    return _quiet(StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(),
                                           vae=vae(shift_factor=0.0609, scaling_factor=1.5035),
                                           text_encoder=te1, tokenizer=clip_tokenizer(), text_encoder_2=te2,
                                           tokenizer_2=clip_tokenizer(), text_encoder_3=None, tokenizer_3=None))


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe
