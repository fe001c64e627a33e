"""csi/provision.py: CreateVolume/DeleteVolume records, idempotency and capacity rules."""

import pytest

from csi.errors import AlreadyExists, InvalidArgument, NotFound
from csi.image.build import LayerBuilder, write_image
from csi.provision import CreateSpec, Provisioner, volume_id_for
from csi.store.state import State

IMAGE = "oci:/layouts/x:app"


class StubResolver:
    """Records what was resolved; raises `error` if set (a typo'd image, a missing tag)."""

    def __init__(self, error=None):
        self.calls = []
        self.error = error

    def check(self, image):
        self.calls.append(image)
        if self.error:
            raise self.error


@pytest.fixture
def state(tmp_path):
    s = State(str(tmp_path / "state.db"))
    yield s
    s.close()


@pytest.fixture
def resolver():
    return StubResolver()


@pytest.fixture
def prov(state, resolver):
    return Provisioner(state, resolver, clock=lambda: 42.0)


def spec(name="pvc-1", required=0, limit=0, **params) -> CreateSpec:
    return CreateSpec(name, required, limit, {"image": IMAGE, **params})


def test_volume_id_is_stable_distinct_and_short():
    a, b = volume_id_for("pvc-1"), volume_id_for("pvc-2")
    assert a == volume_id_for("pvc-1")
    assert a != b
    assert a.startswith("strata-") and len(a) == len("strata-") + 24
    assert "/" not in a and len(a) <= 128


def test_create_records_volume(prov, resolver, state):
    vol = prov.create(spec(required=100, limit=200))
    assert resolver.calls == [IMAGE]  # resolved up front: a typo fails at PVC creation
    assert vol.volume_id == volume_id_for("pvc-1")
    assert vol.capacity == 100  # required wins over limit
    assert vol.parameters == {"image": IMAGE}
    assert vol.created == 42.0
    assert prov.get(vol.volume_id) == vol
    with state.transaction() as tx:
        assert tx.controller_volume("pvc-1") == vol


def test_create_capacity_from_limit_when_no_required(prov):
    assert prov.create(spec(limit=500)).capacity == 500
    assert prov.create(spec("pvc-0")).capacity == 0


def test_create_repeat_is_idempotent(prov, state):
    first = prov.create(spec(required=100))
    again = prov.create(spec(required=100))
    assert again == first
    with state.transaction() as tx:
        assert tx.controller_volume_by_id(first.volume_id) == first


@pytest.mark.parametrize("required, limit", [(50, 0), (0, 100), (100, 100), (0, 0), (1, 1000)])
def test_create_repeat_with_fitting_range_returns_existing(prov, required, limit):
    first = prov.create(spec(required=100))
    assert prov.create(spec(required=required, limit=limit)) == first


@pytest.mark.parametrize("required, limit", [(101, 0), (0, 99), (200, 300)])
def test_create_repeat_with_incompatible_range_is_already_exists(prov, required, limit):
    prov.create(spec(required=100))
    with pytest.raises(AlreadyExists, match="pvc-1"):
        prov.create(spec(required=required, limit=limit))


def test_create_repeat_with_other_parameters_is_already_exists(prov):
    prov.create(spec())
    with pytest.raises(AlreadyExists):
        prov.create(spec(pullPolicy="Always"))
    with pytest.raises(AlreadyExists):
        prov.create(CreateSpec("pvc-1", 0, 0, {"image": "oci:/other:tag"}))


def test_create_requires_image(prov, resolver, state):
    with pytest.raises(InvalidArgument, match="image"):
        prov.create(CreateSpec("pvc-1", 0, 0, {}))
    assert resolver.calls == []
    with state.transaction() as tx:
        assert tx.controller_volume("pvc-1") is None


def test_create_unresolvable_image_records_nothing(state):
    prov = Provisioner(state, StubResolver(error=InvalidArgument("bad image")))
    with pytest.raises(InvalidArgument, match="bad image"):
        prov.create(spec())
    with state.transaction() as tx:
        assert tx.controller_volume("pvc-1") is None


def test_create_with_real_layout(state, tmp_path):
    layout = str(tmp_path / "layout")
    write_image(layout, "app", [LayerBuilder().file("f", "x")])
    prov = Provisioner(state)  # default Resolver
    vol = prov.create(CreateSpec("pvc-9", 0, 0, {"image": f"oci:{layout}:app"}))
    assert vol.volume_id == volume_id_for("pvc-9")
    with pytest.raises(NotFound):
        prov.create(CreateSpec("pvc-10", 0, 0, {"image": f"oci:{layout}:missing"}))


def test_parameters_are_copied(prov):
    params = {"image": IMAGE}
    vol = prov.create(CreateSpec("pvc-1", 0, 0, params))
    params["image"] = "changed"
    assert prov.get(vol.volume_id).parameters == {"image": IMAGE}


def test_delete(prov):
    vol = prov.create(spec())
    prov.delete(vol.volume_id)
    with pytest.raises(NotFound, match=vol.volume_id):
        prov.get(vol.volume_id)
    prov.delete(vol.volume_id)  # unknown: OK, idempotent


def test_delete_unknown_is_ok(prov):
    prov.delete("strata-doesnotexist")


def test_get_unknown_is_not_found(prov):
    with pytest.raises(NotFound):
        prov.get("strata-nope")


def test_recreate_after_delete_with_new_parameters(prov):
    vol = prov.create(spec())
    prov.delete(vol.volume_id)
    again = prov.create(spec(pullPolicy="Never"))
    assert again.volume_id == vol.volume_id
    assert again.parameters["pullPolicy"] == "Never"
