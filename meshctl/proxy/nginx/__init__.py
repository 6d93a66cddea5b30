"""The nginx driver: ``driver`` (files, validate, reload, run-time pushes),
``plan`` (how nginx says a Snapshot) and ``gaps`` (what nginx cannot say exactly)."""
