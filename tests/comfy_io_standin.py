"""A stand-in for the part of ComfyUI's V3 node schema (comfy_api.latest: io and ComfyExtension, ComfyUI 0.3.64) the
nodes use, for tests without ComfyUI: what ComfyUI's loader, /object_info and executor read of a V3 class (its V1
view: INPUT_TYPES, RETURN_TYPES, RETURN_NAMES, CATEGORY, DESCRIPTION, OUTPUT_NODE, FUNCTION), the hidden inputs it
sets on a copy of the class before calling execute or validate_inputs, and how a call's result is normalised. The
options each input type lists in its V1 view (ComfyUI leaves out those that are None) are 0.3.64's facts;
test_comfyui_e2e_stock.py compares the view with the real ComfyUI's /object_info."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class classproperty:  # noqa: N801 - a property read on the class, as ComfyUI's V3 classes expose their V1 view
    def __init__(self, getter):
        self.getter = getter

    def __get__(self, obj, owner):
        return self.getter(owner)


def _pruned(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class _Input:
    io_type = ""

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None):
        self.id, self.display_name, self.optional, self.tooltip, self.lazy = id, display_name, optional, tooltip, lazy

    def as_dict(self) -> dict:
        return _pruned({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                        "lazy": self.lazy})

    def v1(self) -> tuple[str, dict]:  # the V1 entry: the type and the options that are set, less `optional`
        d = self.as_dict()
        d.pop("optional", None)
        return self.io_type, d


class _Widget(_Input):
    def __init__(self, id: str, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                 socketless=None, force_input=None, **extra):
        super().__init__(id, display_name, optional, tooltip, lazy)
        self.default, self.socketless, self.force_input, self.extra = default, socketless, force_input, extra

    def as_dict(self) -> dict:
        return super().as_dict() | _pruned({"default": self.default, "socketless": self.socketless,
                                            "forceInput": self.force_input, **self.extra})


class _Output:
    io_type = ""

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def Custom(io_type: str) -> type:  # noqa: N802 - ComfyUI's name
    return type(f"Custom_{io_type}", (), {"io_type": io_type,
                                          "Input": type("Input", (_Input,), {"io_type": io_type}),
                                          "Output": type("Output", (_Output,), {"io_type": io_type})})


def _widget(io_type: str, options: tuple[str, ...], fixed: dict | None = None) -> type:
    """A widget type whose Input takes `options` as keywords (their V1 names as ComfyUI spells them)."""
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                 socketless=None, force_input=None, **kw):
        unknown = set(kw) - {k for k, _ in (o.split(":") if ":" in o else (o, o) for o in options)}
        if unknown:
            raise TypeError(f"{io_type}.Input: unexpected {sorted(unknown)}")
        extra = {**(fixed or {})}
        for o in options:
            arg, key = o.split(":") if ":" in o else (o, o)
            setattr(self, arg, kw.get(arg))  # as ComfyUI's inputs keep them (min, max, options, ...)
            if arg in kw:
                extra[key] = kw[arg]
        _Widget.__init__(self, id, display_name, optional, tooltip, lazy, default, socketless, force_input, **extra)

    t = Custom(io_type)
    t.Input = type("Input", (_Widget,), {"io_type": io_type, "__init__": __init__})
    return t


Int = _widget("INT", ("min", "max", "step", "control_after_generate", "display_mode:display"))
Float = _widget("FLOAT", ("min", "max", "step", "round", "display_mode:display"))
String = _widget("STRING", ("multiline", "placeholder", "dynamic_prompts:dynamicPrompts"), {"multiline": False})
Boolean = _widget("BOOLEAN", ("label_on", "label_off"))
Combo = _widget("COMBO", ("options", "control_after_generate"), {"multiselect": False})
Model, Latent, Conditioning = Custom("MODEL"), Custom("LATENT"), Custom("CONDITIONING")


class Hidden(str, enum.Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class HiddenHolder:
    def __init__(self, values: dict):
        for h in Hidden:
            setattr(self, h.name, values.get(h))


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list | None = None
    outputs: list | None = None
    hidden: list | None = None
    description: str = ""
    is_output_node: bool = False

    def finalize(self) -> "Schema":  # as ComfyUI's: an output node also gets the prompt and extra_pnginfo
        if self.is_output_node:
            self.hidden = [*(self.hidden or []), *(h for h in (Hidden.prompt, Hidden.extra_pnginfo)
                                                   if h not in (self.hidden or []))]
        return self


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: Any = None, block_execution: str | None = None):
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index) -> Any:
        return self.args[index]


class ComfyNode:
    hidden: HiddenHolder | None = None  # set on the copy of the class ComfyUI calls

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def INPUT_TYPES(cls, include_hidden: bool = True, return_schema: bool = False):  # noqa: N802
        schema = cls.define_schema().finalize()
        out: dict = {"required": {}}
        for i in schema.inputs or []:
            out.setdefault("optional" if i.optional else "required", {})[i.id] = i.v1()
        if include_hidden and schema.hidden:
            out["hidden"] = {h.name: (h.value,) for h in schema.hidden}
        return (out, schema) if return_schema else out

    @classmethod
    def PREPARE_CLASS_CLONE(cls, hidden_inputs: dict) -> type:  # noqa: N802
        return type(cls.__name__, (cls,), {"hidden": HiddenHolder(hidden_inputs)})

    FUNCTION = "EXECUTE_NORMALIZED"
    CATEGORY = classproperty(lambda cls: cls.define_schema().category)
    DESCRIPTION = classproperty(lambda cls: cls.define_schema().description)
    OUTPUT_NODE = classproperty(lambda cls: cls.define_schema().is_output_node)
    RETURN_TYPES = classproperty(lambda cls: tuple(o.io_type for o in cls.define_schema().outputs or []))
    RETURN_NAMES = classproperty(lambda cls: tuple(o.display_name or o.io_type
                                                   for o in cls.define_schema().outputs or []))

    @classmethod
    def EXECUTE_NORMALIZED(cls, *args, **kwargs) -> NodeOutput:  # noqa: N802
        out = cls.execute(*args, **kwargs)
        if out is None:
            return NodeOutput()
        if isinstance(out, tuple):
            return NodeOutput(*out)
        if not isinstance(out, NodeOutput):
            raise TypeError(f"Invalid return type from node: {type(out)}")
        return out


class ComfyExtension:  # comfy_api.latest.ComfyExtension
    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list:
        raise NotImplementedError
