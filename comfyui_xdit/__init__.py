"""comfyui-xdit engine: parallel sampling of diffusers DiTs (no ComfyUI or ZeroMQ imports here)."""

__version__ = "0.1.0"
