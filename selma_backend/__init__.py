"""SELMA backend: the whole pipeline as a plain library.

Nothing here imports ComfyUI (``comfy``, ``folder_paths``, ``server``, ``nodes``, ``comfy_api``,
``comfy_execution``); ``tests/test_backend_isolation.py`` enforces it. Inside this package use
relative imports only, so it works both as the top-level ``selma_backend`` (pip, CLI) and as a
sub-package of the node pack folder that ComfyUI loads from ``custom_nodes/``.
"""

__version__ = "0.1.0"
