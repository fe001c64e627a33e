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

from csi.errors import InvalidArgument
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
    """The claims of a JWT, unverified: the kubelet handed it over, minted by the API server
    for this pod; it is read only to key caches by the identity it names. {} when it is
    not a JWT."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _service_account(token: str, identity: Identity) -> tuple[str, str, str]:
    """(namespace, name, uid) of the service account a token is for: from its claims
    (`kubernetes.io` → namespace, serviceaccount.name/uid; else `sub`
    system:serviceaccount:NS:NAME), else the pod's attributes with no UID."""
    claims = token_claims(token)
    k8s = claims.get("kubernetes.io")
    if isinstance(k8s, dict) and isinstance(k8s.get("serviceaccount"), dict):
        sa = k8s["serviceaccount"]
        return (str(k8s.get("namespace", "")), str(sa.get("name", "")), str(sa.get("uid", "")))
    sub = claims.get("sub")
    if isinstance(sub, str) and sub.startswith("system:serviceaccount:"):
        ns, _, name = sub[len("system:serviceaccount:"):].partition(":")
        return ns, name, ""
    return identity.namespace, identity.service_account, ""


def _hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest() if token else ""


def service_account_key(tokens: TokenAttributes, token: str,
                        identity: Identity) -> tuple[str, ...]:
    """The kubelet's generateServiceAccountCacheKey: namespace, name, UID, annotations (none
    here), and with cacheType Token the token's hash. Without a UID (a token whose claims
    do not say it) the hash is always in: a service account deleted and made again under
    the same name is another identity, and only the token tells them apart."""
    namespace, name, uid = _service_account(token, identity)
    key = (namespace, name, uid, "annotations:0")
    if tokens.cache_type == "Token" or not uid:
        key += ("token", _hash(token))
    return key
