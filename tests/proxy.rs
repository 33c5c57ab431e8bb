//! A server whose only way out is an HTTP proxy, as on many company
//! networks: the runner reaches the control plane through the proxy the
//! environment names (`HTTPS_PROXY`, `NO_PROXY`: what the published
//! runner's `requests` reads), with TLS end to end inside a CONNECT tunnel,
//! so the proxy never sees the key. Each test runs a real `dcsupervisor`
//! against `dccontrol` behind a TLS front (tests/common/tls.rs), through a
//! recording proxy on loopback (tests/common/egress_proxy.rs).

mod common;

use std::path::PathBuf;

use base64::Engine as _;
use common::egress_proxy::EgressProxy;
use common::plane::{output, status_and_code, ControlPlane, Supervisor, KEY, LIMIT};
use common::tls::{contains, TestCa, TlsProxy, Validity};

/// The control plane over HTTPS at `localhost`, and the CA file that
/// trusts it.
struct HttpsPlane {
    plane: ControlPlane,
    front: TlsProxy,
    ca_file: PathBuf,
    _files: tempfile::TempDir,
}

impl HttpsPlane {
    async fn start() -> Self {
        let plane = ControlPlane::start();
        let files = tempfile::tempdir().unwrap();
        let ca = TestCa::new("dcsupervisor test CA");
        let ca_file = files.path().join("ca.pem");
        ca.write_pem(&ca_file);
        let front = TlsProxy::start(&plane.url, ca.issue(&["localhost"], Validity::Current)).await;
        Self { plane, front, ca_file, _files: files }
    }

    /// A runner of the demo project, with `env` (its proxy settings).
    fn runner(&self, env: &[(&str, &str)]) -> Supervisor {
        let ca_line = format!("ca_file = {:?}", self.ca_file.display().to_string());
        Supervisor::start_with_server(
            &self.front.url("localhost"),
            &ca_line,
            "",
            "",
            common::demo_project(),
            env,
        )
    }

    /// An execution runs to its end and its output arrives.
    async fn runs_one(&self, runner: &Supervisor) {
        let id = self.plane.queue("noisy", "--lines 2").await;
        let done = self.plane.wait_done(&id, LIMIT).await;
        assert_eq!(status_and_code(&done), ("success", 0), "{}", runner.log());
        assert_eq!(output(&done, false), "out 0\nout 1\n");
    }
}

fn basic(credentials: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_goes_through_the_proxy_the_environment_names_with_tls_inside() {
    let https = HttpsPlane::start().await;
    let proxy = EgressProxy::start(None).await;
    let runner = https.runner(&[("HTTPS_PROXY", &proxy.url(None))]);
    https.runs_one(&runner).await;

    let asked = proxy.asked();
    assert!(!asked.is_empty(), "the proxy was not used: {}", runner.log());
    let front = format!("localhost:{}", https.front.port);
    for tunnel in &asked {
        assert_eq!(tunnel.target, front, "a tunnel to the control plane only");
        // TLS from the first byte on: a handshake record.
        assert_eq!(tunnel.sent.first(), Some(&0x16), "not TLS inside the tunnel");
        assert!(!contains(&tunnel.sent, KEY) && !contains(&tunnel.sent, "Bearer"), "the proxy saw the key");
    }
    assert!(https.front.seen.handshakes() >= 1);
    let log = runner.log();
    let said = format!(
        "the control plane is reached through the proxy http://127.0.0.1:{} (HTTPS_PROXY)",
        proxy.port
    );
    assert!(log.contains(&said), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_sends_the_control_plane_direct() {
    let https = HttpsPlane::start().await;
    let proxy = EgressProxy::start(None).await;
    let runner = https.runner(&[("https_proxy", &proxy.url(None)), ("NO_PROXY", "example.com,localhost")]);
    https.runs_one(&runner).await;
    assert!(proxy.asked().is_empty(), "NO_PROXY was not followed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_credentials_go_to_the_proxy_and_nowhere_else() {
    let https = HttpsPlane::start().await;
    // A password with characters a URL must percent-encode.
    let proxy = EgressProxy::start(Some(basic("runner:pa ss@1"))).await;

    let mut refused = https.runner(&[("HTTPS_PROXY", &proxy.url(Some("runner:wrong-secret")))]);
    refused.wait_for_log("proxy authorization required", LIMIT).await;
    assert!(refused.is_running(), "a proxy's refusal is retried, not fatal");
    let log = refused.log();
    assert!(
        log.contains(&format!("through the proxy http://127.0.0.1:{} (HTTPS_PROXY)", proxy.port)),
        "{log}"
    );
    assert!(!log.contains("wrong-secret"), "the proxy's password was logged: {log}");
    assert!(https.plane.requests().await.is_empty(), "the control plane heard the runner");
    drop(refused);

    let runner = https.runner(&[("HTTPS_PROXY", &proxy.url(Some("runner:pa%20ss%401")))]);
    https.runs_one(&runner).await;
    let opened: Vec<_> = proxy.asked().into_iter().filter(|tunnel| tunnel.opened).collect();
    assert!(!opened.is_empty());
    assert!(opened
        .iter()
        .all(|tunnel| tunnel.authorization.as_deref() == Some(basic("runner:pa ss@1").as_str())));
    for tunnel in &opened {
        assert!(!contains(&tunnel.sent, "pa ss") && !contains(&tunnel.sent, &basic("runner:pa ss@1")));
    }
    assert!(!runner.log().contains("pa%20ss"), "the proxy's password was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_the_runner_cannot_use_stops_it_at_start_saying_which_variable() {
    let https = HttpsPlane::start().await;
    for (value, problem) in [
        ("socks5://127.0.0.1:1080", "only http:// proxies"),
        ("https://user:hunter2@127.0.0.1:3128", "only http:// proxies"),
        ("http://", "is not a proxy URL"),
    ] {
        let mut refused = https.runner(&[("HTTPS_PROXY", value)]);
        let code = refused.wait_exit(LIMIT).await;
        let log = refused.log();
        assert_eq!(code, Some(1), "{log}");
        assert!(log.contains("HTTPS_PROXY") && log.contains(problem), "{log}");
        assert!(!log.contains("hunter2"), "a proxy password was logged: {log}");
    }
    assert_eq!(https.front.seen.connections(), 0, "a runner that did not start connected");
}
