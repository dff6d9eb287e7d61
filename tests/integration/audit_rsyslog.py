"""A real rsyslog as the Audit Record Repository: TLS (RFC 5425, openssl stream driver) and UDP (RFC 5426).

Started by the test as its own process (``rsyslogd -n -f <conf> -i <pidfile>``) on free ports; each
received message's MSG is written on a line of ``received.log``, so the test reads back exactly the XML
the broker sent.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.tls_support import Pki

CONF = """
global(workDirectory="{work}" maxMessageSize="64k"
       DefaultNetstreamDriver="ossl" DefaultNetstreamDriverCAFile="{ca}"
       DefaultNetstreamDriverCertFile="{cert}" DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="ossl" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
module(load="imudp")
template(name="msgonly" type="string" string="%msg%\\n")
ruleset(name="audit") {{ action(type="omfile" file="{out}" template="msgonly") }}
input(type="imtcp" port="{tcp}" ruleset="audit")
input(type="imudp" address="127.0.0.1" port="{udp}" ruleset="audit")
"""


def _free(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def available() -> bool:
    return shutil.which("rsyslogd") is not None or Path("/usr/sbin/rsyslogd").exists()


class Rsyslog:
    """rsyslogd listening with TLS on ``tcp_port`` and plain UDP on ``udp_port``."""

    def __init__(self, directory: Path, pki: Pki) -> None:
        self.directory = directory
        self.tcp_port, self.udp_port = _free(socket.SOCK_STREAM), _free(socket.SOCK_DGRAM)
        self.received = directory / "received.log"
        self.conf = directory / "rsyslog.conf"
        (directory / "work").mkdir(exist_ok=True)
        self.conf.write_text(CONF.format(work=directory / "work", ca=pki.ca, cert=pki.server_cert,
                                         key=pki.server_key, out=self.received, tcp=self.tcp_port,
                                         udp=self.udp_port))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        rsyslogd = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        self.process = subprocess.Popen([rsyslogd, "-n", "-f", str(self.conf), "-i", str(self.directory / "pid")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=0.2):
                    return
            except OSError as exc:
                if self.process.poll() is not None:
                    stderr = self.process.stderr.read() if self.process.stderr else b""
                    raise RuntimeError(f"rsyslogd failed: {stderr!r}") from exc
                time.sleep(0.05)
        raise RuntimeError("rsyslogd did not listen")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def messages(self) -> list[str]:
        """The MSG of each message received so far (the UTF-8 BOM and surrounding space removed).

        Only complete lines: rsyslog writes a long message in more than one write, and a line read
        between two of them is a message cut short (seen once as an XML syntax error in CI)."""
        if not self.received.exists():
            return []
        text = self.received.read_text(encoding="utf-8", errors="replace")
        text = text[:text.rfind("\n") + 1]
        return [line.lstrip("\ufeff ").rstrip() for line in text.splitlines() if line.strip()]

    def wait_for(self, count: int, seconds: float = 15) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = self.messages()
            if len(found) >= count:
                return found
            time.sleep(0.1)
        return self.messages()
