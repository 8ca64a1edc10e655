"""Administration over HTTP: adapters (list, versions, reload, activate: roll forward or back), the
online worker's controls (read, pin, unpin, freeze, unfreeze, rollback, lineage), captured samples
(stats, delete a request's sample, delete a client's samples), and the operator's page (``GET /ui``,
``webui.py``).

A FastAPI app mounted into the BentoML service (BentoML only routes POST to ``@bentoml.api``
methods and has no path parameters; mounted FastAPI routes also appear in its OpenAPI document).
Changing state needs ``Authorization: Bearer <WESAM_SERVE_ADMIN_TOKEN>``: no token configured
means the write endpoints are disabled (403), a missing token is 401, a wrong one 403.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations at runtime.
import hmac
import re
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, Field

from wesam.errors import WesamError

from .errors import BadRequest, Forbidden, Overloaded, ServiceError, Unauthorized, to_service_error
from .messages import RuntimeClient

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .metrics import Metrics


class ActivateBody(BaseModel):
    version: int | str = Field(description="vN or N", examples=["v2"])


class PinBody(BaseModel):
    version: int | str = Field(description="vN or N: the version the online worker anchors to and resets to",
                               examples=["v2"])


class FreezeBody(BaseModel):
    reason: str | None = Field(None, description="why (shown by the controls, the lineage and the worker's log)")


class RollbackBody(BaseModel):
    freeze: bool = Field(True, description="freeze the domain first, so the worker does not publish again")
    reason: str | None = Field(None, description="the freeze's reason (default: rolled back from vM to vN)")


def check_admin(authorization: str | None, token: str | None) -> None:
    if not token:
        raise Forbidden("the admin API is disabled: start the server with WESAM_SERVE_ADMIN_TOKEN set")
    if not authorization:
        raise Unauthorized("admin token required: send 'Authorization: Bearer <token>'")
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Forbidden("wrong admin token")


def parse_version(value: Any) -> int:
    """``2``, ``"2"`` or ``"v2"`` -> 2."""
    if isinstance(value, bool):
        raise BadRequest("version must be vN or a positive integer")
    if isinstance(value, int):
        version = value
    elif isinstance(value, str) and re.fullmatch(r"v?\d+", value.strip()):
        version = int(value.strip().lstrip("v"))
    else:
        raise BadRequest(f"version must be vN or a positive integer, got {value!r}")
    if version < 1:
        raise BadRequest("version must be >= 1")
    return version


def make_admin_app(runtime: Callable[[], RuntimeClient], token: str | None,
                   metrics: "Metrics | None" = None) -> "FastAPI":
    """``runtime()`` returns the model runtime's client (``status``, ``reload``, ``activate``)."""
    from fastapi import FastAPI, Header
    from fastapi.responses import JSONResponse

    from wesam.version import __version__

    app = FastAPI(title="wesam adapters", version=__version__, openapi_url=None, docs_url=None, redoc_url=None)

    def error(exc: Exception) -> Any:
        e = to_service_error(exc, "admin")
        if metrics is not None:
            metrics.error(e.kind, "admin")
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.to_json(), status_code=e.status, headers=headers)

    async def call(name: str, *args: Any) -> Any:
        try:
            return await getattr(runtime(), name)(*args)
        except WesamError:
            raise
        except Exception as e:  # the runtime process is unreachable or failed: the client may retry
            raise Overloaded(f"model runtime unavailable ({type(e).__name__})") from None

    @app.get("/adapters", response_model=None, tags=["adapters"],
             summary="Served model, domains, active and loaded adapter versions, cache state")
    async def list_adapters():
        try:
            return JSONResponse(await call("status"))
        except Exception as e:  # every failure is a JSON error with its kind
            return error(e)

    @app.get("/adapters/{domain}/versions", response_model=None, tags=["adapters"],
             summary="Every version of a domain: its adapter.json summary (created, method, metrics, lineage) "
                     "and whether it is active, served or previewed here")
    async def list_versions(domain: str):
        try:
            return await answer("versions", domain)
        except Exception as e:  # every failure is a JSON error with its kind
            return error(e)

    @app.post("/adapters/reload", response_model=None, tags=["adapters"],
              summary="Re-read the registry now and load what changed (admin token; refused versions are retried)")
    async def reload(authorization: str | None = Header(None, description="Bearer <admin token>")):
        try:
            check_admin(authorization, token)
            return JSONResponse(await call("reload", True))
        except Exception as e:  # every failure is a JSON error with its kind
            return error(e)

    @app.post("/adapters/{domain}/activate", response_model=None, tags=["adapters"],
              summary="Make a version the active one for a domain (roll forward or back; admin token). "
                      "The version is loaded first; a version that fails to load is refused (409).")
    async def activate(domain: str, body: ActivateBody,
                       authorization: str | None = Header(None, description="Bearer <admin token>")):
        try:
            check_admin(authorization, token)
            out = await call("activate", domain, parse_version(body.version))
            if "error" in out:
                raise ServiceError.from_json(out)
            return JSONResponse(out)
        except Exception as e:  # every failure is a JSON error with its kind
            return error(e)

    async def answer(name: str, *args: Any) -> Any:
        """A runtime call that answers a refusal as JSON (``activate``, the capture calls)."""
        out = await call(name, *args)
        if "error" in out and "kind" in out:
            raise ServiceError.from_json(out)
        return JSONResponse(out)

    # -- the online worker's controls (docs/online.md, "Operating the worker")
    async def worker(domain: str, action: str, authorization: str | None = None, admin: bool = True,
                     params: Callable[[], dict[str, Any] | None] = lambda: None) -> Any:
        """One control through the runtime: the token first (when ``admin``), then the body's
        parameters (``params`` may refuse them), every failure a JSON error with its kind."""
        try:
            if admin:
                check_admin(authorization, token)
            return await answer("worker_control", domain, action, params())
        except Exception as e:  # every failure is a JSON error with its kind
            return error(e)

    @app.get("/adapters/{domain}/control", response_model=None, tags=["worker"],
             summary="The online worker's controls of a domain: pinned version, frozen and why")
    async def worker_control(domain: str):
        return await worker(domain, "control", admin=False)

    @app.get("/adapters/{domain}/lineage", response_model=None, tags=["worker"],
             summary="The active version's ancestry: parents, samples, gate results")
    async def worker_lineage(domain: str):
        return await worker(domain, "lineage", admin=False)

    @app.post("/adapters/{domain}/pin", response_model=None, tags=["worker"],
              summary="Anchor the domain's online worker to a version (admin token)")
    async def worker_pin(domain: str, body: PinBody,
                         authorization: str | None = Header(None, description="Bearer <admin token>")):
        return await worker(domain, "pin", authorization, params=lambda: {"version": parse_version(body.version)})

    @app.post("/adapters/{domain}/unpin", response_model=None, tags=["worker"],
              summary="Anchor the worker to the version active when it starts (admin token)")
    async def worker_unpin(domain: str,
                           authorization: str | None = Header(None, description="Bearer <admin token>")):
        return await worker(domain, "unpin", authorization)

    @app.post("/adapters/{domain}/freeze", response_model=None, tags=["worker"],
              summary="Stop the worker's rounds and publications for a domain (admin token)")
    async def worker_freeze(domain: str, body: FreezeBody | None = None,
                            authorization: str | None = Header(None, description="Bearer <admin token>")):
        return await worker(domain, "freeze", authorization,
                            params=lambda: {"reason": body.reason if body else None})

    @app.post("/adapters/{domain}/unfreeze", response_model=None, tags=["worker"],
              summary="Let the worker run and publish again (admin token)")
    async def worker_unfreeze(domain: str,
                              authorization: str | None = Header(None, description="Bearer <admin token>")):
        return await worker(domain, "unfreeze", authorization)

    @app.post("/adapters/{domain}/rollback", response_model=None, tags=["worker"],
              summary="Serve the active version's lineage parent (else the previous version) and freeze the "
                      "domain (admin token); the target must load first, as for activate")
    async def worker_rollback(domain: str, body: RollbackBody | None = None,
                              authorization: str | None = Header(None, description="Bearer <admin token>")):
        rb = body or RollbackBody()
        return await worker(domain, "rollback", authorization,
                            params=lambda: {"freeze": rb.freeze, "reason": rb.reason})

    @app.get("/capture/stats", response_model=None, tags=["capture"],
             summary="Captured samples per domain in the store, capture queue, outcomes since start (admin token)")
    async def capture_stats(authorization: str | None = Header(None, description="Bearer <admin token>")):
        try:
            check_admin(authorization, token)
            return await answer("capture_stats")
        except Exception as e:  # every failure is a JSON error with its kind
            return error(e)

    @app.delete("/capture/clients/{domain}/{client}", response_model=None, tags=["capture"],
                summary="Delete every captured sample of a client in a domain, queued ones included (admin token)")
    async def capture_delete_client(domain: str, client: str,
                                    authorization: str | None = Header(None, description="Bearer <admin token>")):
        try:
            check_admin(authorization, token)
            return await answer("capture_delete_client", domain, client)
        except Exception as e:  # every failure is a JSON error with its kind
            return error(e)

    @app.delete("/capture/{request_id}", response_model=None, tags=["capture"],
                summary="Delete the captured sample of one request, or cancel it while queued (admin token; "
                        "404 if there is none)")
    async def capture_delete(request_id: str,
                             authorization: str | None = Header(None, description="Bearer <admin token>")):
        try:
            check_admin(authorization, token)
            return await answer("capture_delete", request_id)
        except Exception as e:  # every failure is a JSON error with its kind
            return error(e)

    from .webui import add_ui_routes

    add_ui_routes(app)
    return app
