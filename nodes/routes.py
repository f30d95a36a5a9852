"""``/selma/...`` HTTP routes for the web extension. Registered once from the extension's setup.

Dataset routes read and write only datasets under ComfyUI's output directory: the ``dataset``
parameter is a path relative to it (checked by ``safe_join``: no ``..``, no absolute path, no
symlink out), and an image is served only if the dataset's ``metadata.jsonl`` lists it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from ..selma_backend import __version__
from ..selma_backend.errors import SelmaError
from ..selma_backend.filter import effective_keep, set_review
from ..selma_backend.fsio import read_jsonl
from ..selma_backend.merge.preview import preview_merge, widget_config
from ..selma_backend.paths import safe_join
from ..selma_backend.skills import list_skills
from .glue import output_dir, user_dir
from .merge import _listed_paths

_registered = False
_ROW_FIELDS = ("file_name", "text", "skill", "prompt_id", "sample", "clip_score", "keep", "review", "drop_reason")


def _dataset(name: str | None) -> Path:
    """The dataset folder ``name`` (relative to the output directory) or an HTTP 400/404."""
    try:
        path = safe_join(output_dir(), name or "", field="dataset")
    except SelmaError as e:
        raise web.HTTPBadRequest(text=str(e)) from e
    if not (path / "metadata.jsonl").is_file():
        raise web.HTTPNotFound(text=f"dataset: no SELMA dataset at {name!r} (no metadata.jsonl)")
    return path


def _listed(path: Path, file_name: str | None) -> Path:
    rows = {r.get("file_name"): r for r in read_jsonl(path / "metadata.jsonl")}
    if not file_name or file_name not in rows:
        raise web.HTTPNotFound(text=f"file: {file_name!r} is not an image of this dataset")
    return path / file_name


#: POST /selma/merge/preview fields: (type, default) as SELMA Merge Experts' widgets have them.
_MERGE_FIELDS = {"lora_names": (str, ""), "method": (str, "svd"), "weights": (str, ""), "rank": (int, 0),
                 "density": ((int, float), 0.5), "block_weights": (str, ""), "seed": (int, 0)}


def _merge_preview(body: object) -> dict:
    """Merge the listed experts in memory (a worker thread runs this); SelmaError for bad input."""
    if not isinstance(body, dict):
        raise SelmaError("body: expected a JSON object with " + ", ".join(_MERGE_FIELDS))
    values = {}
    for name, (kind, default) in _MERGE_FIELDS.items():
        value = body.get(name, default)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SelmaError(f"{name}: expected {getattr(kind, '__name__', 'a number')}, got {value!r}")
        values[name] = value
    paths = _listed_paths(values.pop("lora_names"), "lora_names")  # names ComfyUI lists, never a typed path
    if not paths:
        raise SelmaError("lora_names: list at least one expert, one name a line")
    report = preview_merge(paths, widget_config(**values))
    return {"report": report.to_dict(), "text": report.text()}


def register_routes(routes) -> None:
    global _registered
    if _registered:  # setup may run twice (entrypoint and on_load): routes are added once
        return
    _registered = True

    @routes.get("/selma/version")
    async def version(_request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    @routes.get("/selma/skills")
    async def skills(_request: web.Request) -> web.Response:
        return web.json_response([s.to_dict() for s in list_skills(user_dir() / "selma" / "skills")])

    @routes.get("/selma/dataset/rows")
    async def rows(request: web.Request) -> web.Response:
        path = _dataset(request.query.get("dataset"))
        out = []
        for row in read_jsonl(path / "metadata.jsonl"):
            item = {k: row.get(k) for k in _ROW_FIELDS}
            item["effective_keep"] = effective_keep(row)
            out.append(item)
        return web.json_response({"dataset": request.query.get("dataset"), "rows": out})

    @routes.get("/selma/dataset/image")
    async def image(request: web.Request) -> web.FileResponse:
        path = _listed(_dataset(request.query.get("dataset")), request.query.get("file"))
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    @routes.post("/selma/dataset/review")
    async def review(request: web.Request) -> web.Response:
        body = await request.json()
        path = _dataset(body.get("dataset"))
        file_name = body.get("file")
        _listed(path, file_name)
        try:
            row = set_review(path, file_name, body.get("review"))
        except SelmaError as e:
            raise web.HTTPBadRequest(text=str(e)) from e
        return web.json_response({"file_name": file_name, "review": row.get("review"),
                                  "effective_keep": effective_keep(row)})

    @routes.post("/selma/merge/preview")
    async def merge_preview(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as e:
            raise web.HTTPBadRequest(text=f"body: not JSON ({e})") from e
        try:  # a worker thread: merging takes seconds, the server's loop keeps serving
            return web.json_response(await asyncio.to_thread(_merge_preview, body))
        except SelmaError as e:
            raise web.HTTPBadRequest(text=str(e)) from e
