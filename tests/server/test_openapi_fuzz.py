"""Fuzzing with schemathesis: a real ``qubrid-lab serve`` (the tiny model, jobs queued but never trained) is sent
generated requests, valid and invalid, for every operation of its own ``/openapi.json`` and of the reference
specs in ``../shared/specs``. No answer may be a 5xx, and every answer must be documented (status, content
type, schema). Bounded in examples so the file runs in about a minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks

from tests.e2e.conftest import start_tiny_server, stop_server

SPECS = Path(__file__).parents[2].parent / "shared" / "specs"
KEY = "qbt_fuzz-test-key"
EXAMPLES = 15
OWN_CHECKS = [
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory, tiny_model_dir):
    server = start_tiny_server(
        tmp_path_factory.mktemp("fuzz"),
        tiny_model_dir,
        "--model",
        "tiny",
        "--max-running-jobs",
        "0",
        "--max-tokens-cap",
        "16",
        env={"QUBRID_LAB_API_KEYS": KEY},
    )
    yield server
    tried = server.log().count("request_id=")  # one access line per request received
    print(f"\nschemathesis sent {tried} requests to the server")
    stop_server(server)


@pytest.fixture(scope="module")
def own_schema(fuzzed_server):
    return schemathesis.openapi.from_url(f"{fuzzed_server.base_url}/openapi.json")


own = schemathesis.pytest.from_fixture("own_schema")


@own.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_our_own_document_holds_for_generated_requests(case, fuzzed_server):
    case.call_and_validate(
        base_url=fuzzed_server.base_url,
        headers={"Authorization": f"Bearer {KEY}"},
        checks=[not_a_server_error, *OWN_CHECKS],
        timeout=60,
    )


@pytest.fixture(scope="module")
def reference_inference():
    return schemathesis.openapi.from_path(SPECS / "qubrid-inference.openapi.json")


@pytest.fixture(scope="module")
def reference_fine_tuning():
    return schemathesis.openapi.from_path(SPECS / "qubrid-fine-tuning.openapi.json")


REFERENCE_CHECKS = [not_a_server_error, checks.response_schema_conformance]


@schemathesis.pytest.from_fixture("reference_inference").parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_reference_inference_spec_holds(case, fuzzed_server):
    case.call_and_validate(
        base_url=f"{fuzzed_server.base_url}/v1",
        headers={"Authorization": f"Bearer {KEY}"},
        checks=REFERENCE_CHECKS,
        timeout=60,
    )


@schemathesis.pytest.from_fixture("reference_fine_tuning").parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_reference_fine_tuning_spec_holds(case, fuzzed_server):
    case.call_and_validate(
        base_url=f"{fuzzed_server.base_url}/api/v1",
        headers={"Authorization": f"Bearer {KEY}"},
        checks=REFERENCE_CHECKS,
        timeout=60,
    )
