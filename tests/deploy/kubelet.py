"""The CSI calls the kubelet (and the csi-provisioner sidecar) make for a pod's volumes of
one driver, made through a real socket: what deploy/examples/ ask of strata on a node.

Only the parts of the kubelet that decide what reaches the driver are here, after
pkg/volume/csi (csi_mounter.go, csi_attacher.go, csi_util.go) and external-provisioner:
- an inline `csi:` volume: NodePublishVolume only, volume_id `csi-` + sha256(pod UID +
  volume name), the target `<kubelet>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount`
  (the kubelet makes its parent, the driver the target), volume_context = the
  volumeAttributes, plus, with podInfoOnMount, the pod's name, namespace, UID and service
  account and `csi.storage.k8s.io/ephemeral: "true"`; `readOnly` as the readonly flag;
  nodePublishSecretRef's Secret (in the pod's namespace) as `secrets`;
- a PVC: the provisioner's CreateVolume (name `pvc-<claim UID>`, the StorageClass's
  parameters less the `csi.storage.k8s.io/` keys it consumes itself, the claim's access
  modes and size), then, where the node has STAGE_UNSTAGE_VOLUME, NodeStageVolume at
  `<kubelet>/plugins/kubernetes.io/csi/<driver>/<sha256(volume handle)>/globalmount` with
  the PV's volume attributes, and NodePublishVolume with them plus the pod's;
- access modes as the kubelet maps them: ReadWriteOnce is SINGLE_NODE_MULTI_WRITER where
  the node has that capability, else SINGLE_NODE_WRITER; an inline volume counts as
  ReadWriteOnce.
Teardown is the reverse: unpublish, unstage, DeleteVolume (reclaimPolicy Delete).
"""

import base64
import dataclasses
import hashlib
import os
import uuid

from csi.proto import csi_pb2
from csi.quantity import bytes_of

Mode = csi_pb2.VolumeCapability.AccessMode.Mode
NodeCap = csi_pb2.NodeServiceCapability.RPC
KEYS = "csi.storage.k8s.io/"
ACCESS = {"ReadWriteOnce": Mode.SINGLE_NODE_WRITER, "ReadOnlyMany": Mode.MULTI_NODE_READER_ONLY,
          "ReadWriteMany": Mode.MULTI_NODE_MULTI_WRITER,
          "ReadWriteOncePod": Mode.SINGLE_NODE_SINGLE_WRITER}


@dataclasses.dataclass
class Pod:
    name: str
    namespace: str
    spec: dict
    uid: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))


@dataclasses.dataclass
class Mounted:
    """One volume of a pod as the kubelet set it up."""
    pod: Pod
    name: str          # the pod's volume name
    volume_id: str
    target: str
    readonly: bool
    context: dict[str, str]
    staging: str = ""
    created: bool = False  # provisioned for this pod (a PVC): deleted at teardown


def pods_of(docs: list[dict]) -> list[Pod]:
    """The pods an example makes: a Pod, or the replicas of a Deployment."""
    out = []
    for d in docs:
        ns = d["metadata"].get("namespace", "default")
        if d["kind"] == "Pod":
            out.append(Pod(d["metadata"]["name"], ns, d["spec"]))
        elif d["kind"] in ("Deployment", "StatefulSet", "ReplicaSet"):
            for i in range(d["spec"].get("replicas", 1)):
                out.append(Pod(f"{d['metadata']['name']}-{i}", ns, d["spec"]["template"]["spec"]))
    return out


def _mount_cap(mode: int, fs_type: str = "") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


class Kubelet:
    def __init__(self, csi, root: str, driver: str, objects: list[dict],
                 secrets: dict[tuple[str, str], dict[str, str]] | None = None):
        """`csi`: tests.conftest.Csi over the plugin's sockets; `root`: the kubelet's
        directory; `objects`: the example's other objects (Secrets, PVCs, classes);
        `secrets`: Secret data by (namespace, name), over what the objects say."""
        self.csi, self.root, self.driver = csi, root, driver
        self.objects = objects
        self.secrets = secrets or {}
        caps = csi.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=10)
        self.node_caps = {c.rpc.type for c in caps.capabilities}

    # -- what the kubelet reads from the API
    def _object(self, kind: str, name: str, namespace: str | None = None) -> dict:
        found = [d for d in self.objects if d["kind"] == kind and d["metadata"]["name"] == name
                 and (namespace is None or d["metadata"].get("namespace", "default")
                      == namespace)]
        assert len(found) == 1, f"{kind} {namespace}/{name}: {len(found)} in the example"
        return found[0]

    def secret(self, namespace: str, name: str) -> dict[str, str]:
        if (namespace, name) in self.secrets:
            return self.secrets[(namespace, name)]
        s = self._object("Secret", name, namespace)
        data = {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
        return {**data, **s.get("stringData", {})}

    def mode(self, access: str) -> int:
        if access == "ReadWriteOnce" and NodeCap.SINGLE_NODE_MULTI_WRITER in self.node_caps:
            return Mode.SINGLE_NODE_MULTI_WRITER
        return ACCESS[access]

    def _pod_info(self, pod: Pod, ephemeral: bool) -> dict[str, str]:
        return {KEYS + "pod.name": pod.name, KEYS + "pod.namespace": pod.namespace,
                KEYS + "pod.uid": pod.uid,
                KEYS + "serviceAccount.name": pod.spec.get("serviceAccountName", "default"),
                KEYS + "ephemeral": "true" if ephemeral else "false"}

    def _target(self, pod: Pod, volume: str) -> str:
        parent = os.path.join(self.root, "pods", pod.uid, "volumes", "kubernetes.io~csi",
                              volume)
        os.makedirs(parent, exist_ok=True)
        return os.path.join(parent, "mount")

    # -- the calls
    def run(self, pod: Pod, mounted: list[Mounted]) -> None:
        """Set up every volume of `pod` that is this driver's, adding each to `mounted`
        before its first call: what a failure leaves half set up is torn down with it."""
        for v in pod.spec.get("volumes", []):
            if "csi" in v and v["csi"]["driver"] == self.driver:
                self._inline(pod, v, mounted)
            elif "persistentVolumeClaim" in v:
                self._claim(pod, v, mounted)

    def _inline(self, pod: Pod, v: dict, mounted: list[Mounted]) -> None:
        src = v["csi"]
        vid = "csi-" + hashlib.sha256((pod.uid + v["name"]).encode()).hexdigest()
        context = {**src.get("volumeAttributes", {}), **self._pod_info(pod, True)}
        secrets = {}
        if "nodePublishSecretRef" in src:
            secrets = self.secret(pod.namespace, src["nodePublishSecretRef"]["name"])
        m = Mounted(pod, v["name"], vid, self._target(pod, v["name"]),
                    bool(src.get("readOnly")), context)
        mounted.append(m)
        self.csi.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, target_path=m.target, readonly=m.readonly,
            volume_capability=_mount_cap(self.mode("ReadWriteOnce"), src.get("fsType", "")),
            volume_context=context, secrets=secrets), timeout=120)

    def _claim(self, pod: Pod, v: dict, mounted: list[Mounted]) -> None:
        claim = self._object("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"],
                             pod.namespace)
        sc = self._object("StorageClass", claim["spec"]["storageClassName"])
        if sc["provisioner"] != self.driver:
            return
        params = sc.get("parameters", {})
        claim_uid = claim["metadata"].setdefault("uid", str(uuid.uuid4()))
        modes = claim["spec"]["accessModes"]
        created = self.csi.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=f"pvc-{claim_uid}",
            capacity_range=csi_pb2.CapacityRange(
                required_bytes=bytes_of(claim["spec"]["resources"]["requests"]["storage"])),
            volume_capabilities=[_mount_cap(ACCESS[a]) for a in modes],
            parameters={k: v for k, v in params.items() if not k.startswith(KEYS)}),
            timeout=60).volume
        mode = self.mode(modes[0])
        m = Mounted(pod, v["name"], created.volume_id, self._target(pod, f"pvc-{claim_uid}"),
                    bool(v["persistentVolumeClaim"].get("readOnly")),
                    dict(created.volume_context), created=True)
        mounted.append(m)
        if NodeCap.STAGE_UNSTAGE_VOLUME in self.node_caps:
            m.staging = os.path.join(
                self.root, "plugins", "kubernetes.io", "csi", self.driver,
                hashlib.sha256(created.volume_id.encode()).hexdigest(), "globalmount")
            os.makedirs(m.staging, exist_ok=True)
            self.csi.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=m.volume_id, staging_target_path=m.staging,
                volume_capability=_mount_cap(mode), volume_context=m.context,
                secrets=self._class_secret(params, "node-stage")), timeout=120)
        self.csi.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=m.volume_id, target_path=m.target, staging_target_path=m.staging,
            readonly=m.readonly, volume_capability=_mount_cap(mode),
            volume_context={**m.context, **self._pod_info(pod, False)},
            secrets=self._class_secret(params, "node-publish")), timeout=120)

    def _class_secret(self, params: dict, which: str) -> dict[str, str]:
        name = params.get(f"{KEYS}{which}-secret-name")
        if not name:
            return {}
        return self.secret(params.get(f"{KEYS}{which}-secret-namespace", "default"), name)

    def stop(self, mounted: list[Mounted]) -> None:
        """Tear down in reverse; every step is tried, the first error raised at the end."""
        errors = []
        for m in reversed(mounted):
            for call in self._teardown(m):
                try:
                    call()
                except Exception as e:  # noqa: BLE001 - reported after the rest ran
                    errors.append(e)
        if errors:
            raise errors[0]

    def _teardown(self, m: Mounted) -> list:
        node, calls = self.csi.node, []
        calls.append(lambda: node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=m.volume_id, target_path=m.target), timeout=60))
        if m.staging:
            calls.append(lambda: node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=m.volume_id, staging_target_path=m.staging), timeout=60))
        if m.created:
            calls.append(lambda: self.csi.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=m.volume_id), timeout=60))
        return calls
