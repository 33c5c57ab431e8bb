//! Harness for end-to-end tests: a real `dccontrol serve` on loopback, a
//! real `dcsupervisor` pointed at it, and a small HTTP client for the
//! control plane's operator API.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use super::{demo_project, python, TestDb};

pub const KEY: &str = "dc_e2e_test_key";

/// How long an end-to-end step may take before the test gives up.
pub const LIMIT: Duration = Duration::from_secs(60);

/// An execution's final status and exit code, as the control plane recorded them.
pub fn status_and_code(execution: &Value) -> (String, i64) {
    (
        execution["status"].as_str().unwrap_or("").to_string(),
        execution["exit_code"].as_i64().unwrap_or(i64::MIN),
    )
}

pub struct ControlPlane {
    child: Child,
    pub url: String,
}

impl ControlPlane {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0")
    }

    pub fn start_on(listen: &str) -> Self {
        Self::start_with_args(&["--listen", listen])
    }

    /// A control plane that signs the executions it hands out with the key
    /// in `key_file` (see `dccontrol keygen`).
    pub fn start_signed(key_file: &std::path::Path) -> Self {
        Self::start_with_args(&["--listen", "127.0.0.1:0", "--signing-key", key_file.to_str().unwrap()])
    }

    fn start_with_args(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dccontrol"))
            .args(["serve", "--api-key", KEY])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dccontrol");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url =
            line.trim().strip_prefix("listening on ").expect("dccontrol announces its address").to_string();
        Self { child, url }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.url, path))
            .header("Authorization", format!("Bearer {KEY}"))
            .header("Content-Type", "application/json")
            .body(Full::new(body))
            .unwrap();
        let response = client.request(request).await.expect("operator API reachable");
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    pub async fn queue(&self, command: &str, args: &str) -> String {
        self.queue_with(json!({"command": command, "args": args})).await
    }

    pub async fn queue_with(&self, body: Value) -> String {
        let (status, answer) = self.call("POST", "/api/operator/executions", Some(body)).await;
        assert_eq!(status, 201, "{answer}");
        answer["id"].as_str().unwrap().to_string()
    }

    pub async fn executions(&self) -> Vec<Value> {
        let list = self.call("GET", "/api/operator/executions", None).await.1;
        list["executions"].as_array().cloned().expect("an execution list")
    }

    pub async fn execution(&self, id: &str) -> Value {
        self.call("GET", &format!("/api/operator/executions/{id}"), None).await.1
    }

    /// Polls until the execution reaches a final status.
    pub async fn wait_done(&self, id: &str, limit: Duration) -> Value {
        self.wait_status(id, limit, |s| !matches!(s, "pending" | "running")).await
    }

    pub async fn wait_status(&self, id: &str, limit: Duration, wanted: impl Fn(&str) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let execution = self.execution(id).await;
            if wanted(execution["status"].as_str().unwrap_or("")) {
                return execution;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "execution did not get there in time: {execution:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn requests(&self) -> Vec<Value> {
        let (status, log) = self.call("GET", "/api/operator/requests", None).await;
        log["requests"].as_array().cloned().unwrap_or_else(|| panic!("no request log: {status} {log}"))
    }

    pub async fn fault(&self, spec: Value) {
        let (status, answer) = self.call("POST", "/api/operator/faults", Some(spec)).await;
        assert!(status < 300, "{answer}");
    }

    pub async fn clear_faults(&self) {
        self.call("DELETE", "/api/operator/faults", None).await;
    }

    pub async fn set_state(&self, state: &str, reason: Option<&str>) {
        let body = json!({"state": state, "reason": reason});
        let (status, answer) = self.call("POST", "/api/operator/runner-state", Some(body)).await;
        assert!(status < 300, "{answer}");
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of one stream of an execution, chunks in order.
pub fn output(execution: &Value, stderr: bool) -> String {
    chunks(execution)
        .iter()
        .filter(|c| c["is_stderr"].as_bool() == Some(stderr))
        .flat_map(|c| c["segments"].as_array().cloned().unwrap_or_default())
        .map(|s| s["content"].as_str().unwrap_or("").to_string())
        .collect()
}

pub fn chunks(execution: &Value) -> Vec<Value> {
    execution["chunks"].as_array().cloned().unwrap_or_default()
}

/// A `dcsupervisor` process running a Django project against a control plane.
pub struct Supervisor {
    child: Child,
    pub dir: tempfile::TempDir,
    pub project: PathBuf,
    url: String,
    db: TestDb,
    env: Vec<(String, String)>,
}

/// Fast rhythms so tests do not wait on the defaults.
const FAST: &str = "[runner]\npoll_interval = 0.1\noutput_flush_interval = 0.2\n";
const DEMO_COMMANDS: &str = r#"add_allowed_commands = ["noop", "sleep", "noisy", "fail", "exit_with", "spin", "grandchild", "bad_utf8", "boom", "prompt", "hello", "say", "hog", "chaos"]"#;

/// The dc.toml a [`Supervisor`] runs: `project` (the demo's commands
/// allowed) against `url`; `policy` and `extra` as for [`Supervisor::start`].
pub fn demo_config(url: &str, project: &std::path::Path, db: &TestDb, policy: &str, extra: &str) -> String {
    let runner = if extra.contains("[runner]") { String::new() } else { FAST.to_string() };
    format!(
        "[server]\nurl = {url:?}\napi_key = {KEY:?}\nheartbeat_interval = 5\nrequest_timeout = 5\n\n\
         [django]\nproject_dir = {project:?}\nsettings_module = \"demo_project.settings\"\npython = {python:?}\n\
         env = {{ DEMO_DB_PATH = {db:?} }}\n\n[policy]\n{DEMO_COMMANDS}\n{policy}\n\n{runner}\n{extra}\n",
        project = project.display().to_string(),
        python = python().display().to_string(),
        db = db.path().display().to_string(),
    )
}

impl Supervisor {
    /// `policy` and `extra` are TOML appended to the [policy] section and
    /// to the file (`extra` may replace the fast [runner] defaults).
    pub fn start(url: &str, policy: &str, extra: &str) -> Self {
        Self::start_with(url, policy, extra, demo_project(), &[])
    }

    pub fn start_with(url: &str, policy: &str, extra: &str, project: PathBuf, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut supervisor = Self {
            child: Command::new("true").spawn().unwrap(),
            dir,
            project,
            url: url.to_string(),
            db: TestDb::new(),
            env,
        };
        supervisor.write_config(policy, extra);
        supervisor.restart();
        supervisor
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("dc.toml")
    }

    /// Rewrites dc.toml (takes effect on the next start or reload).
    pub fn write_config(&self, policy: &str, extra: &str) {
        let config = demo_config(&self.url, &self.project, &self.db, policy, extra);
        super::write_file(&self.config_path(), &config);
    }

    /// Starts the process (again), with the same directory and configuration.
    pub fn restart(&mut self) {
        // Reap the previous process (it has exited or been killed by now).
        let _ = self.child.wait();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        self.child = Command::new(env!("CARGO_BIN_EXE_dcsupervisor"))
            .arg("--config")
            .arg(self.config_path())
            .arg("-v")
            .env_remove("DJANGOCOMMAND_API_KEY")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dcsupervisor");
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal);
    }

    /// Waits for a line containing `needle` in the log.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.log().contains(needle) {
            assert!(tokio::time::Instant::now() < deadline, "no {needle:?} in the log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("supervisor.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit by itself; its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// SIGTERM, then the exit status (SIGKILL after `limit`).
    pub async fn terminate(&mut self, limit: Duration) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let code = self.wait_exit(limit).await;
        if code.is_none() {
            let _ = self.child.kill();
        }
        code
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The runner-API requests for one execution's `endpoint` (e.g. "output"),
/// whatever the case of the id in their path.
pub fn requests_to(requests: &[Value], id: &str, endpoint: &str) -> Vec<Value> {
    let suffix = format!("{}/{endpoint}/", id.to_ascii_lowercase());
    requests
        .iter()
        .filter(|r| r["path"].as_str().unwrap_or_default().to_ascii_lowercase().ends_with(&suffix))
        .cloned()
        .collect()
}
