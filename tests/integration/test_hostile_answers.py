"""Answers a registry may send to hurt its client, through a real RegistryClient and a
fault proxy in front of a real docker-registry: each is refused as a bad answer (a status
code with a reason), never an exception that escapes as INTERNAL."""


import pytest

from csi.errors import InvalidArgument
from csi.image.build import write_image
from csi.image.reference import parse
from csi.image.registry import RegistryClient
from csi.image.transport import Options
from tests.conftest import app_layer, base_layer, needs_tools
from tests.faultproxy import FaultProxy
from tests.registry import Registry, push

pytestmark = needs_tools("docker-registry", "skopeo")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    layout = str(tmp_path_factory.mktemp("hostile") / "layout")
    write_image(layout, "app", [base_layer(), app_layer()])
    with Registry() as reg:
        push(layout, "app", reg, "team/app", "1.0")
        yield reg


def test_a_manifest_nested_deeper_than_json_goes_is_not_json(registry):
    """json.loads raises RecursionError (no ValueError) for it: it escaped as INTERNAL."""
    with FaultProxy(registry.host) as proxy:
        proxy.fail(200, times=None, path="/manifests/", body=b"[" * 1_000_000)
        client = RegistryClient(Options(insecure=frozenset({proxy.host}), retries=0))
        ref = parse(f"{proxy.host}/team/app:1.0")
        with pytest.raises(InvalidArgument, match="the manifest is not JSON"):
            client.manifest(client.endpoints(ref)[0], ref, "1.0", None)
