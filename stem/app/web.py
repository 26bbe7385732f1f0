"""What the two web apps (the study, `stem.app.study_server`, and the demo, `stem.app.demo_server`) share: Flask's
import with the one line naming the extra, one-line refusals, the optional access token, the bind address
(127.0.0.1 unless `--public`) and serving until Ctrl+C with the network warning."""

from __future__ import annotations

import hmac
import ipaddress
import sys

from stem.core.errors import StemError

TOKEN_DAYS = 30   # the token's cookie: a visitor who comes back within a month needs no link again


def install_hint(app: str) -> str:
    """The one line printed when Flask is missing, e.g. "the study app needs Flask: pip install 'stem[app]'"."""
    return f"the {app} needs Flask: pip install 'stem[app]'"


def import_flask(app: str):
    """The flask module; StemError with `install_hint(app)` when it is not installed."""
    try:
        import flask
    except ImportError:
        raise StemError(install_hint(app)) from None
    return flask


def flask_missing(app: str) -> bool:
    """True, after printing `install_hint(app)` to stderr, when Flask is not installed (a CLI then exits 2)."""
    try:
        import_flask(app)
    except StemError as e:
        print(e, file=sys.stderr)
        return True
    return False


def refuse(status: int, message: str):
    """End the request with `status` and `message` as one line of plain text."""
    from flask import abort, make_response

    abort(make_response(message.replace("\n", " ") + "\n", status, {"Content-Type": "text/plain; charset=utf-8"}))


def require_token(app, token: str | None, *, cookie: str, header: str, refusal: str) -> None:
    """With a `token`, every request of `app` must carry it as `?token=...`, the header `header` or the cookie
    `cookie` (set after a first valid `?token=`; never on a refused request); else 403 with `refusal`.
    None: no check. StemError for a token that is not a non-empty text."""
    if token is None:
        return
    if not isinstance(token, str) or not token:
        raise StemError("the access token must be a non-empty text")
    import flask
    from flask import request

    @app.before_request
    def check_token():
        given = request.args.get("token") or request.headers.get(header) or request.cookies.get(cookie)
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            refuse(403, refusal)
        flask.g.token_ok = True

    @app.after_request
    def remember_token(response):
        if request.args.get("token") and flask.g.get("token_ok"):
            response.set_cookie(cookie, token, max_age=TOKEN_DAYS * 86400, httponly=True, samesite="Lax")
        return response


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_address(host: str | None, public: bool, what: str) -> str:
    """The address to bind: `host`, else 0.0.0.0 with `public`, else 127.0.0.1. StemError for a non-loopback
    `host` without `public` (`what`, e.g. "the study", names what would be exposed)."""
    host = host or ("0.0.0.0" if public else "127.0.0.1")
    if not public and not is_loopback(host):
        raise StemError(f"--host {host} is not a loopback address: add --public to serve {what} on a network")
    return host


def serve(app, host: str, port: int, *, public: bool, token: str | None, warning: str, banner: str) -> int:
    """Serve `app` (threaded) on `host:port` until Ctrl+C. With `public`, `warning` ("the study is served on the
    network ({address}): anyone who can reach this machine can ...") goes to stderr, with "; no --token is set"
    when there is no token. `banner` (with "{link}": the address to open, with ?token=) is printed once serving.
    Returns the exit status: 0, or 2 with one line when the address cannot be bound."""
    from werkzeug.serving import make_server

    try:
        server = make_server(host, port, app, threaded=True)
    except OSError as e:
        print(f"error: cannot serve on {host}:{port}: {e}", file=sys.stderr)
        return 2
    if public:
        print("WARNING: " + warning.format(address=f"{host}:{server.server_port}") +
              ("" if token else "; no --token is set"), file=sys.stderr)
    link = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{server.server_port}/"
    print(banner.format(link=link + (f"?token={token}" if token else "")), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
