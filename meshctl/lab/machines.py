"""Lab hosts that are machines: booted systemd containers on a network-namespace lab's bridge.

    with Lab(hosts=1) as lab, Machines(lab, ["m1", "m2"]) as machines:
        m1 = machines["m1"]
        m1.run(["systemctl", "start", "meshctl-agent"])

Each machine boots the cached base root filesystem (``scripts/build-machine-base.sh``,
run by ``make deps``: Debian bookworm with systemd, sshd, Python, nginx and
HAProxy) through an overlay of its own (so the base is never written), under
``systemd-nspawn --keep-unit --register=no -b`` (``--keep-unit``: without it
nspawn asks systemd's bus for a scope, which a host without systemd lacks).
Its veth joins the lab's bridge, so it reaches the lab's Consul server and
OpenBao like the namespace hosts, and it runs its own Consul client as a
systemd unit and its own sshd (the key of the lab in ``root/.ssh``).

meshctl is installed offline, as on a fleet without internet: a wheel of the
work tree plus the cached wheelhouse of its dependencies, into ``/opt/meshctl``;
the packaged unit ``packaging/systemd/meshctl-agent.service`` is installed
(disabled) for the tests to start. With ``install=False`` neither is: an
Ansible rollout over SSH installs them (``tests/e2e/test_rollout.py``).

Every part of a machine is recorded in the lab's state file before it is
created (``_state.MachineRecord``: the directory, the overlay mount point, the
cgroups, then the nspawn's pid, start time and argv). Machines are stopped by
the pid of their nspawn, verified first (SIGTERM: an orderly poweroff; SIGKILL
after a bound), the overlays unmounted, the cgroups and the directory removed:
when the block is left (by an exception or a signal too: the tests turn
SIGTERM into KeyboardInterrupt), and, from the records alone, by the next
lab's stale sweep or ``meshctl lab down --all`` when the owner was killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from meshctl.errors import LabError
from meshctl.lab import _state, _sys
from meshctl.lab._lab import SERVER_IP, SUBNET, Lab, consul_client_config

#: the machines' addresses start here on the lab's subnet (the namespace hosts use .11 up)
FIRST_MACHINE = 101
REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "systemd" / "meshctl-agent.service"


def cache_dir() -> Path:
    return Path(os.environ.get("MESHCTL_CACHE", Path.home() / ".cache" / "meshctl")) / "machines"


def base_image() -> tuple[Path, Path]:
    """The cached base root filesystem and wheelhouse. Raises LabError if not built."""
    cache = cache_dir()
    bases = sorted(p for p in cache.glob("bookworm-*") if p.is_dir()) if cache.is_dir() else []
    wheels = sorted(p for p in cache.glob("wheels-*") if p.is_dir()) if cache.is_dir() else []
    if not bases or not wheels:
        raise LabError(f"no machine base image in {cache}: run `make deps` as root "
                       "(scripts/build-machine-base.sh; needs debootstrap and systemd-container)")
    return max(bases, key=lambda p: p.stat().st_mtime), max(wheels, key=lambda p: p.stat().st_mtime)


def machines_unavailable() -> str | None:
    """Why machine hosts cannot run here, or None."""
    if os.geteuid() != 0:
        return "machine hosts need root"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn missing (apt-get install systemd-container)"
    try:
        base_image()
    except LabError as exc:
        return str(exc)
    return None


CGROUP_PARENT = "meshctl-machines"


def cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy mounted here: v1 controllers, name=systemd, unified v2."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] in ("cgroup", "cgroup2"):
            out.append(Path(fields[1]))
    return out


def cgroup_paths(name: str) -> list[Path]:
    """Where a machine's cgroup goes: ``meshctl-machines/<name>`` in each hierarchy."""
    return [mount / CGROUP_PARENT / name for mount in cgroup_mounts()]


def make_cgroups(paths: list[Path]) -> list[Path]:
    """Create those cgroups; the ones made (a hierarchy may refuse one)."""
    made = []
    for d in paths:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        made.append(d)
    return made


class Machine:
    """One booted container: its name, address, root and the pid of its init."""

    def __init__(self, lab: Lab, name: str, ip: str, workdir: Path) -> None:
        self.lab, self.name, self.ip, self.workdir = lab, name, ip, workdir
        self.machine = f"{lab.prefix}-{name}"  # nspawn's name: the host veth is vb-<it>
        self.root = workdir / "root"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.cgroups: list[Path] = []  # this machine's own cgroup in each hierarchy

    def __repr__(self) -> str:
        return f"<Machine {self.name} {self.ip}>"

    @property
    def leader(self) -> int:
        """The pid of the machine's systemd (PID 1 inside)."""
        if self.nspawn is None:
            raise LabError(f"machine {self.name} is not running")
        try:
            kids = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children").read_text()
        except OSError:
            kids = ""
        if not kids.split():
            raise LabError(f"machine {self.name}: nspawn {self.nspawn.pid} has no init")
        return int(kids.split()[0])

    def run(self, argv: Sequence[str], *, timeout: float = 60.0, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the machine (all its namespaces), capturing its output."""
        cmd = ["nsenter", "-t", str(self.leader), "-a", "--", "env", "-i",
               "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              input=input, check=False)
        if check and proc.returncode != 0:
            raise LabError(f"{self.name}: {' '.join(argv)} exited {proc.returncode}:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
        return proc

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def show(self, unit: str, prop: str) -> str:
        """One property of a unit (``systemctl show -p PROP --value``)."""
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file into the machine's root (through the overlay, before or after boot)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def journal(self, unit: str, lines: int = 60) -> str:
        return self.run(["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat"],
                        check=False).stdout


class Machines:
    """Booted machines on ``lab``'s bridge (see the module docstring)."""

    def __init__(self, lab: Lab, names: Sequence[str], install: bool = True) -> None:
        """``install=False``: no meshctl on the machines (a rollout installs it)."""
        if not lab.is_up:
            raise LabError("bring the lab up before its machines")
        self.lab = lab
        self.base, self.wheels = base_image()
        # Named now, made by up() once the lab's state records it.
        self.dir = Path(tempfile.gettempdir()) / (f"meshctl-machines-{lab.prefix}-"
                                                  f"{secrets.token_hex(4)}")
        self.machines = {n: Machine(lab, n, f"{SUBNET}.{FIRST_MACHINE + i}", self.dir / n)
                         for i, n in enumerate(names)}
        self.ssh_key = self.dir / "id_ed25519"
        self.install = install

    def __getitem__(self, name: str) -> Machine:
        return self.machines[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.machines.values())

    def __enter__(self) -> Machines:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    # ------------------------------------------------------------ up

    def up(self) -> None:
        """Build each machine's overlay, boot them all, wait until each is up."""
        self.lab._edit_state(lambda st: st.machine_dirs.append(str(self.dir)))
        self.dir.mkdir(mode=0o700)
        (self.dir / _state.MARKER).write_text(self.lab.prefix + "\n")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.ssh_key)],
                       check=True, capture_output=True, timeout=30)
        wheel = self._build_wheel() if self.install else None
        for m in self.machines.values():
            self._prepare(m, wheel)
        for m in self.machines.values():
            self._boot(m)
        for m in self.machines.values():
            self._wait_booted(m)

    def _build_wheel(self) -> Path:
        out = self.dir / "wheel"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--disable-pip-version-check", "--wheel-dir", str(out), str(REPO)],
                       check=True, capture_output=True, timeout=300)
        return next(out.glob("meshctl-*.whl"))

    def _record(self, m: Machine, **fields: object) -> None:
        """Set fields of m's record in the lab's state (the record is made at first)."""
        def edit(st: _state.LabState) -> None:
            rec = next((r for r in st.machines if r.name == m.machine), None)
            if rec is None:
                rec = _state.MachineRecord(name=m.machine, dir=str(self.dir), root=str(m.root))
                st.machines.append(rec)
            for key, value in fields.items():
                setattr(rec, key, value)

        self.lab._edit_state(edit)

    def _prepare(self, m: Machine, wheel: Path | None) -> None:
        self._record(m)  # before the overlay is mounted
        for d in ("upper", "work", "root"):
            (m.workdir / d).mkdir(parents=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.base},upperdir={m.workdir / 'upper'},"
                        f"workdir={m.workdir / 'work'}", str(m.root)],
                       check=True, capture_output=True, timeout=30)
        m.write("/etc/hostname", f"{m.name}\n")
        m.write("/etc/hosts", f"127.0.0.1 localhost\n{m.ip} {m.name}\n")
        # The address on nspawn's host0, before anything that binds it.
        m.write("/etc/systemd/system/lab-net.service", f"""[Unit]
Description=lab address on host0
DefaultDependencies=no
Before=network-online.target consul.service ssh.service
Wants=network-online.target
[Service]
Type=oneshot
RemainAfterExit=yes
# host0 is nspawn's end of the veth; wait for it rather than race it.
ExecStartPre=/usr/bin/timeout 10 /bin/sh -c 'until [ -e /sys/class/net/host0 ]; do sleep 0.1; done'
ExecStart=/sbin/ip addr replace {m.ip}/24 dev host0
ExecStart=/sbin/ip link set host0 up
[Install]
WantedBy=multi-user.target
""")
        consul = consul_client_config(m.name, m.ip, SERVER_IP, Path("/var/lib/consul"))
        m.write("/etc/consul.d/consul.json", json.dumps(consul, indent=1))
        m.write("/etc/systemd/system/consul.service", """[Unit]
Description=Consul client agent
Requires=lab-net.service
After=lab-net.service
[Service]
ExecStart=/usr/local/bin/consul agent -config-dir=/etc/consul.d
Restart=on-failure
[Install]
WantedBy=multi-user.target
""")
        shutil.copy2(_sys.require_program("consul"), m.root / "usr/local/bin/consul")
        wants = m.root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        for unit in ("lab-net.service", "consul.service"):
            (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")
        # sshd: host keys of its own, the lab's key for root.
        subprocess.run(["chroot", str(m.root), "ssh-keygen", "-A"], check=True,
                       capture_output=True, timeout=60)
        m.write("/root/.ssh/authorized_keys", Path(f"{self.ssh_key}.pub").read_text(), 0o600)
        (m.root / "root/.ssh").chmod(0o700)
        # The demo application, stdlib only: it runs without meshctl installed.
        shutil.copy2(REPO / "meshctl" / "lab" / "demoapp.py", m.root / "usr/local/lib/demoapp.py")
        if wheel is None:
            return
        # meshctl, offline: the work tree's wheel and the cached wheelhouse.
        stage = m.root / "var/cache/meshctl-wheels"
        shutil.copytree(self.wheels, stage)
        shutil.copy2(wheel, stage / wheel.name)
        subprocess.run(["chroot", str(m.root), "python3", "-m", "venv", "/opt/meshctl"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(["chroot", str(m.root), "/opt/meshctl/bin/pip", "install", "-q",
                        "--no-index", "--find-links", "/var/cache/meshctl-wheels",
                        f"/var/cache/meshctl-wheels/{wheel.name}"],
                       check=True, capture_output=True, timeout=300)
        subprocess.run(["chroot", str(m.root), "useradd", "--system", "--home-dir",
                        "/var/lib/meshctl", "--shell", "/usr/sbin/nologin", "meshctl"],
                       check=True, capture_output=True, timeout=30)
        m.write("/etc/systemd/system/meshctl-agent.service", UNIT.read_text())

    def _boot(self, m: Machine) -> None:
        # --keep-unit makes the cgroup nspawn runs in the container's own root
        # cgroup. Started from one process, every machine would share it, and
        # their inits would create the same unit cgroups (system.slice/...) in one
        # tree: a unit of one machine then fails to attach to its cgroup
        # (219/CGROUP) when another machine boots at the same time. So nspawn
        # starts in a cgroup of its own, one per hierarchy, removed at down().
        paths = cgroup_paths(m.machine)
        self._record(m, cgroups=[str(p) for p in paths])
        m.cgroups = make_cgroups(paths)
        dirs = list(m.cgroups)

        def enter_cgroups() -> None:
            pid = str(os.getpid())
            for d in dirs:
                with contextlib.suppress(OSError):
                    (d / "cgroup.procs").write_text(pid)

        # Until its pid is recorded, the nspawn is found by its cgroups (entered
        # before it executes).
        argv = [_sys.require_program("systemd-nspawn"), "--keep-unit", "--register=no",
                "--quiet", "-M", m.machine, "-D", str(m.root),
                f"--network-bridge={self.lab.bridge}", "-b"]
        log = open(m.workdir / "console.log", "wb")  # noqa: SIM115 - lives with nspawn
        m.nspawn = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=enter_cgroups)
        log.close()
        self._record(m, pid=m.nspawn.pid, start_time=_sys.start_time(m.nspawn.pid), argv=argv)

    def _wait_booted(self, m: Machine, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if m.nspawn is not None and m.nspawn.poll() is not None:
                raise LabError(f"machine {m.name} exited at boot:\n"
                               f"{_sys.tail(m.workdir / 'console.log')}")
            try:
                state = m.run(["systemctl", "is-system-running", "--wait"], check=False,
                              timeout=max(1.0, deadline - time.monotonic())).stdout.strip()
            except (LabError, subprocess.TimeoutExpired):
                state = ""
            if state in ("running", "degraded"):
                break
            if time.monotonic() >= deadline:
                raise LabError(f"machine {m.name} did not boot in {timeout:g}s ({state!r})")
            time.sleep(0.2)
        failed = m.systemctl("--failed", "--no-legend", "--plain").stdout.strip()
        if failed:
            why = "\n".join(m.journal(line.split()[0], 15) for line in failed.splitlines())
            raise LabError(f"machine {m.name}: units failed at boot: {failed}\n{why}")

    # ------------------------------------------------------------ down

    def down(self) -> None:
        """Power every machine off (by nspawn's pid), unmount the overlays, remove the
        cgroups and the directory: what the lab's state records, as a stale sweep would.

        Raises LabError if something could not be removed (its record then stays
        in the lab's state, and the lab's own teardown tries again).
        """
        mine: list[_state.MachineRecord] = []

        def take(state: _state.LabState) -> None:
            mine.extend(r for r in state.machines if r.dir == str(self.dir))

        with contextlib.suppress(LabError):  # the lab went down first: it removed them
            self.lab._edit_state(take)
        problems = _state.teardown_machines(self.lab.prefix, mine, [str(self.dir)])
        for m in self.machines.values():
            if m.nspawn is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.nspawn.wait(timeout=5)  # reap: teardown saw it exit
            m.cgroups = []
        if problems:
            raise LabError(f"machines of lab {self.lab.prefix}: teardown incomplete: "
                           + "; ".join(problems))
        def forget(state: _state.LabState) -> None:
            state.machines = [r for r in state.machines if r.dir != str(self.dir)]
            state.machine_dirs = [d for d in state.machine_dirs if d != str(self.dir)]

        with contextlib.suppress(LabError):  # the lab already went down: nothing to forget
            self.lab._edit_state(forget)
