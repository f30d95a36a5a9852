"""Thin ComfyUI adapters: widgets → one backend config → one backend call → outputs.

Every contact with ComfyUI goes through :mod:`.glue`, so a new ComfyUI release costs one file.
"""
