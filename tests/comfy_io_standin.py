"""A stand-in for the part of ComfyUI's V3 node schema (comfy_api.latest.io, ComfyUI 0.3.64) the nodes use, for
tests without ComfyUI: what ComfyUI's loader, /object_info and executor read of a V3 class (its V1 view:
INPUT_TYPES, RETURN_TYPES, RETURN_NAMES, CATEGORY, DESCRIPTION, FUNCTION) and how a call's result is normalised.
test_comfyui_e2e_stock.py compares the view with the real ComfyUI's /object_info."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class classproperty:  # noqa: N801 - a property read on the class, as ComfyUI's V3 classes expose their V1 view
    def __init__(self, getter):
        self.getter = getter

    def __get__(self, obj, owner):
        return self.getter(owner)


class _Input:
    io_type = ""

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip

    def v1(self) -> tuple[str, dict]:  # the V1 entry: the type and the options that are set
        return self.io_type, {k: v for k, v in (("display_name", self.display_name), ("tooltip", self.tooltip))
                              if v is not None}


class _Output:
    io_type = ""

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def Custom(io_type: str) -> type:  # noqa: N802 - ComfyUI's name
    return type(f"Custom_{io_type}", (), {"io_type": io_type,
                                          "Input": type("Input", (_Input,), {"io_type": io_type}),
                                          "Output": type("Output", (_Output,), {"io_type": io_type})})


Model = Custom("MODEL")


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list | None = None
    outputs: list | None = None
    hidden: list | None = None
    description: str = ""


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: Any = None, block_execution: str | None = None):
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self):
        return self.args if self.args else None


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def INPUT_TYPES(cls, include_hidden: bool = True) -> dict:  # noqa: N802
        out: dict = {"required": {}}
        for i in cls.define_schema().inputs or []:
            out.setdefault("optional" if i.optional else "required", {})[i.id] = i.v1()
        return out

    FUNCTION = "EXECUTE_NORMALIZED"
    CATEGORY = classproperty(lambda cls: cls.define_schema().category)
    DESCRIPTION = classproperty(lambda cls: cls.define_schema().description)
    RETURN_TYPES = classproperty(lambda cls: [o.io_type for o in cls.define_schema().outputs or []])
    RETURN_NAMES = classproperty(lambda cls: [o.display_name or o.io_type for o in cls.define_schema().outputs or []])

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
