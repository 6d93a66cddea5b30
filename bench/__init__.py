"""meshctl benchmarks: sidecar latency and convergence, measured in the lab.

    python -m bench.run                       # both drivers, full run (~4 min)
    python -m bench.run --quick --out /tmp/b  # smoke run (seconds of load)

Modules: :mod:`bench.run` (command line and orchestration), :mod:`bench.deploy`
(the benchmark mesh on a lab), :mod:`bench.load` (vegeta and wrk inside a lab
host), :mod:`bench.converge` (the probe loop and convergence measurements),
:mod:`bench.report` (statistics, JSON and Markdown; pure). See bench/README.md.
"""
