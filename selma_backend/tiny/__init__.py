"""Tiny random-weight models for tests and demos, written offline and deterministically from a seed.

One module per family (``diffusion``: SD1/SDXL diffusers folders, ``ldm``: the mini SD1.5 single
file, ``openclip``, ``llm``); ``common`` holds seeding, atomic publishing and the provenance marker.
The public entry points are re-exported by ``selma_backend.tiny_models``.
"""
