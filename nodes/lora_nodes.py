"""Parallel LoRA: a LoRA from ComfyUI's loras folder added to an XDIT_MODEL's set. The set travels with each
sample job to the pool, whose ranks patch the weights they hold (and restore them for another set)."""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from . import queue_check, schemas
from .checkpoints import LORA_SUFFIXES as SUFFIXES  # noqa: F401 - the files the pool reads
from .checkpoints import LoraNodeError, lora_names  # noqa: F401 - the loras folder's files the node lists
from .checkpoints import resolve_lora as resolve
from .pool import ModelHandle


class ParallelLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schemas.lora()

    @classmethod
    def validate_inputs(cls, lora_name=None):  # the one argument: schemas.VALIDATED
        return queue_check.problem_for(getattr(getattr(cls, "hidden", None), "unique_id", None))

    @classmethod
    def execute(cls, model, lora_name, strength_model):
        if not isinstance(model, ModelHandle):
            raise LoraNodeError("Parallel LoRA: model must come from Load Parallel DiT")
        strength = float(strength_model)
        if strength == 0.0:  # as LoraLoaderModelOnly: the model unchanged
            return (model,)
        path = resolve(lora_name)
        return (dataclasses.replace(model, loras=(*model.loras, (path, strength))),)


NODES = (ParallelLoRA,)
