//! An outbound HTTP proxy on loopback, as a company network puts between
//! its servers and the internet: it opens CONNECT tunnels (only for the
//! right `Proxy-Authorization`, when it wants one) and records what it was
//! asked and every byte the client sent through each tunnel.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One CONNECT request the proxy received.
#[derive(Clone, Debug)]
pub struct Asked {
    /// `host:port`, as the client wrote it.
    pub target: String,
    pub authorization: Option<String>,
    /// Whether the tunnel was opened.
    pub opened: bool,
    /// What the client sent through the tunnel.
    pub sent: Vec<u8>,
}

pub struct EgressProxy {
    pub port: u16,
    asked: Arc<Mutex<Vec<Asked>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EgressProxy {
    /// `wanted`: the `Proxy-Authorization` value to insist on, if any.
    pub async fn start(wanted: Option<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let asked = asked.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(serve(client, wanted.clone(), asked.clone()));
                }
            }
        });
        Self { port, asked, task }
    }

    /// `http://127.0.0.1:<port>`, with `credentials` (`user:password`,
    /// already percent-encoded) if given.
    pub fn url(&self, credentials: Option<&str>) -> String {
        match credentials {
            Some(credentials) => format!("http://{credentials}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    pub fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut client: TcpStream, wanted: Option<String>, asked: Arc<Mutex<Vec<Asked>>>) {
    let Some(head) = read_head(&mut client).await else { return };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let authorization = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, value)| value.trim().to_string());
    let target = match request_line.split(' ').collect::<Vec<_>>()[..] {
        ["CONNECT", target, _] => target.to_string(),
        _ => {
            let _ = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n").await;
            return;
        }
    };
    let allowed = wanted.is_none() || authorization == wanted;
    let index = {
        let mut asked = asked.lock().unwrap();
        asked.push(Asked { target: target.clone(), authorization, opened: allowed, sent: Vec::new() });
        asked.len() - 1
    };
    if !allowed {
        let refusal =
            "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\n\
                       Content-Length: 0\r\n\r\n";
        let _ = client.write_all(refusal.as_bytes()).await;
        return;
    }
    let address: SocketAddr = target.replace("localhost", "127.0.0.1").parse().expect("host:port");
    let Ok(server) = TcpStream::connect(address).await else { return };
    if client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_err() {
        return;
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut buffer = [0u8; 16 * 1024];
        while let Ok(read @ 1..) = client_read.read(&mut buffer).await {
            asked.lock().unwrap()[index].sent.extend_from_slice(&buffer[..read]);
            if server_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

/// The request head, up to its blank line (at most 8 KiB).
async fn read_head(client: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || client.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).ok()
}
