"""The nodes' V3 schemas (ComfyUI's comfy_api.latest io.Schema): every input's name, type, default, limits and
tooltip, declared once. The node classes (xdit_nodes.py, lora_nodes.py, setup_check.py, stock_model.py) return these
from define_schema, and the queue-time checks (queue_check.py, auto_layout.py) read the same declarations, so this
module imports none of those: no import circle between the node modules. Input names, defaults and their order are
the V1 nodes' (saved and API-format workflows address widgets by them; tests/data/node_inputs_main.json)."""
from __future__ import annotations

from comfy_api.latest import io

from . import checkpoints
from .families import VARIANTS, sampler_names, scheduler_names
from .pool import ATTENTION, DEVICES

CATEGORY, TESTING_CATEGORY = "xDiT", "xDiT/testing"
CONFIGURE, LOAD, SAMPLER, SAMPLER_ADVANCED = ("XDiTConfigureHybridParallel", "XDiTLoadParallelDiT",
                                              "XDiTParallelSampler", "XDiTParallelSamplerAdvanced")
LORA, STOCK_MODEL, TINY_CONDITIONING, SETUP_CHECK = ("XDiTParallelLoRA", "XDiTParallelDiTModel",
                                                     "XDiTTinyConditioning", "XDiTSetupCheck")
SAMPLERS = (SAMPLER, SAMPLER_ADVANCED)  # the same queue-time checks: both take a model, cfg and a latent
DTYPES = ("bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
FAMILIES = ("auto", *dict.fromkeys(v.family for v in VARIANTS.values()), *VARIANTS)
MAX_SEED = 0xFFFFFFFFFFFFFFFF
ENABLE = ("enable", "disable")
# The one input each checked node's validate_inputs takes: ComfyUI reports a validation message once per argument
# of that method, prefixed with the argument's name; the queue-time check's line is about the node as a whole.
VALIDATED = {CONFIGURE: "ulysses_degree", LOAD: "checkpoint", SAMPLER: "model", SAMPLER_ADVANCED: "model",
             LORA: "lora_name"}

ParallelConfig = io.Custom("XDIT_PARALLEL_CONFIG")  # Configure Hybrid Parallel's output
XDiTModel = io.Custom("XDIT_MODEL")  # Load Parallel DiT's and Parallel LoRA's output


def _degree(name: str, tip: str, maximum: int = 64, optional: bool = False):
    return io.Int.Input(name, default=1, min=1, max=maximum, tooltip=tip, optional=optional)


def configure() -> io.Schema:
    return io.Schema(
        node_id=CONFIGURE, display_name="Configure Hybrid Parallel (xDiT)", category=CATEGORY,
        description=("How a Parallel DiT runs: on which device and GPUs, and how the work is split. The product of "
                     "the degrees is the number of ranks (one per GPU): it must not exceed the GPUs you have."),
        inputs=[
            io.Combo.Input("device", options=list(DEVICES), default="auto", tooltip="auto: CUDA when torch sees a GPU"),
            _degree("ulysses_degree", "sequence parallel over attention heads (all-to-all); must divide the model's "
                    "attention heads (Flux.1 24, SD3.5 Large 38, Wan 14B 40, ...)"),
            _degree("ring_degree", "sequence parallel with K/V passed around a ring; any degree up to the image "
                    "tokens (where Ulysses cannot divide the heads)"),
            _degree("pipefusion_degree", "pipeline stages over the transformer blocks; at most the model's blocks, "
                    "Parallel Sampler only (not Parallel DiT Model), not with two-expert Wan 2.2"),
            _degree("cfg_degree", "2: positive and negative branches on separate halves; needs a cfg other than 1 "
                    "(a negative branch)", maximum=2),
            _degree("dp_degree", "data parallel over the batch; at most the batch size"),
            io.Int.Input("num_patches", default=0, min=0, max=64,
                         tooltip="PipeFusion patches; 0 = the pipefusion degree"),
            io.Int.Input("warmup_steps", default=1, min=0, max=100,
                         tooltip="synchronous steps before PipeFusion's stale-K/V steps"),
            io.Combo.Input("attention", options=list(ATTENTION), default="auto",
                           tooltip="preferred SDPA kernel on CUDA"),
            io.String.Input("gpus", default="", optional=True,
                            tooltip="CUDA GPU numbers, e.g. 0,1,2,3; empty = the first ones"),
            io.String.Input("pool_address", default="", optional=True,
                            tooltip="tcp://HOST:PORT of a pool started with `python -m comfyui_xdit serve`; "
                                    "empty = start one here"),
            _degree("shard_degree", "FSDP2: split every block's weights over this many of the ranks (innermost "
                    "degrees, e.g. the ulysses ones); alone, that many GPUs pool their memory and compute the same "
                    "step", optional=True),
            io.Boolean.Input("shard_keep", default=False, optional=True,
                             tooltip="keep each block's gathered weights for the whole job (one gather per block "
                                     "per job, more memory)"),
            io.Combo.Input("layout", options=["auto", "manual"], default="auto", optional=True, tooltip=(
                "auto: when queued, pick the degrees (ulysses, ring, cfg, dp, shard; fp8 storage when nothing "
                "else fits) for the GPUs, the checkpoint and the sampler's job from a cost model, and show why; "
                "manual: the degree widgets; last, so saved workflows keep their widget order")),
        ],
        outputs=[ParallelConfig.Output(display_name="parallel_config")],
        hidden=[io.Hidden.unique_id])


def load() -> io.Schema:
    names = checkpoints.list_checkpoints()
    return io.Schema(
        node_id=LOAD, display_name="Load Parallel DiT (xDiT)", category=CATEGORY,
        description=("Loads a diffusion transformer (families: "
                     + ", ".join(dict.fromkeys(v.family for v in VARIANTS.values()))
                     + ") on the worker pool of the parallel config (starting the pool, or restarting it when the "
                     "config changed). Text encoders and VAE stay ComfyUI's own loaders."),
        inputs=[
            ParallelConfig.Input("parallel_config"),
            io.Combo.Input("checkpoint", options=names, tooltip="from models/diffusion_models, unet or checkpoints"),
            io.Combo.Input("weight_dtype", options=list(DTYPES), default="bf16",
                           tooltip="fp8_*: weights stored in fp8, computed in bf16"),
            io.Combo.Input("family", options=list(FAMILIES), default="auto", tooltip="auto: detected from the weights"),
            io.Combo.Input("checkpoint_2", options=["none", *names], default="none", optional=True, tooltip=(
                "Wan 2.2 A14B as one model: the low-noise expert file, with the high-noise one as checkpoint (the "
                "experts switch at the published boundary_ratio)")),
        ],
        outputs=[XDiTModel.Output(display_name="model")],
        hidden=[io.Hidden.unique_id])


def _seed(name: str) -> io.Int.Input:
    return io.Int.Input(name, default=0, min=0, max=MAX_SEED, control_after_generate=True)


def _sampler_name() -> io.Combo.Input:
    return io.Combo.Input("sampler_name", options=sampler_names(), tooltip=(
        "euler and dpmpp_2m run in the pool's own loop (every method, the step cache); the others run as ComfyUI's "
        "own sampler over the pool's forwards, as with Parallel DiT Model (Ulysses, Ring, CFG, DP, shard; a "
        "single-file checkpoint ComfyUI detects)"))


def _cache_options() -> list:
    return [
        io.Combo.Input("cache", options=["none", "fbcache"], default="none", optional=True, tooltip=(
            "First-block cache: on steps where the first block's residual changed less than the threshold, reuse "
            "the other blocks' residual from the last computed step instead of running them.")),
        io.Float.Input("cache_threshold", default=0.1, min=0.0, max=10.0, step=0.01, optional=True,
                       tooltip="relative change under which a step is reused"),
        io.Int.Input("cache_warmup", default=1, min=1, max=10000, optional=True,
                     tooltip="first steps always computed"),
        io.Int.Input("cache_max_consecutive", default=0, min=0, max=10000, optional=True,
                     tooltip="most reused steps in a row (0: no limit)"),
    ]


def cache_fields(cache, threshold, warmup, max_consecutive) -> dict | None:
    """The step cache's settings (the pool's CacheFields) from the _cache_options widgets; None: no cache."""
    if cache != "fbcache":
        return None
    return {"threshold": float(threshold), "warmup": int(warmup), "max_consecutive": int(max_consecutive)}


def _sampler_options() -> list:
    return [
        *_cache_options(),
        io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.01, optional=True, tooltip=(
            "flow models (Wan, SD3): the sampling shift, as ModelSamplingSD3 sets it on a native model; 0: the "
            "model's own (Wan 8.0)")),
        io.Boolean.Input("compile", default=False, optional=True, tooltip=(
            "regional torch.compile: each repeated transformer block class compiled once per shape and layout, kept "
            "by the pool for later jobs (the first job pays the compilation; euler and dpmpp_2m only)")),
    ]


def sampler() -> io.Schema:
    return io.Schema(
        node_id=SAMPLER, display_name="Parallel Sampler (xDiT)", category=CATEGORY,
        description=("KSampler for a Parallel DiT: the denoising loop runs on the worker pool, with ComfyUI's "
                     "noise, schedulers and conditioning; decode the result with VAE Decode."),
        inputs=[
            XDiTModel.Input("model"), io.Conditioning.Input("positive"), io.Conditioning.Input("negative"),
            io.Latent.Input("latent_image"), _seed("seed"),
            io.Int.Input("steps", default=20, min=1, max=10000),
            io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01),
            _sampler_name(), io.Combo.Input("scheduler", options=scheduler_names()),
            io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
            *_sampler_options(),
        ],
        outputs=[io.Latent.Output()],
        hidden=[io.Hidden.unique_id])


def sampler_advanced() -> io.Schema:
    return io.Schema(
        node_id=SAMPLER_ADVANCED, display_name="Parallel Sampler (Advanced) (xDiT)", category=CATEGORY,
        description=("KSamplerAdvanced for a Parallel DiT: runs steps start_at_step..end_at_step of a `steps` "
                     "schedule on the worker pool, with or without adding noise and returning the leftover noise, so "
                     "that two samplers can share one schedule (as Wan 2.2's high-noise and low-noise stages do)."),
        inputs=[
            XDiTModel.Input("model"),
            io.Combo.Input("add_noise", options=list(ENABLE),
                           tooltip="disable: the latent already holds its noise (a second stage)"),
            _seed("noise_seed"),
            io.Int.Input("steps", default=20, min=1, max=10000),
            io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
            _sampler_name(), io.Combo.Input("scheduler", options=scheduler_names()),
            io.Conditioning.Input("positive"), io.Conditioning.Input("negative"), io.Latent.Input("latent_image"),
            io.Int.Input("start_at_step", default=0, min=0, max=10000),
            io.Int.Input("end_at_step", default=10000, min=0, max=10000),
            io.Combo.Input("return_with_leftover_noise", options=["disable", "enable"], tooltip=(
                "enable: stop at end_at_step's noise level (for a next stage); disable: denoise fully there")),
            *_sampler_options(),
        ],
        outputs=[io.Latent.Output()],
        hidden=[io.Hidden.unique_id])


def lora() -> io.Schema:
    return io.Schema(
        node_id=LORA, display_name="Parallel LoRA (xDiT)", category=CATEGORY,
        description=("LoraLoaderModelOnly for a Parallel DiT: adds a LoRA (ComfyUI/kohya, diffusers/PEFT, "
                     "ai-toolkit, musubi/LightX2V formats) to the model's set; chain several. Each pool rank patches "
                     "the weights it holds before sampling and restores them when the set changes, without "
                     "reloading the model."),
        inputs=[
            XDiTModel.Input("model"),
            io.Combo.Input("lora_name", options=checkpoints.lora_names(), tooltip="from models/loras (.safetensors)"),
            io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01),
        ],
        outputs=[XDiTModel.Output(display_name="model")],
        hidden=[io.Hidden.unique_id])


def stock_model() -> io.Schema:
    return io.Schema(
        node_id=STOCK_MODEL, display_name="Parallel DiT Model (xDiT)", category=CATEGORY,
        description=("The Parallel DiT as a ComfyUI MODEL for stock sampling nodes (KSampler, "
                     "SamplerCustomAdvanced, guiders, ModelSampling shift nodes): ComfyUI runs the sampling loop, "
                     "the worker pool runs each transformer forward with Ulysses / Ring inside it and the cond/uncond "
                     "batch split over CFG and DP ranks. PipeFusion stays in Parallel Sampler. The step cache spans "
                     "each sampling run's forwards (samplers that call the model at the schedule's noise levels)."),
        inputs=[XDiTModel.Input("model"), *_cache_options()], outputs=[io.Model.Output(display_name="model")])


def tiny_conditioning() -> io.Schema:
    return io.Schema(
        node_id=TINY_CONDITIONING, display_name="Tiny Conditioning (xDiT)", category=TESTING_CATEGORY,
        description=("Random conditioning in the shape the loaded model's text encoders make (tokens x the "
                     "encoder's width, plus the pooled vector and guidance where the family takes them), for checking "
                     "a set-up with the built-in tiny models without downloading text encoders. Not for real "
                     "images."),
        inputs=[
            XDiTModel.Input("model"),
            io.Int.Input("seed", default=0, min=0, max=MAX_SEED, tooltip="the same seed, the same values"),
            io.Int.Input("tokens", default=8, min=1, max=4096, tooltip="text tokens per prompt"),
        ],
        outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")])


def setup_check() -> io.Schema:
    return io.Schema(
        node_id=SETUP_CHECK, display_name="Setup Check (xDiT)", category=TESTING_CATEGORY,
        description=("Compares the parallel sampler's latent with one GPU's (all degrees 1) for the same model, "
                     "conditioning, latent and seed: PASS when their relative L2 difference is within the "
                     "tolerance, an error with the numbers otherwise."),
        inputs=[
            io.Latent.Input("parallel", tooltip="the parallel run's result"),
            io.Latent.Input("reference", tooltip="one GPU's result (Configure Hybrid Parallel, all degrees 1)"),
            io.Float.Input("tolerance", default=1e-4, min=0.0, max=1.0, step=1e-5, round=False,
                           tooltip="largest relative L2 difference that passes (fp32: 1e-4; bf16: 2e-2)"),
        ],
        outputs=[], is_output_node=True)


SCHEMAS = {CONFIGURE: configure, LOAD: load, SAMPLER: sampler, SAMPLER_ADVANCED: sampler_advanced, LORA: lora,
           STOCK_MODEL: stock_model, TINY_CONDITIONING: tiny_conditioning, SETUP_CHECK: setup_check}


def widgets(node_id: str) -> list:
    """The inputs of a node that take constants (widgets), in order; a link input (a socket type) is left out."""
    return [i for i in SCHEMAS[node_id]().inputs or [] if isinstance(i, WIDGETS)]


WIDGETS = (io.Int.Input, io.Float.Input, io.String.Input, io.Boolean.Input, io.Combo.Input)
