"""Starts a meshflow server for the client tests: the real binary on 127.0.0.1:0, a fresh SQLite file."""

import json
import os
import shutil
import subprocess
import tempfile

import grpc
import pytest


def binary():
    """The meshflow binary under test."""
    path = os.environ.get("MESHFLOW_BIN")
    if not path:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")), "debug", "meshflow")
    if not os.path.exists(path):
        pytest.fail(f"meshflow binary not found at {path}; build it with `cargo build -p meshflow`")
    return path


@pytest.fixture(scope="session")
def server_address():
    yield from serve()


def serve():
    """Runs `meshflow serve` as the README's walkthrough starts it (on a free port); yields its address."""
    data = tempfile.mkdtemp(prefix="meshflow-py-")
    args = [
        binary(), "serve",
        "--listen", "127.0.0.1:0",
        "--database-url", f"sqlite://{data}/meshflow.db?mode=rwc",
        "--log-format", "json",
        # Steps may call the tests' own HTTP servers on loopback, and nothing else.
        "--allow-http-to", "127.0.0.1/32",
    ]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    address = None
    # The server logs one JSON object per line; the `serving` line carries the bound address.
    for line in proc.stderr:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        fields = record.get("fields", {})
        if fields.get("message") == "serving":
            address = fields["addr"]
            break
    if address is None:
        proc.kill()
        pytest.fail("meshflow exited before serving")
    yield address
    proc.terminate()
    proc.wait(timeout=30)
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture()
def channel(server_address):
    with grpc.insecure_channel(server_address) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch
