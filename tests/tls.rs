//! HTTPS end to end, as an attacker would test it: a real `dcsupervisor`
//! against `dccontrol` behind a TLS-terminating proxy on loopback
//! (`tests/common/tls.rs`), with certificates made at test time. The runner
//! must work over HTTPS with `server.ca_file`; refuse an untrusted, expired
//! or misnamed certificate before sending anything (the proxy records every
//! byte on the wire and every byte it could decrypt); never follow a
//! redirect with the key; and refuse an unusable `ca_file` at start and on
//! reload (docs/security.md, "On the network").

mod common;

use std::path::Path;
use std::time::Duration;

use common::plane::{output, requests_to, status_and_code, ControlPlane, Supervisor, KEY, LIMIT};
use common::tls::{contains, TestCa, TlsProxy, Trap, Validity};
use dcsupervisor::local_plane::wire::{Endpoint, FaultSpec};

/// The `[server]` line naming `path` as the extra CA file.
fn ca_line(path: &Path) -> String {
    format!("ca_file = {:?}", path.display().to_string())
}

/// A runner of the demo project against `url`, with `server` lines added
/// to its `[server]` section.
fn runner(url: &str, server: &str) -> Supervisor {
    Supervisor::start_with_server(url, server, "", "", common::demo_project(), &[])
}

/// The test CA, written to a PEM file in `dir`.
fn ca_in(dir: &Path) -> (TestCa, std::path::PathBuf) {
    let ca = TestCa::new("dcsupervisor test CA");
    let path = dir.join("ca.pem");
    ca.write_pem(&path);
    (ca, path)
}

/// Nothing the runner sent could be read: no handshake completed, nothing
/// was decrypted, no connection opened in plain HTTP, and neither the key
/// nor an `Authorization` header crossed the wire; nor did the control
/// plane behind the proxy hear anything.
async fn assert_nothing_left(proxy: &TlsProxy, plane: &ControlPlane) {
    let seen = &proxy.seen;
    assert_eq!(seen.handshakes(), 0, "a handshake completed: {:?}", seen.failures());
    assert!(
        seen.plaintext().is_empty(),
        "the proxy decrypted {:?}",
        String::from_utf8_lossy(&seen.plaintext())
    );
    assert!(
        !seen.any_opening_not_tls(),
        "a connection was not TLS: {:?}",
        String::from_utf8_lossy(&seen.wire())
    );
    let wire = seen.wire();
    assert!(!contains(&wire, KEY) && !contains(&wire, "authorization") && !contains(&wire, "Bearer"));
    assert!(plane.requests().await.is_empty(), "the control plane heard the runner");
}

/// 1. With `server.ca_file` naming the test CA, everything goes over HTTPS:
///    heartbeat, sync, poll, start, output, completion; nothing readable on
///    the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_trusting_the_test_ca_does_everything_over_https() {
    let plane = ControlPlane::start();
    let files = tempfile::tempdir().unwrap();
    let (ca, ca_file) = ca_in(files.path());
    let proxy = TlsProxy::start(&plane.url, ca.issue(&["localhost"], Validity::Current)).await;
    let runner = runner(&proxy.url("localhost"), &ca_line(&ca_file));

    let id = plane.queue("noisy", "--lines 2").await;
    let done = plane.wait_done(&id, LIMIT).await;
    assert_eq!(status_and_code(&done), ("success", 0), "{}", runner.log());
    assert_eq!(output(&done, false), "out 0\nout 1\n");
    assert_eq!(output(&done, true), "err 0\nerr 1\n");
    // The sync follows the first heartbeat's answer, which also lets polls start.
    plane
        .wait_state(LIMIT, |state| state.heartbeats >= 1 && state.commands.iter().any(|c| c.name == "noisy"))
        .await;
    let requests = plane.requests().await;
    for endpoint in ["start", "output", "complete"] {
        assert!(!requests_to(&requests, &id, endpoint).is_empty(), "no {endpoint} request");
    }
    for path in ["/api/runner/heartbeat/", "/api/runner/commands/sync/", "/api/runner/pending/"] {
        assert!(requests.iter().any(|r| r.path == path), "no request to {path}");
    }

    let seen = &proxy.seen;
    assert!(seen.handshakes() >= 1 && seen.failures().is_empty(), "{:?}", seen.failures());
    assert!(!seen.any_opening_not_tls(), "every connection opened with a TLS handshake");
    // The proxy (trusted: it holds the key) read the requests; the wire did not carry them in clear.
    assert!(contains(&seen.plaintext(), &format!("Bearer {KEY}")));
    let wire = seen.wire();
    assert!(!contains(&wire, KEY) && !contains(&wire, "authorization") && !contains(&wire, "noisy"));
}

/// 2. Without `ca_file`, a certificate from a CA the system does not trust
///    is refused: the key never leaves, the log names the problem and the
///    fix, and the runner keeps trying (over TLS, never falling back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused_before_anything_is_sent() {
    let plane = ControlPlane::start();
    let ca = TestCa::new("an untrusted CA");
    let proxy = TlsProxy::start(&plane.url, ca.issue(&["localhost"], Validity::Current)).await;
    let mut runner = runner(&proxy.url("localhost"), "");

    // Refused, then tried again (heartbeats back off from 1 s).
    proxy.seen.wait(LIMIT, "two refused handshakes", |seen| seen.failures().len() >= 2).await;
    runner.wait_for_log("certificate", LIMIT).await;
    assert!(runner.is_running(), "{}", runner.log());
    assert_nothing_left(&proxy, &plane).await;
    let log = runner.log();
    let line = log.lines().find(|l| l.contains("heartbeat failed")).expect("a failed heartbeat is logged");
    assert!(line.contains("UnknownIssuer") || line.contains("unknown issuer"), "{line}");
    // Said as what it is, with the fix (before: "cannot reach the control plane").
    assert!(line.contains("certificate was refused, nothing was sent"), "{line}");
    assert!(line.contains("server.ca_file"), "the fix is named: {line}");
    assert!(!log.contains(KEY));
    // `once`, what an operator runs to check the key, says the same and fails.
    let once = std::process::Command::new(env!("CARGO_BIN_EXE_dcsupervisor"))
        .arg("--config")
        .arg(runner.config_path())
        .arg("once")
        .env_remove("DJANGOCOMMAND_API_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&once.stderr);
    assert_eq!(once.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("certificate was refused") && stderr.contains("server.ca_file"), "{stderr}");
    assert_nothing_left(&proxy, &plane).await;
}

/// 3. A certificate for another name, and an expired one (both signed by
///    the CA the runner trusts), are refused likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_or_expired_is_refused() {
    let plane = ControlPlane::start();
    let files = tempfile::tempdir().unwrap();
    let (ca, ca_file) = ca_in(files.path());
    let other_name = TlsProxy::start(&plane.url, ca.issue(&["control.example.com"], Validity::Current)).await;
    let expired = TlsProxy::start(&plane.url, ca.issue(&["localhost"], Validity::Expired)).await;
    let mut misnamed_runner = runner(&other_name.url("localhost"), &ca_line(&ca_file));
    let mut expired_runner = runner(&expired.url("localhost"), &ca_line(&ca_file));

    for (proxy, runner, problem) in [
        (&other_name, &mut misnamed_runner, "not valid for name"),
        (&expired, &mut expired_runner, "expired"),
    ] {
        proxy.seen.wait(LIMIT, problem, |seen| seen.failures().len() >= 2).await;
        runner.wait_for_log("heartbeat failed", LIMIT).await;
        assert!(runner.is_running(), "{}", runner.log());
        assert_nothing_left(proxy, &plane).await;
        let log = runner.log();
        let line = log.lines().find(|l| l.contains("heartbeat failed")).unwrap();
        assert!(
            line.contains("certificate was refused, nothing was sent") && line.contains(problem),
            "{line}"
        );
    }
}

/// What self-hosting looks like: a self-signed certificate named in
/// `ca_file` is trusted, and a URL with an IP address is checked against
/// the addresses the certificate names (a certificate for `localhost`
/// reached at 127.0.0.1 is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_certificate_in_ca_file_is_trusted_and_ip_addresses_are_checked() {
    let files = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start();
    let (cert, pem) = common::tls::ServerCert::self_signed(&["127.0.0.1"]);
    let self_signed = files.path().join("self-signed.pem");
    common::write_file(&self_signed, &pem);
    let proxy = TlsProxy::start(&plane.url, cert).await;
    let runner = runner(&proxy.url("127.0.0.1"), &ca_line(&self_signed));

    let other_plane = ControlPlane::start();
    let (ca, ca_file) = ca_in(files.path());
    let by_name = TlsProxy::start(&other_plane.url, ca.issue(&["localhost"], Validity::Current)).await;
    let mut misnamed = self::runner(&by_name.url("127.0.0.1"), &ca_line(&ca_file));

    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
    assert!(proxy.seen.failures().is_empty(), "{:?}\n{}", proxy.seen.failures(), runner.log());
    by_name.seen.wait(LIMIT, "a refused handshake", |seen| !seen.failures().is_empty()).await;
    misnamed.wait_for_log("heartbeat failed", LIMIT).await;
    assert!(misnamed.is_running());
    assert_nothing_left(&by_name, &other_plane).await;
    let log = misnamed.log();
    let line = log.lines().find(|l| l.contains("heartbeat failed")).unwrap();
    assert!(line.contains("certificate was refused") && line.contains("not valid for name"), "{line}");
}

/// A man in the middle that accepts the connection and never answers (a
/// tarpit) costs a timeout per attempt, not a hung runner: each attempt
/// ends after `request_timeout`, is logged, and is tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_ends_times_out_and_is_retried() {
    let trap = Trap::start().await;
    let url = format!("https://localhost:{}", trap.port);
    let timeout = [("DCSUPERVISOR_SERVER__REQUEST_TIMEOUT", "1")];
    let mut runner = Supervisor::start_with_server(&url, "", "", "", common::demo_project(), &timeout);
    trap.seen.wait(LIMIT, "a second attempt", |seen| seen.connections() >= 2).await;
    runner.wait_for_log("heartbeat failed: no answer within 1s", LIMIT).await;
    assert!(runner.is_running(), "{}", runner.log());
    assert!(!trap.seen.any_opening_not_tls(), "every attempt opened with a TLS handshake");
    let wire = trap.seen.wire();
    assert!(!contains(&wire, KEY) && !contains(&wire, "authorization"));
}

/// A reload applies the new trust at once, both ways: the reload
/// heartbeats at once (not when the failed heartbeat's backoff, up to
/// `heartbeat_interval`, runs out), under the new `ca_file`: refused with
/// the wrong CA, through with the right one; and no connection made under
/// the old trust is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_trusted_ca_at_once() {
    let plane = ControlPlane::start();
    let files = tempfile::tempdir().unwrap();
    let (ca, right) = ca_in(files.path());
    let wrong = files.path().join("other-ca.pem");
    TestCa::new("another CA").write_pem(&wrong);
    let proxy = TlsProxy::start(&plane.url, ca.issue(&["localhost"], Validity::Current)).await;
    // The first heartbeat is told to come back in 60 s (the longest wait).
    let busy = FaultSpec {
        endpoint: Some(Endpoint::Heartbeat),
        status: 503,
        retry_after: Some(60),
        ..FaultSpec::default()
    };
    plane.fault(busy).await;
    let interval = [("DCSUPERVISOR_SERVER__HEARTBEAT_INTERVAL", "60")];
    let runner = Supervisor::start_with_server(
        &proxy.url("localhost"),
        &ca_line(&right),
        "",
        "",
        common::demo_project(),
        &interval,
    );
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !plane.requests().await.iter().any(|r| r.status == Some(503)) {
        assert!(tokio::time::Instant::now() < deadline, "no heartbeat:\n{}", runner.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Before: a reload heartbeat at once only when the command list had changed.
    runner.write_config_with_server(&ca_line(&wrong), "", "");
    runner.signal(nix::sys::signal::Signal::SIGHUP);
    runner.wait_reloaded(1).await;
    proxy
        .seen
        .wait(Duration::from_secs(20), "a heartbeat refused at once", |seen| !seen.failures().is_empty())
        .await;

    runner.write_config_with_server(&ca_line(&right), "", "");
    runner.signal(nix::sys::signal::Signal::SIGHUP);
    runner.wait_reloaded(2).await;
    plane.wait_heartbeat_after(0, Duration::from_secs(20)).await;
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");

    let refused = proxy.seen.failures().len();
    runner.write_config_with_server(&ca_line(&wrong), "", "");
    runner.signal(nix::sys::signal::Signal::SIGHUP);
    runner.wait_reloaded(3).await;
    // Polls (every 0.1 s) now fail their handshakes; none reaches the plane.
    proxy.seen.wait(LIMIT, "refused again", |seen| seen.failures().len() > refused + 1).await;
    let heard = plane.requests().await.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(plane.requests().await.len(), heard, "a request went through under the old trust");
}

/// 4. An HTTPS control plane answering a redirect (to plain HTTP, or to
///    another HTTPS origin) is never followed: nothing reaches where it
///    points, the runner logs it and tries again at the same URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed_to_another_scheme_or_origin() {
    let plane = ControlPlane::start();
    let files = tempfile::tempdir().unwrap();
    let (ca, ca_file) = ca_in(files.path());
    let proxy = TlsProxy::start(&plane.url, ca.issue(&["localhost"], Validity::Current)).await;
    let trap = Trap::start().await;
    // Each endpoint once, to plain HTTP or to another HTTPS origin (a port of ours that only listens).
    let to_http = format!("http://127.0.0.1:{}/api/runner/heartbeat/", trap.port);
    let to_https = format!("https://localhost:{}/api/runner/heartbeat/", trap.port);
    let faults = [
        (Endpoint::Heartbeat, 307, &to_http),
        (Endpoint::Pending, 308, &to_https),
        (Endpoint::Start, 302, &to_http),
        (Endpoint::Output, 301, &to_https),
        (Endpoint::Complete, 303, &to_http),
    ];
    for (endpoint, status, location) in faults {
        let location = Some(location.clone());
        plane.fault(FaultSpec { endpoint: Some(endpoint), status, location, ..FaultSpec::default() }).await;
    }
    let runner = runner(&proxy.url("localhost"), &ca_line(&ca_file));

    let id = plane.queue("noisy", "--lines 1").await;
    let done = plane.wait_done(&id, LIMIT).await;
    assert_eq!(status_and_code(&done), ("success", 0), "{}", runner.log());
    assert_eq!(output(&done, false), "out 0\n");
    let requests = plane.requests().await;
    let first_status = |path: &str| requests.iter().find(|r| r.path.ends_with(path)).and_then(|r| r.status);
    let met: Vec<_> = ["/heartbeat/", "/pending/", "/start/", "/output/", "/complete/"]
        .into_iter()
        .map(first_status)
        .collect();
    assert_eq!(met, [Some(307), Some(308), Some(302), Some(301), Some(303)], "each redirect was met");
    assert_eq!(
        trap.seen.connections(),
        0,
        "a redirect was followed: {:?}",
        String::from_utf8_lossy(&trap.seen.wire())
    );
    let log = runner.log();
    assert!(log.contains(&format!("a redirect to {to_http:?}, not followed")), "{log}");
    assert!(log.contains(&format!("a redirect to {to_https:?}, not followed")), "{log}");
}

/// 5. A `ca_file` that is missing, empty or not PEM (or endless) stops the
///    start with an error naming the field and the problem, before anything
///    is sent; on a reload it is refused and the running configuration (and
///    its trust) stays. So does a plain `http://` URL to a host that is not
///    loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_ca_file_is_a_config_error_at_start_and_on_reload() {
    let plane = ControlPlane::start();
    let files = tempfile::tempdir().unwrap();
    let (ca, ca_file) = ca_in(files.path());
    let proxy = TlsProxy::start(&plane.url, ca.issue(&["localhost"], Validity::Current)).await;
    let url = proxy.url("localhost");
    let missing = files.path().join("missing.pem");
    let empty = files.path().join("empty.pem");
    common::write_file(&empty, "");
    let not_pem = files.path().join("not-pem.pem");
    std::fs::write(&not_pem, b"\x30\x82\x01\x0a not a PEM file, perhaps DER\n").unwrap();
    let not_a_certificate = files.path().join("garbage.pem");
    let garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
    common::write_file(&not_a_certificate, &format!("{}{garbage}", ca.pem()));
    // Before: read line by line without end, so the start (or a reload) hung, eating memory.
    let endless = Path::new("/dev/zero").to_path_buf();
    let bad_files = [
        (&missing, "cannot read it: No such file"),
        (&empty, "no PEM certificate in it"),
        (&not_pem, "no PEM certificate in it"),
        (&not_a_certificate, "certificate 2 in it is not usable"),
        (&endless, "not a regular file"),
    ];

    for (path, problem) in bad_files {
        let mut refused = runner(&url, &ca_line(path));
        let code = refused.wait_exit(LIMIT).await;
        let log = refused.log();
        assert_eq!(code, Some(1), "{log}");
        assert!(log.contains("server.ca_file") && log.contains(&path.display().to_string()), "{log}");
        assert!(log.contains(problem), "{log}");
    }
    assert_eq!(proxy.seen.connections(), 0, "nothing was sent by a runner that did not start");

    let mut running = runner(&url, &ca_line(&ca_file));
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
    for (times, (path, problem)) in bad_files.into_iter().enumerate() {
        running.write_config_with_server(&ca_line(path), "", "");
        running.signal(nix::sys::signal::Signal::SIGHUP);
        running.wait_reload_refused(times + 1).await;
        let refusal =
            running.notifications().into_iter().rev().find(|n| n.contains("reload refused")).unwrap();
        assert!(refusal.contains("server.ca_file") && refusal.contains(problem), "{refusal}");
    }
    // Plain HTTP to a host that is not loopback: refused on reload as at start.
    let plain = "http://control.example.com:44999";
    running.write_config_for(plain, &ca_line(&ca_file), "", "");
    running.signal(nix::sys::signal::Signal::SIGHUP);
    running.wait_reload_refused(bad_files.len() + 1).await;
    let refusal = running.notifications().into_iter().rev().find(|n| n.contains("reload refused")).unwrap();
    assert!(refusal.contains("server.url") && refusal.contains("HTTPS is required"), "{refusal}");
    let mut refused = runner(plain, "");
    assert_eq!(refused.wait_exit(LIMIT).await, Some(1));
    assert!(refused.log().contains("HTTPS is required"), "{}", refused.log());
    assert!(running.is_running());
    // The old configuration, and its trust in the test CA, are still in force.
    let done = plane.wait_done(&plane.queue("noop", "").await, LIMIT).await;
    assert_eq!(status_and_code(&done).0, "success", "{}", running.log());
}
