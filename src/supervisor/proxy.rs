//! The way out to the control plane: direct, or through the outbound HTTP
//! proxy the environment names, as curl and Python's `requests` (the
//! published runner's HTTP library) read it: `HTTPS_PROXY` (or
//! `https_proxy`), else `ALL_PROXY`, minus the hosts of `NO_PROXY`. A
//! server that may only reach the internet through a proxy runs the
//! published runner without other set-up, so it runs this one too.
//!
//! Through a proxy the runner opens a CONNECT tunnel to the control plane
//! and speaks TLS inside it, end to end: the proxy sees the host name and
//! encrypted bytes, never the API key. Plain HTTP (only ever to a host of
//! `server.allow_http_hosts`, meant to be reached directly) never goes
//! through a proxy. The parsing, `NO_PROXY` matching and the tunnel are
//! hyper-util's.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

/// The environment variables that name a proxy for HTTPS, in the order
/// they are looked at (curl's and `requests`').
const PROXY_VARIABLES: [&str; 4] = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"];

/// Why the proxy the environment names cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{variable} is not a proxy URL (http://[user:password@]host:port)")]
    Unusable { variable: &'static str },
    #[error("{variable} names a {scheme}:// proxy; only http:// proxies (HTTP CONNECT) are supported")]
    UnsupportedScheme { variable: &'static str, scheme: String },
}

impl ProxyError {
    /// The environment variable at fault.
    pub fn variable(&self) -> &'static str {
        match self {
            ProxyError::Unusable { variable } | ProxyError::UnsupportedScheme { variable, .. } => variable,
        }
    }
}

/// How the runner reaches the control plane.
#[derive(Clone, Debug)]
pub enum Egress {
    Direct,
    /// Through the proxy at `proxy` (its URL without credentials, fit for
    /// logs), named by `variable`.
    Proxy {
        proxy: Uri,
        variable: &'static str,
        tunnel: Box<Tunnel<HttpConnector>>,
    },
}

impl Egress {
    /// The way to `base_url` given this process's environment.
    pub fn from_env(base_url: &Uri, tcp: HttpConnector) -> Result<Self, ProxyError> {
        Self::from_lookup(base_url, tcp, |name| std::env::var(name).ok())
    }

    fn from_lookup(
        base_url: &Uri,
        tcp: HttpConnector,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ProxyError> {
        if base_url.scheme_str() != Some("https") {
            return Ok(Egress::Direct);
        }
        let Some((variable, value)) = PROXY_VARIABLES
            .iter()
            .find_map(|name| lookup(name).filter(|v| !v.trim().is_empty()).map(|v| (*name, v)))
        else {
            return Ok(Egress::Direct);
        };
        check_scheme(variable, &value)?;
        let no_proxy = ["NO_PROXY", "no_proxy"].iter().find_map(|name| lookup(name)).unwrap_or_default();
        let matcher = Matcher::builder().https(value.as_str()).no(no_proxy).build();
        let Some(intercept) = matcher.intercept(base_url) else {
            // Either NO_PROXY lists the host, or the value does not parse.
            return match Matcher::builder().https(value.as_str()).build().intercept(base_url) {
                Some(_) => Ok(Egress::Direct),
                None => Err(ProxyError::Unusable { variable }),
            };
        };
        let proxy = intercept.uri().clone();
        let mut tunnel = Box::new(Tunnel::new(proxy.clone(), tcp));
        if let Some(credentials) = intercept.basic_auth() {
            tunnel = Box::new(tunnel.with_auth(credentials.clone()));
        }
        Ok(Egress::Proxy { proxy, variable, tunnel })
    }

    /// For the log and for errors: how the control plane is reached.
    pub fn describe(&self) -> Option<String> {
        match self {
            Egress::Direct => None,
            Egress::Proxy { proxy, variable, .. } => {
                Some(format!("through the proxy {} ({variable})", proxy_address(proxy)))
            }
        }
    }
}

/// `http://host:port`, what a log may say of the proxy (no credentials:
/// hyper-util keeps them apart).
fn proxy_address(proxy: &Uri) -> String {
    let authority = proxy.authority().map(|a| a.as_str()).unwrap_or("?");
    format!("{}://{authority}", proxy.scheme_str().unwrap_or("http"))
}

/// hyper-util quietly ignores a proxy it cannot use (a SOCKS one, for this
/// connector); a runner that then went direct would fail in a way that
/// does not name the cause.
fn check_scheme(variable: &'static str, value: &str) -> Result<(), ProxyError> {
    match value.split_once("://") {
        None => Ok(()), // `host:port`: http, as curl assumes
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") => Ok(()),
        Some((scheme, _)) => {
            Err(ProxyError::UnsupportedScheme { variable, scheme: scheme.to_ascii_lowercase() })
        }
    }
}

/// The TCP connection under TLS: straight to the control plane, or a
/// tunnel through the proxy.
#[derive(Clone)]
pub struct EgressConnector {
    tcp: HttpConnector,
    egress: Egress,
}

impl EgressConnector {
    pub fn new(tcp: HttpConnector, egress: Egress) -> Self {
        Self { tcp, egress }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match &mut self.egress {
            Egress::Direct => self.tcp.poll_ready(cx).map_err(Into::into),
            Egress::Proxy { tunnel, .. } => tunnel.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        match &mut self.egress {
            Egress::Direct => {
                let connecting = self.tcp.call(destination);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
            Egress::Proxy { tunnel, .. } => {
                let connecting = tunnel.call(destination);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(url: &str, env: &[(&str, &str)]) -> Result<Egress, ProxyError> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        Egress::from_lookup(&url.parse().unwrap(), HttpConnector::new(), lookup)
    }

    #[test]
    fn https_goes_through_the_proxy_the_environment_names() {
        let way =
            egress("https://app.example.com", &[("HTTPS_PROXY", "http://u:secret@proxy:3128")]).unwrap();
        assert_eq!(way.describe().unwrap(), "through the proxy http://proxy:3128 (HTTPS_PROXY)");
        let way = egress("https://app.example.com", &[("all_proxy", "proxy.internal:8080")]).unwrap();
        assert_eq!(way.describe().unwrap(), "through the proxy http://proxy.internal:8080 (all_proxy)");
    }

    #[test]
    fn https_proxy_wins_over_all_proxy_and_no_proxy_goes_direct() {
        let env = [("ALL_PROXY", "http://all:1"), ("https_proxy", "http://https:2")];
        assert!(egress("https://app.example.com", &env).unwrap().describe().unwrap().contains("https:2"));
        let env = [("HTTPS_PROXY", "http://proxy:3128"), ("NO_PROXY", "localhost,.example.com")];
        assert!(egress("https://app.example.com", &env).unwrap().describe().is_none());
        assert!(egress("https://example.org", &env).unwrap().describe().is_some());
    }

    #[test]
    fn plain_http_and_no_proxy_variable_go_direct() {
        let env = [("HTTPS_PROXY", "http://proxy:3128"), ("HTTP_PROXY", "http://proxy:3128")];
        assert!(egress("http://127.0.0.1:8000", &env).unwrap().describe().is_none());
        assert!(egress("https://app.example.com", &[]).unwrap().describe().is_none());
        assert!(egress("https://app.example.com", &[("HTTPS_PROXY", "  ")]).unwrap().describe().is_none());
    }

    #[test]
    fn a_proxy_that_cannot_be_used_is_an_error_not_a_silent_direct_connection() {
        for value in ["socks5://proxy:1080", "https://proxy:443"] {
            let err = egress("https://app.example.com", &[("HTTPS_PROXY", value)]).unwrap_err();
            assert!(err.to_string().contains("only http:// proxies"), "{err}");
        }
        let err = egress("https://app.example.com", &[("HTTPS_PROXY", "http://")]).unwrap_err();
        assert!(err.to_string().contains("HTTPS_PROXY is not a proxy URL"), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(256))]

        /// Whatever the environment holds (it is outside input too): a way
        /// out or an error naming the variable, never a panic, and a
        /// password never in what may be logged.
        #[test]
        fn any_proxy_environment_is_handled(
            value in proptest::prop_oneof![
                "[ -~]{0,40}",
                "(http://)?[a-z]{1,8}@[a-z.]{1,10}(:[0-9]{1,5})?",
                "(socks5|HTTPS|ftp)://[a-z]{1,5}@[a-z]{1,5}:[0-9]{1,4}",
            ],
            no_proxy in "[ -~]{0,30}",
            password in "[a-z]{12}",
        ) {
            let with_password = value.replacen('@', &format!(":{password}@"), 1);
            for proxy in [value.as_str(), with_password.as_str()] {
                let env = [("HTTPS_PROXY", proxy), ("NO_PROXY", no_proxy.as_str())];
                match egress("https://app.example.com", &env) {
                    Ok(way) => {
                        let text = format!("{} {way:?}", way.describe().unwrap_or_default());
                        proptest::prop_assert!(!text.contains(&password), "{}", text);
                    }
                    Err(err) => {
                        proptest::prop_assert_eq!(err.variable(), "HTTPS_PROXY");
                        proptest::prop_assert!(!err.to_string().contains(&password));
                    }
                }
            }
        }
    }

    #[test]
    fn credentials_never_show() {
        let way =
            egress("https://app.example.com", &[("HTTPS_PROXY", "http://user:hunter2@proxy:3128")]).unwrap();
        let text = format!("{} {way:?}", way.describe().unwrap());
        assert!(!text.contains("hunter2"), "{text}");
    }
}
