"""Vault (or OpenBao, which speaks the same API): the mesh's certificate authority.

Three parts, each in its own module, imported from where it lives:

- :mod:`meshctl.vault.leaf`: the agent side of a leaf certificate's life,
  Vault-agnostic: parsing, the reuse and renewal decisions, the store on disk,
  ``ensure_leaf`` / ``refresh_ca`` over any ``LeafIssuer``.
- :mod:`meshctl.vault.client`: ``VaultClient``, the agent's authenticated
  client (token or AppRole, re-login, TLS, timeouts): a ``LeafIssuer``; and
  ``explain_refusal`` for Vault's refusals.
- :mod:`meshctl.vault.setup`: the operator's ``meshctl vault setup`` (PKI
  mount and CA, roles, one policy and AppRole per host). The agent never
  imports it.

Layering: leaf ← client ← setup.
"""
