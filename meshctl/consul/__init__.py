"""The Consul adapter (py-consul): registration and blocking-query watches.

The only package that talks to Consul, one job per module:

- ``session``: abortable HTTP plumbing (a watch loop's own client, whose
  blocking queries another thread can cut short) and the secret-free account
  of a failure that every Consul error carries;
- ``keys``: the watch keys, plain data that run in ``meshctl._watch.Watcher``
  (``HealthConnect``, ``ConfigEntries``, ``ConfigEntry``, ``DiscoveryChain``,
  ``IntentionMatch``, ``HealthChecks``);
- ``payloads``: pure translation of Consul's answers and of registrations
  (``instances_from_health``, ``refused_instances``, ``service_registration``,
  ``sidecar_registration``);
- ``client``: ``ConsulClient``, the host agent's client (registration, reads)
  and the ``Source`` of a ``Watcher``.

Import each name from the module that owns it; this package re-exports nothing.
Every failure surfaces as ConsulError with the operation in its message;
tokens never appear in messages.
"""
