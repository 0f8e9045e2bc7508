"""A Python client that knows nothing of meshflow but its address: it discovers the services by
server reflection, as grpcurl does, builds messages from plain JSON, and drives WorkflowService."""

import base64
import hashlib
import hmac
import http.server
import json
import threading
import uuid

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

WORKFLOW = "meshflow.workflow.v1.WorkflowService"


class Reflected:
    """Calls any method of a reflected service with JSON in and JSON out."""

    def __init__(self, channel):
        self.channel = channel
        self.db = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)

    def services(self):
        return set(self.db.get_services())

    def call(self, service, method, request_json):
        desc = self.pool.FindServiceByName(service).FindMethodByName(method)
        request_cls = message_factory.GetMessageClass(desc.input_type)
        response_cls = message_factory.GetMessageClass(desc.output_type)
        text = request_json if isinstance(request_json, str) else json.dumps(request_json)
        request = json_format.Parse(text, request_cls())
        rpc = self.channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        return json_format.MessageToDict(rpc(request, timeout=30), preserving_proto_field_name=False)


@pytest.fixture()
def api(channel):
    return Reflected(channel)


def test_reflection_lists_the_built_services_and_health(api):
    assert api.services() == {
        "meshflow.execution.v1.ExecutionService",
        "meshflow.orchestrator.v1.OrchestratorService",
        "meshflow.workflow.v1.WorkflowService",
        "meshflow.workflow.v1.WorkflowTemplateService",
        "meshflow.workflow.v1.TransformationRuleService",
        "meshflow.webhook.v1.WebhookService",
        "meshflow.circuitbreaker.v1.CircuitBreakerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert api.call("grpc.health.v1.Health", "Check", {}) == {"status": "SERVING"}


def test_create_read_list_update_delete_from_plain_json(api):
    name = f"py-{uuid.uuid4().hex[:8]}"
    created = api.call(WORKFLOW, "CreateWorkflow", {
        "requestId": name,
        "workflow": {
            "name": name,
            "tags": ["python"],
            "steps": [
                {"id": "fetch", "http": {"method": "GET", "url": "http://127.0.0.1:9/item/${input.id}"}},
                {"id": "double", "dependsOn": ["fetch"],
                 "transform": {"assignments": [{"target": "price", "expression": "steps.fetch.output.body.price * 2"}]}},
            ],
        },
    })["workflow"]
    workflow_id = created["workflowId"]
    assert created["version"] == "1"  # int64 is a string in proto3 JSON
    assert created["status"] == "WORKFLOW_STATUS_DRAFT"

    got = api.call(WORKFLOW, "GetWorkflow", {"workflowId": workflow_id})["workflow"]
    assert got["steps"] == created["steps"]

    listed = api.call(WORKFLOW, "ListWorkflows", {"tag": "python", "name": name})["workflows"]
    assert [w["workflowId"] for w in listed] == [workflow_id]

    updated = api.call(WORKFLOW, "UpdateWorkflow", {
        "workflow": {"workflowId": workflow_id, "etag": got["etag"], "description": "from python",
                     "steps": [{"id": "only", "functionCall": {"function": "uuid"}}]},
        "updateMask": "description,steps",
    })["workflow"]
    assert updated["description"] == "from python"
    assert updated["version"] == "2"

    versions = api.call(WORKFLOW, "ListWorkflowVersions", {"workflowId": workflow_id})["versions"]
    assert [v["version"] for v in versions] == ["2", "1"]

    report = api.call(WORKFLOW, "ValidateWorkflow", {"workflow": {"name": "x", "steps": [
        {"id": "a", "dependsOn": ["a"], "functionCall": {"function": "uuid"}}]}})
    assert report.get("valid", False) is False
    assert report["violations"][0]["field"] == "workflow.steps[0].depends_on[0]"

    assert api.call(WORKFLOW, "DeleteWorkflow", {"workflowId": workflow_id, "etag": updated["etag"]}) == {}
    with pytest.raises(grpc.RpcError) as missing:
        api.call(WORKFLOW, "GetWorkflow", {"workflowId": workflow_id})
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_input_carries_field_violations(api):
    with pytest.raises(grpc.RpcError) as err:
        api.call(WORKFLOW, "CreateWorkflow", {"workflow": {"name": "Bad Name", "steps": [
            {"id": "a", "http": {"method": "GET", "url": "ftp://x"}}]}})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields, reasons = details(err.value)
    assert {"workflow.name", "workflow.steps[0].http.url"} <= fields
    assert reasons == {("INVALID_ARGUMENT", "meshflow")}


def details(error):
    """The field violations and ErrorInfo reasons of a failed call."""
    fields, reasons = set(), set()
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields |= {v.field for v in bad.field_violations}
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reasons.add((info.reason, info.domain))
    return fields, reasons


def test_bytes_that_are_not_a_message_are_invalid_argument(api):
    def raw(method):
        """A call that sends the given bytes as they are."""
        return api.channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)

    cases = [
        # workflow_id claims five bytes and has two.
        ("/meshflow.orchestrator.v1.OrchestratorService/StartExecution", b"\x0a\x05ab", "workflow_id"),
        # workflow.name is not UTF-8.
        ("/meshflow.workflow.v1.WorkflowService/CreateWorkflow", b"\x0a\x04\x12\x02\xc3\x28", "workflow.name"),
        # Not a field at all.
        ("/meshflow.execution.v1.ExecutionService/ListExecutions", b"\xff\xff\xff", None),
    ]
    for method, body, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            raw(method)(body, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.details())
        fields, reasons = details(err.value)
        assert reasons == {("MALFORMED_MESSAGE", "meshflow")}
        assert fields == ({field} if field else set())
    # The server keeps serving.
    assert isinstance(api.call(WORKFLOW, "ListWorkflows", {}), dict)


ORCHESTRATOR = "meshflow.orchestrator.v1.OrchestratorService"


def stream(api, service, method, request):
    """Calls a server-streaming method with JSON; yields each message as a dict."""
    desc = api.pool.FindServiceByName(service).FindMethodByName(method)
    request_cls = message_factory.GetMessageClass(desc.input_type)
    response_cls = message_factory.GetMessageClass(desc.output_type)
    rpc = api.channel.unary_stream(
        f"/{service}/{method}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    for message in rpc(json_format.Parse(json.dumps(request), request_cls()), timeout=60):
        yield json_format.MessageToDict(message)


def test_execute_workflow_streams_events_and_watch_resumes_mid_way(api):
    name = f"py-run-{uuid.uuid4().hex[:8]}"
    workflow = api.call(WORKFLOW, "CreateWorkflow", {"workflow": {
        "name": name,
        "status": "WORKFLOW_STATUS_ACTIVE",
        "steps": [
            {"id": "greet", "transform": {"assignments": [{"target": "text", "expression": "'hello ' + input.name"}]}},
            {"id": "items", "dependsOn": ["greet"], "forEach": {"items": "[1, 2, 3]", "steps": [
                {"id": "square", "transform": {"assignments": [{"target": "n", "expression": "item * item"}]}}]}},
            {"id": "total", "dependsOn": ["items"], "functionCall": {"function": "sum",
                "arguments": {"values": "${steps.items.output.map(o, o.square.n)}"}}},
        ],
    }})["workflow"]

    messages = list(stream(api, ORCHESTRATOR, "ExecuteWorkflow",
                           {"workflowId": workflow["workflowId"], "input": {"name": "ada"}}))
    execution = messages[0]["execution"]
    events = [m["event"] for m in messages[1:]]
    for e in events:
        print(e["sequence"], e["type"], e.get("stepPath", ""), json.dumps(e.get("output", "")))
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "EVENT_TYPE_EXECUTION_STARTED"
    assert events[-1]["type"] == "EVENT_TYPE_EXECUTION_COMPLETED"
    assert events[-1]["output"]["total"] == 14
    assert events[-1]["output"]["greet"] == {"text": "hello ada"}

    # Events sent live carry the time their commit returned, at or after their own time.
    live = [m for m in messages[1:] if "commitTime" in m]
    assert live, "ExecuteWorkflow sends events live"
    for m in live:
        assert nanos(m["commitTime"]) >= nanos(m["event"]["time"])

    middle = len(events) // 2
    replayed = list(stream(api, ORCHESTRATOR, "WatchExecution",
                           {"executionId": execution["executionId"], "afterSequence": middle}))
    assert [m["event"] for m in replayed] == events[middle:]
    # Read from history, they carry none.
    assert all("commitTime" not in m for m in replayed)


def nanos(rfc3339):
    t = timestamp_pb2.Timestamp()
    t.FromJsonString(rfc3339)
    return t.ToNanoseconds()


class Shop(http.server.BaseHTTPRequestHandler):
    """GET /item/{n} -> {"id": n, "price": n * 1.5, "ok": true}; GET /flaky answers 503 to the
    first request of each Idempotency-Key, then 200; POST /echo records the request."""

    posted = []
    flaky_keys = set()

    def reply(self, status, doc):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/item/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.reply(200, {"id": n, "price": n * 1.5, "ok": True})
        elif self.path == "/flaky":
            key = self.headers["Idempotency-Key"]
            if key in Shop.flaky_keys:
                self.reply(200, {"ok": True})
            else:
                Shop.flaky_keys.add(key)
                self.reply(503, {"ok": False})
        else:
            self.reply(404, {})

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        Shop.posted.append((dict((k.lower(), v) for k, v in self.headers.items()), body))
        self.reply(200, {"received": True})

    def log_message(self, *args):
        pass


def test_all_nine_step_types_run_to_completion_with_every_attempt_streamed(api):
    shop = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Shop)
    threading.Thread(target=shop.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{shop.server_port}"
    try:
        workflow = api.call(WORKFLOW, "CreateWorkflow", {"workflow": {
            "name": f"py-nine-{uuid.uuid4().hex[:8]}",
            "status": "WORKFLOW_STATUS_ACTIVE",
            "variables": {"base": base},
            "inputSchema": {"type": "object", "required": ["n"]},
            "steps": [
                {"id": "check", "validation": {"value": "input",
                    "jsonSchema": {"properties": {"n": {"type": "integer", "minimum": 1}}},
                    "rules": [{"expression": "value.n < 100", "message": "n too big"}]}},
                {"id": "fetch", "dependsOn": ["check"], "http": {"method": "GET", "url": "${vars.base}/item/${input.n}",
                    "extract": {"price": "response.body.price"}}},
                {"id": "flaky", "dependsOn": ["check"], "http": {"method": "GET", "url": "${vars.base}/flaky"},
                    "retryPolicy": {"strategy": "RETRY_STRATEGY_FIXED", "maxAttempts": 3, "initialDelay": "0.01s"}},
                {"id": "double", "dependsOn": ["fetch"], "transform": {"assignments": [
                    {"target": "price", "expression": "steps.fetch.output.price * 2.0"}]}},
                {"id": "branch", "dependsOn": ["double"], "conditional": {
                    "branches": [{"condition": "steps.double.output.price > 100.0",
                                  "steps": [{"id": "big", "functionCall": {"function": "uuid"}}]}],
                    "otherwise": [{"id": "small", "functionCall": {"function": "uuid"}}]}},
                {"id": "fan", "dependsOn": ["branch", "flaky"], "parallel": {"branches": [
                    {"name": "a", "steps": [{"id": "pa", "http": {"method": "GET", "url": "${vars.base}/item/10"}}]},
                    {"name": "b", "steps": [{"id": "pb", "functionCall": {"function": "sum", "arguments": {"values": [1, 2, 3]}}}]}]}},
                {"id": "each", "dependsOn": ["fan"], "forEach": {"items": "[1, 2, 3]", "maxConcurrency": 2, "steps": [
                    {"id": "get", "http": {"method": "GET", "url": "${vars.base}/item/${item}"}}]}},
                {"id": "total", "dependsOn": ["each"], "functionCall": {"function": "sum",
                    "arguments": {"values": "${steps.each.output.map(o, o.get.body.price)}"}}},
                {"id": "approval", "dependsOn": ["total"], "wait": {"signal": "approved", "timeout": "60s"}},
                {"id": "notify", "dependsOn": ["approval"], "webhookCall": {"url": "${vars.base}/hook",
                    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "eventType": "order.priced",
                    "payload": {"total": "${steps.total.output}", "by": "${steps.approval.output.by}"}}},
            ],
        }})["workflow"]

        messages = []
        for m in stream(api, ORCHESTRATOR, "ExecuteWorkflow",
                        {"workflowId": workflow["workflowId"], "input": {"n": 4}}):
            messages.append(m)
            e = m.get("event", {})
            if e.get("type") == "EVENT_TYPE_STEP_WAITING" and e.get("stepPath") == "approval":
                api.call(ORCHESTRATOR, "SignalExecution", {
                    "executionId": messages[0]["execution"]["executionId"],
                    "signalName": "approved", "payload": {"by": "ana"}})
        events = [m["event"] for m in messages[1:]]
        for e in events:
            print(e["sequence"], e["type"], e.get("stepPath", ""), e.get("attempt", ""))
        assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["type"] == "EVENT_TYPE_EXECUTION_COMPLETED", events[-1]

        def of(path):
            return [(e["type"].removeprefix("EVENT_TYPE_"), e.get("attempt", 0)) for e in events
                    if e.get("stepPath") == path]

        # Every step's start and end, each attempt of the retried one, the branch not taken.
        for path in ["check", "fetch", "double", "branch", "branch/small", "fan", "fan[a]/pa", "fan[b]/pb",
                     "each", "each[0]/get", "each[2]/get", "total", "notify"]:
            assert of(path)[0][0] == "STEP_STARTED", path
            assert of(path)[-1][0] == "STEP_SUCCEEDED", path
        assert of("flaky") == [("STEP_STARTED", 1), ("STEP_RETRY_SCHEDULED", 1),
                               ("STEP_STARTED", 2), ("STEP_SUCCEEDED", 2)]
        assert of("branch/big") == [("STEP_SKIPPED", 0)]
        assert ("STEP_WAITING", 1) in of("approval") and of("approval")[-1][0] == "STEP_SUCCEEDED"

        output = events[-1]["output"]
        assert output["fetch"] == {"price": 6}
        assert output["double"] == {"price": 12}
        assert output["total"] == 9
        assert output["approval"] == {"by": "ana"}
        headers, body = Shop.posted[-1]
        assert "webhook-signature" in headers
        assert json.loads(body)["data"] == {"total": 9, "by": "ana"}
    finally:
        shop.shutdown()


WEBHOOKS = "meshflow.webhook.v1.WebhookService"


class Receiver(http.server.BaseHTTPRequestHandler):
    """Records every POST it receives and answers 204."""

    received = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        Receiver.received.append((dict((k.lower(), v) for k, v in self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def standard_webhooks_signature(secret, msg_id, timestamp, body):
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def test_a_registered_webhook_receives_signed_deliveries_from_a_step(api):
    receiver = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        name = f"py-hook-{uuid.uuid4().hex[:8]}"
        hook = api.call(WEBHOOKS, "CreateWebhook", {"requestId": name, "webhook": {
            "name": name, "url": f"http://127.0.0.1:{receiver.server_port}/in",
            "eventTypes": ["lead.routed"], "headers": {"X-Team": "agents"}}})["webhook"]
        assert hook["secret"].startswith("whsec_")
        assert "secret" not in api.call(WEBHOOKS, "GetWebhook", {"webhookId": hook["webhookId"]})["webhook"]
        listed = api.call(WEBHOOKS, "ListWebhooks", {"eventType": "lead.routed"})["webhooks"]
        assert name in [w["name"] for w in listed]

        with pytest.raises(grpc.RpcError) as err:
            api.call(WEBHOOKS, "CreateWebhook", {"webhook": {"name": name + "-x", "url": "ftp://x",
                                                            "eventTypes": ["lead.routed"]}})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        workflow = api.call(WORKFLOW, "CreateWorkflow", {"workflow": {
            "name": f"py-notify-{uuid.uuid4().hex[:8]}",
            "status": "WORKFLOW_STATUS_ACTIVE",
            "steps": [{"id": "notify", "webhookCall": {"webhookId": name, "eventType": "lead.routed",
                                                       "payload": {"lead": "${input.lead}"}}}],
        }})["workflow"]
        messages = list(stream(api, ORCHESTRATOR, "ExecuteWorkflow",
                               {"workflowId": workflow["workflowId"], "input": {"lead": "L-7"}}))
        assert messages[-1]["event"]["type"] == "EVENT_TYPE_EXECUTION_COMPLETED"

        headers, body = Receiver.received[-1]
        # The signature checks out with an independent implementation of Standard Webhooks.
        assert headers["webhook-signature"] == standard_webhooks_signature(
            hook["secret"], headers["webhook-id"], headers["webhook-timestamp"], body)
        assert headers["x-team"] == "agents"
        assert json.loads(body)["data"] == {"lead": "L-7"}

        # Disabled, it receives nothing more: the step fails with the reason.
        api.call(WEBHOOKS, "UpdateWebhook", {"webhook": {
            "webhookId": hook["webhookId"], "status": "WEBHOOK_STATUS_DISABLED", "disabledReason": "paused"},
            "updateMask": "status"})
        failed = list(stream(api, ORCHESTRATOR, "ExecuteWorkflow",
                             {"workflowId": workflow["workflowId"], "input": {"lead": "L-8"}}))
        assert failed[-1]["event"]["type"] == "EVENT_TYPE_EXECUTION_FAILED"
        assert failed[-1]["event"]["error"]["code"] == "webhook_disabled"
        assert len(Receiver.received) == 1
    finally:
        receiver.shutdown()
