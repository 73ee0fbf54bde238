"""Parallel DiT Model: an XDIT_MODEL as a ComfyUI MODEL that stock sampling nodes drive (KSampler, SamplerCustom-
Advanced with any guider, ModelSampling* shift nodes, ...). ComfyUI's own BaseModel of the family is built from the
checkpoint's header (meta tensors: no weights in ComfyUI's process) with its model_sampling, latent format and
extra_conds; its `diffusion_model` is a proxy whose forward sends one transformer forward to the pool and returns
the output as ComfyUI's model would. ComfyUI's loop gives progress, previews and cancel."""
from __future__ import annotations

import functools
import os
import secrets
from typing import Any

import torch
from comfy_api.latest import io

from . import schemas
from .families import TINY_VARIANT, applies_text_mask, native, reference_method_error, spec
from .pool import MANAGER, ModelHandle

NAME = "Parallel DiT Model"
# ComfyUI diffusion-model arguments a text-to-image forward may carry without changing anything here
_IGNORED = {"c_size", "c_ar"}  # PixArt micro-conditioning: Sigma's model does not use it (the engine passes none)
# The most seconds one forward may take before it is given up on (a frozen rank: the error names it when it is on rank
# 0's host); XDIT_FORWARD_TIMEOUT sets another. A dead rank is reported at once, whatever this is.
FORWARD_TIMEOUT_ENV, FORWARD_TIMEOUT_S = "XDIT_FORWARD_TIMEOUT", 300.0


def forward_timeout() -> float:
    value = os.environ.get(FORWARD_TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else FORWARD_TIMEOUT_S
    except ValueError:
        raise StockModelError(f"{NAME}: {FORWARD_TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if not 0 < seconds < float("inf"):
        raise StockModelError(f"{NAME}: {FORWARD_TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return seconds


class StockModelError(Exception):
    """One clear line for ComfyUI's error dialog."""


WEIGHT_PATCH_REFUSAL = (f"{NAME}'s weights live on the worker pool, so ComfyUI's weight patches (LoraLoader, "
                        "LoraLoaderModelOnly, model merging) cannot reach them: add LoRAs with "
                        "Parallel LoRA on Load Parallel DiT's model, before Parallel DiT Model")
HOOK_PATCH_REFUSAL = (f"{NAME}'s weights live on the worker pool, so a LoRA hook on the conditioning (Create Hook "
                      "LoRA, Create Hook Model as LoRA) cannot patch them: add LoRAs with Parallel LoRA on Load "
                      "Parallel DiT's model")


@functools.cache
def _patcher_class() -> type:
    """ComfyUI's ModelPatcher, refusing weight patches instead of dropping them (its LoRA loaders would find none
    of the model's keys in the weightless proxy and sample without the LoRA, with only a log warning; its weight
    hooks on conditioning, registered when sampling starts, without even that)."""
    import comfy.model_patcher

    class PoolModelPatcher(comfy.model_patcher.ModelPatcher):
        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            raise StockModelError(WEIGHT_PATCH_REFUSAL)

        def add_hook_patches(self, hook, patches, strength_patch=1.0, strength_model=1.0):
            if strength_patch == 0 and strength_model == 1:
                return []  # a hook of model strength 0 (one for the text encoder only) changes no weight
            raise StockModelError(HOOK_PATCH_REFUSAL)

    return PoolModelPatcher


def _meta_state_dict(path: str) -> dict[str, torch.Tensor]:
    from .geometry import tensor_shapes

    return {k: torch.empty(shape, dtype=torch.float32, device="meta") for k, shape in tensor_shapes(path).items()}


def _published_meta_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """The variant's published architecture as meta tensors (diffusers layout, from the engine's shipped config):
    what ComfyUI's detection reads for a built-in tiny model, which is no checkpoint ComfyUI knows. The tiny model
    takes the published model's latents and conditioning widths, so ComfyUI's side (model sampling, latent format,
    extra conds) is the published model's."""
    import json

    import diffusers

    from comfyui_xdit import families as registry
    from comfyui_xdit.weights import CONFIG_DIR

    fam, v = registry.variants()[variant]
    with torch.device("meta"):
        model = getattr(diffusers, fam.diffusers_class).from_config(json.loads((CONFIG_DIR / v.config).read_text()))
    return dict(model.state_dict())


def comfy_model_config(path: str, variant: str | None = None):
    """ComfyUI's model config for a checkpoint file (its detection, run on meta tensors of the header's shapes), or
    with `variant` for that variant's published architecture (a built-in tiny model)."""
    import comfy.model_detection as md
    import comfy.utils

    sd = _published_meta_state_dict(variant) if variant else _meta_state_dict(path)
    prefix = md.unet_prefix_from_state_dict(sd)
    stripped = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
    sd = stripped or sd
    config = md.model_config_from_unet(sd, "")
    if config is None:
        converted = md.convert_diffusers_mmdit(sd, "")
        if converted is not None:
            sd = converted
            config = md.model_config_from_unet(sd, "")
    if config is None:
        raise StockModelError(f"{NAME}: ComfyUI does not recognise the checkpoint {variant or path}")
    return config, sd


class PoolDiffusionModel(torch.nn.Module):
    """Stands in for ComfyUI's diffusion model: no weights; forward = one transformer forward on the pool. ComfyUI's
    own model, built on the meta device, is kept beside it (unregistered) for the attributes ComfyUI's BaseModel
    reads of its diffusion model (patch size, input channels...)."""

    def __init__(self, handle: ModelHandle, meta_model: torch.nn.Module | None, cache: dict | None = None):
        super().__init__()
        self.handle = handle
        self.cache = cache  # the step cache's settings (CacheFields), kept across the calls of each run
        self.flow = spec(handle.variant).model_type != "EPS"
        self.text_mask = applies_text_mask(handle.variant)  # the running ComfyUI's model applies attention_mask
        self.native = native(handle.variant)  # the running ComfyUI's own model of the variant (its latent layout)
        self.dtype = torch.float32
        object.__setattr__(self, "_meta", meta_model)
        self._client = None
        self._run = None   # the sampling run of the last forward (ComfyUI's sample_sigmas tensor)
        self._run_id, self._run_step = "", -1  # the step cache's name for that run, and its last step
        self._hashes: dict[tuple, tuple[torch.Tensor, torch.Tensor, str]] = {}  # this run's conds (_wire_cond)
        self.key = handle.key
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            meta = self.__dict__.get("_meta")
            if meta is None or name.startswith("_"):
                raise
            return getattr(meta, name)

    def _pool(self, run: Any) -> tuple[Any, bool]:
        """The pool's client for this forward, and whether the forward is a later call of the same sampling run. A
        pool that stopped during this run (a rank died) is an error; the next run starts it again and loads the
        model there."""
        same_run = run is not None and run is self._run
        if not same_run:
            self._hashes.clear()
            self._run_id, self._run_step = secrets.token_hex(8), -1
        self._run = run
        ours = self._client is not None and same_run
        # a dead pool is not restarted just to refuse the call; one that died after this check, which the manager
        # has already replaced, is this run's error too
        client = None if ours and not self._client.pool_alive() else MANAGER.client_for(self.handle.settings)
        if ours and client is not self._client:
            self._client = None
            raise StockModelError(f"{NAME}: the worker pool stopped during sampling (a rank exited); the next run "
                                  "starts it again")
        if client is not self._client:  # a new pool (first call, restart): make sure the model is on it
            info = client.load(self.handle.source, self.handle.load_family, self.handle.dtype)
            self.key = info["key"]
            self._client = client
        return client, same_run

    def _wire_cond(self, role: str, t: torch.Tensor, options: dict, to_wire) -> tuple[torch.Tensor, str]:
        """A conditioning tensor's wire form (CPU, `to_wire(t)`) and content hash, made once per sampling run:
        ComfyUI rebuilds the batch's tensors every step from the same conds (named by their uuids in
        transformer_options); a strided sample of the values, taken where the tensor is (a GPU's conditioning is not
        copied to the host on every call), guards the reuse."""
        from ..runtime.cond_cache import content_hash

        t = t.detach()
        n = t.numel()
        sample = t.reshape(-1)[torch.linspace(0, max(n - 1, 0), min(n, 4099), device=t.device).long()]
        key = (role, tuple(map(str, options.get("uuids") or ())), tuple(options.get("cond_or_uncond") or ()),
               tuple(t.shape), t.dtype, t.device)
        known = self._hashes.get(key) if options.get("uuids") else None
        if known is not None and torch.equal(known[0], sample):
            return known[1], known[2]
        wire = to_wire(t)
        digest = content_hash(wire)
        self._hashes[key] = (sample.clone(), wire, digest)
        return wire, digest

    def _reference_roles(self, kwargs: dict) -> dict:
        """Qwen-Image-Edit: the forward's ref_latents (model space, [B, 16, 1, h, w] each, as ComfyUI's QwenImage
        model gets them) as the engine's reference_latent inputs, popped from kwargs: back in ComfyUI's latent
        convention (the engine takes that), padded to even sizes as ComfyUI's model pads them (circular)."""
        if spec(self.handle.variant).family != "qwen-image" or kwargs.get("ref_latents") is None:
            return {}
        refs = list(kwargs.pop("ref_latents"))
        why = reference_method_error(kwargs.pop("ref_latents_method", None), self.handle.variant)
        if why:
            raise StockModelError(f"{NAME}: {why}")
        names = ("reference_latent", "reference_latent_2", "reference_latent_3")
        if len(refs) > len(names):
            raise StockModelError(f"{NAME}: {len(refs)} reference latents; at most {len(names)} are taken")
        from comfyui_xdit import families

        fmt = families.get("qwen-image").latent
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (fmt.mean, fmt.std))

        def to_wire(t: torch.Tensor) -> torch.Tensor:
            t = t.to("cpu", torch.float32)
            t = t[:, :, 0] if t.ndim == 5 else t
            pad = (0, t.shape[-1] % 2, 0, t.shape[-2] % 2)
            if any(pad):
                t = torch.nn.functional.pad(t, pad, mode="circular")
            return (t * std + mean).contiguous()

        return {name: (r, to_wire) for name, r in zip(names, refs)}

    def run_position(self, transformer_options: dict, batch: int) -> dict:
        """Where this forward sits in its sampling run, for the step cache (RunFields): the step is the index of the
        call's sigma in ComfyUI's schedule (sample_sigmas), the measured rows the positive ones (cond_or_uncond 0,
        one chunk of the batch each), as the Parallel Sampler measures its positive branch."""
        schedule, sigma = transformer_options.get("sample_sigmas"), transformer_options.get("sigmas")
        if not (isinstance(schedule, torch.Tensor) and isinstance(sigma, torch.Tensor) and sigma.numel()):
            raise StockModelError(f"{NAME}: the step cache needs the sampler's schedule (ComfyUI passed none)")
        s = schedule.detach().to("cpu", torch.float64).reshape(-1)
        cur = float(sigma.detach().reshape(-1)[0])
        found = [i for i in range(len(s) - 1) if abs(float(s[i]) - cur) <= 1e-6 * max(abs(cur), 1e-12)]
        if not found:
            raise StockModelError(f"{NAME}: the step cache needs a sampler that calls the model at the schedule's "
                                  f"noise levels; this one called it at sigma {cur:.4g}, between two steps (as dpm_2, "
                                  "dpmpp_2s_ancestral and dpmpp_sde do): use euler, dpmpp_2m, heun, uni_pc, ... or "
                                  "set cache to none")
        step = next((i for i in found if i >= self._run_step), found[-1])
        if step < self._run_step:
            raise StockModelError(f"{NAME}: the step cache needs a sampler that goes through the schedule once; this "
                                  f"one went back from step {self._run_step} to {step}: set cache to none")
        self._run_step = step
        chunks = list(transformer_options.get("cond_or_uncond") or [0])
        if batch % len(chunks):
            raise StockModelError(f"{NAME}: a batch of {batch} rows in {len(chunks)} cond/uncond chunks")
        measured = [c == 0 for c in chunks for _ in range(batch // len(chunks))]
        return {"id": self._run_id, "step": step, "steps": len(s) - 1, "measured": measured}

    def engine_timestep(self, timestep: torch.Tensor, transformer_options: dict, batch: int) -> torch.Tensor:
        """ComfyUI's model timestep -> the engine's: flow models take sigma * 1000 (the sigmas ComfyUI's loop
        passes in transformer_options, one per row), epsilon models the discrete timestep ComfyUI computed."""
        t = timestep.detach().to("cpu", torch.float32).reshape(-1)
        if not self.flow:
            return t
        sigmas = transformer_options.get("sigmas")
        if isinstance(sigmas, torch.Tensor) and sigmas.numel() and batch % sigmas.numel() == 0:
            s = sigmas.detach().to("cpu", torch.float32).reshape(-1)
            return s.repeat(batch // s.numel()) * 1000
        raise StockModelError(f"{NAME}: ComfyUI's sampler gave no sigmas for this forward")

    def forward(self, x, timesteps, context=None, y=None, guidance=None, attention_mask=None, control=None,
                transformer_options={}, **kwargs):  # noqa: B006 - ComfyUI's signature
        from ..runtime.errors import PoolError

        refs = self._reference_roles(kwargs)
        attention_mask = self._real_tokens(context, attention_mask, kwargs.pop("num_tokens", None))
        used = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED)
        if control is not None:
            used.append("control")
        if used:
            raise StockModelError(f"{NAME}: this forward carries {', '.join(used)} (ControlNet, reference latents, "
                                  "image conditioning), which the parallel model does not take yet")
        if context is None:
            raise StockModelError(f"{NAME}: the forward has no text conditioning")
        skip, patched = model_patches(transformer_options)
        if patched:
            raise StockModelError(f"{NAME}: ComfyUI model patches reach this forward ({patched}; e.g. from "
                                  "attention- or block-patching nodes); the worker pool runs the unpatched model "
                                  "(and skips blocks for SkipLayerGuidance), so remove that node from the graph")
        b = x.shape[0]
        roles = {"cond": (context, lambda t: t.to("cpu", torch.float32).contiguous())}
        if y is not None:
            roles["pooled"] = (y, lambda t: t.to("cpu", torch.float32).reshape(t.shape[0], -1).contiguous())
        if attention_mask is not None:
            if spec(self.handle.variant).family == "flux" or not self.text_mask:
                raise StockModelError(f"{NAME}: an attention_mask on {self.handle.variant} is not supported")
            roles["cond_mask"] = (attention_mask, lambda t: t.to("cpu").reshape(b, -1).to(torch.int64))
        roles.update(refs)
        g = None
        if guidance is not None:
            gv = guidance.detach().to("cpu", torch.float32).reshape(-1)
            if gv.numel() and not bool((gv == gv[0]).all()):
                raise StockModelError(f"{NAME}: rows of one forward have different Flux guidance values")
            g = float(gv[0]) if gv.numel() else None
        t = self.engine_timestep(timesteps, transformer_options, b)
        xin = x.detach().to(torch.float32)  # where ComfyUI holds it: the client's encode makes the one host copy
        patch = self._native_patch(xin)
        if patch > 1:  # the running ComfyUI's own model's layout (FLUX.2: 128 channels at 1/16) -> the engine's
            from .convert import unfold

            xin = unfold(xin, patch)
        try:
            client, later = self._pool(transformer_options.get("sample_sigmas"))
            wired = {role: self._wire_cond(role, v, transformer_options, f) for role, (v, f) in roles.items()}
            conds, hashes = {r: w[0] for r, w in wired.items()}, {r: w[1] for r, w in wired.items()}
            # a run's forwards share the context cache, and the step cache when it is on
            cached = {"cache": self.cache, "run": self.run_position(transformer_options, b)} if self.cache else \
                {"run": {"id": self._run_id}} if self._run is not None else {}
            if self.cache and skip:
                raise StockModelError(f"{NAME}: the step cache and SkipLayerGuidance do not compose (a skipped block "
                                      "would change the reused residual): set cache to none or remove the node")
            # within a run a pool that died is an error, never a silent restart (the check in _pool races the death)
            out = client.forward(self.key, xin, t, conds, guidance=g, parallel=self.handle.settings.degrees(),
                                 hashes=hashes, restart=not later, timeout=forward_timeout(),
                                 **({"skip_blocks": skip} if skip else {}), **cached)
        except PoolError as e:
            self._client = None  # a failed pool is checked (and the model loaded) again on the next call
            raise StockModelError(f"{NAME}: {str(e).strip() or type(e).__name__}") from None
        self.calls += 1
        if patch > 1:
            from .convert import fold

            out = fold(out, patch)
        return out.to(device=x.device, dtype=x.dtype)

    def _native_patch(self, x: torch.Tensor) -> int:
        """The patch folding the running ComfyUI's own model of the variant puts into its latents (the model space
        ComfyUI hands this forward: FLUX.2's 2x2 at 1/16), 1 for the engine's layout."""
        n = self.native
        if n is None or n.patch == 1 or x.ndim != 4:
            return 1
        channels = spec(self.handle.variant).channels
        if x.shape[1] == channels * n.patch ** 2:
            return n.patch
        if x.shape[1] != channels:
            raise StockModelError(f"{NAME}: a latent of {x.shape[1]} channels for {self.handle.variant} (expected "
                                  f"{channels * n.patch ** 2}, ComfyUI's layout, or {channels})")
        return 1

    def _real_tokens(self, context, attention_mask, num_tokens):
        """Lumina2's (Z-Image's) `num_tokens`: the CONDITIONING's real prompt tokens, which the newer ComfyUI passes
        on every call (from the attention_mask's count, else the context's length). It must agree with the mask; with
        no mask, fewer tokens than the context has are its leading ones (a mask of them is made). The attention_mask
        to use."""
        if num_tokens is None or context is None:
            return attention_mask
        try:
            n = int(torch.as_tensor(num_tokens).reshape(-1)[0])
        except (TypeError, ValueError, IndexError):
            raise StockModelError(f"{NAME}: num_tokens {num_tokens!r} is not a token count") from None
        length = context.shape[1]
        if not 1 <= n <= length:
            raise StockModelError(f"{NAME}: num_tokens {n} for a context of {length} tokens")
        if attention_mask is not None:
            counts = sorted(set((attention_mask.reshape(context.shape[0], -1) != 0).sum(dim=1).tolist()))
            if counts != [n] and not (n == 1 and counts == [0]):
                raise StockModelError(f"{NAME}: num_tokens {n} disagrees with the attention_mask's "
                                      f"{', '.join(map(str, counts))} real tokens")
            return attention_mask
        if n == length:
            return None
        mask = torch.zeros(context.shape[0], length, dtype=torch.int64, device=context.device)
        mask[:, :n] = 1
        return mask


def model_patches(transformer_options: dict) -> tuple[dict[str, list[int]], str]:
    """The model patches ComfyUI passes a forward (transformer_options' "patches" and "patches_replace": block
    replacements, attention and input/output patches): (the blocks to skip: block replacements that return their
    arguments, as SkipLayerGuidance's do, by kind; the patches the pool cannot run, '' when none)."""
    skip: dict[str, list[int]] = {}
    found = []
    for group in ("patches_replace", "patches"):
        for kind, entries in sorted((transformer_options.get(group) or {}).items()):
            if group == "patches_replace" and kind == "dit" and entries:
                for key in [k for k, fn in entries.items() if _skips_block(k, fn)]:
                    skip.setdefault(key[0], []).append(key[1])
                entries = {k: fn for k, fn in entries.items() if not _skips_block(k, fn)}
            if entries:
                names = sorted(map(str, entries))
                found.append(f"{group} {kind}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    return {k: sorted(v) for k, v in skip.items()}, "; ".join(found)


def _skips_block(key, fn) -> bool:
    """A "dit" block replacement that hands its arguments back untouched (the block skipped), by what it does."""
    if not (isinstance(key, tuple) and len(key) == 2 and key[0] in ("double_block", "single_block")
            and isinstance(key[1], int)):
        return False
    probe = {}

    def original_block(args):
        raise LookupError  # it runs the block: not a skip

    try:
        return fn(probe, {"original_block": original_block}) is probe
    except Exception:  # noqa: BLE001 - anything else it does is a patch the pool cannot run
        return False


def stock_model(handle: ModelHandle, cache: dict | None = None):
    """The ComfyUI MODEL (a ModelPatcher) for a loaded XDIT_MODEL; `cache`: the step cache's settings (CacheFields),
    applied across the forwards of each sampling run."""
    import os

    tiny = TINY_VARIANT.get(handle.source) == handle.variant
    if not tiny and not os.path.isfile(handle.source):
        raise StockModelError(f"{NAME}: needs a single-file checkpoint ComfyUI can detect or a built-in tiny model; "
                              f"{handle.source} is neither (diffusers folders run in Parallel Sampler)")
    if handle.settings.pipefusion > 1:
        raise StockModelError(f"{NAME}: PipeFusion needs the whole sampling loop: use Parallel Sampler for "
                              "pipefusion_degree > 1 (the parallel model runs Ulysses, Ring, CFG, DP and shard per "
                              "forward)")
    import comfy.model_management as mm

    config, sd = comfy_model_config(handle.source, handle.variant if tiny else None)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, "", device=torch.device("meta"))
    meta = model.diffusion_model
    model.diffusion_model = PoolDiffusionModel(handle, meta, cache)
    model.memory_usage_factor = 0.0  # activations live on the pool: ComfyUI frees nothing for them
    return _patcher_class()(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device(), size=1)


class ParallelDiTModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schemas.stock_model()

    @classmethod
    def execute(cls, model: ModelHandle, cache="none", cache_threshold=0.1, cache_warmup=1,
                cache_max_consecutive=0) -> io.NodeOutput:
        if not isinstance(model, ModelHandle):
            raise StockModelError(f"{NAME}: model must come from Load Parallel DiT")
        return io.NodeOutput(stock_model(model, schemas.cache_fields(cache, cache_threshold, cache_warmup,
                                                                     cache_max_consecutive)))


NODES = (ParallelDiTModel,)
