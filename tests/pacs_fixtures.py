"""A real Orthanc with its DICOMweb plugin for the PACS tests, and tiny fake DICOMweb servers that fail.

``OrthancServer`` runs Debian's Orthanc (``apt-get install orthanc orthanc-dicomweb``) with its own
configuration and storage in a temporary folder, on a free port of 127.0.0.1, with remote access off
and HTTP basic authentication on (a random password). Orthanc binds every interface whatever it is
told, which is why ``RemoteAccessAllowed`` stays false. Run as root (as in the project's containers),
it is started as the unprivileged ``orthanc`` user the Debian package creates (else ``nobody``); the
folder is made outside pytest's private base folder so that user can enter it. Its DICOM port is off.

``fake_dicomweb`` serves canned failures on another free port: HTTP 500, an answer slower than the
client's timeout, or a server that wants a bearer token (optionally over TLS). ``phantom_studies``
writes synthetic head-CT studies (one axial series each) to store in it.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ORTHANC_BINARY = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
# Where Debian's orthanc-dicomweb puts the plugin (dpkg -L orthanc-dicomweb): a symlink in the plugins
# folder to /usr/lib/orthanc/libOrthancDicomWeb.so.<version>.
PLUGIN_CANDIDATES = (
    os.environ.get("HEMORRHAGE_ORTHANC_DICOMWEB_PLUGIN", ""),
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    *sorted(glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*")),
)
SKIP_REASON = "Orthanc is not installed (apt-get install -y orthanc orthanc-dicomweb)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dicomweb_plugin() -> str:
    for candidate in PLUGIN_CANDIDATES:
        if candidate and os.path.isfile(candidate):
            return candidate
    raise RuntimeError("Orthanc is installed but its DICOMweb plugin is not: apt-get install -y orthanc-dicomweb")


def _service_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run Orthanc as when the tests run as root, else None (run as we are)."""
    if os.geteuid() != 0:
        return None
    for name in ("orthanc", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


class OrthancServer:
    """One Orthanc process; ``start`` / ``stop`` may alternate (the storage stays), ``close`` removes all."""

    def __init__(self, name: str = "hemorrhage-test") -> None:
        if ORTHANC_BINARY is None:
            raise RuntimeError(SKIP_REASON)
        self.name = name
        self.user = "hemorrhage"
        self.password = secrets.token_urlsafe(18)
        self.port = free_port()
        self.account = _service_user()
        self.root = Path(tempfile.mkdtemp(prefix="hemorrhage-orthanc-"))
        self.config_path = self.root / "orthanc.json"
        self.log_path = self.root / "orthanc.log"
        self.process: subprocess.Popen | None = None
        config = {
            "Name": name,
            "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"),
            "Plugins": [dicomweb_plugin()],
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpDescribeErrors": False,
            "ConcurrentJobs": 1,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }
        self.config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
        os.chmod(self.config_path, 0o600)  # it holds the password
        if self.account is not None:
            for path in (self.root, self.config_path):
                os.chown(path, self.account.pw_uid, self.account.pw_gid)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The DICOMweb base address the commands are given."""
        return f"{self.base}/dicom-web"

    @property
    def env(self) -> dict[str, str]:
        return {"HEMORRHAGE_DICOMWEB_USER": self.user, "HEMORRHAGE_DICOMWEB_PASSWORD": self.password}

    def start(self, timeout_s: float = 60.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the process
        kwargs = {}
        if self.account is not None:
            kwargs = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        try:
            self.process = subprocess.Popen([ORTHANC_BINARY, str(self.config_path)], stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, cwd=self.root, start_new_session=True, **kwargs)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.base}/system", auth=(self.user, self.password), timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- helpers for the tests ---------------------------------------------------------------------
    def session(self) -> requests.Session:
        session = requests.Session()
        session.auth = (self.user, self.password)
        return session

    def stow(self, datasets: Sequence) -> None:
        """Store pydicom datasets with STOW-RS (dicomweb-client), as a modality or another node would."""
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.url, session=self.session(), timeout=(10, 60))
        answer = client.store_instances(list(datasets))
        failed = getattr(answer, "FailedSOPSequence", None)
        assert not failed, f"Orthanc refused {len(failed)} instances"

    def series_of(self, study_uid: str, modality: str | None = None) -> list[dict]:
        """QIDO-RS series of a study (DICOM JSON), optionally of one modality."""
        params = {"Modality": modality} if modality else {}
        answer = self.session().get(f"{self.url}/studies/{study_uid}/series", params=params, timeout=30)
        if answer.status_code == 404:
            return []
        answer.raise_for_status()
        return answer.json() if answer.content else []

    def instances_of(self, study_uid: str, series_uid: str) -> list[str]:
        answer = self.session().get(f"{self.url}/studies/{study_uid}/series/{series_uid}/instances", timeout=30)
        answer.raise_for_status()
        return [item["00080018"]["Value"][0] for item in answer.json()]


class _FakeHandler(BaseHTTPRequestHandler):
    mode = "error500"
    delay_s = 0.0
    token = ""
    requests_seen: list[dict] = []

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.requests_seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
        if self.mode == "slow":
            time.sleep(self.delay_s)
        if self.mode == "error500":
            self._send(500, b"internal failure", "text/plain")
        elif self.mode == "bearer" and self.headers.get("Authorization") != f"Bearer {self.token}":
            self._send(401, b"", "text/plain")
        else:
            self._send(200, b"[]", "application/dicom+json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass


@contextmanager
def fake_dicomweb(mode: str, *, delay_s: float = 0.0, token: str = "", tls: tuple[str, str] | None = None
                  ) -> Iterator[tuple[str, list[dict]]]:
    """(base URL, requests seen) of a fake DICOMweb server: ``error500``, ``slow`` (answers after
    ``delay_s``), or ``bearer`` (an empty study list for ``Bearer <token>``, else 401); ``tls`` =
    (certificate, key) serves https."""
    handler = type("Handler", (_FakeHandler,), {"mode": mode, "delay_s": delay_s, "token": token,
                                                "requests_seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}/dicom-web", handler.requests_seen
    finally:
        server.shutdown()
        server.server_close()


def self_signed_certificate(folder: Path) -> tuple[str, str] | None:
    """(certificate, key) for 127.0.0.1 made with openssl, or None when openssl is absent."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def phantom_studies(folder: Path, *, patients: int, slices: int, seed: int, size: int = 64,
                    identity: dict[str, str] | None = None) -> list[list[Path]]:
    """Synthetic phantom studies (one axial CT series each, ``identity`` written into the headers):
    each study's files in z order."""
    import pydicom

    from hemorrhage_core.synthetic import write_dataset

    write_dataset(folder, patients=patients, slices_per_patient=slices, size=size, seed=seed, workers=1,
                  progress=False, identity_tags=identity)
    by_series: dict[str, list[tuple[float, Path]]] = {}
    for path in sorted((folder / "stage_2_train").glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(ds.SeriesInstanceUID, []).append((float(ds.ImagePositionPatient[2]), path))
    return [[p for _, p in sorted(files)] for files in by_series.values()]


def pacs_run(runs_dir: Path) -> Path:
    """A finished stage-2 run for the dashboard's PACS tests: a real tiny untrained model, and validation
    predictions of 30 patients x 2 slices, enough negative studies for study-level thresholds to be
    chosen on them (not defaulted to 0.5)."""
    from dashboard_fixtures import synthetic_predictions, tiny_model_checkpoint

    from hemorrhage_core.runs import RunWriter

    writer = RunWriter.create(runs_dir, backbone="resnet18", stage=2, config={"image_size": 64}, device="cpu")
    writer.write_predictions(synthetic_predictions(n_patients=30, slices=2, seed=0))
    tiny_model_checkpoint(writer.checkpoint_path("best"))
    writer.finish()
    return writer.path
