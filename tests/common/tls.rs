//! HTTPS on loopback for the TLS tests: a test CA and the certificates it
//! (or nobody) signs, made at test time with rcgen, and a TLS-terminating
//! proxy in front of `dccontrol` that records what an attacker on the path
//! would see: every byte on the wire, and every byte it could decrypt.
//! The control plane itself stays plain HTTP on loopback; the runner talks
//! TLS to the proxy only.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A certificate authority made for one test: nobody else trusts it.
pub struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A server certificate (with its chain) and its private key.
pub struct ServerCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// When a certificate is valid.
#[derive(Clone, Copy)]
pub enum Validity {
    /// From 1975 to 4096 (rcgen's default).
    Current,
    /// 2020 only: expired.
    Expired,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// The CA's certificate, PEM: what `server.ca_file` names.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    pub fn write_pem(&self, path: &Path) {
        super::write_file(path, &self.pem);
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[&str], validity: Validity) -> ServerCert {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("valid names");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        if let Validity::Expired = validity {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ServerCert {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }
}

impl ServerCert {
    /// A self-signed certificate for `names`, as a self-hosted control
    /// plane might use, and its PEM (what `server.ca_file` would name).
    pub fn self_signed(names: &[&str]) -> (Self, String) {
        let made =
            rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("valid names");
        let cert = ServerCert {
            chain: vec![made.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der())),
        };
        (cert, made.cert.pem())
    }
}

/// What one [`TlsProxy`] (or [`Trap`]) saw.
#[derive(Default)]
pub struct Seen {
    connections: AtomicUsize,
    handshakes: AtomicUsize,
    failures: Mutex<Vec<String>>,
    /// Every byte clients sent, as it came over the wire.
    wire: Mutex<Vec<u8>>,
    /// Every byte clients sent that the proxy could decrypt.
    plaintext: Mutex<Vec<u8>>,
    /// The first bytes of each connection.
    openings: Mutex<Vec<Vec<u8>>>,
}

impl Seen {
    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// TLS handshakes completed.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// Why each failed handshake failed, as the server side saw it.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    pub fn wire(&self) -> Vec<u8> {
        self.wire.lock().unwrap().clone()
    }

    pub fn plaintext(&self) -> Vec<u8> {
        self.plaintext.lock().unwrap().clone()
    }

    /// Whether any connection opened with something other than a TLS
    /// handshake record (content type 22, version 3.x): a plain HTTP request.
    pub fn any_opening_not_tls(&self) -> bool {
        self.openings.lock().unwrap().iter().any(|opening| !opening.starts_with(&[0x16, 0x03]))
    }

    /// Polls until `wanted` holds.
    pub async fn wait(&self, limit: Duration, what: &str, wanted: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !wanted(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {} connections, {} handshakes, failures {:?}",
                self.connections(),
                self.handshakes(),
                self.failures()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A stream that copies what is read from it into `sink`.
struct Recorded<S> {
    inner: S,
    sink: Arc<Seen>,
    plaintext: bool,
    first: bool,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            if self.plaintext {
                self.sink.plaintext.lock().unwrap().extend_from_slice(new);
            } else {
                self.sink.wire.lock().unwrap().extend_from_slice(new);
                if self.first {
                    self.sink.openings.lock().unwrap().push(new[..new.len().min(8)].to_vec());
                }
            }
            self.first = false;
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TLS-terminating proxy on 127.0.0.1 (a free port) in front of `upstream`
/// (a `dccontrol` URL, `http://127.0.0.1:PORT`), serving `cert`.
pub struct TlsProxy {
    pub port: u16,
    pub seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    pub async fn start(upstream: &str, cert: ServerCert) -> Self {
        let upstream: SocketAddr =
            upstream.strip_prefix("http://").expect("a plain HTTP upstream").parse().unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(cert.chain, cert.key)
            .expect("a usable certificate and key");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    seen.connections.fetch_add(1, Ordering::SeqCst);
                    let (seen, acceptor) = (seen.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        let wire = Recorded { inner: tcp, sink: seen.clone(), plaintext: false, first: true };
                        let tls = match acceptor.accept(wire).await {
                            Ok(tls) => tls,
                            Err(error) => {
                                seen.failures.lock().unwrap().push(error.to_string());
                                return;
                            }
                        };
                        seen.handshakes.fetch_add(1, Ordering::SeqCst);
                        let mut client =
                            Recorded { inner: tls, sink: seen.clone(), plaintext: true, first: false };
                        let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    });
                }
            }
        });
        Self { port, seen, task }
    }

    /// `https://<host>:<port>`.
    pub fn url(&self, host: &str) -> String {
        format!("https://{host}:{}", self.port)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener that only records: where a redirect points, to show nothing
/// ever follows it.
pub struct Trap {
    pub port: u16,
    pub seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Trap {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    seen.connections.fetch_add(1, Ordering::SeqCst);
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let mut wire = Recorded { inner: tcp, sink: seen, plaintext: false, first: true };
                        let mut sink = Vec::new();
                        let _ = wire.read_to_end(&mut sink).await;
                    });
                }
            }
        });
        Self { port, seen, task }
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `haystack` contains `needle`, ignoring ASCII case.
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    let needle = needle.to_ascii_lowercase();
    haystack.to_ascii_lowercase().windows(needle.len()).any(|window| window == needle.as_bytes())
}
