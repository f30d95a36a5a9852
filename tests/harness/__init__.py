"""Test harness: a real ComfyUI server, comfy-cli and a headless browser, started for real."""
