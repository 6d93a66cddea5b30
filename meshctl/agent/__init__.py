"""The host agent: sources → compile() → apply, with quiescence and fail-static.

One job per module:

- ``loop``: ``Agent``, the reconcile loop; it is given its sources (the
  watched Consul values and the registry), its certificate issuer, its proxy
  driver and its clock;
- ``parts``: the default parts built from an ``AgentConfig`` (the Consul
  client and watcher, the Vault client, the proxy driver);
- ``host``: what the CLI runs (``run_agent``, ``plan_once``, ``deregister_host``);
- ``planning``: which Consul keys a host depends on and the snapshot they
  compile to, pure over a value getter;
- ``quiescence``: the debounce between a change and a pass (and the reload splay);
- ``proxy_watch``: wakes the loop when the proxy's master exits;
- ``ports``: the sidecar port book and the port probe;
- ``status``: the status file ``meshctl status`` reads, and the pid file.

Import each name from the module that owns it; this package re-exports nothing.
"""
