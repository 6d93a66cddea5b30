"""The HAProxy driver: ``driver`` (files, master socket, run-time slots), ``plan``
(how HAProxy says a Snapshot) and ``gaps`` (what HAProxy cannot say exactly)."""
