"""The Ansible playbook, linted and applied for real: over SSH (an sshd this test starts on a
loopback port with throwaway keys) to this machine, installing into a temporary prefix with
service-manager steps off. Then the node is started with the exact command line of the
rendered unit and must answer health; a second run must change nothing."""

from __future__ import annotations

import getpass
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support.wait import wait_for

pytestmark = pytest.mark.slow  # runs ansible, ansible-lint and an sshd

ANSIBLE = Path(__file__).resolve().parents[1] / "ansible"
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (the test extra and .ci/run install it)")
    return path


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)


def test_yamllint_and_ansible_lint_and_syntax():
    assert (r := run(tool("yamllint"), "--strict", ".", cwd=ANSIBLE)).returncode == 0, r.stdout + r.stderr
    assert (r := run(tool("ansible-lint"), "--profile", "production", cwd=ANSIBLE)).returncode == 0, r.stdout + r.stderr
    for playbook in ("site.yml", "upgrade.yml", "reset.yml"):
        r = run(tool("ansible-playbook"), "--syntax-check", "-i", "inventory.example.yml", f"playbooks/{playbook}",
                cwd=ANSIBLE)
        assert r.returncode == 0, r.stdout + r.stderr


def test_a_model_in_a_home_folder_stays_readable_to_serve():
    """ProtectHome=true would hide a model under /home from caravan-serve: the unit makes it read-only."""
    jinja2 = pytest.importorskip("jinja2")
    template = (ANSIBLE / "roles" / "coordinator" / "templates" / "caravan-serve.service.j2").read_text()
    settings = dict(ansible_managed="test", caravan_user="caravan", caravan_cache_dir="/opt/caravan/cache",
                    caravan_venv="/opt/caravan/venv", caravan_home="/opt/caravan", caravan_serve_host="127.0.0.1",
                    caravan_serve_port=8080, caravan_ctx=2048, caravan_threads=4, caravan_serve_max_connections=1000,
                    coordinator_nodes="pi2:50051", caravan_api_key="", coordinator_api_key_file="")
    render = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render
    for model, protect in (("/home/pi/models/my.gguf", "read-only"), ("/opt/caravan/cache/models/my.gguf", "true"),
                           ("smollm2-135m-instruct", "true")):
        unit = render(coordinator_model=model, **settings)
        assert f"--model {model} " in unit and f"\nProtectHome={protect}\n" in unit, unit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def sshd(tmp_path):
    if SSHD is None:
        pytest.skip("no sshd on this machine (.ci/run installs openssh-server)")
    keygen = tool("ssh-keygen")
    for name in ("host_key", "client_key"):
        assert run(keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)).returncode == 0
    (tmp_path / "authorized_keys").write_text((tmp_path / "client_key.pub").read_text())
    os.chmod(tmp_path / "authorized_keys", 0o600)
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {tmp_path / 'host_key'}",
        f"PidFile {tmp_path / 'sshd.pid'}", f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}",
        "StrictModes no", "UsePAM no", "PasswordAuthentication no", "PermitRootLogin prohibit-password",
        "Subsystem sftp internal-sftp", "",
    ]))
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    wait_for(lambda: listening(port), 10, "sshd listening")
    yield port, tmp_path / "client_key"
    proc.terminate()
    proc.wait(timeout=10)


def unit_command(unit: Path) -> tuple[list[str], dict[str, str]]:
    """ExecStart and Environment= of a rendered unit."""
    argv, env = [], {}
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            argv = shlex.split(line[len("ExecStart="):])
        elif line.startswith("Environment="):
            key, _, value = line[len("Environment="):].partition("=")
            env[key] = value
    return argv, env


def test_site_playbook_installs_a_working_node_and_is_idempotent(sshd, tmp_path, smollm2_path):
    node_port = free_port()
    apply = site_playbook(sshd, tmp_path, smollm2_path, node_port)
    first = apply()
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]

    prefix = tmp_path / "prefix"
    units = prefix / "etc" / "systemd" / "system"
    # The workers' kernels were compiled at install, where the node's own start finds them.
    assert list((prefix / "opt" / "caravan" / "cache" / "numba").glob("*/warm/llama-Q4_1")), first.stdout[-4000:]
    token = prefix / "opt" / "caravan" / "cache" / "cluster-token"
    assert (token.stat().st_mode & 0o777) == 0o600
    assert token.read_text().strip() == (tmp_path / "credentials" / "cluster-token").read_text().strip()
    check_units_parse(units)
    check_serve_unit(prefix, units, smollm2_path)
    check_node_unit_starts_a_node(prefix, units, node_port)

    second = apply()
    assert second.returncode == 0, second.stdout[-4000:]
    recap = [line for line in second.stdout.splitlines() if line.startswith("testhost")][-1]
    assert "changed=0" in recap, second.stdout[-4000:]


def site_playbook(sshd, tmp_path: Path, smollm2_path: Path, node_port: int):
    """A function that applies playbooks/site.yml over `sshd` to this machine, into tmp_path/prefix
    (service-manager and package steps off), with the token and API key the test checks."""
    playbook = tool("ansible-playbook")
    port, key = sshd
    inventory = {"all": {
        "hosts": {"testhost": {
            "ansible_host": "127.0.0.1", "ansible_port": port, "ansible_user": getpass.getuser(),
            "ansible_ssh_private_key_file": str(key), "ansible_python_interpreter": sys.executable,
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        }},
        "children": {"workers": {"hosts": {"testhost": None}}, "coordinator": {"hosts": {"testhost": None}}},
    }}
    (tmp_path / "inventory.json").write_text(json.dumps(inventory))
    extra = {
        "caravan_prefix": str(tmp_path / "prefix"), "caravan_manage_services": False,
        "caravan_manage_packages": False, "caravan_venv_site_packages": True, "caravan_model_file": str(smollm2_path),
        "caravan_threads": 1, "caravan_node_port": node_port,
        "caravan_token_file": str(tmp_path / "credentials" / "cluster-token"),
        "caravan_archive": str(tmp_path / "caravan-src.tar"), "caravan_api_key": "test-api-key",
    }
    (tmp_path / "vars.json").write_text(json.dumps(extra))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}

    def apply() -> subprocess.CompletedProcess:
        return run(playbook, "-i", str(tmp_path / "inventory.json"), "playbooks/site.yml",
                   "-e", f"@{tmp_path / 'vars.json'}", cwd=ANSIBLE, env=env)

    return apply


def check_units_parse(units: Path) -> None:
    """Both units: no MemoryDenyWriteExecute, caravan's own kernel cache, restarts, and (with
    systemd-analyze) every key and value parses."""
    analyze = shutil.which("systemd-analyze")
    for name in ("caravan-node.service", "caravan-serve.service"):
        text = (units / name).read_text()
        assert "MemoryDenyWriteExecute" not in text.replace("MemoryDenyWriteExecute stays off", "")
        # caravan keeps compiled kernels under CARAVAN_HOME, apart per version of its sources
        assert "NUMBA_CACHE_DIR" not in text and "Environment=CARAVAN_HOME=" in text and "Restart=on-failure" in text
        if analyze:
            # Every key and value must parse (this machine may lack the service user: not checked).
            verify = run(analyze, "verify", str(units / name))
            problems = [line for line in (verify.stdout + verify.stderr).splitlines()
                        if any(word in line for word in ("Unknown", "Invalid", "Failed to parse", "bad-setting"))]
            assert not problems, problems


def check_serve_unit(prefix: Path, units: Path, smollm2_path: Path) -> None:
    """caravan-serve's API key file, file limit and model, as the playbook installed them."""
    # The API key is in a file of the service's own, not on the command line or in the unit.
    api_key = prefix / "opt" / "caravan" / "cache" / "api-key"
    assert (api_key.stat().st_mode & 0o777) == 0o600 and api_key.read_text().strip() == "test-api-key"
    serve_unit = (units / "caravan-serve.service").read_text()
    assert "test-api-key" not in serve_unit and f"--api-key-file {api_key}" in serve_unit
    serve_argv, _ = unit_command(units / "caravan-serve.service")
    max_connections = int(serve_argv[serve_argv.index("--max-connections") + 1])
    nofile = int(next(line.split("=", 1)[1] for line in serve_unit.splitlines() if line.startswith("LimitNOFILE=")))
    assert nofile > max_connections

    # A model file of the machine running Ansible is copied into the coordinator's cache, for serve.
    model = prefix / "opt" / "caravan" / "cache" / "models" / smollm2_path.name
    assert model.stat().st_size == smollm2_path.stat().st_size and (model.stat().st_mode & 0o777) == 0o640
    assert serve_argv[serve_argv.index("--model") + 1] == str(model) and "ProtectHome=true" in serve_unit


def check_node_unit_starts_a_node(prefix: Path, units: Path, node_port: int) -> None:
    """The node unit's exact command line starts a node that answers health."""
    argv, unit_env = unit_command(units / "caravan-node.service")
    assert argv[0] == str(prefix / "opt" / "caravan" / "venv" / "bin" / "caravan") and "--no-advertise" not in argv
    node = subprocess.Popen(argv + ["--no-advertise"], env={**os.environ, **unit_env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        health = [str(prefix / "opt" / "caravan" / "venv" / "bin" / "python"), "-m", "caravan.node.health",
                  f"127.0.0.1:{node_port}", "--timeout", "30"]
        assert run(*health).returncode == 0
    finally:
        node.terminate()
        node.wait(timeout=15)
