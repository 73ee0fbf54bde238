"""The nodes: thin adapters between ComfyUI's types and the worker pool."""
from __future__ import annotations

import logging
from typing import Any

from . import auto_layout, checkpoints, convert, queue_check, wan_image
from .families import SAMPLERS, VARIANTS, sampler_names, scheduler_names, spec
from .pool import ATTENTION, DEVICES, MANAGER, ModelHandle, settings_from_inputs, validation_error

log = logging.getLogger("comfyui_xdit.nodes")

CATEGORY = "xDiT"
DTYPES = ("bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
FAMILIES = ("auto", *dict.fromkeys(v.family for v in VARIANTS.values()), *VARIANTS)
MAX_SEED = 0xFFFFFFFFFFFFFFFF
HIDDEN = {queue_check.HIDDEN: "UNIQUE_ID"}  # the node id, for the queue-time check's verdict


class XDiTNodeError(Exception):
    """One clear message for ComfyUI's error dialog."""


def _degree(default: int = 1, maximum: int = 64, tip: str = "") -> tuple:
    return ("INT", {"default": default, "min": 1, "max": maximum, "tooltip": tip})


class ConfigureHybridParallel:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("XDIT_PARALLEL_CONFIG",)
    RETURN_NAMES = ("parallel_config",)
    FUNCTION = "configure"
    DESCRIPTION = ("How a Parallel DiT runs: on which device and GPUs, and how the work is split. The product of "
                   "the degrees is the number of ranks (one per GPU).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "device": (list(DEVICES), {"default": "auto", "tooltip": "auto: CUDA when torch sees a GPU"}),
                "ulysses_degree": _degree(tip="sequence parallel over attention heads (all-to-all)"),
                "ring_degree": _degree(tip="sequence parallel with K/V passed around a ring"),
                "pipefusion_degree": _degree(tip="pipeline stages over the transformer blocks"),
                "cfg_degree": _degree(maximum=2, tip="2: positive and negative branches on separate halves"),
                "dp_degree": _degree(tip="data parallel over the batch"),
                "num_patches": ("INT", {"default": 0, "min": 0, "max": 64,
                                        "tooltip": "PipeFusion patches; 0 = the pipefusion degree"}),
                "warmup_steps": ("INT", {"default": 1, "min": 0, "max": 100,
                                         "tooltip": "synchronous steps before PipeFusion's stale-K/V steps"}),
                "attention": (list(ATTENTION), {"default": "auto", "tooltip": "preferred SDPA kernel on CUDA"}),
            },
            "optional": {
                "gpus": ("STRING", {"default": "", "tooltip": "CUDA GPU numbers, e.g. 0,1,2,3; empty = the first ones"}),
                "pool_address": ("STRING", {"default": "", "tooltip": "tcp://HOST:PORT of a pool started with "
                                            "`python -m comfyui_xdit serve`; empty = start one here"}),
                "shard_degree": _degree(tip="FSDP2: split every block's weights over this many of the ranks "
                                        "(innermost degrees, e.g. the ulysses ones); alone, that many GPUs "
                                        "pool their memory and compute the same step"),
                "shard_keep": ("BOOLEAN", {"default": False, "tooltip": "keep each block's gathered weights for "
                                           "the whole job (one gather per block per job, more memory)"}),
                "layout": (["auto", "manual"], {"default": "auto", "tooltip": (
                    "auto: when queued, pick the degrees (ulysses, ring, cfg, dp, shard; fp8 storage when nothing "
                    "else fits) for the GPUs, the checkpoint and the sampler's job from a cost model, and show why; "
                    "manual: the degree widgets; last, so saved workflows keep their widget order")}),
            },
            "hidden": dict(HIDDEN),
        }

    @staticmethod
    def settings(device, ulysses_degree, ring_degree, pipefusion_degree, cfg_degree, dp_degree, num_patches,
                 warmup_steps, attention, gpus="", pool_address="", shard_degree=1, shard_keep=False, layout="manual"):
        """The XDIT_PARALLEL_CONFIG value for these widget values (not yet validated; `layout` auto has written its
        degrees into them when the prompt was queued)."""
        return settings_from_inputs(device=device, ulysses=int(ulysses_degree), ring=int(ring_degree),
                                    pipefusion=int(pipefusion_degree), cfg=int(cfg_degree), dp=int(dp_degree),
                                    num_patches=int(num_patches), warmup_steps=int(warmup_steps),
                                    attention=attention, gpus=gpus or "", address=pool_address or "",
                                    shard=int(shard_degree), shard_keep=bool(shard_keep))

    @classmethod
    def VALIDATE_INPUTS(cls, xdit_check=None):
        auto = auto_layout.problem_for(xdit_check)
        return auto if auto is not True else queue_check.problem_for(xdit_check)

    def configure(self, device, ulysses_degree, ring_degree, pipefusion_degree, cfg_degree, dp_degree, num_patches,
                  warmup_steps, attention, gpus="", pool_address="", shard_degree=1, shard_keep=False,
                  xdit_check=None, layout="manual"):  # "manual": prompts saved before the widget keep their degrees
        s = self.settings(device, ulysses_degree, ring_degree, pipefusion_degree, cfg_degree, dp_degree,
                          num_patches, warmup_steps, attention, gpus, pool_address, shard_degree, shard_keep)
        err = validation_error(s)
        if err:
            raise XDiTNodeError(err)
        if layout != "auto":
            return (s,)
        line = auto_layout.reason_for(xdit_check) or "auto: not resolved when queued; the degrees as set"
        log.info("xDiT Configure Hybrid Parallel: %s", line)
        return {"ui": {"text": [line]}, "result": (s,)}


class LoadParallelDiT:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("XDIT_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    DESCRIPTION = ("Loads a diffusion transformer (families: "
                   + ", ".join(dict.fromkeys(v.family for v in VARIANTS.values()))
                   + ") on the worker pool of the parallel config (starting the pool, or restarting it when the "
                   "config changed). Text encoders and VAE stay ComfyUI's own loaders.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "parallel_config": ("XDIT_PARALLEL_CONFIG",),
                "checkpoint": (checkpoints.list_checkpoints(), {"tooltip": "from models/diffusion_models, unet or "
                                                                "checkpoints"}),
                "weight_dtype": (list(DTYPES), {"default": "bf16", "tooltip": "fp8_*: weights stored in fp8, "
                                                "computed in bf16"}),
                "family": (list(FAMILIES), {"default": "auto", "tooltip": "auto: detected from the weights"}),
            },
            "optional": {
                "checkpoint_2": (["none", *checkpoints.list_checkpoints()], {
                    "default": "none", "tooltip": "Wan 2.2 A14B as one model: the low-noise expert file, with the "
                    "high-noise one as checkpoint (the experts switch at the published boundary_ratio)"}),
            },
            "hidden": dict(HIDDEN),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, xdit_check=None):
        return queue_check.problem_for(xdit_check)

    def load(self, parallel_config, checkpoint, weight_dtype, family, checkpoint_2="none", xdit_check=None):
        try:
            path = checkpoints.resolve(checkpoint)
            if checkpoint_2 not in (None, "", "none"):  # two experts: one source (the engine's pair)
                from comfyui_xdit.weights import pair_source

                path = pair_source(path, checkpoints.resolve(checkpoint_2))
            variant = checkpoints.detect_variant(path, None if family == "auto" else family)
        except Exception as e:  # noqa: BLE001
            raise XDiTNodeError(f"Load Parallel DiT: {e}") from None
        engine_family = None if family == "auto" else family
        try:
            client = MANAGER.client_for(parallel_config)
            info = client.load(path, engine_family, weight_dtype, parallel=parallel_config.load_degrees())
        except Exception as e:  # noqa: BLE001 - pool errors are one line already
            raise XDiTNodeError(f"Load Parallel DiT: {_one_line(e)}") from None
        loaded_family = info.get("family") or spec(variant).family
        if spec(variant).family != loaded_family:
            raise XDiTNodeError(f"Load Parallel DiT: the pool loaded {checkpoint} as {loaded_family}, "
                                f"expected {spec(variant).family}")
        return (ModelHandle(parallel_config, path, weight_dtype, loaded_family, variant, info["key"], info,
                            load_family=engine_family),)


class ParallelSampler:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    DESCRIPTION = ("KSampler for a Parallel DiT: the denoising loop runs on the worker pool, with ComfyUI's "
                   "noise, schedulers and conditioning; decode the result with VAE Decode.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("XDIT_MODEL",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (sampler_names(), {"tooltip": (
                    "euler and dpmpp_2m run in the pool's own loop (every method, the step cache); the others run "
                    "as ComfyUI's own sampler over the pool's forwards, as with Parallel DiT Model (Ulysses, Ring, "
                    "CFG, DP, shard; a single-file checkpoint ComfyUI detects)")}),
                "scheduler": (scheduler_names(),),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            },
            "optional": {
                "cache": (["none", "fbcache"], {"default": "none", "tooltip": (
                    "First-block cache: on steps where the first block's residual changed less than the threshold, "
                    "reuse the other blocks' residual from the last computed step instead of running them.")}),
                "cache_threshold": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.01,
                                              "tooltip": "relative change under which a step is reused"}),
                "cache_warmup": ("INT", {"default": 1, "min": 1, "max": 10000,
                                         "tooltip": "first steps always computed"}),
                "cache_max_consecutive": ("INT", {"default": 0, "min": 0, "max": 10000,
                                                  "tooltip": "most reused steps in a row (0: no limit)"}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": (
                    "flow models (Wan, SD3): the sampling shift, as ModelSamplingSD3 sets it on a native model; "
                    "0: the model's own (Wan 8.0)")}),
                "compile": ("BOOLEAN", {"default": False, "tooltip": (
                    "regional torch.compile: each repeated transformer block class compiled once per shape and "
                    "layout, kept by the pool for later jobs (the first job pays the compilation; euler and "
                    "dpmpp_2m only)")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", **HIDDEN},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, xdit_check=None):
        return queue_check.problem_for(xdit_check)

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise,
               cache="none", cache_threshold=0.1, cache_warmup=1, cache_max_consecutive=0, shift=0.0, compile=False,
               unique_id=None, xdit_check=None):
        return _sample("Parallel Sampler", model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                       scheduler, _cache_fields(cache, cache_threshold, cache_warmup, cache_max_consecutive),
                       unique_id, denoise=denoise, shift=shift, compile=compile)


ENABLE = ["enable", "disable"]


class ParallelSamplerAdvanced:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    DESCRIPTION = ("KSamplerAdvanced for a Parallel DiT: runs steps start_at_step..end_at_step of a `steps` schedule "
                   "on the worker pool, with or without adding noise and returning the leftover noise, so that two "
                   "samplers can share one schedule (as Wan 2.2's high-noise and low-noise stages do).")

    @classmethod
    def INPUT_TYPES(cls):
        base = ParallelSampler.INPUT_TYPES()
        req = base["required"]
        return {
            "required": {
                "model": req["model"],
                "add_noise": (list(ENABLE), {"tooltip": "disable: the latent already holds its noise (a second "
                                             "stage)"}),
                "noise_seed": req["seed"],
                "steps": req["steps"],
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": req["sampler_name"],
                "scheduler": req["scheduler"],
                "positive": req["positive"],
                "negative": req["negative"],
                "latent_image": req["latent_image"],
                "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
                "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
                "return_with_leftover_noise": (["disable", "enable"], {"tooltip": (
                    "enable: stop at end_at_step's noise level (for a next stage); disable: denoise fully there")}),
            },
            "optional": dict(base["optional"]),
            "hidden": dict(base["hidden"]),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, xdit_check=None):
        return queue_check.problem_for(xdit_check)

    def sample(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, start_at_step, end_at_step, return_with_leftover_noise, cache="none",
               cache_threshold=0.1, cache_warmup=1, cache_max_consecutive=0, shift=0.0, compile=False,
               unique_id=None, xdit_check=None):
        name = "Parallel Sampler (Advanced)"
        for what, value in (("add_noise", add_noise), ("return_with_leftover_noise", return_with_leftover_noise)):
            if value not in ENABLE:
                raise XDiTNodeError(f"{name}: {what} must be enable or disable, got {value!r}")
        for what, value in (("start_at_step", start_at_step), ("end_at_step", end_at_step)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise XDiTNodeError(f"{name}: {what} must be a whole number >= 0, got {value!r}")
        return _sample(name, model, positive, negative, latent_image, noise_seed, steps, cfg, sampler_name,
                       scheduler, _cache_fields(cache, cache_threshold, cache_warmup, cache_max_consecutive),
                       unique_id, add_noise=add_noise == "enable", start_step=start_at_step, last_step=end_at_step,
                       force_full_denoise=return_with_leftover_noise == "disable", shift=shift, compile=compile)


def _cache_fields(cache, threshold, warmup, max_consecutive) -> dict | None:
    if cache != "fbcache":
        return None
    return {"threshold": float(threshold), "warmup": int(warmup), "max_consecutive": int(max_consecutive)}


def _sample(name: str, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
            cache: dict | None, unique_id, denoise: float = 1.0, add_noise: bool = True,
            start_step: int | None = None, last_step: int | None = None, force_full_denoise: bool = False,
            shift: float = 0.0, compile: bool = False):
    """KSampler's and KSamplerAdvanced's sampling (ComfyUI's common_ksampler) on the pool: the noise levels of the
    `steps` schedule (denoise truncates it), cut to [start_step : last_step + 1] with the last set to 0 when
    force_full_denoise cuts it short; ComfyUI's noise for the seed, or zeros without add_noise."""
    if not isinstance(model, ModelHandle):
        raise XDiTNodeError(f"{name}: model must come from Load Parallel DiT")
    if denoise <= 0.0:  # ComfyUI samples over no noise levels: the input as its fix_empty_latent_channels left it
        return (convert.unchanged_latent(latent_image, model.variant),)
    if start_step is not None and start_step >= min(steps if last_step is None else last_step, steps):
        return (convert.unchanged_latent(latent_image, model.variant),)  # nothing to run: ComfyUI returns the input
    if sampler_name not in SAMPLERS:
        if compile:
            raise XDiTNodeError(f"{name}: {sampler_name} runs as ComfyUI's own sampler over the pool's forwards, "
                                "without compile: use euler or dpmpp_2m to compile")
        return _sample_in_comfyui(name, model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                                  scheduler, cache, denoise, add_noise, start_step, last_step, force_full_denoise,
                                  shift)
    try:
        lat = convert.latent_input(latent_image, model.variant)
        image = _image_geometry(model)
        tensors, guidance = convert.conditioning_tensors(positive, negative, model.family, cfg != 1.0,
                                                         model.variant, image_input=image is not None,
                                                         use_native=lat["native"])
        if image is not None:  # Wan image-to-video: WanImageToVideo's latent, mask and CLIP vision
            tensors.update(wan_image.image_inputs(positive, negative, cfg != 1.0, lat["samples"], image.in_channels,
                                        image.image_dim, _comfy_objects(model.variant)[1]))
    except convert.ConversionError as e:
        raise XDiTNodeError(f"{name}: {e}") from None
    samples = lat["samples"]
    tensors["latent"] = samples
    if lat["given_frames"]:  # Wan 2.2 TI2V: the start image's latent frames (ComfyUI's noise_mask 0 on them)
        tensors["image_latent"] = samples[:, :, :lat["given_frames"]].contiguous()
    if add_noise:
        tensors["noise"] = convert.engine_noise_for(lat, seed, model.variant)
    else:
        tensors["noise"] = samples.new_zeros(samples.shape)
    full_steps = steps if denoise > 0.9999 else int(steps / denoise)  # the schedule denoise truncates
    try:
        model_sampling, latent_format = _comfy_objects(model.variant, tuple(samples.shape[-2:]), full_steps, shift,
                                                       use_native=lat["native"])
    except ValueError as e:
        raise XDiTNodeError(f"{name}: {e}") from None
    try:
        sigmas = convert.sigmas_for(model.variant, sampler_name, scheduler, steps, denoise, model_sampling)
    except ValueError as e:
        raise XDiTNodeError(f"{name}: {e}") from None
    sigmas = convert.step_range(sigmas, start_step, last_step, force_full_denoise)
    tensors["sigmas"] = sigmas
    tensors["noise"] = convert.engine_noise(tensors["noise"], sigmas, model.variant, model_sampling)
    fields = convert.request_fields(samples, steps, seed, cfg, guidance, sampler_name, model.variant)
    if cache is not None:
        fields["cache"] = cache
    if compile:
        fields["compile"] = True
    _free_comfy_vram(model)
    try:
        out = _run(model, fields, tensors, unique_id, len(sigmas) - 1, latent_format, lat["native"])
    except _PoolFailure as e:
        raise XDiTNodeError(f"{name}: {e}") from None
    return (convert.output_latent(latent_image, out, model.variant, use_native=lat["native"]),)


def _sample_in_comfyui(name: str, model: ModelHandle, positive, negative, latent_image, seed, steps, cfg,
                       sampler_name, scheduler, cache: dict | None, denoise: float, add_noise: bool,
                       start_step: int | None, last_step: int | None, force_full_denoise: bool, shift: float):
    """A sampler the pool's loop does not have: ComfyUI's own (its common_ksampler's steps), driving Parallel DiT
    Model's MODEL, whose forwards run on the pool with the handle's degrees. PipeFusion and the step cache need the
    pool's loop: refused in one line."""
    if model.settings.pipefusion > 1 or cache is not None:
        what = "PipeFusion" if model.settings.pipefusion > 1 else "the step cache"
        raise XDiTNodeError(f"{name}: {sampler_name} runs as ComfyUI's own sampler over the pool's forwards, "
                            f"without {what}: use {' or '.join(SAMPLERS)} for {what}")
    import comfy.sample
    import comfy.utils
    import latent_preview

    from .stock_model import StockModelError, stock_model

    try:
        patcher = stock_model(model)
    except StockModelError as e:
        raise XDiTNodeError(f"{name}: sampler {sampler_name} runs through {e}") from None
    samples = comfy.sample.fix_empty_latent_channels(patcher, latent_image["samples"])
    if shift:
        try:
            model_sampling, _ = _comfy_objects(model.variant, tuple(samples.shape[-2:]), steps, shift)
        except ValueError as e:
            raise XDiTNodeError(f"{name}: {e}") from None
        patcher.add_object_patch("model_sampling", model_sampling)
    if add_noise:
        noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
    else:
        noise = samples.new_zeros(samples.shape).cpu()
    out = comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative, samples,
                              denoise=denoise, disable_noise=not add_noise, start_step=start_step,
                              last_step=last_step, force_full_denoise=force_full_denoise,
                              noise_mask=latent_image.get("noise_mask"),
                              callback=latent_preview.prepare_callback(patcher, steps),
                              disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    result = dict(latent_image)
    result["samples"] = out
    return (result,)


def _image_geometry(model: ModelHandle):
    """The checkpoint's geometry when its input holds image conditioning (Wan I2V), else None."""
    from .geometry import geometry

    try:
        g = geometry(model.source)
    except Exception:  # noqa: BLE001 - loading read it already; no image input known
        return None
    return g if g.image_input and g.in_channels else None


def _comfy_objects(variant: str, latent_hw: tuple[int, int] | None = None, steps: int | None = None,
                   shift: float | None = None, use_native: bool = False):
    from .families import comfy_objects

    return comfy_objects(variant, latent_hw, steps, shift, use_native=use_native)


def _free_comfy_vram(model: ModelHandle) -> None:
    """The pool's ranks share the GPUs with ComfyUI: hand ComfyUI's cached models (encoders) back first."""
    if model.settings.address or model.settings.resolved_device() != "cuda":
        return
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


class _PoolFailure(Exception):
    """The pool's one-line reason a job failed; the sampler node names itself in front of it."""


def _run(model: ModelHandle, fields: dict, tensors: dict, unique_id: Any, total: int, latent_format: Any,
         use_native: bool = False):
    import comfy.model_management as mm
    import comfy.utils

    from ..runtime.errors import JobCancelled, PoolError
    from .progress import run_job

    pbar = comfy.utils.ProgressBar(total, node_id=unique_id)
    previewer = _previewer(latent_format)

    def on_step(step, steps, preview):
        image = None
        if previewer is not None and preview is not None:
            try:
                preview = (convert.engine_to_native(preview.float(), model.variant) if use_native
                           else convert.comfy_layout(preview.float(), model.variant))
                image = previewer.decode_latent_to_preview_image("JPEG", latent_format.process_in(preview))
            except Exception as e:  # noqa: BLE001 - a preview must never fail the job
                log.debug("xDiT preview failed: %s", e)
        pbar.update_absolute(step, steps, image)

    try:
        client = MANAGER.client_for(model.settings)
        # as Load Parallel DiT loaded it (the same key: no second copy), again if the pool restarted since
        key = client.load(model.source, model.load_family, model.dtype, parallel=model.settings.load_degrees())["key"]
        latents, info = run_job(client, key, fields, tensors, model.settings.degrees(), on_step=on_step,
                                check_interrupt=mm.throw_exception_if_processing_interrupted,
                                preview=previewer is not None,
                                **({"loras": model.lora_fields()} if model.loras else {}))
    except JobCancelled:
        mm.throw_exception_if_processing_interrupted()
        raise _PoolFailure("the pool cancelled the job") from None
    except PoolError as e:
        raise _PoolFailure(_one_line(e)) from None
    if "reused_steps" in info:
        log.info("xDiT sampler: the step cache reused %d of %d steps %s", len(info["reused_steps"]), total,
                 info["reused_steps"])
    return latents


def _previewer(latent_format):
    try:
        import latent_preview

        return latent_preview.get_previewer("cpu", latent_format)
    except Exception:  # noqa: BLE001 - no previews
        return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text


queue_check.register()

try:  # the stock-sampler model node, in its own module; a V3 node, so it needs ComfyUI's comfy_api at import
    from .stock_model import ParallelDiTModel  # noqa: E402
except ModuleNotFoundError as e:  # outside ComfyUI (pytest importing this checkout as a package): left out
    if not (e.name or "").startswith("comfy_api"):
        raise
    ParallelDiTModel = None

NODE_CLASS_MAPPINGS = {
    "XDiTConfigureHybridParallel": ConfigureHybridParallel,
    "XDiTLoadParallelDiT": LoadParallelDiT,
    "XDiTParallelSampler": ParallelSampler,
    "XDiTParallelSamplerAdvanced": ParallelSamplerAdvanced,
    **({"XDiTParallelDiTModel": ParallelDiTModel} if ParallelDiTModel is not None else {}),
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "XDiTConfigureHybridParallel": "Configure Hybrid Parallel (xDiT)",
    "XDiTLoadParallelDiT": "Load Parallel DiT (xDiT)",
    "XDiTParallelSampler": "Parallel Sampler (xDiT)",
    "XDiTParallelSamplerAdvanced": "Parallel Sampler (Advanced) (xDiT)",
    **({"XDiTParallelDiTModel": "Parallel DiT Model (xDiT)"} if ParallelDiTModel is not None else {}),
}
