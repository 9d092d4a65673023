"""`typed()`: a request body as the typed request the edge would have made of it."""

from inferd.wire.request import InferenceRequest, parse_request


def typed(endpoint: str, body: dict, request_id: str = "test-request", **kw) -> InferenceRequest:
    return parse_request(endpoint, body, request_id=request_id, **kw)
