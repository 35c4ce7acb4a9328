"""Requests that are not LLM calls: paths the config lets through unmetered, and the model list
Tollgate answers itself."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from . import auth, endpoints, routing
from .inbound import read_body
from .keys import CONFIG, UPSTREAMS
from .endpoints import Prefix
from .upstream import UpstreamClient, UpstreamError, request_headers, response_headers


async def passthrough(request: web.Request, prefix: Prefix, where: endpoints.PassThrough) -> web.StreamResponse:
    """Relay a call the config lets through unmetered (model lists, version, files...)."""
    app = request.app
    upstream = where.upstream
    client = app[UPSTREAMS][upstream.name]
    body = await read_body(request, app[CONFIG]) if request.can_read_body else None
    headers = request_headers(request.headers, upstream)
    response = await client.send(request.method, client.target(prefix, where.rest, request.rel_url.raw_query_string),
                                 headers, body)
    async with response:
        out = web.StreamResponse(status=response.status, reason=response.reason,
                                 headers=response_headers(response.headers))
        out.headers["X-Tollgate-Upstream"] = upstream.name
        await out.prepare(request)
        try:
            async for chunk in client.chunks(response):
                await out.write(chunk)
        except UpstreamError:
            # Too late for an error status: cut the connection so the body cannot pass as whole.
            if request.transport is not None:
                request.transport.close()
            return out
        await out.write_eof()
        return out


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: what the configured upstreams serve, named as clients should name them."""
    app = request.app
    config = app[CONFIG]
    auth.proxy_key(config, request.headers)
    seen: dict[str, str] = {}
    for upstream in config.upstreams.values():
        names = list(routing.listed_models(upstream)) + list(upstream.aliases)
        if upstream.kind == "ollama":
            names += await _ollama_models(app[UPSTREAMS][upstream.name])
        for name in names:
            if routing.serves(upstream, name) and routing.upstream_for(config, name) is upstream:
                seen.setdefault(name, upstream.name)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": owner}
            for name, owner in seen.items()]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                        content_type="application/json")


async def _ollama_models(client: UpstreamClient) -> list[str]:
    """The models an Ollama server has pulled; an unreachable server just lists none."""
    try:
        response = await asyncio.wait_for(
            client.send("GET", client.target("api", "tags"), request_headers({}, client.upstream), None), 5.0)
        async with response:
            if response.status != 200:
                return []
            body = orjson.loads(await client.read(response))
    except (UpstreamError, asyncio.TimeoutError, orjson.JSONDecodeError):
        return []
    models = body.get("models") if isinstance(body, dict) else None
    return [m["name"] for m in models or () if isinstance(m, dict) and isinstance(m.get("name"), str)]
