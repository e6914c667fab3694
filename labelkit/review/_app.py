"""The review web app (Flask): an overview of the clusters, a page per cluster, the decision log, and save.

Security, for a tool that serves a folder of images on a shared machine:

* every request carries the session's random token (``?token=`` on pages and images, the ``X-Review-Token``
  header on the JSON API), compared in constant time; without it: 403;
* a POST must be JSON with the token header, and an ``Origin`` header, where the browser sends one, must be
  this server's own: a page on another site cannot post decisions;
* samples are served by sample id, and only ids of the reviewed artefact, decoded from the given data: no path
  ever comes from a request;
* the server writes only into the review folder (the log, thumbnails, ``reviewed.parquet``).
"""

from __future__ import annotations

import hmac
import math

from ..errors import LabelkitError
from ._pages import CLUSTER, DECISIONS, OVERVIEW, render
from ._session import ReviewSession

__all__ = ["create_app", "serve", "PAGE", "LOOPBACK"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")

PAGE = 50  # clusters on an overview page, and members on a cluster page


def create_app(session: ReviewSession, token: str):
    """The Flask app of ``session``, answering only requests that carry ``token``."""
    from flask import Flask

    app = Flask("labelkit.review")
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024
    _guard(app, token)
    _page_routes(app, session, token)
    _api_routes(app, session)
    return app


def _guard(app, token: str) -> None:
    from flask import Response, abort, jsonify, request

    @app.before_request
    def guard():
        if request.path == "/favicon.ico":  # browsers ask without the token; nothing to give them
            return Response(status=204)
        given = request.headers.get("X-Review-Token") or request.args.get("token") or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(403)
        if request.method == "POST":
            if request.headers.get("X-Review-Token") != token or not request.is_json:
                abort(403)  # a cross-site form can neither set the header nor send JSON
            origin = request.headers.get("Origin")
            if origin is not None and origin != request.host_url.rstrip("/"):
                abort(403)
        return None

    @app.after_request
    def headers(response):
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store" if response.mimetype != "image/png" else "private, max-age=3600"
        return response

    @app.errorhandler(LabelkitError)
    def refused(exc):
        return jsonify(error=str(exc)), 400


def _paged(items, page_arg) -> tuple:
    pages = max(1, math.ceil(len(items) / PAGE))
    page = min(max(1, page_arg), pages)
    return items[(page - 1) * PAGE: page * PAGE], page, pages


def _page_routes(app, session: ReviewSession, token: str) -> None:
    from flask import Response, abort, request

    @app.get("/")
    def overview():
        sort = request.args.get("sort", "cluster")
        descending = request.args.get("desc") == "1"
        shown, page, pages = _paged(session.rows_overview(sort, descending), request.args.get("page", 1, type=int))
        return render(OVERVIEW, session=session, rows=[session.cluster_row(c) for c in shown], page=page,
                      pages=pages, sort=sort, desc=descending, token=token, empty=int((session.sizes == 0).sum()))

    @app.get("/cluster/<int:cluster>")
    def cluster(cluster: int):
        if not 0 <= cluster < session.state.k:
            abort(404)
        shown, page, pages = _paged(session.members(cluster), request.args.get("page", 1, type=int))
        samples = [(session.art.sample_ids[r], float(session.scores[r])) for r in shown]
        return render(CLUSTER, session=session, row=session.cluster_row(cluster), samples=samples, page=page,
                      pages=pages, nearest=session.nearest(cluster), token=token)

    @app.get("/decisions")
    def decisions():
        entries = session.log.entries()
        undone = {e["undo"] for e in entries if e["op"] == "undo"}
        return render(DECISIONS, session=session, entries=entries[::-1], undone=undone, token=token)

    @app.get("/thumb")
    def thumb():
        png = session.thumbnail(request.args.get("id", ""))
        if png is None:
            abort(404)
        return Response(png, mimetype="image/png")


def _api_routes(app, session: ReviewSession) -> None:
    from flask import jsonify, request

    @app.post("/api/decide")
    def decide():
        return jsonify(entry=session.decide(request.get_json()), k=session.state.k)

    @app.post("/api/save")
    def save():
        path, version = session.save()
        return jsonify(path=str(path), artefact_id=version.artefact_id, samples=version.num_samples)


def serve(session: ReviewSession, token: str, *, host: str = "127.0.0.1", port: int = 0, expose: bool = False):
    """A threaded HTTP server for the app (not started: call ``serve_forever``); ``port`` 0 takes a free one.
    Any host but the loopback needs ``expose``: the token is then all that guards the data."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):  # a library does not write a line per request to the console
        def log_request(self, *args, **kwargs) -> None:
            pass

    if host not in LOOPBACK and not expose:
        from ..errors import ConfigError

        raise ConfigError(f"--host {host} serves the review to other machines; add --expose if that is meant")
    return make_server(host, port, create_app(session, token), threaded=True, request_handler=Quiet)
