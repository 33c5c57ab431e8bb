//! Harness for end-to-end tests: a real `dccontrol serve` on loopback, a
//! real `dcsupervisor` pointed at it, and the library's typed operator
//! client (`dcsupervisor::local_plane::OperatorClient`) to drive the first
//! and read what the second did.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dcsupervisor::local_plane::wire::{
    ChunkView, ExecutionDetail, ExecutionStatus, ExecutionSummary, FaultSpec, LoggedRequest, NewExecution,
    StateView,
};
use dcsupervisor::local_plane::{ClientError, OperatorClient};
use dcsupervisor::protocol::api::{ExecutionId, RunnerState};

use super::{demo_project, python, TestDb};

pub const KEY: &str = "dc_e2e_test_key";

/// The environment variables that may send the runner through a proxy.
pub const PROXY_VARIABLES: [&str; 8] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// How long an end-to-end step may take before the test gives up.
pub const LIMIT: Duration = Duration::from_secs(60);

/// An execution's final status and exit code (`i64::MIN` for none), as the
/// control plane recorded them: `("success", 0)`.
pub fn status_and_code(execution: &ExecutionDetail) -> (&'static str, i64) {
    (execution.summary.status.as_str(), execution.summary.exit_code.map_or(i64::MIN, i64::from))
}

/// A `dccontrol serve` process and a client of its operator API.
pub struct ControlPlane {
    child: Child,
    pub url: String,
    pub client: OperatorClient,
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
        let client = OperatorClient::new(&url, KEY).expect("a loopback URL");
        Self { child, url, client }
    }

    /// Queues `command` with `args` (one string, split like a shell would).
    pub async fn queue(&self, command: &str, args: &str) -> ExecutionId {
        self.queue_with(NewExecution::new(command, args)).await
    }

    pub async fn queue_with(&self, request: NewExecution) -> ExecutionId {
        self.client.queue(&request).await.expect("the execution is queued")
    }

    pub async fn executions(&self) -> Vec<ExecutionSummary> {
        self.client.list().await.expect("the execution list")
    }

    pub async fn execution(&self, id: &ExecutionId) -> ExecutionDetail {
        self.client.detail(id).await.expect("the execution")
    }

    /// Polls until the execution reaches a final status.
    pub async fn wait_done(&self, id: &ExecutionId, limit: Duration) -> ExecutionDetail {
        self.wait_status(id, limit, ExecutionStatus::is_finished).await
    }

    pub async fn wait_status(
        &self,
        id: &ExecutionId,
        limit: Duration,
        wanted: impl Fn(ExecutionStatus) -> bool,
    ) -> ExecutionDetail {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let execution = self.execution(id).await;
            if wanted(execution.summary.status) {
                return execution;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "execution did not get there in time: {execution:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the runner last reported.
    pub async fn state(&self) -> StateView {
        self.client.state().await.expect("the control plane's state")
    }

    /// Polls the control plane's view of the runner until `wanted` holds:
    /// what the runner did, seen from outside, instead of its log.
    pub async fn wait_state(&self, limit: Duration, wanted: impl Fn(&StateView) -> bool) -> StateView {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let state = self.state().await;
            if wanted(&state) {
                return state;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the runner did not get there in time: {state:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for a heartbeat the control plane processed after `heartbeats`
    /// earlier ones: the runner is authenticated and talking.
    pub async fn wait_heartbeat_after(&self, heartbeats: u64, limit: Duration) -> StateView {
        self.wait_state(limit, |state| state.heartbeats > heartbeats).await
    }

    pub async fn requests(&self) -> Vec<LoggedRequest> {
        self.client.requests().await.expect("the request log")
    }

    pub async fn fault(&self, spec: FaultSpec) {
        self.client.add_fault(&spec).await.expect("the fault is accepted");
    }

    pub async fn clear_faults(&self) {
        self.client.clear_faults().await.expect("the faults are cleared");
    }

    pub async fn set_state(&self, state: RunnerState, reason: Option<&str>) {
        self.client.set_runner_state(state, reason).await.expect("the runner state is set");
    }

    pub async fn cancel(&self, id: &ExecutionId, force: bool) {
        self.client.cancel(id, force).await.expect("the cancel is recorded");
    }

    /// The entry `/pending/` hands out for `id`, as raw JSON.
    pub async fn signed_entry(&self, id: &ExecutionId) -> serde_json::Value {
        self.client.signed_entry(id).await.expect("the pending entry")
    }

    /// Raw entries for the next `/pending/` answer; the refusal if any.
    pub async fn inject_pending(&self, entries: Vec<serde_json::Value>) -> Result<(), ClientError> {
        self.client.inject_pending(entries).await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of one stream of an execution, chunks in order.
pub fn output(execution: &ExecutionDetail, stderr: bool) -> String {
    execution
        .chunks
        .iter()
        .filter(|chunk| chunk.is_stderr == stderr)
        .flat_map(|chunk| chunk.segments.iter().map(|segment| segment.content.as_str()))
        .collect()
}

pub fn chunks(execution: &ExecutionDetail) -> &[ChunkView] {
    &execution.chunks
}

/// A `dcsupervisor` process running a Django project against a control plane.
pub struct Supervisor {
    child: Child,
    /// Where it sends systemd's notifications (`NOTIFY_SOCKET`): ready,
    /// reloaded or reload refused, stopping. Tests wait on these, the
    /// service manager's own interface, rather than on log text.
    notify: std::os::unix::net::UnixDatagram,
    notifications: std::sync::Mutex<Vec<String>>,
    /// Copies its stdout and stderr into the log.
    log_copier: Option<LogCopier>,
    pub dir: tempfile::TempDir,
    pub project: PathBuf,
    url: String,
    /// Lines added to `[server]` (e.g. `ca_file = "..."`).
    server: String,
    db: TestDb,
    env: Vec<(String, String)>,
}

/// Fast rhythms so tests do not wait on the defaults.
const FAST: &str = "[runner]\npoll_interval = 0.1\noutput_flush_interval = 0.2\n";
const DEMO_COMMANDS: &str = r#"add_allowed_commands = ["noop", "sleep", "noisy", "fail", "exit_with", "spin", "grandchild", "bad_utf8", "boom", "prompt", "hello", "say", "hog", "chaos"]"#;

/// The dc.toml a [`Supervisor`] runs: `project` (the demo's commands
/// allowed) against `url`; `policy` and `extra` as for [`Supervisor::start`].
pub fn demo_config(url: &str, project: &std::path::Path, db: &TestDb, policy: &str, extra: &str) -> String {
    demo_config_with_server(url, "", project, db, policy, extra)
}

/// [`demo_config`] with `server` (TOML lines) added to its `[server]` section.
pub fn demo_config_with_server(
    url: &str,
    server: &str,
    project: &std::path::Path,
    db: &TestDb,
    policy: &str,
    extra: &str,
) -> String {
    let runner = if extra.contains("[runner]") { String::new() } else { FAST.to_string() };
    format!(
        "[server]\nurl = {url:?}\napi_key = {KEY:?}\nheartbeat_interval = 5\nrequest_timeout = 5\n{server}\n\n\
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
        Self::start_with_server(url, "", policy, extra, project, env)
    }

    /// [`Supervisor::start_with`], `server` (TOML lines) added to `[server]`.
    pub fn start_with_server(
        url: &str,
        server: &str,
        policy: &str,
        extra: &str,
        project: PathBuf,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let notify = std::os::unix::net::UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();
        notify.set_nonblocking(true).unwrap();
        let mut supervisor = Self {
            child: Command::new("true").spawn().unwrap(),
            notify,
            notifications: std::sync::Mutex::new(Vec::new()),
            log_copier: None,
            dir,
            project,
            url: url.to_string(),
            server: server.to_string(),
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
        self.write_config_with_server(&self.server, policy, extra);
    }

    /// Rewrites dc.toml with `server` (TOML lines) in `[server]`.
    pub fn write_config_with_server(&self, server: &str, policy: &str, extra: &str) {
        self.write_config_for(&self.url, server, policy, extra);
    }

    /// Rewrites dc.toml for the control plane at `url`.
    pub fn write_config_for(&self, url: &str, server: &str, policy: &str, extra: &str) {
        let config = demo_config_with_server(url, server, &self.project, &self.db, policy, extra);
        super::write_file(&self.config_path(), &config);
    }

    /// Starts the process (again), with the same directory and configuration.
    pub fn restart(&mut self) {
        // Reap the previous process (it has exited or been killed by now).
        let _ = self.child.wait();
        self.finish_log();
        let (copier, log_pipe) = LogCopier::start(&self.log_path());
        self.log_copier = Some(copier);
        let mut command = Command::new(env!("CARGO_BIN_EXE_dcsupervisor"));
        // Loopback only, whatever proxy the machine running the tests names
        // (a test that wants one passes it in `env`).
        for proxy in PROXY_VARIABLES {
            command.env_remove(proxy);
        }
        self.child = command
            .arg("--config")
            .arg(self.config_path())
            .arg("-v")
            .env_remove("DJANGOCOMMAND_API_KEY")
            .env("NO_COLOR", "1")
            .env("NOTIFY_SOCKET", self.dir.path().join("notify.sock"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log_pipe.try_clone().unwrap())
            .stderr(log_pipe)
            .spawn()
            .expect("start dcsupervisor");
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal);
    }

    /// Every systemd notification received so far, oldest first (each is
    /// its `KEY=value` lines, e.g. `"READY=1\nSTATUS=reloaded"`).
    pub fn notifications(&self) -> Vec<String> {
        let mut received = self.notifications.lock().unwrap();
        let mut buffer = [0u8; 4096];
        while let Ok(length) = self.notify.recv(&mut buffer) {
            received.push(String::from_utf8_lossy(&buffer[..length]).into_owned());
        }
        received.clone()
    }

    /// Waits until `times` notifications contain `needle`.
    pub async fn wait_notified_times(&self, needle: &str, times: usize, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let received = self.notifications();
            if received.iter().filter(|n| n.contains(needle)).count() >= times {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{needle:?} not notified {times} time(s): {received:#?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a notification containing `needle`.
    pub async fn wait_notified(&self, needle: &str, limit: Duration) {
        self.wait_notified_times(needle, 1, limit).await;
    }

    /// Waits for the `times`-th reload to be applied (systemd's
    /// `READY=1` + `STATUS=reloaded`).
    pub async fn wait_reloaded(&self, times: usize) {
        self.wait_notified_times("STATUS=reloaded", times, LIMIT).await;
    }

    /// Waits for the `times`-th reload to be refused, the previous
    /// configuration kept.
    pub async fn wait_reload_refused(&self, times: usize) {
        self.wait_notified_times("STATUS=reload refused", times, LIMIT).await;
    }

    /// Waits for a line containing `needle` in the log: for tests of what
    /// the log says, or of what nothing else shows.
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

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        if let Some(copier) = &self.log_copier {
            copier.catch_up();
        }
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
                self.finish_log();
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Waits for the log copiers: once the process is gone, its last lines
    /// are in the log.
    fn finish_log(&mut self) {
        if let Some(copier) = self.log_copier.take() {
            copier.finish();
        }
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

/// Copies a process's stdout and stderr (one pipe) into its log file from a
/// thread of the test process, so the log stays whole while a test limits
/// the process's file size (a "full disk" must not eat its log).
struct LogCopier {
    pipe: std::sync::Arc<std::os::fd::OwnedFd>,
    /// Held while a read from the pipe is being written to the file.
    copying: std::sync::Arc<std::sync::Mutex<()>>,
    thread: std::thread::JoinHandle<()>,
}

impl LogCopier {
    /// The copier, and the pipe's end for the process's stdout and stderr.
    fn start(path: &std::path::Path) -> (Self, std::fs::File) {
        use std::io::Write as _;
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let pipe = std::sync::Arc::new(read);
        let copying = std::sync::Arc::new(std::sync::Mutex::new(()));
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        let (source, lock) = (pipe.clone(), copying.clone());
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsFd as _;
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                // Wait without the lock, so `catch_up` is never held up by an idle pipe.
                // A signal handled in this process (tokio's SIGCHLD) may
                // interrupt either call: try again. Giving up would leave the
                // pipe full and the runner blocked on its next log line.
                let mut polled = [nix::poll::PollFd::new(source.as_fd(), nix::poll::PollFlags::POLLIN)];
                match nix::poll::poll(&mut polled, nix::poll::PollTimeout::NONE) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return,
                    Ok(_) => {}
                }
                let _copying = lock.lock().unwrap();
                match nix::unistd::read(source.as_fd(), &mut buffer) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Ok(0) | Err(_) => return, // every writer is gone
                    Ok(length) => {
                        let _ = log.write_all(&buffer[..length]);
                    }
                }
            }
        });
        (Self { pipe, copying, thread }, std::fs::File::from(write))
    }

    /// Returns once what the process wrote so far is in the file: nothing
    /// waits in the pipe, and no read is half-copied.
    fn catch_up(&self) {
        use std::os::fd::AsRawFd as _;
        for _ in 0..1000 {
            let _copying = self.copying.lock().unwrap();
            let mut waiting: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int through the pointer.
            let asked = unsafe { libc::ioctl(self.pipe.as_raw_fd(), libc::FIONREAD, &mut waiting) };
            if asked != 0 || waiting == 0 {
                return;
            }
            drop(_copying);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for the end of the copy, which comes once every process holding
    /// the pipe is gone (a few seconds at most: then it is left to finish).
    fn finish(self) {
        for _ in 0..500 {
            if self.thread.is_finished() {
                let _ = self.thread.join();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The runner-API requests for one execution's `endpoint` (e.g. "output"),
/// whatever the case of the id in their path.
pub fn requests_to(requests: &[LoggedRequest], id: &ExecutionId, endpoint: &str) -> Vec<LoggedRequest> {
    let suffix = format!("{}/{endpoint}/", id.as_str().to_ascii_lowercase());
    requests.iter().filter(|r| r.path.to_ascii_lowercase().ends_with(&suffix)).cloned().collect()
}
