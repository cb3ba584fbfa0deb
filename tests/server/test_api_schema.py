"""Property-based API test (issue 15.7): Schemathesis generates requests from the server's own
OpenAPI schema (/openapi.json, which describes the multipart forms of /dream and /jobs) and
checks every response: no 5xx, status codes, content types, headers and bodies as documented.

Bounded and reproducible: a fixed number of examples per operation and mode (valid data, then
data that breaks the schema), derandomized (Hypothesis derives the examples from the test, so
every run sends the same requests), no example database; against a real `onnxdream serve`
process, stopped in `finally`; a real dream, job and (with PyAV) video job pass the same checks.
About 15-25 s.
"""

from __future__ import annotations

import importlib.util

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the API test needs schemathesis")
pytest.importorskip("fastapi", reason="the server needs the [serve] extra")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from serverproc import Server  # noqa: E402

pytestmark = pytest.mark.xdist_group("server")  # with the other server processes

EXAMPLES = {"positive": 40, "negative": 20}  # per operation


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def _checks():
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance,
            response_headers_conformance, response_schema_conformance]


def _exercise(op, mode, examples: int, url: str, checks, ran: dict[str, int]) -> None:
    """``examples`` requests for one operation in one mode; raises on the first failure
    (Hypothesis shrinks it to a minimal request first)."""

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def exercise(case):
        response = case.call(base_url=url, timeout=30)
        ran[op.label] = ran.get(op.label, 0) + 1
        case.validate_response(response, checks=checks)

    try:
        exercise()
    except Unsatisfiable:
        if mode.name != "NEGATIVE":
            raise  # an operation without parameters has no invalid requests to make


def _video_job(by_label, url: str, checks, tmp_path) -> None:
    """A video job (issue 13.4) passes the same checks: queued, its view in frames, its file."""
    import time

    from videoclip import make_clip

    clip = make_clip(tmp_path / "clip.mp4", seconds=1.0).read_bytes()
    case = by_label["POST /jobs"].Case(
        body={"video": clip, "steps": 1, "octaves": 1, "seed": 3, "format": "webm"},
        media_type="multipart/form-data")
    response = case.call(base_url=url, timeout=60)
    assert response.status_code == 202, response.text
    case.validate_response(response, checks=checks)
    job_id = response.json()["id"]
    deadline = time.monotonic() + 60
    while True:
        case = by_label["GET /jobs/{job_id}"].Case(path_parameters={"job_id": job_id})
        response = case.call(base_url=url, timeout=30)
        case.validate_response(response, checks=checks)
        if response.json()["state"] == "done":
            break
        assert response.json()["state"] in ("queued", "running"), response.text
        assert time.monotonic() < deadline
        time.sleep(0.1)
    case = by_label["GET /jobs/{job_id}/result"].Case(path_parameters={"job_id": job_id})
    response = case.call(base_url=url, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == ["video/webm"]
    case.validate_response(response, checks=checks)


@pytest.mark.timeout(120)
def test_the_api_holds_its_schema_under_generated_requests(model_home, tmp_path):
    from schemathesis import GenerationMode

    srv = Server(model_home, tmp_path / "server.log", "--max-pixels", "50000", "--max-body",
                 "1", "--max-queue", "4")
    try:
        schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
        checks = _checks()
        operations = [result.ok() for result in schema.get_all_operations()]
        labels = {op.label for op in operations}
        assert {"POST /dream", "POST /jobs", "GET /jobs/{job_id}", "GET /health"} <= labels
        ran: dict[str, int] = {}
        for op in operations:
            for mode, n in EXAMPLES.items():
                _exercise(op, GenerationMode(mode), n, srv.url, checks, ran)
        # the forms were exercised, not skipped
        assert ran.get("POST /dream", 0) >= 20 and ran.get("POST /jobs", 0) >= 20, ran
        # ... and a real dream and job pass the same checks (the success responses)
        by_label = {op.label: op for op in operations}
        form = {"image": _png(), "steps": 1, "octaves": 1, "seed": 3}
        for label, status in (("POST /dream", 200), ("POST /jobs", 202)):
            case = by_label[label].Case(body=form, media_type="multipart/form-data")
            response = case.call(base_url=srv.url, timeout=60)
            assert response.status_code == status, response.text
            case.validate_response(response, checks=checks)
        if importlib.util.find_spec("av") and importlib.util.find_spec("cv2"):
            _video_job(by_label, srv.url, checks, tmp_path)
        assert srv.alive() and "Traceback" not in srv.log(), srv.log()
    finally:
        srv.stop()
