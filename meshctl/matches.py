"""The request-match vocabulary that routes and intentions' permissions share.

A service-router route (``meshctl.model.Route``) and an L7 intention
permission (``meshctl.intentions.Permission``) both match request headers the
way Consul's config entries spell it; one shape serves both, so the drivers and
the Lua evaluators read one form. Imports nothing of meshctl.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeaderMatch:
    """One header criterion, of a service-router route or of an intention's permission.

    ``kind`` is one of present, exact, prefix, suffix, regex (routes and
    permissions) or contains (permissions only); ``value`` is empty for
    present, and a regex is the portable subset (``meshctl._regex``) matched
    against the whole value. As in Envoy, a request without the header never
    matches, inverted or not, except an inverted ``present`` match.
    ``ignore_case`` (permissions' IgnoreCase) compares exact/prefix/suffix/contains
    values case-insensitively.
    """

    name: str
    kind: str
    value: str = ""
    invert: bool = False
    ignore_case: bool = False
