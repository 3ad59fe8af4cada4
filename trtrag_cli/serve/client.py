"""`trtrag ask --server URL`: the question asked of a running `trtrag serve` over HTTP (httpx)."""

from __future__ import annotations

from trtrag_cli.util.errors import TrtragError

HINTS = {401: "pass --api-key, or set the variable named by serve.api_key_env (default TRTRAG_API_KEY)",
         404: "is this a trtrag server with an index (not one started with --generate-only)?",
         429: "the server is busy: ask again shortly",
         503: "the server is still loading or shutting down: ask again shortly"}


def ask(server: str, question: str, top_k: int | None = None, mode: str | None = None,
        api_key: str | None = None, timeout_s: float = 300.0) -> dict:
    """POST /v1/ask; the dict is what the server's pipeline returned (what `ask --json` prints locally)."""
    import httpx

    url = server.rstrip("/")
    url = url[:-3] if url.endswith("/v1") else url
    body = {"question": question, **({"top_k": top_k} if top_k else {}), **({"mode": mode} if mode else {})}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        reply = httpx.post(f"{url}/v1/ask", json=body, headers=headers, timeout=timeout_s)
    except httpx.InvalidURL as exc:
        raise TrtragError(f"--server {server!r} is not a URL ({exc})", "e.g. --server http://127.0.0.1:8000") \
            from None
    except httpx.HTTPError as exc:
        raise TrtragError(f"cannot reach the server at {url}: {type(exc).__name__}: {exc}",
                          "is `trtrag serve` running there? check the --server address") from None
    if reply.status_code != 200:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:200]
        raise TrtragError(f"the server at {url} answered HTTP {reply.status_code}: {message}",
                          HINTS.get(reply.status_code))
    return reply.json()
