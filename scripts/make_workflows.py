"""Writes the example workflows: workflows/<name>.json (UI format, drag and drop into ComfyUI) and
workflows/api/<name>.json (API format, for POST /prompt), from one description per model and the node
definitions of a running ComfyUI (GET /object_info), which fix the order of each node's widget values.

    python scripts/make_workflows.py --server http://127.0.0.1:8188

Then redraw the thumbnails (workflows/<name>.jpg) of the workflows that changed: scripts/screenshot_workflows.py.
"""
from __future__ import annotations

import argparse
import json
import math
import urllib.request
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "workflows"
TINY_MODELS = ("tiny-flux", "tiny-flux2", "tiny-sd3", "tiny-pixart", "tiny-qwen-image", "tiny-z-image", "tiny-wan",
               "tiny-wan-a14b", "tiny-wan-ti2v")  # built-in (nodes/checkpoints.py TINY_MODELS): no file to place
LINK_FREE = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def parallel(**deg):
    """Configure Hybrid Parallel with these degrees, saved as layout manual: the editor would otherwise show the
    widget's default (auto) for a file that does not set it, and run other degrees than the file's."""
    d = dict(device="auto", ulysses_degree=2, ring_degree=1, pipefusion_degree=1, cfg_degree=1, dp_degree=1,
             num_patches=0, warmup_steps=1, attention="auto", gpus="", pool_address="", shard_degree=1,
             shard_keep=False, layout="manual")
    d.update(deg)
    return d


def qwen_image_graph() -> dict:
    """Qwen-Image with ComfyUI's own loaders (the files of Comfy-Org/Qwen-Image_ComfyUI): Qwen2.5-VL 7B through
    CLIPLoader type qwen_image, the Wan-style Qwen-Image VAE, EmptySD3LatentImage at the release's 1328x1328, true
    CFG 4 on cfg parallel x Ulysses 2 (24 heads: Ulysses 1, 2, 3, 4, 6 or 8)."""
    return {
        "1": ("CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image",
                             "device": "default"}),
        "2": ("CLIPTextEncode", {"text": 'a neon sign reading "xDiT" above a rainy street market at night, '
                                         "photograph", "clip": ["1", 0]}),
        "3": ("CLIPTextEncode", {"text": " ", "clip": ["1", 0]}),
        "5": ("XDiTConfigureHybridParallel", parallel(cfg_degree=2)),
        "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0], "checkpoint": "qwen_image_bf16.safetensors",
                                      "weight_dtype": "bf16", "family": "auto"}),
        "7": ("EmptySD3LatentImage", {"width": 1328, "height": 1328, "batch_size": 1}),
        "8": ("XDiTParallelSampler", {"model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0],
                                      "latent_image": ["7", 0], "seed": 42, "steps": 30, "cfg": 4.0,
                                      "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}),
        "9": ("VAELoader", {"vae_name": "qwen_image_vae.safetensors"}),
        "10": ("VAEDecode", {"samples": ["8", 0], "vae": ["9", 0]}),
        "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": "xdit_qwen_image"}),
    }


def qwen_image_edit_graph() -> dict:
    """Qwen-Image-Edit 2509 with ComfyUI's own nodes (the files of Comfy-Org/Qwen-Image-Edit_ComfyUI): the input
    image scaled to about 1 megapixel, encoded by VAEEncode as the latent to edit and by TextEncodeQwenImageEditPlus
    (Qwen2.5-VL sees it; its latent goes on as reference_latents) for the positive and the negative alike; true CFG
    4 on cfg parallel x Ulysses 2."""
    return {
        "1": ("CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image",
                             "device": "default"}),
        "9": ("VAELoader", {"vae_name": "qwen_image_vae.safetensors"}),
        "12": ("LoadImage", {"image": "example.png"}),
        "13": ("ImageScaleToTotalPixels", {"image": ["12", 0], "upscale_method": "lanczos", "megapixels": 1.0}),
        "2": ("TextEncodeQwenImageEditPlus", {"clip": ["1", 0], "prompt": "turn the scene into a watercolor "
                                             "painting, keep the composition", "vae": ["9", 0], "image1": ["13", 0]}),
        "3": ("TextEncodeQwenImageEditPlus", {"clip": ["1", 0], "prompt": " ", "vae": ["9", 0], "image1": ["13", 0]}),
        "5": ("XDiTConfigureHybridParallel", parallel(cfg_degree=2)),
        "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0],
                                      "checkpoint": "qwen_image_edit_2509_bf16.safetensors", "weight_dtype": "bf16",
                                      "family": "auto"}),
        "7": ("VAEEncode", {"pixels": ["13", 0], "vae": ["9", 0]}),
        "8": ("XDiTParallelSampler", {"model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0],
                                      "latent_image": ["7", 0], "seed": 42, "steps": 40, "cfg": 4.0,
                                      "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}),
        "10": ("VAEDecode", {"samples": ["8", 0], "vae": ["9", 0]}),
        "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": "xdit_qwen_image_edit"}),
    }


def wan_graph(kind: str) -> dict:
    """Wan with ComfyUI's own loaders (the file names of Comfy-Org's repackaged Wan 2.1 / 2.2 releases): umT5-xxl
    through CLIPLoader type wan, the Wan 2.1 VAE (the Wan 2.2 VAE for TI2V 5B), VAE Decode, Create Video and
    Save Video. Wan 2.2 A14B is ComfyUI's own two-expert graph: two loaders (the high-noise and the low-noise
    files) and two advanced samplers sharing one schedule, split at the user's step."""
    size, steps, cfg, fps = {"wan2.2-t2v-a14b": ((832, 480, 81), 20, 3.5, 16),
                             "wan2.2-ti2v-5b": ((1280, 704, 121), 30, 5.0, 24),
                             "wan2.1-t2v-1.3b": ((832, 480, 81), 30, 6.0, 16)}[kind]
    w, h, length = size
    g = {
        "1": ("CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                             "device": "default"}),
        "2": ("CLIPTextEncode", {"text": "a red panda rides a bicycle along a canal in autumn, leaves falling, "
                                         "tracking shot", "clip": ["1", 0]}),
        "3": ("CLIPTextEncode", {"text": "blurry, static, low quality, watermark, text", "clip": ["1", 0]}),
        # 40 heads (14B): Ulysses 1, 2, 4, 5 or 8; 24 heads (5B) and 12 heads (1.3B): 1, 2, 3, 4, 6 ...
        "5": ("XDiTConfigureHybridParallel", parallel(cfg_degree=2)),
        "12": ("VAELoader", {"vae_name": "wan2.2_vae.safetensors" if kind == "wan2.2-ti2v-5b"
                             else "wan_2.1_vae.safetensors"}),
        "13": ("VAEDecode", {"samples": ["9" if kind == "wan2.2-t2v-a14b" else "8", 0], "vae": ["12", 0]}),
        "14": ("CreateVideo", {"images": ["13", 0], "fps": float(fps)}),
        "15": ("SaveVideo", {"video": ["14", 0], "filename_prefix": f"video/xdit_{kind}", "format": "auto",
                             "codec": "auto"}),
    }
    sampling = {"positive": ["2", 0], "negative": ["3", 0], "cfg": cfg, "sampler_name": "euler",
                "scheduler": "simple"}
    if kind == "wan2.2-ti2v-5b":
        g["7"] = ("Wan22ImageToVideoLatent", {"width": w, "height": h, "length": length, "batch_size": 1,
                                              "vae": ["12", 0]})
    else:
        g["7"] = ("EmptyHunyuanLatentVideo", {"width": w, "height": h, "length": length, "batch_size": 1})
    if kind == "wan2.2-t2v-a14b":
        split = steps // 2
        g["6"] = ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0],
                                          "checkpoint": "wan2.2_t2v_high_noise_14B_fp16.safetensors",
                                          "weight_dtype": "bf16", "family": "auto"})
        g["4"] = ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0],
                                          "checkpoint": "wan2.2_t2v_low_noise_14B_fp16.safetensors",
                                          "weight_dtype": "bf16", "family": "auto"})
        g["8"] = ("XDiTParallelSamplerAdvanced", {
            "model": ["6", 0], "add_noise": "enable", "noise_seed": 42, "steps": steps, **sampling,
            "latent_image": ["7", 0], "start_at_step": 0, "end_at_step": split, "return_with_leftover_noise": "enable"})
        g["9"] = ("XDiTParallelSamplerAdvanced", {
            "model": ["4", 0], "add_noise": "disable", "noise_seed": 42, "steps": steps, **sampling,
            "latent_image": ["8", 0], "start_at_step": split, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"})
    else:
        ckpt = {"wan2.2-ti2v-5b": "wan2.2_ti2v_5B_fp16.safetensors",
                "wan2.1-t2v-1.3b": "wan2.1_t2v_1.3B_fp16.safetensors"}[kind]
        g["6"] = ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0], "checkpoint": ckpt, "weight_dtype": "bf16",
                                          "family": "auto"})
        g["8"] = ("XDiTParallelSampler", {"model": ["6", 0], **sampling, "latent_image": ["7", 0], "seed": 42,
                                          "steps": steps, "denoise": 1.0})
    return g


def wan_i2v_graph() -> dict:
    """Wan 2.2 I2V A14B as ComfyUI's own image-to-video graph: Load Image into WanImageToVideo (with the Wan 2.1 VAE;
    Wan 2.2 I2V takes no CLIP vision), whose CONDITIONING pair and video LATENT feed the two-expert samplers (the
    high- and low-noise I2V files, split at the user's step)."""
    steps, split = 20, 10
    sampling = {"positive": ["7", 0], "negative": ["7", 1], "cfg": 3.5, "sampler_name": "euler",
                "scheduler": "simple", "noise_seed": 42, "steps": steps}
    return {
        "1": ("CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                             "device": "default"}),
        "2": ("CLIPTextEncode", {"text": "the red panda in the picture starts pedalling, the camera follows it along "
                                         "the canal, leaves falling", "clip": ["1", 0]}),
        "3": ("CLIPTextEncode", {"text": "blurry, static, low quality, watermark, text", "clip": ["1", 0]}),
        # 40 heads: Ulysses 1, 2, 4, 5 or 8
        "5": ("XDiTConfigureHybridParallel", parallel(cfg_degree=2)),
        "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0],
                                      "checkpoint": "wan2.2_i2v_high_noise_14B_fp16.safetensors",
                                      "weight_dtype": "bf16", "family": "auto"}),
        "4": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0],
                                      "checkpoint": "wan2.2_i2v_low_noise_14B_fp16.safetensors",
                                      "weight_dtype": "bf16", "family": "auto"}),
        "16": ("LoadImage", {"image": "example.png"}),
        "7": ("WanImageToVideo", {"positive": ["2", 0], "negative": ["3", 0], "vae": ["12", 0], "width": 832,
                                  "height": 480, "length": 81, "batch_size": 1, "start_image": ["16", 0]}),
        "8": ("XDiTParallelSamplerAdvanced", {
            "model": ["6", 0], "add_noise": "enable", **sampling, "latent_image": ["7", 2], "start_at_step": 0,
            "end_at_step": split, "return_with_leftover_noise": "enable"}),
        "9": ("XDiTParallelSamplerAdvanced", {
            "model": ["4", 0], "add_noise": "disable", **sampling, "latent_image": ["8", 0], "start_at_step": split,
            "end_at_step": 10000, "return_with_leftover_noise": "disable"}),
        "12": ("VAELoader", {"vae_name": "wan_2.1_vae.safetensors"}),
        "13": ("VAEDecode", {"samples": ["9", 0], "vae": ["12", 0]}),
        "14": ("CreateVideo", {"images": ["13", 0], "fps": 16.0}),
        "15": ("SaveVideo", {"video": ["14", 0], "filename_prefix": "video/xdit_wan2.2-i2v-a14b", "format": "auto",
                             "codec": "auto"}),
    }


def setup_check_graph() -> dict:
    """The set-up check without downloads: the built-in tiny-flux (random weights, real Flux widths) sampled on
    Ulysses 2 by Parallel Sampler and by ComfyUI's KSampler on Parallel DiT Model, and on one GPU, from the same Tiny
    Conditioning, latent and seed; two Setup Checks compare each parallel run with the one-GPU run. fp32 so that the
    tolerance can be tight (the ranks' sums in another order are the only difference)."""
    sampling = {"positive": ["3", 0], "negative": ["3", 1], "latent_image": ["4", 0], "seed": 42, "steps": 4,
                "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    return {
        "1": ("XDiTConfigureHybridParallel", parallel(ulysses_degree=2)),
        "2": ("XDiTLoadParallelDiT", {"parallel_config": ["1", 0], "checkpoint": "tiny-flux", "weight_dtype": "fp32",
                                      "family": "auto"}),
        "3": ("XDiTTinyConditioning", {"model": ["2", 0], "seed": 0, "tokens": 8}),
        "4": ("EmptySD3LatentImage", {"width": 256, "height": 256, "batch_size": 1}),
        "5": ("XDiTParallelSampler", {"model": ["2", 0], **sampling}),
        "6": ("XDiTConfigureHybridParallel", parallel(ulysses_degree=1)),
        "7": ("XDiTLoadParallelDiT", {"parallel_config": ["6", 0], "checkpoint": "tiny-flux", "weight_dtype": "fp32",
                                      "family": "auto"}),
        "8": ("XDiTParallelSampler", {"model": ["7", 0], **sampling}),
        "9": ("XDiTSetupCheck", {"parallel": ["5", 0], "reference": ["8", 0], "tolerance": 1e-4}),
        "10": ("XDiTParallelDiTModel", {"model": ["2", 0]}),
        "11": ("KSampler", {"model": ["10", 0], **sampling}),
        "12": ("XDiTSetupCheck", {"parallel": ["11", 0], "reference": ["8", 0], "tolerance": 1e-4}),
    }


SETUP_CHECK_NOTE = (
    "Setup check, no downloads: tiny-flux is a built-in Flux transformer with random weights (2 + 2 blocks) that "
    "takes conditioning at Flux's real widths, which Tiny Conditioning makes from a seed. The top row samples it on "
    "the parallel config with Parallel Sampler, the third with ComfyUI's KSampler on Parallel DiT Model, the second "
    "on one GPU (all degrees 1: leave that Configure node as it is); each Setup Check shows PASS when its two latents "
    "agree (relative L2 within the tolerance) and stops with the numbers when they do not. About a minute, on CPUs "
    "too (device auto). The output is noise-like: there is no image to look at.")


WAN_NOTE = (
    "Wan on xDiT. Text encoder and VAE are ComfyUI's own loaders; the Parallel Sampler takes their CONDITIONING "
    "(umT5-xxl) and the video LATENT [batch, channels, frames, h, w] and returns the same shape for VAE Decode. "
    "Sampling shift: ComfyUI's default for Wan (8.0); a ModelSamplingSD3 node cannot be attached to a Parallel DiT: "
    "set the samplers' shift input instead (what ModelSamplingSD3 sets). Samplers: euler or dpmpp_2m. Frames: 4k+1 (81, 121).")
WAN_A14B_NOTE = (
    WAN_NOTE + "\n\nWan 2.2 A14B is ComfyUI's usual two-expert graph: the high-noise file samples steps 0 to "
    "end_at_step with leftover noise, the low-noise file the rest without adding noise; the split step is the "
    "boundary between the experts, as in ComfyUI. Both models stay loaded on the pool (two Load Parallel DiT, one "
    "parallel config). Needs both experts' memory on every rank (2 x 29 GB in bf16 with Ulysses/Ring/CFG).")
WAN_I2V_NOTE = (
    WAN_A14B_NOTE.replace("Wan 2.2 A14B is", "Wan 2.2 I2V A14B is") + "\n\nImage to video: WanImageToVideo's "
    "CONDITIONING carries the start image's latent and mask, which the Parallel Sampler passes to the model as "
    "ComfyUI does (its 36 input channels: latent, 4 mask channels, image latent). Feed positive and negative "
    "through the same WanImageToVideo. Wan 2.2 I2V has no CLIP vision input; Wan 2.1 I2V 14B needs CLIP Vision "
    "Encode into clip_vision_output.")
WAN_TI2V_NOTE = (
    WAN_NOTE + "\n\nWan 2.2 TI2V 5B: 48-channel Wan 2.2 VAE latents at 16x (Wan22ImageToVideoLatent); text to video "
    "only: a start_image gives the latent a noise_mask, which Parallel Sampler refuses (use the native KSampler).")


def stock_graph(kind: str) -> dict:
    """Stock ComfyUI samplers on Parallel DiT Model's MODEL: KSampler behind ModelSamplingSD3 (SD3.5-large), and
    SamplerCustomAdvanced with CFGGuider (Flux.1-dev)."""
    if kind == "sd3.5-large-stock-ksampler":
        return {
            "1": ("TripleCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                       "clip_name3": "t5xxl_fp16.safetensors"}),
            "2": ("CLIPTextEncode", {"text": "a lighthouse on a cliff at dusk, oil painting", "clip": ["1", 0]}),
            "3": ("CLIPTextEncode", {"text": "blurry, low quality", "clip": ["1", 0]}),
            "5": ("XDiTConfigureHybridParallel", parallel(ulysses_degree=2, cfg_degree=2)),
            "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0], "checkpoint": "sd3.5_large.safetensors",
                                          "weight_dtype": "bf16", "family": "auto"}),
            "7": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            "8": ("KSampler", {"model": ["13", 0], "positive": ["2", 0], "negative": ["3", 0],
                               "latent_image": ["7", 0], "seed": 42, "steps": 28, "cfg": 4.5,
                               "sampler_name": "dpmpp_2m_sde", "scheduler": "beta", "denoise": 1.0}),
            "9": ("VAELoader", {"vae_name": "sd3.5_vae.safetensors"}),
            "10": ("VAEDecode", {"samples": ["8", 0], "vae": ["9", 0]}),
            "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": "xdit_sd3.5_stock"}),
            "12": ("XDiTParallelDiTModel", {"model": ["6", 0]}),
            "13": ("ModelSamplingSD3", {"model": ["12", 0], "shift": 3.0}),
        }
    return {
        "1": ("DualCLIPLoader", {"clip_name1": "t5xxl_fp16.safetensors", "clip_name2": "clip_l.safetensors",
                                 "type": "flux", "device": "default"}),
        "2": ("CLIPTextEncode", {"text": "a red fox in fresh snow, morning light, photograph", "clip": ["1", 0]}),
        "3": ("FluxGuidance", {"conditioning": ["2", 0], "guidance": 3.5}),
        "4": ("CLIPTextEncode", {"text": "", "clip": ["1", 0]}),
        "5": ("XDiTConfigureHybridParallel", parallel(ulysses_degree=2, ring_degree=2)),
        "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0], "checkpoint": "flux1-dev.safetensors",
                                      "weight_dtype": "bf16", "family": "auto"}),
        "7": ("XDiTParallelDiTModel", {"model": ["6", 0]}),
        "8": ("CFGGuider", {"model": ["7", 0], "positive": ["3", 0], "negative": ["4", 0], "cfg": 1.0}),
        "9": ("KSamplerSelect", {"sampler_name": "res_multistep"}),
        "10": ("BasicScheduler", {"model": ["7", 0], "scheduler": "simple", "steps": 28, "denoise": 1.0}),
        "11": ("RandomNoise", {"noise_seed": 42}),
        "12": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        "13": ("SamplerCustomAdvanced", {"noise": ["11", 0], "guider": ["8", 0], "sampler": ["9", 0],
                                         "sigmas": ["10", 0], "latent_image": ["12", 0]}),
        "14": ("VAELoader", {"vae_name": "ae.safetensors"}),
        "15": ("VAEDecode", {"samples": ["13", 0], "vae": ["14", 0]}),
        "16": ("SaveImage", {"images": ["15", 0], "filename_prefix": "xdit_flux_stock"}),
    }


def graph(kind: str) -> dict:
    """API-format graph for one example; links as [node_id, output_index]."""
    if "-stock-" in kind:
        g = stock_graph(kind)
    elif kind == "qwen-image":
        g = qwen_image_graph()
    elif kind == "qwen-image-edit-2509":
        g = qwen_image_edit_graph()
    elif kind == "wan2.2-i2v-a14b":
        g = wan_i2v_graph()
    elif kind.startswith("wan"):
        g = wan_graph(kind)
    elif kind in ("flux1-dev", "flux1-schnell"):
        dev = kind == "flux1-dev"
        g = {
            "1": ("DualCLIPLoader", {"clip_name1": "t5xxl_fp16.safetensors", "clip_name2": "clip_l.safetensors",
                                     "type": "flux", "device": "default"}),
            "2": ("CLIPTextEncode", {"text": "a red fox reading a newspaper in a sunlit cafe, photograph",
                                     "clip": ["1", 0]}),
            "3": ("CLIPTextEncode", {"text": "", "clip": ["1", 0]}),
            "5": ("XDiTConfigureHybridParallel", parallel()),
            "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0], "checkpoint": f"{kind}.safetensors",
                                          "weight_dtype": "bf16", "family": "auto"}),
            "7": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            "8": ("XDiTParallelSampler", {"model": ["6", 0], "positive": ["4", 0] if dev else ["2", 0],
                                          "negative": ["3", 0], "latent_image": ["7", 0], "seed": 42,
                                          "steps": 20 if dev else 4, "cfg": 1.0, "sampler_name": "euler",
                                          "scheduler": "simple", "denoise": 1.0}),
            "9": ("VAELoader", {"vae_name": "ae.safetensors"}),
            "10": ("VAEDecode", {"samples": ["8", 0], "vae": ["9", 0]}),
            "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": f"xdit_{kind}"}),
        }
        if dev:
            g["4"] = ("FluxGuidance", {"conditioning": ["2", 0], "guidance": 3.5})
    elif kind == "sd3.5-large":
        g = {
            "1": ("TripleCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                       "clip_name3": "t5xxl_fp16.safetensors"}),
            "2": ("CLIPTextEncode", {"text": "a lighthouse on a cliff at dusk, oil painting", "clip": ["1", 0]}),
            "3": ("CLIPTextEncode", {"text": "blurry, low quality", "clip": ["1", 0]}),
            "5": ("XDiTConfigureHybridParallel", parallel(cfg_degree=2)),
            "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0], "checkpoint": "sd3.5_large.safetensors",
                                          "weight_dtype": "bf16", "family": "auto"}),
            "7": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            "8": ("XDiTParallelSampler", {"model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0],
                                          "latent_image": ["7", 0], "seed": 42, "steps": 28, "cfg": 4.5,
                                          "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0}),
            "9": ("VAELoader", {"vae_name": "sd3.5_vae.safetensors"}),
            "10": ("VAEDecode", {"samples": ["8", 0], "vae": ["9", 0]}),
            "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": "xdit_sd3.5"}),
        }
    elif kind == "pixart-sigma":
        g = {
            "1": ("CLIPLoader", {"clip_name": "t5xxl_fp16.safetensors", "type": "pixart", "device": "default"}),
            "2": ("CLIPTextEncode", {"text": "a small robot watering plants on a balcony, watercolor",
                                     "clip": ["1", 0]}),
            "3": ("CLIPTextEncode", {"text": "", "clip": ["1", 0]}),
            "5": ("XDiTConfigureHybridParallel", parallel(cfg_degree=2)),
            "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0],
                                          "checkpoint": "PixArt-Sigma-XL-2-1024-MS.pth",
                                          "weight_dtype": "fp16", "family": "auto"}),
            "7": ("EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            "8": ("XDiTParallelSampler", {"model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0],
                                          "latent_image": ["7", 0], "seed": 42, "steps": 20, "cfg": 4.5,
                                          "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}),
            "9": ("VAELoader", {"vae_name": "sdxl_vae.safetensors"}),
            "10": ("VAEDecode", {"samples": ["8", 0], "vae": ["9", 0]}),
            "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": "xdit_pixart_sigma"}),
        }
    elif kind == "flux2-dev":
        g = flux2_graph()
    elif kind == "setup-check":
        g = setup_check_graph()
    elif kind == "z-image-turbo":
        g = {
            # how ComfyUI versions with Z-Image load its Qwen3-4B text encoder (see the note: 0.3.64 has none)
            "1": ("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2", "device": "default"}),
            "2": ("CLIPTextEncode", {"text": "a lantern-lit street market in the rain at night, photograph",
                                     "clip": ["1", 0]}),
            "3": ("CLIPTextEncode", {"text": "", "clip": ["1", 0]}),
            "5": ("XDiTConfigureHybridParallel", parallel()),  # 30 heads: Ulysses 2, 3, 5, 6, 10 or 15
            "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0], "checkpoint": "z_image_turbo_bf16.safetensors",
                                          "weight_dtype": "bf16", "family": "auto"}),
            "7": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            "8": ("XDiTParallelSampler", {"model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0],
                                          "latent_image": ["7", 0], "seed": 42, "steps": 9, "cfg": 1.0,
                                          "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}),
            "9": ("VAELoader", {"vae_name": "ae.safetensors"}),
            "10": ("VAEDecode", {"samples": ["8", 0], "vae": ["9", 0]}),
            "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": "xdit_z_image_turbo"}),
        }
    else:
        raise ValueError(kind)
    return {nid: {"class_type": ct, "inputs": inputs} for nid, (ct, inputs) in sorted(g.items(), key=lambda x: int(x[0]))}


FLUX2_NOTE = (
    "FLUX.2-dev on xDiT. ComfyUI 0.3.64 has no FLUX.2 text encoder and no FLUX.2 VAE.\n\n"
    "Text: replace nodes 1-2 (placeholders) with a node whose CONDITIONING tensor is what Flux2Pipeline.encode_prompt "
    "makes with the Mistral-3 Small 24B encoder: [batch, tokens (512), 15360], the hidden states of its layers 10, 20 "
    "and 30 stacked per token (3 x 5120). No pooled output, no mask. FluxGuidance sets the distilled guidance "
    "(default 4.0). FLUX.2 has no negative prompt: keep cfg 1 (negative is unused).\n\n"
    "Latent: the sampler returns [batch, 32, H/8, W/8], the FLUX.2 VAE's batch-norm-normalised latent in its "
    "32-channel layout; Save Latent writes it. Decode with diffusers' AutoencoderKLFlux2: "
    "vae.decode(comfyui_xdit.families.flux2.to_vae_space(latent, vae)).")


def flux2_graph() -> dict:
    """FLUX.2-dev: placeholder text encoding (no FLUX.2 text encoder in ComfyUI 0.3.64) and Save Latent (no FLUX.2
    VAE either); the UI file carries FLUX2_NOTE."""
    return {
        "1": ("CLIPLoader", {"clip_name": "flux2_text_encoder_placeholder.safetensors", "type": "stable_diffusion",
                             "device": "default"}),
        "2": ("CLIPTextEncode", {"text": "a glass teapot on a wooden table in morning light, photograph",
                                 "clip": ["1", 0]}),
        "4": ("FluxGuidance", {"conditioning": ["2", 0], "guidance": 4.0}),
        "5": ("XDiTConfigureHybridParallel", parallel()),
        "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0], "checkpoint": "flux2-dev.safetensors",
                                      "weight_dtype": "bf16", "family": "auto"}),
        "7": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        "8": ("XDiTParallelSampler", {"model": ["6", 0], "positive": ["4", 0], "negative": ["4", 0],
                                      "latent_image": ["7", 0], "seed": 42, "steps": 50, "cfg": 1.0,
                                      "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}),
        "9": ("SaveLatent", {"samples": ["8", 0], "filename_prefix": "latents/xdit_flux2_dev"}),
    }


EXAMPLES = ("setup-check",
            "flux1-dev", "flux1-schnell", "sd3.5-large", "pixart-sigma", "qwen-image", "qwen-image-edit-2509",
            "flux2-dev", "z-image-turbo",
            "wan2.2-t2v-a14b", "wan2.2-ti2v-5b", "wan2.1-t2v-1.3b", "wan2.2-i2v-a14b", "sd3.5-large-stock-ksampler",
            "flux1-dev-stock-custom-advanced")
Z_IMAGE_NOTE = (
    "Parallel Sampler expects the conditioning ZImagePipeline's text encoder makes: Qwen3-4B hidden states "
    "of its second-to-last layer for the chat-templated prompt, [batch, tokens, 2560], the prompt's real "
    "tokens only (or an attention_mask marking them). ComfyUI 0.3.64 has no Qwen3-4B text encoder: this "
    "CLIPLoader (type lumina2, qwen_3_4b.safetensors) is how later ComfyUI versions load it; on 0.3.64 feed "
    "such a CONDITIONING from another node. Turbo is distilled: cfg 1 (the negative is unused), 8-9 steps; "
    "the VAE is the Flux VAE (ae.safetensors).")
# UI-only Note nodes (the editor's own; not queued, so not in the API twin)
NOTES = {"setup-check": SETUP_CHECK_NOTE,
         "flux2-dev": FLUX2_NOTE, "z-image-turbo": Z_IMAGE_NOTE, "wan2.2-t2v-a14b": WAN_A14B_NOTE,
         "wan2.2-ti2v-5b": WAN_TI2V_NOTE, "wan2.1-t2v-1.3b": WAN_NOTE, "wan2.2-i2v-a14b": WAN_I2V_NOTE}


def is_link_type(t) -> bool:
    return isinstance(t, str) and t not in LINK_FREE


def ordered_inputs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order") or {s: list(info["input"].get(s) or {}) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section) or []:
            out.append((name, info["input"][section][name]))
    return out


def has_control(conf: list) -> bool:
    return len(conf) > 1 and isinstance(conf[1], dict) and bool(conf[1].get("control_after_generate"))


NODE_WIDTH, COLUMN_GAP, ROW_GAP, TITLE = 320, 60, 40, 30
SLOT_ROW, WIDGET_ROW, MULTILINE_ROWS = 24, 26, 4


def node_height(info: dict, n_inputs: int, n_outputs: int) -> int:
    """Body height (the title bar is above `pos`), generous against what the editor computes: a row per slot, a row
    per widget (four for a multiline text box), a seed's control widget, margins. Every widget input counts, the
    optional ones too (the editor draws a widget for each, set in the graph or not)."""
    rows = 0
    for name, conf in ordered_inputs(info):
        if is_link_type(conf[0]):
            continue
        extra = conf[1] if len(conf) > 1 and isinstance(conf[1], dict) else {}
        rows += MULTILINE_ROWS if extra.get("multiline") else 1
        rows += 1 if has_control(conf) else 0
    return 40 + SLOT_ROW * max(n_inputs, n_outputs) + WIDGET_ROW * rows


def columns(api: dict) -> dict[str, int]:
    """Column of each node: its longest path from a node without inputs; such nodes sit just left of their first
    consumer (a VAE loader next to VAE Decode, not beside the text encoders)."""
    deps = {nid: [v[0] for v in n["inputs"].values() if isinstance(v, list)] for nid, n in api.items()}
    col: dict[str, int] = {}

    def depth(nid: str) -> int:
        if nid not in col:
            col[nid] = 1 + max((depth(d) for d in deps[nid]), default=-1)
        return col[nid]

    for nid in api:
        depth(nid)
    for nid in api:
        consumers = [c for c, ds in deps.items() if nid in ds]
        if not deps[nid] and consumers:
            col[nid] = min(col[c] for c in consumers) - 1
    return col


def layout(api: dict, nodes: list[dict]) -> None:
    """Positions in place: one column per dependency depth, nodes stacked in it with their title bars and a gap
    between them, so that no two node rectangles overlap."""
    col = columns(api)
    bottom: dict[int, int] = {}
    for node in nodes:
        c = col[str(node["id"])]
        y = bottom.get(c, 60)
        node["pos"] = [40 + (NODE_WIDTH + COLUMN_GAP) * c, y]
        bottom[c] = y + node["size"][1] + TITLE + ROW_GAP


DEGREES = ("ulysses_degree", "ring_degree", "pipefusion_degree", "cfg_degree", "dp_degree")
# where ComfyUI looks for each loader's file (folder under ComfyUI/), by node and input
FILE_FOLDERS = {("XDiTLoadParallelDiT", "checkpoint"): "models/diffusion_models",
                ("CLIPLoader", "clip_name"): "models/text_encoders",
                ("DualCLIPLoader", "clip_name1"): "models/text_encoders",
                ("DualCLIPLoader", "clip_name2"): "models/text_encoders",
                ("TripleCLIPLoader", "clip_name1"): "models/text_encoders",
                ("TripleCLIPLoader", "clip_name2"): "models/text_encoders",
                ("TripleCLIPLoader", "clip_name3"): "models/text_encoders",
                ("VAELoader", "vae_name"): "models/vae",
                ("LoadImage", "image"): "input"}


def setup_note(api: dict) -> str:
    """What every workflow's Note starts with: the GPU count it is saved for and how to change it, and which file goes
    in which ComfyUI folder (read off the graph, so it cannot disagree with it)."""
    # the parallel one where a workflow has several (the setup check's one-GPU reference has all degrees 1)
    conf = max((n["inputs"] for n in api.values() if n["class_type"] == "XDiTConfigureHybridParallel"),
               key=lambda c: (c.get("layout") == "auto", math.prod(c.get(d, 1) for d in DEGREES)))
    if conf.get("layout") == "auto":
        gpus = "Set for every GPU found (Configure Hybrid Parallel: layout auto)."
    else:
        used = [f"{d} {conf[d]}" for d in DEGREES if conf.get(d, 1) != 1] or ["all degrees 1"]
        n = 1
        for d in DEGREES:
            n *= conf.get(d, 1)
        gpus = f"Set for {n} GPU{'s' if n != 1 else ''} (Configure Hybrid Parallel: {' x '.join(used)})."
    files: dict[str, list[str]] = {}
    tiny: list[str] = []
    for node in api.values():
        for name, value in node["inputs"].items():
            folder = FILE_FOLDERS.get((node["class_type"], name))
            if value in TINY_MODELS:
                tiny.append(value)
            elif folder and isinstance(value, str) and value not in files.get(folder, []):
                files.setdefault(folder, []).append(value)
    lines = [gpus + " Other GPU counts: set its layout to auto (the planner picks degrees for the GPUs it finds), "
             "or set the degrees so that their product is the GPU count (ulysses_degree must divide the model's "
             "attention heads; cfg_degree 2 needs cfg > 1).", "", "Files (under ComfyUI/):"]
    lines += [f"- {folder}/: {', '.join(names)}" for folder, names in files.items()]
    if tiny and not files:
        lines[-1] = (f"Files: none ({', '.join(dict.fromkeys(tiny))} is built in). Your own checkpoints go in "
                     "ComfyUI/models/diffusion_models/.")
    return "\n".join(lines)


def add_note(ui: dict, text: str) -> None:
    """A Note node (the editor's own) in the first column, below the nodes there."""
    first = [n for n in ui["nodes"] if n["pos"][0] == 40]
    y = max((n["pos"][1] + n["size"][1] for n in first), default=0) + TITLE + ROW_GAP
    lines = sum(max(1, -(-len(par) // 44)) for par in text.split("\n"))
    nid = ui["last_node_id"] + 1
    ui["nodes"].append({"id": nid, "type": "Note", "pos": [40, y], "size": [NODE_WIDTH, 40 + 17 * lines],
                        "flags": {}, "order": len(ui["nodes"]), "mode": 0, "inputs": [], "outputs": [],
                        "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    ui["last_node_id"] = nid


def to_ui(api: dict, object_info: dict) -> dict:
    """UI-format graph (what ComfyUI's editor saves) for an API-format graph."""
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(nid), None, None, name])
                out_links.setdefault((value[0], value[1]), []).append(len(links))
    for order, (nid, node) in enumerate(api.items()):
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, conf in ordered_inputs(info):
            if is_link_type(conf[0]):
                link = next((l for l in links if l[3] == int(nid) and l[6] == name), None)
                slot = len(inputs)
                inputs.append({"name": name, "type": conf[0], "link": link[0] if link else None})
                if link:
                    link[4], link[5] = slot, conf[0]
            elif name in node["inputs"]:
                widgets.append(node["inputs"][name])
                if has_control(conf):
                    widgets.append("fixed")
        outputs = [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (t, n) in enumerate(zip(info["output"], info.get("output_name", info["output"])))]
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [0, 0],
                      "size": [NODE_WIDTH, node_height(info, len(inputs), len(outputs))],
                      "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    layout(api, nodes)
    return {"last_node_id": max(int(n) for n in api), "last_link_id": len(links), "nodes": nodes,
            "links": [l[:6] for l in links], "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--object-info", default=None, help="a saved GET /object_info answer instead of a server")
    args = p.parse_args()
    if args.object_info:
        object_info = json.loads(Path(args.object_info).read_text())
    else:
        with urllib.request.urlopen(args.server.rstrip("/") + "/object_info", timeout=60) as r:
            object_info = json.load(r)
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    for kind in EXAMPLES:
        api = graph(kind)
        (OUT / "api" / f"{kind}.json").write_text(json.dumps(api, indent=2) + "\n")
        ui = to_ui(api, object_info)
        note = setup_note(api)
        add_note(ui, note + ("\n\n" + NOTES[kind] if kind in NOTES else ""))
        (OUT / f"{kind}.json").write_text(json.dumps(ui, indent=2) + "\n")
        print("wrote", kind)
    print("now redraw their thumbnails: python scripts/screenshot_workflows.py --comfyui $COMFYUI_DIR")


if __name__ == "__main__":
    main()
