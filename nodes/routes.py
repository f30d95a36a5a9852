"""``/selma/...`` HTTP routes for the web extension. Registered once from the extension's on_load."""

from __future__ import annotations

from aiohttp import web

from ..selma_backend import __version__
from ..selma_backend.skills import list_skills
from .glue import user_dir

_registered = False


def register_routes(routes) -> None:
    global _registered
    if _registered:  # ComfyUI may call on_load again (e.g. a reload): routes are added once
        return
    _registered = True

    @routes.get("/selma/version")
    async def version(_request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    @routes.get("/selma/skills")
    async def skills(_request: web.Request) -> web.Response:
        return web.json_response([s.to_dict() for s in list_skills(user_dir() / "selma" / "skills")])
