"""podInfoOnMount: the kubelet's pod attributes are recorded with the publication and shown
by `strata ls`, through the real server and the real CLI."""

import subprocess
import sys

POD = {"csi.storage.k8s.io/pod.name": "web-7", "csi.storage.k8s.io/pod.namespace": "shop",
       "csi.storage.k8s.io/pod.uid": "9c1f-uid", "csi.storage.k8s.io/serviceAccount.name": "sa"}


def strata_ls(root: str) -> str:
    return subprocess.run([sys.executable, "-m", "csi", "ls", "--root", root],
                          capture_output=True, text=True, check=True).stdout


def test_pod_identity_is_recorded_and_listed(strata, csi, pods, images):
    csi.publish("pod-id", pods / "t", images.app, **POD)
    csi.publish("no-pod", pods / "anon", images.app)
    try:
        rows = {line.split()[-1]: line for line in strata_ls(strata.root).splitlines()
                if line.endswith(("/t", "/anon"))}
        assert rows[str(pods / "t")].startswith("shop/web-7 ")
        assert rows[str(pods / "t")].split()[1] == "pod-id"
        assert rows[str(pods / "anon")].startswith("- "), "no podInfoOnMount: no pod shown"
        from csi.store.state import State

        state = State(f"{strata.root}/state.db", migrate=False)
        try:
            with state.read() as tx:
                pub = tx.publication(str(pods / "t"))
        finally:
            state.close()
        assert (pub.pod, pub.pod_uid, pub.service_account) == ("shop/web-7", "9c1f-uid", "sa")
    finally:
        csi.unpublish("pod-id", pods / "t")
        csi.unpublish("no-pod", pods / "anon")
