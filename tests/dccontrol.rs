//! `dccontrol`, the local control plane, over real HTTP: the real binary is
//! started on a free loopback port and spoken to with plain HTTP/1.1 requests
//! written by hand, so what is checked is exactly what a runner sees on the
//! wire. The runner is played by the test itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dcsupervisor::protocol::commands::{commands_hash, SyncedCommand};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

const KEY: &str = "dc_test_key_for_dccontrol";

/// A `dccontrol serve` on its own port, killed when dropped.
struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`
    url: String,
    /// `127.0.0.1:PORT`
    address: String,
}

impl Server {
    fn start() -> Self {
        let mut child = dccontrol()
            .args(["serve", "--listen", "127.0.0.1:0", "--api-key", KEY])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dccontrol serve");
        let mut first_line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first_line)
            .expect("read the listening line");
        let url = first_line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first_line:?}"))
            .to_string();
        let address = url.strip_prefix("http://").unwrap().to_string();
        Self { child, url, address }
    }

    /// A raw request: exactly these headers (plus Host, Content-Length and
    /// Connection: close).
    fn send(&self, method: &str, path: &str, headers: &[(&str, String)], body: &str) -> Answer {
        exchange(&self.address, self.request_bytes(method, path, headers, body).as_bytes())
    }

    /// A runner request and whatever bytes came back before the server
    /// closed the connection (nothing, for an injected reset).
    fn runner_raw(&self, method: &str, path: &str, body: Option<Value>) -> String {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = self.request_bytes(method, path, &runner_headers(), &body);
        let mut stream = TcpStream::connect(&self.address).expect("connect to dccontrol");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(request.as_bytes()).expect("send the request");
        let mut raw = Vec::new();
        // A reset may end the read with an error: what came before it counts.
        let _ = stream.read_to_end(&mut raw);
        String::from_utf8_lossy(&raw).into_owned()
    }

    fn request_bytes(&self, method: &str, path: &str, headers: &[(&str, String)], body: &str) -> String {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.address,
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        request
    }

    /// A request as a well-behaved runner sends it.
    fn runner(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.runner_with(method, path, body, &runner_headers())
    }

    fn runner_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, String)],
    ) -> Answer {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.send(method, path, headers, &body)
    }

    fn operator(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let headers =
            [("Authorization", format!("Bearer {KEY}")), ("Content-Type", "application/json".to_string())];
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.send(method, &format!("/api/operator/{path}"), &headers, &body)
    }

    fn queue(&self, body: Value) -> String {
        let answer = self.operator("POST", "executions", Some(body));
        assert_eq!(answer.status, 201, "{}", answer.body);
        answer.json()["id"].as_str().unwrap().to_string()
    }

    fn execution(&self, id: &str) -> Value {
        let answer = self.operator("GET", &format!("executions/{id}"), None);
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.json()
    }

    fn requests(&self) -> Vec<Value> {
        let log = self.operator("GET", "requests", None).json();
        log["requests"].as_array().unwrap().clone()
    }

    /// `dccontrol <subcommand> --server <this> --api-key <key> <rest...>`.
    fn client(&self, args: &[&str]) -> Command {
        let mut command = dccontrol();
        // Right after the subcommand's name, so that a `--` among the rest
        // cannot turn them into the command's arguments.
        command.arg(args[0]).args(["--server", &self.url, "--api-key", KEY]).args(&args[1..]);
        command
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dccontrol() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dccontrol"));
    for name in ["DJANGOCOMMAND_API_KEY", "DCCONTROL_URL", "DCCONTROL_LISTEN", "RUST_LOG"] {
        command.env_remove(name);
    }
    command.stdin(Stdio::null());
    command
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn detail(&self) -> String {
        self.json()["detail"].as_str().unwrap_or_default().to_string()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 exchange on a fresh connection, read until the server closes.
fn exchange(address: &str, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(address).expect("connect to dccontrol");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request).expect("send the request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the answer");
    let raw = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers =
        lines.filter_map(|line| line.split_once(": ")).map(|(n, v)| (n.to_string(), v.to_string())).collect();
    Answer { status, headers, body: body.to_string() }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn nonce() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn runner_headers_at(timestamp: String, nonce: String) -> Vec<(&'static str, String)> {
    vec![
        ("Authorization", format!("Bearer {KEY}")),
        ("Content-Type", "application/json".to_string()),
        ("X-Request-Timestamp", timestamp),
        ("X-Request-Nonce", nonce),
    ]
}

fn runner_headers() -> Vec<(&'static str, String)> {
    runner_headers_at(unix_now().to_string(), nonce())
}

fn heartbeat(hash: &str) -> Value {
    json!({
        "runner_version": "dcsupervisor/test",
        "python_version": "3.12.1",
        "django_version": "5.1",
        "commands_hash": hash,
    })
}

fn execution_path(id: &str, action: &str) -> String {
    format!("/api/runner/executions/{id}/{action}/")
}

fn chunk(number: u64, is_stderr: bool, content: &str) -> Value {
    json!({
        "chunk_number": number,
        "is_stderr": is_stderr,
        "segments": [{"timestamp": 1700000000.25, "content": content}],
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits for a child with a deadline, so a hung client fails the test
/// instead of hanging it.
fn wait_with_deadline(child: Child, limit: Duration) -> Output {
    let (done, outcome) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    match outcome.recv_timeout(limit) {
        Ok(output) => output.expect("wait for dccontrol"),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("dccontrol did not finish within {limit:?}");
        }
    }
}

#[test]
fn runner_requests_need_the_key_a_fresh_timestamp_and_an_unused_nonce() {
    let server = Server::start();
    let hb = Some(heartbeat("sha256:0"));
    let path = "/api/runner/heartbeat/";

    let mut no_key = runner_headers();
    no_key.remove(0);
    let refused = server.runner_with("POST", path, hb.clone(), &no_key);
    assert_eq!((refused.status, refused.detail().as_str()), (401, "Invalid API key"));

    let mut wrong_key = runner_headers();
    wrong_key[0].1 = "Bearer dc_wrong".into();
    assert_eq!(server.runner_with("POST", path, hb.clone(), &wrong_key).status, 401);

    let fresh = runner_headers();
    assert_eq!(server.runner_with("POST", path, hb.clone(), &fresh).status, 200);
    let replayed = server.runner_with("POST", path, hb.clone(), &fresh);
    assert_eq!(replayed.status, 401);
    assert!(replayed.detail().contains("Nonce already used"), "{}", replayed.body);

    for timestamp in [unix_now() - 1000, unix_now() + 1000] {
        let stale =
            server.runner_with("POST", path, hb.clone(), &runner_headers_at(timestamp.to_string(), nonce()));
        assert_eq!(stale.status, 401);
        assert!(stale.detail().contains("timestamp"), "{}", stale.body);
    }
    let not_a_number = runner_headers_at("soon".into(), nonce());
    assert!(server
        .runner_with("POST", path, hb.clone(), &not_a_number)
        .detail()
        .contains("X-Request-Timestamp"));
    let bad_nonce = runner_headers_at(unix_now().to_string(), "not-a-uuid".into());
    let refused = server.runner_with("POST", path, hb.clone(), &bad_nonce);
    assert_eq!(refused.status, 401);
    assert!(refused.detail().contains("X-Request-Nonce"), "{}", refused.body);

    // Only the one authentic, fresh heartbeat changed anything.
    assert_eq!(server.operator("GET", "state", None).json()["heartbeats"], 1);

    // The operator API needs the key too.
    let anonymous = server.send("GET", "/api/operator/state", &[], "");
    assert_eq!((anonymous.status, anonymous.detail().as_str()), (401, "Invalid API key"));

    // Every runner request is logged in order, with its answer and never the key.
    let log = server.requests();
    let statuses: Vec<u64> = log.iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [401, 401, 200, 401, 401, 401, 401, 401]);
    let seqs: Vec<u64> = log.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert!(log[0]["headers"].get("authorization").is_none());
    assert_eq!(log[1]["headers"]["authorization"], "<invalid>");
    assert_eq!(log[2]["headers"]["authorization"], "Bearer <redacted>");
    assert_eq!(log[2]["headers"]["x-request-nonce"], fresh[3].1.as_str());
    assert_eq!(log[2]["body"], heartbeat("sha256:0"));
    assert_eq!((log[2]["method"].as_str(), log[2]["path"].as_str()), (Some("POST"), Some(path)));
    assert!(!server.operator("GET", "requests", None).body.contains(KEY));

    assert_eq!(server.operator("DELETE", "requests", None).status, 200);
    assert!(server.requests().is_empty());
}

#[test]
fn an_execution_is_started_fed_out_of_order_and_completed_once() {
    let server = Server::start();
    let id = server.queue(json!({"command": "noisy", "args": "--lines 3", "timeout": 60}));

    let beat = server.runner("POST", "/api/runner/heartbeat/", Some(heartbeat("sha256:0")));
    assert_eq!(beat.json()["pending_executions"], 1);
    let pending = server.runner("GET", "/api/runner/pending/", None).json();
    assert_eq!(
        pending["executions"],
        json!([{
            "id": id, "command": "noisy", "args": "--lines 3",
            "timeout": 60, "use_metadata_only_mode": false,
        }])
    );

    // A non-UUID id is refused before anything is looked up; nothing changes.
    server.operator("DELETE", "requests", None);
    let refused = server.runner("POST", "/api/runner/executions/not-a-uuid/start/", None);
    assert_eq!(refused.status, 400);
    assert!(refused.detail().contains("not a UUID"), "{}", refused.body);
    assert_eq!(server.execution(&id)["status"], "pending");
    assert_eq!(server.requests()[0]["status"], 400);
    let unknown = execution_path("00000000-0000-4000-8000-000000000000", "start");
    assert_eq!(server.runner("POST", &unknown, None).status, 404);

    assert_eq!(server.runner("POST", &execution_path(&id, "start"), None).status, 200);
    let again = server.runner("POST", &execution_path(&id, "start"), None);
    assert_eq!(again.status, 409);
    assert!(again.detail().contains("already running"), "{}", again.body);
    assert_eq!(server.runner("GET", "/api/runner/pending/", None).json()["executions"], json!([]));

    // Chunks arrive out of order, and chunk 1 twice (a retry): the first copy counts.
    let output = execution_path(&id, "output");
    for body in [
        chunk(3, false, "c\n"),
        chunk(1, false, "a\n"),
        chunk(2, true, "b\n"),
        chunk(1, false, "DUPLICATE\n"),
    ] {
        let answer = server.runner("POST", &output, Some(body));
        assert_eq!((answer.status, answer.json()), (200, json!({"ok": true})));
    }
    let malformed = server.runner("POST", &output, Some(json!({"chunk_number": "one"})));
    assert_eq!(malformed.status, 400);
    assert!(malformed.detail().contains("invalid request body"), "{}", malformed.body);

    let cancel_status = execution_path(&id, "cancel-status");
    let status = server.runner("GET", &cancel_status, None).json();
    assert_eq!(status, json!({"cancel_requested": false, "force_kill": false}));
    let cancel = server.operator("POST", &format!("executions/{id}/cancel"), Some(json!({"force": true})));
    assert_eq!(cancel.status, 200);
    let status = server.runner("GET", &cancel_status, None).json();
    assert_eq!(status, json!({"cancel_requested": true, "force_kill": true}));

    let detail = server.execution(&id);
    let chunks = detail["chunks"].as_array().unwrap();
    let seen: Vec<(u64, bool, &str)> = chunks
        .iter()
        .map(|c| {
            (
                c["chunk_number"].as_u64().unwrap(),
                c["is_stderr"].as_bool().unwrap(),
                c["segments"][0]["content"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [(1, false, "a\n"), (2, true, "b\n"), (3, false, "c\n")]);
    assert_eq!(chunks[0]["segments"][0]["timestamp"], 1700000000.25);

    let complete = execution_path(&id, "complete");
    let end = json!({"exit_code": 3, "status": "failed"});
    assert_eq!(server.runner("POST", &complete, Some(end.clone())).status, 200);
    let twice = server.runner("POST", &complete, Some(end));
    assert_eq!(twice.status, 409);
    assert!(twice.detail().contains("already completed"), "{}", twice.body);

    let detail = server.execution(&id);
    assert_eq!((detail["status"].as_str(), detail["exit_code"].as_i64()), (Some("failed"), Some(3)));
    let (started, completed) =
        (detail["started_at"].as_f64().unwrap(), detail["completed_at"].as_f64().unwrap());
    assert!(detail["created_at"].as_f64().unwrap() <= started && started <= completed);
    let listed = server.operator("GET", "executions", None).json();
    assert_eq!(listed["executions"][0]["status"], "failed");

    // Wrong method, unknown paths, an oversize body.
    assert_eq!(server.runner("GET", &execution_path(&id, "start"), None).status, 405);
    let nowhere = server.runner("GET", "/api/runner/nowhere/", None);
    assert_eq!(nowhere.status, 404);
    assert!(nowhere.detail().contains("no endpoint"));
    let mut huge = runner_headers();
    huge.push(("Content-Length", (17 * 1024 * 1024).to_string()));
    let request = format!(
        "POST {output} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{}\r\n",
        server.address,
        huge.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect::<String>()
    );
    assert_eq!(exchange(&server.address, request.as_bytes()).status, 413);
}

#[test]
fn heartbeat_reports_whether_the_synced_commands_match() {
    let server = Server::start();
    let heartbeat_path = "/api/runner/heartbeat/";
    let commands = vec![
        SyncedCommand {
            name: "migrate".into(),
            app_label: "django.core".into(),
            help_text: "usage: manage.py migrate … ✓".into(),
            bound_args: None,
        },
        SyncedCommand {
            name: "check".into(),
            app_label: "django.core".into(),
            help_text: "usage: manage.py check".into(),
            bound_args: None,
        },
    ];
    let hash = commands_hash(&commands);

    let before = server.runner("POST", heartbeat_path, Some(heartbeat(&hash))).json();
    assert_eq!(
        before,
        json!({"ok": true, "commands_in_sync": false, "pending_executions": 0,
               "runner_state": "active", "suspension_reason": null})
    );

    let synced = server.runner("POST", "/api/runner/commands/sync/", Some(json!({"commands": commands})));
    assert_eq!(synced.json(), json!({"ok": true, "synced_count": 2, "commands_hash": hash}));
    let bad_sync = server.runner("POST", "/api/runner/commands/sync/", Some(json!({"commands": "all"})));
    assert_eq!(bad_sync.status, 400);

    let after = server.runner("POST", heartbeat_path, Some(heartbeat(&hash))).json();
    assert_eq!(after["commands_in_sync"], true);
    let other = server.runner("POST", heartbeat_path, Some(heartbeat("sha256:other"))).json();
    assert_eq!(other["commands_in_sync"], false);

    let state = server.operator("GET", "state", None).json();
    assert_eq!(state["heartbeats"], 3);
    assert_eq!(state["commands_hash"], hash.as_str());
    assert_eq!(state["commands"], json!(commands));
    assert_eq!(state["runner"]["runner_version"], "dcsupervisor/test");
    assert_eq!(state["runner"]["django_version"], "5.1");
    assert!(state["runner"]["last_heartbeat"].as_f64().unwrap() > 1.0e9);

    let suspend = json!({"state": "suspended", "reason": "billing"});
    assert_eq!(server.operator("POST", "runner-state", Some(suspend)).status, 200);
    let answer = server.runner("POST", heartbeat_path, Some(heartbeat(&hash))).json();
    assert_eq!(
        (answer["runner_state"].as_str(), answer["suspension_reason"].as_str()),
        (Some("suspended"), Some("billing"))
    );
    let resume = json!({"state": "active", "reason": null});
    assert_eq!(server.operator("POST", "runner-state", Some(resume)).status, 200);
    let answer = server.runner("POST", heartbeat_path, Some(heartbeat(&hash))).json();
    assert_eq!(
        (answer["runner_state"].as_str(), answer["suspension_reason"].is_null()),
        (Some("active"), true)
    );
    let nonsense = json!({"state": "paused"});
    assert_eq!(server.operator("POST", "runner-state", Some(nonsense)).status, 400);
}

#[test]
fn faults_answer_in_place_of_the_server_then_stop() {
    let server = Server::start();
    let heartbeat_path = "/api/runner/heartbeat/";
    let fault = json!({"path_prefix": heartbeat_path, "status": 503, "count": 2, "retry_after": 7});
    assert_eq!(server.operator("POST", "faults", Some(fault)).status, 201);

    assert_eq!(server.runner("GET", "/api/runner/pending/", None).status, 200);
    for _ in 0..2 {
        let injected = server.runner("POST", heartbeat_path, Some(heartbeat("sha256:0")));
        assert_eq!(injected.status, 503);
        assert_eq!(injected.header("retry-after"), Some("7"));
        assert_eq!(injected.json(), json!({"detail": "injected fault"}));
    }
    assert_eq!(server.runner("POST", heartbeat_path, Some(heartbeat("sha256:0"))).status, 200);
    assert_eq!(server.operator("GET", "state", None).json()["heartbeats"], 1);

    // A faulted start changes nothing: the execution is still there to start.
    let id = server.queue(json!({"command": "check"}));
    let fault = json!({"path_prefix": "/api/runner/executions/", "status": 500, "body": "oops"});
    server.operator("POST", "faults", Some(fault));
    let failed = server.runner("POST", &execution_path(&id, "start"), None);
    assert_eq!((failed.status, failed.body.as_str()), (500, "oops"));
    assert_eq!(server.execution(&id)["status"], "pending");
    assert_eq!(server.runner("POST", &execution_path(&id, "start"), None).status, 200);

    // Status 0: only a delay, then the request is processed.
    let slow = json!({"status": 0, "delay_ms": 300});
    server.operator("POST", "faults", Some(slow));
    let began = Instant::now();
    let answer = server.runner("POST", heartbeat_path, Some(heartbeat("sha256:0")));
    assert!(began.elapsed() >= Duration::from_millis(300));
    assert_eq!(answer.status, 200);
    assert_eq!(server.operator("GET", "state", None).json()["heartbeats"], 2);

    let many = json!({"status": 502, "count": 5});
    server.operator("POST", "faults", Some(many));
    assert_eq!(server.operator("DELETE", "faults", None).status, 200);
    assert_eq!(server.runner("GET", "/api/runner/pending/", None).status, 200);

    // Raw entries go out with the next /pending/ answer only.
    let raw = json!({"executions": [{"id": "../../admin", "command": "x"}, "junk"]});
    assert_eq!(server.operator("POST", "inject-pending", Some(raw)).status, 200);
    let first = server.runner("GET", "/api/runner/pending/", None).json();
    assert_eq!(first["executions"], json!([{"id": "../../admin", "command": "x"}, "junk"]));
    let second = server.runner("GET", "/api/runner/pending/", None).json();
    assert_eq!(second["executions"], json!([]));
}

#[test]
fn scripted_faults_cut_reset_redirect_and_answer_html_per_endpoint_and_attempt() {
    let server = Server::start();
    let id = server.queue(json!({"command": "check"}));
    let output = execution_path(&id, "output");
    for fault in [
        json!({"endpoint": "output", "status": 503, "cut_body": true, "body": "{\"detail\": \"0123456789\"}"}),
        json!({"endpoint": "output", "reset": true}),
        json!({"endpoint": "output", "status": 307}),
        json!({"endpoint": "output"}),
        json!({"endpoint": "output", "status": 200, "html": true}),
        json!({"endpoint": "output", "status": 524, "after_processing": true}),
    ] {
        assert_eq!(server.operator("POST", "faults", Some(fault)).status, 201);
    }
    assert_eq!(
        server.runner("POST", &execution_path(&id, "start"), None).status,
        200,
        "not an output: untouched"
    );
    let send = |n| server.runner_raw("POST", &output, Some(chunk(n, false, "x\n")));

    let cut = send(1);
    assert!(cut.starts_with("HTTP/1.1 503") && cut.contains("content-length: 24"), "{cut}");
    assert!(cut.ends_with("{\"detail\": \""), "half of the 24 bytes, then the end: {cut:?}");
    assert_eq!(send(1), "", "a reset: no answer at all");
    let redirect = send(1);
    assert!(redirect.starts_with("HTTP/1.1 307"), "{redirect}");
    assert!(redirect.contains(&format!("location: /moved{output}")), "{redirect}");
    assert!(send(1).starts_with("HTTP/1.1 200"), "an attempt let through");
    let html = send(2);
    assert!(html.starts_with("HTTP/1.1 200") && html.contains("content-type: text/html"), "{html}");
    assert!(html.contains("<h1>Bad Gateway</h1>"), "{html}");
    assert!(send(3).starts_with("HTTP/1.1 524"), "processed, then answered 524");
    assert!(send(4).starts_with("HTTP/1.1 200"), "the script is used up");

    // Only the chunks processed reached the store: 1 (let through), 3 (after
    // processing) and 4; 2 got the HTML page instead of the view.
    let numbers: Vec<u64> = server.execution(&id)["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["chunk_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 3, 4]);
    let logged: Vec<u64> = server
        .requests()
        .iter()
        .filter(|r| r["path"] == output.as_str())
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, [503, 0, 307, 200, 200, 524, 200], "a reset is logged as status 0");

    // An outage: every runner request for a while, then it ends by itself.
    let outage = json!({"status": 0, "reset": true, "duration_ms": 300});
    assert_eq!(server.operator("POST", "faults", Some(outage)).status, 201);
    assert_eq!(server.runner_raw("GET", "/api/runner/pending/", None), "");
    assert_eq!(server.runner_raw("POST", "/api/runner/heartbeat/", Some(heartbeat("sha256:0"))), "");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(server.runner("GET", "/api/runner/pending/", None).status, 200);

    let impossible = server.operator("POST", "faults", Some(json!({"reset": true, "cut_body": true})));
    assert_eq!(impossible.status, 400, "{}", impossible.body);
}

#[test]
fn run_follow_streams_what_the_runner_sends_and_exits_with_its_code() {
    let server = Server::start();
    let follower = server
        .client(&["run", "noisy", "1 2", "x", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dccontrol run");

    // Play the runner: pick the execution up, feed it slowly, out of order.
    let deadline = Instant::now() + Duration::from_secs(10);
    let execution = loop {
        let pending = server.runner("GET", "/api/runner/pending/", None).json();
        if let Some(first) = pending["executions"].get(0) {
            break first.clone();
        }
        assert!(Instant::now() < deadline, "dccontrol run queued nothing");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!((execution["command"].as_str(), execution["args"].as_str()), (Some("noisy"), Some("'1 2' x")));
    let id = execution["id"].as_str().unwrap();
    server.runner("POST", &execution_path(id, "start"), None);
    let output = execution_path(id, "output");
    for body in [
        chunk(2, true, "warning\n"),
        chunk(1, false, "line 1\npartial"),
        chunk(3, false, " end\n"),
        chunk(1, false, "DUPLICATE\n"),
    ] {
        server.runner("POST", &output, Some(body));
        std::thread::sleep(Duration::from_millis(150));
    }
    let end = json!({"exit_code": 3, "status": "failed"});
    server.runner("POST", &execution_path(id, "complete"), Some(end));

    let done = wait_with_deadline(follower, Duration::from_secs(15));
    let (stdout, stderr) = (text(&done.stdout), text(&done.stderr));
    assert_eq!(done.status.code(), Some(3), "stderr: {stderr}");
    assert_eq!(stdout, "line 1\npartial end\n");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.first(), Some(&format!("queued {id}").as_str()), "{stderr}");
    assert!(lines.contains(&"warning"), "{stderr}");
    let last = lines.last().unwrap();
    assert!(last.starts_with("[failed, exit code 3, ") && last.ends_with(" s]"), "{stderr}");
}

#[test]
fn operator_commands_queue_list_cancel_and_show() {
    let server = Server::start();
    let queued = server.client(&["run", "migrate", "--timeout", "30", "--", "--plan"]).output().unwrap();
    assert!(queued.status.success(), "{}", text(&queued.stderr));
    let id = text(&queued.stdout).trim().to_string();
    let execution = server.execution(&id);
    assert_eq!((execution["args"].as_str(), execution["timeout"].as_u64()), (Some("--plan"), Some(30)));

    let listed = server.client(&["list"]).output().unwrap();
    let table = text(&listed.stdout);
    assert!(table.contains(&id) && table.contains("pending") && table.contains("migrate --plan"), "{table}");

    let cancelled = server.client(&["cancel", &id, "--force"]).output().unwrap();
    assert!(cancelled.status.success(), "{}", text(&cancelled.stderr));
    let status = server.runner("GET", &execution_path(&id, "cancel-status"), None).json();
    assert_eq!(status, json!({"cancel_requested": true, "force_kill": true}));

    server.runner("POST", &execution_path(&id, "start"), None);
    server.runner("POST", &execution_path(&id, "output"), Some(chunk(1, false, "Planned operations:\n")));
    let shown = text(&server.client(&["show", &id]).output().unwrap().stdout);
    assert!(shown.contains("status     running"), "{shown}");
    assert!(shown.contains("kill requested"), "{shown}");
    assert!(shown.contains("stdout| Planned operations:"), "{shown}");
    let raw = server.client(&["show", &id, "--json"]).output().unwrap();
    let raw: Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(raw["cancel_requested"], true);

    let bad_id = server.client(&["show", "../../admin"]).output().unwrap();
    assert_eq!(bad_id.status.code(), Some(1));
    assert!(text(&bad_id.stderr).contains("not a UUID"));
}

#[test]
fn clients_and_the_server_fail_with_clear_messages() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let down = dccontrol().args(["list", "--server", &url]).output().unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert_eq!(
        text(&down.stderr).trim(),
        format!("dccontrol: cannot reach the control plane at {url}: connection refused")
    );

    let remote = dccontrol().args(["list", "--server", "http://192.0.2.1:8765"]).output().unwrap();
    assert_eq!(remote.status.code(), Some(1));
    assert!(text(&remote.stderr).contains("loopback"));

    let exposed = dccontrol().args(["serve", "--listen", "0.0.0.0:0"]).output().unwrap();
    assert!(!exposed.status.success());
    assert!(text(&exposed.stderr).contains("not a loopback address"));

    let server = Server::start();
    let wrong_key =
        dccontrol().args(["list", "--server", &server.url, "--api-key", "dc_wrong"]).output().unwrap();
    assert_eq!(wrong_key.status.code(), Some(1));
    assert!(text(&wrong_key.stderr).contains("401 Unauthorized: Invalid API key"));
}

#[test]
fn sigterm_stops_the_server() {
    let mut server = Server::start();
    kill(Pid::from_raw(server.child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "dccontrol serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
