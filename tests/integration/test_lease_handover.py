"""A lease hands over to the record that references its layers (csi/store/layers.py Lease):
a warm publish writes two transactions (the lease; the publication with the image record
and the lease's end), and however a publish or a hand-over fails, no lease is left holding
layers and the image is still recorded. Real overlay mounts, a real SQLite store."""

import contextlib
import os

import pytest

from csi import compose
from csi.config import Config
from csi.errors import FailedPrecondition
from csi.image.layout import OciLayout
from csi.image.reference import parse
from csi.volumes import PublishSpec
from tests.conftest import needs_root, unmount_all_under


@contextlib.contextmanager
def node(tmp_path):
    parts = compose.node(Config(root=str(tmp_path / "store"), node_id="t"))
    try:
        yield parts
    finally:
        parts.close()
        unmount_all_under(str(tmp_path))


def leases(parts) -> list[str]:
    with parts.state.read() as tx:
        return sorted(h for _, h in tx.holders() if h.startswith("lease:"))


def recorded(parts, digest: str) -> bool:
    with parts.state.read() as tx:
        return tx.image(digest) is not None


def spec(tmp_path, name: str, image: str) -> PublishSpec:
    return PublishSpec(name, str(tmp_path / name), image, False, 1)


@needs_root
def test_a_warm_publish_writes_two_transactions_and_leaves_no_lease(tmp_path, images):
    with node(tmp_path) as parts:
        vm = parts.volumes
        vm.publish(spec(tmp_path, "cold", images.app))  # pulls, unpacks, records
        vm.unpublish("cold", str(tmp_path / "cold"))
        statements: list[str] = []
        parts.state._db.set_trace_callback(statements.append)
        try:
            vm.publish(spec(tmp_path, "warm", images.app))
        finally:
            parts.state._db.set_trace_callback(None)
        assert statements.count("BEGIN IMMEDIATE") == statements.count("COMMIT") == 2, \
            statements
        assert leases(parts) == []
        target = str(tmp_path / "warm")
        with parts.state.read() as tx:
            pub = tx.publication(target)
            assert tx.image(pub.manifest_digest) is not None
            assert {h for _, h in tx.holders()} == {"pub:" + target}
        vm.unpublish("warm", target)


@needs_root
def test_a_publish_that_fails_after_the_lease_leaves_none(tmp_path, images):
    with node(tmp_path) as parts:
        p = PublishSpec("orphan", str(tmp_path / "no-parent" / "target"), images.app, False, 1)
        with pytest.raises(FailedPrecondition, match="parent of target"):
            parts.volumes.publish(p)
        assert leases(parts) == []
        image = OciLayout(parse(images.app)).resolve()
        assert recorded(parts, image.manifest_digest)  # its layers are present: it stays
        assert parts.trash.drain(timeout=60)
        assert os.listdir(parts.paths.volumes) == []
        with parts.state.read() as tx:
            assert tx.holders() == [] and tx.publications() == []


@needs_root
def test_a_hand_over_whose_transaction_rolls_back_ends_with_the_block(tmp_path, images):
    with node(tmp_path) as parts:
        source = OciLayout(parse(images.app))
        image = source.resolve()
        with parts.puller.acquire(source, image) as lease:
            held = leases(parts)
            assert held == ["lease:" + lease.token] * len(image.layers)
            with pytest.raises(RuntimeError, match="the caller's record"):
                with parts.state.transaction() as tx:
                    lease.hand_over(tx)
                    raise RuntimeError("the caller's record failed")
            assert leases(parts) == held  # rolled back: still held
            assert not recorded(parts, image.manifest_digest)
        assert leases(parts) == []
        assert recorded(parts, image.manifest_digest)  # written where the lease ended


@needs_root
@pytest.mark.parametrize("block_fails", [False, True], ids=["block-ok", "block-fails"])
def test_when_what_a_lease_writes_at_its_end_fails_the_lease_still_ends(tmp_path, images,
                                                                         caplog, block_fails):
    """The lease's own error is raised, unless the block already raised one: that one is
    the caller's to see, and the lease's is logged."""
    def fail(tx):
        raise RuntimeError("the image record failed")

    with node(tmp_path) as parts:
        source = OciLayout(parse(images.app))
        image = source.resolve()
        expected = (FailedPrecondition, "the caller's error") if block_fails else \
            (RuntimeError, "the image record failed")
        with pytest.raises(expected[0], match=expected[1]):
            with parts.layers.acquire(source, image.layers) as lease:
                lease.on_end(fail)
                assert leases(parts)
                if block_fails:
                    raise FailedPrecondition("the caller's error")
        assert leases(parts) == []
        assert ("ending the lease on layers" in caplog.text) == block_fails
