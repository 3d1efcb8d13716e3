"""Tiny random versions of every generator backend's folders, built from configs as diffusers'
own tests do (kandinsky2_2/test_kandinsky*.py Dummies, stable_unclip, IP-Adapter tests) and
saved with ``save_pretrained``; the CLIP tokenizer is built offline from a vocabulary written
here (never a hub id). Shared by tests/test_backends.py and bench/backends.py."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

DIM = 32  # the tiny CLIP image space
IMAGE = 32  # the tiny CLIP image side


def tokenizer():
    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    merges = ["#version: 0.2", "t h", "th e</w>", "a n", "o n</w>"]
    tokens += ["th", "the</w>", "an", "on</w>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(line.split()) for line in merges[1:]]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)


def _ids(tok) -> dict:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


def text_config(tok):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=DIM, projection_dim=DIM, intermediate_size=37,
                          layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=len(tok), max_position_embeddings=77, **_ids(tok))


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=DIM, projection_dim=DIM, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=2, image_size=IMAGE,
                            patch_size=8, num_channels=3)


def image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(crop_size=IMAGE, size=IMAGE, do_center_crop=True, do_normalize=True,
                              do_resize=True, resample=3)


def clip_dir(root: Path, seed: int = 0) -> Path:
    """A full CLIPModel (text + vision towers) with tokenizer and preprocessing."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tok = tokenizer()
    config = CLIPConfig(text_config=text_config(tok).to_dict(),
                        vision_config=vision_config().to_dict(), projection_dim=DIM)
    CLIPModel(config).save_pretrained(root)
    tok.save_pretrained(root)
    image_processor().save_pretrained(root)
    return root


def vision_tower_of(clip_root: Path):
    """The CLIPVisionModelWithProjection holding exactly the vision weights of `clip_root`."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    full = CLIPModel.from_pretrained(clip_root, local_files_only=True)
    tower = CLIPVisionModelWithProjection(vision_config())
    state = {k: v for k, v in full.state_dict().items()
             if k.startswith(("vision_model.", "visual_projection."))}
    tower.load_state_dict(state)
    return tower


def kandinsky_dirs(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(decoder, prior) folders of a tiny Kandinsky 2.2."""
    from diffusers import (DDIMScheduler, KandinskyV22Pipeline, KandinskyV22PriorPipeline,
                           PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, VQModel)
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    tok = tokenizer()
    torch.manual_seed(seed)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=DIM,
                             num_layers=1)
    with torch.no_grad():  # public statistics of a raw CLIP scale (random, nonzero mean)
        prior.clip_mean.copy_(0.5 * torch.randn_like(prior.clip_mean))
        prior.clip_std.copy_(1.0 + 0.5 * torch.rand_like(prior.clip_std))
    prior_pipe = KandinskyV22PriorPipeline(
        prior=prior, image_encoder=CLIPVisionModelWithProjection(vision_config()),
        text_encoder=CLIPTextModelWithProjection(text_config(tok)), tokenizer=tok,
        scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                  num_train_timesteps=1000, clip_sample=True,
                                  clip_sample_range=10.0),
        image_processor=image_processor())
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64),
        layers_per_block=1, encoder_hid_dim=DIM, encoder_hid_dim_type="image_proj",
        cross_attention_dim=32, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
        class_embed_type=None)
    movq = VQModel(block_out_channels=[32, 64],
                   down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                   norm_type="spatial", num_vq_embeddings=12, out_channels=3,
                   up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], vq_embed_dim=4)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                              thresholding=False)
    decoder, prior_dir = root / "decoder", root / "prior"
    KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(decoder)
    prior_pipe.save_pretrained(prior_dir)
    return decoder, prior_dir


def _sd_parts(seed: int, cross_dim: int = DIM, projection_class_dim: int | None = None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = tokenizer()
    torch.manual_seed(seed)
    extra = {}
    if projection_class_dim is not None:
        extra = {"class_embed_type": "projection",
                 "projection_class_embeddings_input_dim": projection_class_dim}
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
        cross_attention_dim=cross_dim, layers_per_block=1, norm_num_groups=4, **extra)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                        norm_num_groups=4, sample_size=32)
    return unet, vae, CLIPTextModel(text_config(tok)), tok


def unclip_dir(root: Path, clip_root: Path, seed: int = 0) -> Path:
    """A tiny StableUnCLIPImg2ImgPipeline whose image encoder is `clip_root`'s vision tower."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import \
        StableUnCLIPImageNormalizer

    unet, vae, text_encoder, tok = _sd_parts(seed, projection_class_dim=2 * DIM)
    normaliser = StableUnCLIPImageNormalizer(embedding_dim=DIM)
    with torch.no_grad():
        normaliser.mean.copy_(0.3 * torch.randn_like(normaliser.mean))
        normaliser.std.copy_(0.5 + torch.rand_like(normaliser.std))
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=image_processor(), image_encoder=vision_tower_of(clip_root),
        image_normalizer=normaliser,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tok, text_encoder=text_encoder, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, prediction_type="v_prediction",
                                set_alpha_to_one=False, steps_offset=1),
        vae=vae)
    pipe.save_pretrained(root)
    return root


def ip_adapter_dirs(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(SD 1.5 folder, ip-adapter .safetensors file) for the tiny CLIP space."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet, vae, text_encoder, tok = _sd_parts(seed)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(beta_schedule="scaled_linear",
                                                           beta_start=0.00085, beta_end=0.012,
                                                           set_alpha_to_one=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    sd = root / "sd15"
    pipe.save_pretrained(sd)
    torch.manual_seed(seed + 1)
    cross = unet.config.cross_attention_dim
    weights = {"image_proj.proj.weight": 0.2 * torch.randn(4 * cross, DIM),
               "image_proj.proj.bias": torch.zeros(4 * cross),
               "image_proj.norm.weight": torch.ones(cross),
               "image_proj.norm.bias": torch.zeros(cross)}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name[:-len(".processor")])
            for part in ("k", "v"):
                shape = getattr(attention, f"to_{part}").weight.shape
                weights[f"ip_adapter.{key_id}.to_{part}_ip.weight"] = 0.2 * torch.randn(shape)
            key_id += 2
    adapter = root / "ip-adapter_tiny.safetensors"
    save_file(weights, str(adapter))
    return sd, adapter


def demo_parts(clip_root: Path, seed: int = 0):
    """A ClipEncoder on the tiny CLIP + a tiny dprdm demo pipeline with 32-d conditions."""
    from dprdm.encoders.clip import ClipEncoder
    from dprdm.generation import Autoencoder, LatentDenoiser, RetrievalDiffusionPipeline
    from dprdm.generation import default_scheduler

    torch.manual_seed(seed)
    denoiser = LatentDenoiser(cond_dim=DIM, channels=(16, 32), emb_dim=32, cond_map_channels=4,
                              heads=2)
    with torch.no_grad():  # zero-initialised output layers would ignore the condition
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ae = Autoencoder(channels=(8, 8, 16), encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1, 1))
    return ClipEncoder.from_pretrained(clip_root), RetrievalDiffusionPipeline(ae, denoiser,
                                                                              default_scheduler())


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (and leave the other core to the rest)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
