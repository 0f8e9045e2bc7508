"""The README's walkthrough, run as written: every grpcurl command of README.md, in order, against a
server started as the README starts it and the demo items it calls. Placeholders (`<id>`, `<etag>`,
`<execution id>`) take the values the earlier answers gave, as a reader would copy them, and
127.0.0.1:50051 and the demo's 127.0.0.1:8090 become the free ports the test servers took."""

import json
import os
import re
import shlex
import subprocess

import grpc
import pytest

from conftest import binary, serve
from test_workflow_client import Reflected, stream

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
STREAMING = {"ExecuteWorkflow", "WatchExecution"}
# Streams that do not end: the test reads their first message.
ENDLESS = {"WatchCircuitBreakers"}


def commands():
    """Every grpcurl command of the README's sh blocks: (arguments, heredoc body or None)."""
    text = open(README, encoding="utf-8").read()
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        lines = block.split("\n")
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line.startswith("grpcurl"):
                continue
            command = line
            # A quoted -d body may span lines; so may a trailing backslash.
            while command.endswith("\\") or command.count("'") % 2 == 1:
                command = (command[:-1] if command.endswith("\\") else command + "\n") + lines[i]
                i += 1
            heredoc = None
            if "<<'EOF'" in command:
                body = []
                while lines[i] != "EOF":
                    body.append(lines[i])
                    i += 1
                i += 1
                heredoc = "\n".join(body)
                command = command.replace("<<'EOF'", "")
            found.append((shlex.split(command), heredoc))
    return found


@pytest.fixture(scope="module")
def demo_items():
    proc = subprocess.Popen([binary(), "demo-items", "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://(127\.0\.0\.1:\d+)", line)
    assert match, f"demo-items printed {line!r}"
    yield match.group(1)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def readme_server():
    yield from serve()


def test_the_readme_walkthrough_runs_as_written(readme_server, demo_items):
    found = commands()
    assert len(found) >= 10, found
    with grpc.insecure_channel(readme_server) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        api = Reflected(channel)
        seen = {}
        for args, heredoc in found:
            assert args[:2] == ["grpcurl", "-plaintext"], args
            if args[-1] == "list":
                assert "meshflow.orchestrator.v1.OrchestratorService" in api.services()
                continue
            body = heredoc if args[2:4] == ["-d", "@"] else args[3]
            for placeholder in ("<id>", "<etag>", "<execution id>"):
                if placeholder in body:
                    body = body.replace(placeholder, seen[placeholder])
            body = body.replace("127.0.0.1:8090", demo_items)
            service, method = args[-1].rsplit("/", 1)
            request = json.loads(body)
            if method in ENDLESS:
                messages = stream(api, service, method, request)
                first = next(messages)
                messages.close()
                if method == "WatchCircuitBreakers":
                    breaker = first["circuitBreaker"]
                    assert breaker["state"] == "CIRCUIT_BREAKER_STATE_FORCED_OPEN", first
                    assert breaker["config"]["minimumCalls"] == 20, first
                continue
            if method in STREAMING:
                answers = list(stream(api, service, method, request))
                events = [a["event"] for a in answers if "event" in a]
                assert events[-1]["type"] == "EVENT_TYPE_EXECUTION_COMPLETED", answers
                for e in events:
                    if e.get("stepId") == "double" and e["type"] == "EVENT_TYPE_STEP_SUCCEEDED":
                        seen["price"] = e["output"]["price"]
                continue
            answer = api.call(service, method, request)
            remember(method, answer, seen)
            if method == "ValidateWorkflow":
                assert [v["field"] for v in answer["violations"]] == [
                    "workflow.steps[0].depends_on", "workflow.steps[1].http.url"], answer
            if method == "TestTransformationRule":
                assert answer["output"] == {"total": 120}, answer
            if method == "ListCircuitBreakers":
                assert [b["serviceId"] for b in answer["circuitBreakers"]] == [
                    "payments.example.com:443"], answer
            if method == "ResetCircuitBreaker":
                assert answer["circuitBreaker"]["state"] == "CIRCUIT_BREAKER_STATE_CLOSED", answer
        # The price check ran: item 3 costs 4.5, doubled 9.
        assert seen["price"] == 9


def remember(method, answer, seen):
    """Keeps what a reader would copy from an answer into the next commands."""
    resource = answer.get("workflow") or answer.get("webhook")
    if resource:
        seen["<id>"] = resource.get("workflowId") or resource.get("webhookId")
        seen["<etag>"] = resource["etag"]
    if method == "StartExecution":
        seen["<execution id>"] = answer["execution"]["executionId"]


def test_the_readme_buf_curl_commands_run(readme_server, tmp_path):
    """The README's `npx @bufbuild/buf curl` lines, with the buf the test command installed."""
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    buf = os.path.join(root, "node_modules", ".bin", "buf")
    assert os.path.exists(buf), "run `npm ci` (the test command does) to install @bufbuild/buf"
    text = open(README, encoding="utf-8").read()
    lines = re.findall(r"^npx @bufbuild/buf curl .*?(?<!\\)$", text, re.M | re.S)
    assert len(lines) == 3, lines
    (tmp_path / "workflow.json").write_text(json.dumps({"workflow": {
        "name": "from-buf", "steps": [{"id": "f", "functionCall": {"function": "uuid"}}]}}))
    for line in lines:
        command = line.replace("\\\n", " ").replace("127.0.0.1:50051", readme_server)
        stdin = None
        if command.endswith("< workflow.json"):
            command = command[: -len("< workflow.json")]
            stdin = open(tmp_path / "workflow.json", encoding="utf-8")
        args = shlex.split(command)
        assert args[:2] == ["npx", "@bufbuild/buf"], args
        out = subprocess.run([buf, *args[2:]], stdin=stdin, capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        if "--list-services" in args:
            assert "meshflow.workflow.v1.WorkflowService" in out.stdout, out.stdout
        if args[-1].endswith("/CreateWorkflow"):
            assert json.loads(out.stdout)["workflow"]["name"] == "from-buf", out.stdout
