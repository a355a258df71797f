"""The operator's ClusterRole (manifests/base/rbac.yaml) as a set of permissions, and what calls need.

A permission is (apiGroup, resource[/subresource], verb), as the RBAC authorizer checks a request. What the
operator needs comes from the requests the emulated API server saw it make (`Call.permissions`), plus the
permissions no request shows but the API server checks all the same (NOT_OBSERVABLE).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml
from emulated_apiserver import Call

ROOT = Path(__file__).resolve().parents[2]
RBAC_FILE = ROOT / "manifests" / "base" / "rbac.yaml"
Permission = tuple[str, str, str]

NOT_OBSERVABLE: dict[Permission, str] = {
    # The OwnerReferencesPermissionEnforcement admission plugin: a child whose ownerReference sets
    # blockOwnerDeletion (every child here does) may only be written by who can update the owner's finalizers.
    ("piggyback.dev", "llmservices/finalizers", "update"): "children set blockOwnerDeletion on their owners",
    # RBAC's escalation check: a RoleBinding may name a role only if its writer holds the role's permissions
    # or `bind` on it; the operator binds piggyback-epp for each gateway-routed pool's endpoint picker.
    ("rbac.authorization.k8s.io", "clusterroles", "bind"): "RoleBindings of the EPPs and routers name their roles",
}


def granted_permissions(path: Path = RBAC_FILE) -> set[Permission]:
    role = next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "ClusterRole")
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def needed_permissions(calls: Iterable[Call]) -> dict[Permission, Call]:
    """Each permission the calls need, with one call that needed it (for the failure message)."""
    needed: dict[Permission, Call] = {}
    for call in calls:
        for permission in call.permissions():
            needed.setdefault(permission, call)
    return needed


def missing_permissions(calls: Iterable[Call]) -> dict[Permission, Call]:
    granted = granted_permissions()
    return {perm: call for perm, call in needed_permissions(calls).items() if perm not in granted}
