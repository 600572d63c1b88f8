"""What every request of the page reads: the served run (`PageState`, kept on the app's state) and the
parameters routes share, each parsed and checked in one place.

The order of checks is part of the API: FastAPI's parsing of every parameter comes first (a 422 names
the first parameter that did not parse, in the order the route declares them), then the route's own
checks (400 / 404 / 413), in the order the handler calls them. So the shared parameters below are
parsed by dependencies, which refuse nothing FastAPI itself would not, and the checks that answer
400 are functions a handler calls in its body.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic_core import PydanticKnownError

from medembed.serve.page_pool import PagePool
from medembed.serve.search import Searcher, SearchOptions


@dataclass
class ServeLimits:
    """What one request may ask of the page: upload bytes and pixels, results served (k x (page + 1)),
    query characters; a request past one is refused with a 4xx naming it."""

    max_upload_bytes: int = 10 * 2**20
    max_upload_pixels: int = 40_000_000
    max_k: int = 200
    max_query_chars: int = 2000


@dataclass(frozen=True)
class PageState:
    """One served run: the searcher that answers, its pool as request keys, the limits requests meet."""

    searcher: Searcher
    pool: PagePool
    limits: ServeLimits


async def page_state(request: Request) -> PageState:
    return request.app.state.page


Page = Annotated[PageState, Depends(page_state)]


async def text_query(state: Page, q: str = Query(...)) -> str:
    """`q`, refused as FastAPI refuses a parameter (422, its own words) when longer than the limit:
    the limit is the served app's, which a handler's signature cannot hold."""
    limit = state.limits.max_query_chars
    if len(q) > limit:
        error = PydanticKnownError("string_too_long", {"max_length": limit})
        raise RequestValidationError([{"type": error.type, "loc": ("query", "q"), "msg": error.message(),
                                       "input": q, "ctx": {"max_length": limit}}])
    return q


TextQuery = Annotated[str, Depends(text_query)]


def require_text(q: str) -> str:
    """`q`, or a 400 when it is blank."""
    if not q.strip():
        raise HTTPException(400, "q: the query is empty")
    return q


@dataclass(frozen=True)
class SearchArgs:
    """What an image search takes besides its query: page `page` of `k` hits, the filters, and whether
    to scan exactly instead of asking the index."""

    k: int
    page: int
    split: str | None
    modality: str | None
    concept: str | None
    exact: bool

    @property
    def asked(self) -> int:
        """How many hits pages 0..page hold."""
        return self.k * (self.page + 1)

    @property
    def filters(self) -> tuple[str | None, str | None, str | None]:
        return self.split, self.modality, self.concept


async def search_args(k: int = Query(SearchOptions.k, ge=1, le=100), page: int = Query(0, ge=0),
                      split: str | None = None, modality: str | None = None, concept: str | None = None,
                      exact: bool = False) -> SearchArgs:
    return SearchArgs(k, page, split, modality, concept, exact)


Search = Annotated[SearchArgs, Depends(search_args)]


def within_served(args: SearchArgs, limits: ServeLimits) -> SearchArgs:
    """`args`, or a 400 when its pages reach past the results the page serves."""
    if args.asked > limits.max_k:
        raise HTTPException(400, f"k x (page + 1) = {args.asked} is more than the {limits.max_k} results served")
    return args
