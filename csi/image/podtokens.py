"""The pod's service-account tokens (KEP-4412) for the credential providers that take them,
and who a pull is for.

The kubelet mints the token for a container image itself; a CSI driver gets what the
CSIDriver's `tokenRequests` asked for in NodePublishVolume: `volume_context` (or `secrets`,
with `serviceAccountTokenInSecrets: true`) key TOKENS_KEY holds JSON
`{"<audience>": {"token": "…", "expirationTimestamp": "…"}}` (`Identity.tokens`). The
token goes to the provider as `serviceAccountToken`, and the identity it stands for into
the cache key as the kubelet forms it (`service_account_key`), so that an answer for one
identity never serves another. Tokens are never logged.
"""

import base64
import dataclasses
import hashlib
import json

from csi.errors import InvalidArgument, PermissionDenied
from csi.image.credconfig import TokenAttributes

# Where the kubelet puts the tokens the CSIDriver's tokenRequests asked for (KEP-1855), in
# volume_context, or in secrets when the CSIDriver opts in (KEP-5538).
TOKENS_KEY = "csi.storage.k8s.io/serviceAccount.tokens"


@dataclasses.dataclass(frozen=True)
class Identity:
    """The pod a pull is for, as NodePublishVolume tells it (podInfoOnMount), and the raw
    TOKENS_KEY value from the CSIDriver's tokenRequests ("" when none came)."""

    namespace: str = ""
    pod: str = ""
    pod_uid: str = ""
    service_account: str = ""
    tokens: str = dataclasses.field(default="", repr=False)


def audience_token(tokens: str, audience: str) -> str:
    """The token for `audience` from a TOKENS_KEY value; "" when it holds none for it. A
    value that is not the kubelet's JSON is InvalidArgument (its text is never quoted: it
    holds tokens)."""
    if not tokens:
        return ""
    try:
        doc = json.loads(tokens)
    except (ValueError, RecursionError):  # a pod may write this value (docs): nested deep
        raise InvalidArgument(f"{TOKENS_KEY} is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{TOKENS_KEY} is not a JSON object of audiences")
    entry = doc.get(audience)
    if entry is None:
        return ""
    token = entry.get("token") if isinstance(entry, dict) else None
    if not isinstance(token, str):
        raise InvalidArgument(f"{TOKENS_KEY}[{audience!r}] has no \"token\" string")
    return token


def token_claims(token: str) -> dict:
    """The claims of a JWT, unverified (strata cannot check the API server's signature):
    {} when it is not a JWT. Never trusted alone: see `service_account`."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


def service_account(token: str, identity: Identity, audience: str) -> tuple[str, str, str]:
    """(namespace, name, UID) of the service account the pod's `token` stands for, or
    PermissionDenied.

    Who the pod is comes from the kubelet's pod attributes (podInfoOnMount, which the
    kubelet overwrites whatever the pod spec says), never from the token alone: its claims
    are unverified, and without `tokenRequests` on the CSIDriver the kubelet passes a pod
    author's inline `volumeAttributes` unchanged, so a pod could name another namespace's
    service account in a token of its own making and be served that one's cached answer.
    So the token's claims (`kubernetes.io` namespace, serviceaccount.name, pod.uid: what
    the API server writes in every token it binds to a pod) must name this very pod and
    its service account; only then is the UID the claims give trusted for the key. Errors
    name the claim that disagrees, never the token or the values it claims."""
    what = f"the service-account token for audience {audience!r}"
    pod = (identity.namespace, identity.service_account, identity.pod_uid)
    if not all(pod):
        raise PermissionDenied(
            f"{what} cannot be checked: the request does not say which pod it is for "
            "(csi.storage.k8s.io/pod.namespace, serviceAccount.name and pod.uid); the "
            "CSIDriver must set podInfoOnMount: true (docs/credential-providers.md)")
    k8s = token_claims(token).get("kubernetes.io")
    k8s = k8s if isinstance(k8s, dict) else {}
    sa = k8s.get("serviceaccount") if isinstance(k8s.get("serviceaccount"), dict) else {}
    bound = k8s.get("pod") if isinstance(k8s.get("pod"), dict) else {}
    claimed = (k8s.get("namespace"), sa.get("name"), bound.get("uid"))
    names = ("kubernetes.io.namespace", "kubernetes.io.serviceaccount.name",
             "kubernetes.io.pod.uid")
    missing = [n for n, v in zip(names, claimed, strict=True) if not isinstance(v, str) or not v]
    if missing:
        raise PermissionDenied(
            f"{what} is not one the kubelet asked for this pod: it lacks the claims "
            f"{', '.join(missing)} of a token bound to a pod")
    wrong = [n for n, v, want in zip(names, claimed, pod, strict=True) if v != want]
    if wrong:
        raise PermissionDenied(
            f"{what} is not this pod's: its claims {', '.join(wrong)} disagree with the pod "
            "the kubelet names; refused without running the provider")
    uid = sa.get("uid")
    return identity.namespace, identity.service_account, uid if isinstance(uid, str) else ""


def _hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest() if token else ""


def service_account_key(tokens: TokenAttributes, token: str,
                        identity: Identity) -> tuple[str, ...]:
    """The kubelet's generateServiceAccountCacheKey: namespace, name, UID, annotations (none
    here), and with cacheType Token the token's hash; PermissionDenied for a token that is
    not the pod's (`service_account`). Without a UID (a token whose claims do not say it)
    the hash is always in: a service account deleted and made again under the same name is
    another identity, and only the token tells them apart."""
    namespace, name, uid = service_account(token, identity, tokens.audience)
    key = (namespace, name, uid, "annotations:0")
    if tokens.cache_type == "Token" or not uid:
        key += ("token", _hash(token))
    return key
