//! End-to-end tests of the handlers, driven through [`Server`] with parsed requests.

use super::*;
use crate::http::{ChunkedWriter, Handler};
use crate::script;
use crate::server::{Chunking, Compression};
use crate::sse::HeartbeatKind;
use std::time::Duration;

const KEY: &str = "test-key";

fn server() -> Server {
    Server::new(Arc::new(App::new(Config {
        listen: "127.0.0.1:0".into(),
        api_key: KEY.into(),
        heartbeat: None,
        heartbeat_kind: HeartbeatKind::Comment,
        event_delay: Duration::ZERO,
        seed: 1,
        exit_on_stdin_eof: false,
        verbose: false,
        tls_cert_out: None,
        compression: Compression::Auto,
        chunking: Chunking::Awkward,
    })))
}

fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Request {
    let mut headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    headers.push(("content-length".into(), body.len().to_string()));
    let mut req = Request::new(method, target, headers, "HTTP/1.1");
    req.body = body.as_bytes().to_vec();
    req
}

/// Hands `req` to the server as the wire does: head first (recorded), then the whole body.
fn serve(s: &Server, req: Request) -> Reply {
    if let Some(token) = s.arrived(&req) {
        s.body_read(
            token,
            &BodyReport {
                bytes: req.body.len(),
                complete: true,
                trailers: vec![],
            },
        );
    }
    s.handle(req)
}

const GOOD: &[(&str, &str)] = &[
    ("x-api-key", KEY),
    ("anthropic-version", "2023-06-01"),
    (
        "anthropic-beta",
        "files-api-2025-04-14, managed-agents-2026-04-01",
    ),
];

fn full(reply: Reply) -> (u16, Value, Vec<(String, String)>) {
    match reply {
        Reply::Full(r) => (
            r.status,
            serde_json::from_slice(&r.body).unwrap(),
            r.headers,
        ),
        Reply::Stream(_) => panic!("unexpected stream"),
        Reply::Fault(f) => panic!("unexpected fault {f:?}"),
    }
}

fn call(s: &Server, method: &str, target: &str, body: Value) -> (u16, Value) {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (status, json, _) = full(serve(s, request(method, target, GOOD, &body)));
    (status, json)
}

fn setup(s: &Server) -> String {
    let (_, agent) = call(
        s,
        "POST",
        "/v1/agents",
        json!({"name": "a", "model": "claude-sonnet-4-6"}),
    );
    let (_, env) = call(
        s,
        "POST",
        "/v1/environments",
        json!({"name": "e", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}}),
    );
    let (status, session) = call(
        s,
        "POST",
        "/v1/sessions",
        json!({"agent": agent["id"], "environment_id": env["id"]}),
    );
    assert_eq!(status, 200, "{session}");
    session["id"].as_str().unwrap().to_string()
}

fn wait_idle(s: &Server, sid: &str) {
    for _ in 0..500 {
        {
            let store = s.app.store();
            let session = &store.sessions[sid];
            if !session.worker_active && session.pending.is_empty() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("session {sid} never went idle");
}

fn event_types(s: &Server, sid: &str) -> Vec<String> {
    let (_, page) = call(
        s,
        "GET",
        &format!("/v1/sessions/{sid}/events?limit=1000"),
        Value::Null,
    );
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn auth_and_version_headers() {
    let s = server();
    let (status, body, headers) = full(serve(&s, request("GET", "/v1/agents", &[], "")));
    assert_eq!(status, 401);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(body["error"]["message"], "invalid x-api-key");
    let rid = body["request_id"].as_str().unwrap();
    assert!(rid.starts_with("req_") && rid.len() == 28);
    assert!(headers.iter().any(|(n, v)| n == "request-id" && v == rid));

    let bearer = format!("Bearer {KEY}");
    let (status, body, _) = full(serve(
        &s,
        request(
            "GET",
            "/v1/agents",
            &[
                ("authorization", &bearer),
                ("anthropic-beta", "managed-agents-2026-04-01"),
            ],
            "",
        ),
    ));
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("anthropic-version"));
    let (status, body, _) = full(serve(
        &s,
        request(
            "GET",
            "/v1/agents",
            &[
                ("authorization", &bearer),
                ("anthropic-version", "2026-10-21"),
            ],
            "",
        ),
    ));
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("anthropic-beta"));
    let (status, _, _) = full(serve(
        &s,
        request(
            "GET",
            "/v1/agents?beta=true",
            &[
                ("authorization", &bearer),
                ("anthropic-version", "2026-10-21"),
                ("anthropic-beta", "managed-agents-2026-04-01"),
            ],
            "",
        ),
    ));
    assert_eq!(status, 200);

    let (_, log) = call(&s, "GET", "/_emulator/requests", Value::Null);
    let log = log["requests"].as_array().unwrap();
    assert_eq!(log.len(), 4);
    assert_eq!(log[3]["path"], "/v1/agents?beta=true");
    assert!(log[3]["headers"]
        .as_array()
        .unwrap()
        .contains(&json!(["authorization", bearer])));
}

#[test]
fn agent_validation_versions_and_conflicts() {
    let s = server();
    let (status, body) = call(&s, "POST", "/v1/agents", json!({"model": "m"}));
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("name"));
    let (status, body) = call(&s, "POST", "/v1/agents", json!({"name": "n"}));
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("model"));

    let (_, agent) = call(
        &s,
        "POST",
        "/v1/agents",
        json!({"name": "n", "model": {"id": "claude-opus-4-8"}}),
    );
    let id = agent["id"].as_str().unwrap();
    assert!(id.starts_with("agent_"));
    assert_eq!(
        agent["model"],
        json!({"id": "claude-opus-4-8", "speed": "standard"})
    );
    assert_eq!(agent["version"], 1);
    let (status, _) = call(
        &s,
        "POST",
        &format!("/v1/agents/{id}"),
        json!({"version": 5, "name": "x"}),
    );
    assert_eq!(status, 409);
    let (_, v2) = call(
        &s,
        "POST",
        &format!("/v1/agents/{id}"),
        json!({"version": 1, "system": "be brief"}),
    );
    assert_eq!(v2["version"], 2);
    let (_, v1) = call(
        &s,
        "GET",
        &format!("/v1/agents/{id}?version=1"),
        Value::Null,
    );
    assert_eq!(v1["system"], Value::Null);
    let (_, versions) = call(&s, "GET", &format!("/v1/agents/{id}/versions"), Value::Null);
    assert_eq!(versions["data"].as_array().unwrap().len(), 2);
    assert_eq!(versions["data"][0]["version"], 2);
    let (_, archived) = call(&s, "POST", &format!("/v1/agents/{id}/archive"), Value::Null);
    assert!(archived["archived_at"].is_string());
    let (_, list) = call(&s, "GET", "/v1/agents", Value::Null);
    assert!(list["data"].as_array().unwrap().is_empty());
    let (_, list) = call(&s, "GET", "/v1/agents?include_archived=true", Value::Null);
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let (status, body) = call(&s, "GET", "/v1/agents/agent_nope", Value::Null);
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (404, Some("not_found_error"))
    );
    let (status, _) = call(&s, "GET", "/v1/agents?limit=101", Value::Null);
    assert_eq!(status, 400);
}

#[test]
fn list_pagination_through_the_api() {
    let s = server();
    for i in 0..5 {
        call(
            &s,
            "POST",
            "/v1/agents",
            json!({"name": format!("a{i}"), "model": "m"}),
        );
    }
    let mut names = Vec::new();
    let mut target = "/v1/agents?limit=2".to_string();
    loop {
        let (status, page) = call(&s, "GET", &target, Value::Null);
        assert_eq!(status, 200);
        for a in page["data"].as_array().unwrap() {
            names.push(a["name"].as_str().unwrap().to_string());
        }
        match page["next_page"].as_str() {
            Some(next) => target = format!("/v1/agents?limit=2&page={next}"),
            None => break,
        }
    }
    assert_eq!(names, ["a4", "a3", "a2", "a1", "a0"]);
    let (status, _) = call(&s, "GET", "/v1/agents?page=garbage", Value::Null);
    assert_eq!(status, 400);
}

#[test]
fn scripted_turns_are_deterministic_and_metered() {
    let s = server();
    let sid = setup(&s);
    let (status, sent) = call(
        &s,
        "POST",
        &format!("/v1/sessions/{sid}/events"),
        json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "use a tool"}]}]}),
    );
    assert_eq!(status, 200);
    assert_eq!(sent["data"][0]["processed_at"], Value::Null);
    assert!(sent["data"][0]["id"].as_str().unwrap().starts_with("sevt_"));
    wait_idle(&s, &sid);
    assert_eq!(
        event_types(&s, &sid),
        [
            "user.message",
            "session.status_running",
            "span.model_request_start",
            "agent.tool_use",
            "span.model_request_end",
            "agent.tool_result",
            "span.model_request_start",
            "agent.message",
            "span.model_request_end",
            "session.usage",
            "session.status_idle",
        ]
    );
    call(
        &s,
        "POST",
        &format!("/v1/sessions/{sid}/events"),
        json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "hello"}]}]}),
    );
    wait_idle(&s, &sid);

    // Turn 0 ("use a tool", 10 chars): requests 0 and 1; turn 1 ("hello", 5 chars).
    let u00 = script::model_usage("use a tool", 0, 0);
    let u01 = script::model_usage("use a tool", 0, 1);
    let u10 = script::model_usage("hello", 1, 0);
    let (_, truth) = call(&s, "GET", &format!("/_emulator/usage/{sid}"), Value::Null);
    assert_eq!(truth["model"], "claude-sonnet-4-6");
    assert_eq!(truth["model_requests"], 3);
    assert_eq!(
        truth["input_tokens"],
        u00.input_tokens + u01.input_tokens + u10.input_tokens
    );
    assert_eq!(
        truth["output_tokens"],
        u00.output_tokens + u01.output_tokens + u10.output_tokens
    );
    assert_eq!(truth["cache_creation_input_tokens"], 50);
    assert_eq!(truth["cache_read_input_tokens"], 100 + 500);
    assert_eq!(truth["active_seconds"], 6);

    let (_, page) = call(
        &s,
        "GET",
        &format!("/v1/sessions/{sid}/events?types[]=span.model_request_end&limit=100"),
        Value::Null,
    );
    let spans = page["data"].as_array().unwrap();
    let ids: Vec<&Value> = spans.iter().map(|e| &e["id"]).collect();
    assert_eq!(
        truth["span_event_ids"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        ids
    );
    assert_eq!(spans[2]["model_usage"], u10.to_json());

    let (_, session) = call(&s, "GET", &format!("/v1/sessions/{sid}"), Value::Null);
    assert_eq!(session["status"], "idle");
    assert_eq!(session["usage"]["input_tokens"], truth["input_tokens"]);
    assert_eq!(
        session["usage"]["cache_creation"]["ephemeral_5m_input_tokens"],
        50
    );
    let (_, usage_events) = call(
        &s,
        "GET",
        &format!("/v1/sessions/{sid}/events?types%5B%5D=session.usage&order=desc&limit=1"),
        Value::Null,
    );
    assert_eq!(usage_events["data"][0]["usage"], session["usage"]);

    let (_, echoed) = call(
        &s,
        "GET",
        &format!("/v1/sessions/{sid}/events?limit=1"),
        Value::Null,
    );
    assert!(echoed["data"][0]["processed_at"].is_string());
}

#[test]
fn streams_see_new_events_and_end_on_delete() {
    let s = server();
    let sid = setup(&s);
    let Reply::Stream(stream) = serve(
        &s,
        request("GET", &format!("/v1/sessions/{sid}/stream"), GOOD, ""),
    ) else {
        panic!("expected a stream");
    };
    assert!(stream
        .headers
        .contains(&("content-type".into(), "text/event-stream".into())));
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut chunks = ChunkedWriter::new(&mut out);
        (stream.body)(&mut chunks).unwrap();
        String::from_utf8(out).unwrap()
    });
    call(
        &s,
        "POST",
        &format!("/v1/sessions/{sid}/events"),
        json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}]}),
    );
    wait_idle(&s, &sid);
    let (status, deleted) = call(&s, "DELETE", &format!("/v1/sessions/{sid}"), Value::Null);
    assert_eq!(
        (status, deleted["type"].as_str()),
        (200, Some("session_deleted"))
    );
    let text = reader.join().unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        names,
        [
            "user.message",
            "user.message",
            "session.status_running",
            "span.model_request_start",
            "agent.message",
            "span.model_request_end",
            "session.usage",
            "session.status_idle",
            "session.deleted",
        ]
    );
    assert!(text.contains(r#""text":"Echo: hi""#));
    let (status, _) = call(&s, "GET", &format!("/v1/sessions/{sid}"), Value::Null);
    assert_eq!(status, 404);
    let (status, _) = call(&s, "GET", &format!("/_emulator/usage/{sid}"), Value::Null);
    assert_eq!(status, 200, "ground truth survives deletion");
}

#[test]
fn large_turn_streams_full_texts_keeps_history_small_and_meters() {
    let s = server();
    let sid = setup(&s);
    let Reply::Stream(stream) = serve(
        &s,
        request(
            "GET",
            &format!("/v1/sessions/{sid}/events/stream"),
            GOOD,
            "",
        ),
    ) else {
        panic!("expected a stream");
    };
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut chunks = ChunkedWriter::new(&mut out);
        (stream.body)(&mut chunks).unwrap();
        String::from_utf8(out).unwrap()
    });
    let command = "emulator:large 5 3";
    call(
        &s,
        "POST",
        &format!("/v1/sessions/{sid}/events"),
        json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": command}]}]}),
    );
    wait_idle(&s, &sid);
    let mut expected = vec![
        "user.message",
        "session.status_running",
        "span.model_request_start",
    ];
    expected.extend(["agent.message"; 5]);
    expected.extend([
        "span.model_request_end",
        "session.usage",
        "session.status_idle",
    ]);
    assert_eq!(event_types(&s, &sid), expected);

    // The history keeps 1 KiB of each 3 KiB text, plus a note.
    let (_, page) = call(
        &s,
        "GET",
        &format!("/v1/sessions/{sid}/events?types[]=agent.message&limit=100"),
        Value::Null,
    );
    let kept = page["data"].as_array().unwrap();
    assert_eq!(kept.len(), 5);
    let kept_text = kept[0]["content"][0]["text"].as_str().unwrap();
    assert!(kept_text.starts_with(&script::filler(script::LARGE_HISTORY_BYTES)));
    assert!(kept_text.contains("3072 bytes streamed"), "{kept_text}");

    // Metered exactly like a one-request turn.
    let usage = script::model_usage(command, 0, 0);
    let (_, truth) = call(&s, "GET", &format!("/_emulator/usage/{sid}"), Value::Null);
    assert_eq!(truth["model_requests"], 1);
    assert_eq!(truth["input_tokens"], usage.input_tokens);
    assert_eq!(truth["output_tokens"], usage.output_tokens);
    assert_eq!(truth["cache_creation_input_tokens"], 50);
    assert_eq!(truth["active_seconds"], script::ACTIVE_SECONDS_PER_REQUEST);
    let (_, spans) = call(
        &s,
        "GET",
        &format!("/v1/sessions/{sid}/events?types[]=span.model_request_end"),
        Value::Null,
    );
    assert_eq!(spans["data"][0]["model_usage"], usage.to_json());
    assert_eq!(truth["span_event_ids"][0], spans["data"][0]["id"]);

    // The stream carries the full texts, with the history's ids, as one-line JSON.
    call(&s, "DELETE", &format!("/v1/sessions/{sid}"), Value::Null);
    let text = reader.join().unwrap();
    let full = script::filler(3 * 1024);
    let streamed: Vec<Value> = text
        .split("event: agent.message\ndata: ")
        .skip(1)
        .map(|rest| serde_json::from_str(rest.split_once('\n').unwrap().0).unwrap())
        .collect();
    assert_eq!(streamed.len(), 5);
    for (event, stored) in streamed.iter().zip(kept) {
        assert_eq!(event["content"][0]["text"], full.as_str());
        assert_eq!(event["id"], stored["id"]);
        assert_eq!(event["created_at"], stored["created_at"]);
    }
}

#[test]
fn credentials_never_echo_secrets() {
    let s = server();
    let (_, vault) = call(&s, "POST", "/v1/vaults", json!({"display_name": "v"}));
    let vid = vault["id"].as_str().unwrap();
    assert!(vid.starts_with("vlt_"));
    let (status, cred) = call(
        &s,
        "POST",
        &format!("/v1/vaults/{vid}/credentials"),
        json!({"auth": {"type": "static_bearer", "token": "sekrit", "mcp_server_url": "https://x"}}),
    );
    assert_eq!(status, 200);
    assert!(cred["id"].as_str().unwrap().starts_with("vcrd_"));
    assert_eq!(
        cred["auth"],
        json!({"type": "static_bearer", "mcp_server_url": "https://x"})
    );
    let (_, list) = call(
        &s,
        "GET",
        &format!("/v1/vaults/{vid}/credentials"),
        Value::Null,
    );
    assert!(!list.to_string().contains("sekrit"));
}

/// Opens a stream on `sid` and runs a turn; returns the stream's bytes and whether its body
/// ended with an error (an aborted connection).
fn stream_turn(s: &Server, sid: &str, text: &str) -> (Vec<u8>, bool) {
    let Reply::Stream(stream) = serve(
        s,
        request(
            "GET",
            &format!("/v1/sessions/{sid}/events/stream"),
            GOOD,
            "",
        ),
    ) else {
        panic!("expected a stream");
    };
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let failed = (stream.body)(&mut ChunkedWriter::new(&mut out)).is_err();
        (out, failed)
    });
    call(
        s,
        "POST",
        &format!("/v1/sessions/{sid}/events"),
        json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": text}]}]}),
    );
    wait_idle(s, sid);
    call(s, "DELETE", &format!("/v1/sessions/{sid}"), Value::Null);
    reader.join().unwrap()
}

fn usage_sum(truth: &Value, field: &str) -> u64 {
    truth["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|span| span[field].as_u64().unwrap())
        .sum()
}

#[test]
fn fault_turns_deliver_the_first_request_then_misbehave() {
    let s = server();
    for (command, aborted, spans, marker) in [
        ("emulator:fault reset", true, 1, None),
        ("emulator:fault hang 0", true, 1, None),
        (
            "emulator:fault malformed",
            false,
            1,
            Some(&b"this line has no colon"[..]),
        ),
        (
            "emulator:fault badutf8",
            false,
            1,
            Some(&b"\xed\xa0\x80"[..]),
        ),
        (
            "emulator:fault truncated",
            false,
            2,
            Some(&b"\"model_usage\":{\""[..]),
        ),
        (
            "emulator:fault hugeline 1",
            false,
            2,
            Some(&b"\"padding\":\"lorem"[..]),
        ),
    ] {
        let sid = setup(&s);
        let (out, failed) = stream_turn(&s, &sid, command);
        assert_eq!(failed, aborted, "{command}");
        let (_, truth) = call(&s, "GET", &format!("/_emulator/usage/{sid}"), Value::Null);
        assert_eq!(truth["model_requests"], spans, "{command}");
        assert_eq!(
            usage_sum(&truth, "input_tokens"),
            truth["input_tokens"].as_u64().unwrap()
        );
        let first = script::model_usage(command, 0, 0);
        assert_eq!(truth["spans"][0]["output_tokens"], first.output_tokens);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("event: span.model_request_end"), "{command}");
        let first_span_id = truth["span_event_ids"][0].as_str().unwrap();
        assert!(
            text.contains(first_span_id),
            "{command}: first span delivered"
        );
        if let Some(marker) = marker {
            assert!(out.windows(marker.len()).any(|w| w == marker), "{command}");
            if command.ends_with("truncated") {
                let cut = text
                    .lines()
                    .filter_map(|l| l.split_once("\"model_usage\":{\""))
                    .map(|(_, rest)| rest.len())
                    .collect::<Vec<_>>();
                assert_eq!(cut.len(), 2, "{text}");
                assert_eq!(cut[1], 5, "the second span is cut inside its usage: {text}");
            }
            assert!(text.contains("event: session.status_idle"), "{command}");
        } else {
            assert!(
                !text.contains("event: session.usage"),
                "{command}: cut before"
            );
        }
        // The history is well-formed: complete events only, the turn ends idle.
        let types = event_types_if_any(&s, &sid);
        assert!(types.is_empty(), "the session was deleted: {types:?}");
    }
    // A 1 MiB line is one line.
    let sid = setup(&s);
    let (out, _) = stream_turn(&s, &sid, "emulator:fault hugeline 1");
    let longest = out.split(|b| *b == b'\n').map(<[u8]>::len).max().unwrap();
    assert!(longest > 1 << 20, "{longest}");
}

fn event_types_if_any(s: &Server, sid: &str) -> Vec<String> {
    let (status, page) = call(
        s,
        "GET",
        &format!("/v1/sessions/{sid}/events?limit=1000"),
        Value::Null,
    );
    if status != 200 {
        return Vec::new();
    }
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn request_faults_by_kind() {
    let s = server();
    let add = |body: Value| call(&s, "POST", "/_emulator/faults", body);
    assert_eq!(add(json!({"kind": "bogus"})).0, 400);
    assert_eq!(add(json!({"kind": "status"})).0, 400);
    assert_eq!(
        add(json!({"status": 529, "path_prefix": "/v1/agents"})).0,
        200
    );
    let (status, body) = call(&s, "GET", "/v1/agents", Value::Null);
    assert_eq!(status, 529);
    assert_eq!(body["error"]["type"], "overloaded_error");
    assert_eq!(
        call(&s, "GET", "/v1/agents", Value::Null).0,
        200,
        "consumed"
    );

    let misbehaves = |kind: &str| {
        add(json!({"kind": kind, "path_prefix": "/v1/agents", "hold_ms": 5}));
        match serve(&s, request("GET", "/v1/agents", GOOD, "")) {
            Reply::Fault(f) => f,
            _ => panic!("{kind}: expected a fault"),
        }
    };
    assert!(matches!(misbehaves("reset"), Misbehave::Close));
    assert!(matches!(
        misbehaves("hang"),
        Misbehave::Hang(d) if d == Duration::from_millis(5)
    ));
    assert!(matches!(
        misbehaves("hang_headers"),
        Misbehave::HeadThenHang { status: 200, .. }
    ));
    let Misbehave::Truncate { resp, keep } = misbehaves("truncated") else {
        panic!("expected a truncated answer");
    };
    assert_eq!(resp.status, 200);
    assert_eq!(keep, resp.body.len() / 2);
    assert!(serde_json::from_slice::<Value>(&resp.body).is_ok());

    add(json!({"kind": "truncated_json", "path_prefix": "/v1/agents"}));
    let Reply::Full(resp) = serve(&s, request("GET", "/v1/agents", GOOD, "")) else {
        panic!("expected a full answer");
    };
    assert_eq!(resp.status, 200);
    assert!(serde_json::from_slice::<Value>(&resp.body).is_err());
    let (_, listed) = call(&s, "GET", "/_emulator/faults", Value::Null);
    assert_eq!(listed["faults"], json!([]));
}
