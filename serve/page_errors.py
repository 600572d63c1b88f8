"""How the page refuses a request: always `{"error": one line}`, in the API's own terms.

A parameter FastAPI could not parse (422), a request a handler turns down (an `HTTPException`) and the
router's own 404 / 405 all reach the client the same way, so a script or the page's JavaScript reads
one shape. `Searcher` words its messages for `cli.py search`; a JSON client sends query parameters, so
a command-line flag in an answer is named as the query parameter that does the same.
"""
from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# the command line's flags (in `Searcher`'s messages) -> the query parameter that does the same in the API
API_TERMS = {"--exact": "exact=true", "--text": "q", "--split": "split", "-k": "k"}
_FLAG = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(API_TERMS, key=len, reverse=True))) + r")\b")


def in_api_terms(text: str) -> str:
    """`text` with each command-line flag named as the query parameter that does the same.

    `Searcher` words its notes for `cli.py search` ("search again with --exact"); a JSON client sends
    query parameters, so a flag in an answer would name something it cannot send."""
    return _FLAG.sub(lambda m: API_TERMS[m.group(1)], text)


async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A parameter that did not parse: its name and FastAPI's reason, the first of them only."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "body"))
    return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)


async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every refusal as {"error": one line}, a command-line flag in it named as its query parameter."""
    detail = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else f"no such page: {request.url.path}"
    return JSONResponse({"error": in_api_terms(str(detail))}, status_code=exc.status_code)


def answer_errors_in_one_line(app: FastAPI) -> None:
    """Send every refusal of `app` through `bad_request` or `refused` (also the router's own 404 / 405)."""
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(StarletteHTTPException, refused)
