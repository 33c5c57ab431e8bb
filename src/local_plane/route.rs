//! The operator API's endpoints, one enum for both sides: the typed client
//! builds requests from it ([`OperatorRoute::path`], [`OperatorRoute::method`])
//! and the server reads them back ([`OperatorRoute::parse`]), like
//! `protocol::route` does for the runner API.
//!
//! Unlike the runner API, a trailing slash is optional: people type these
//! paths by hand with curl.

use http::Method;

/// Where every operator-API path starts.
pub const OPERATOR_PREFIX: &str = "/api/operator/";

/// One operator-API request: the endpoint and what is done to it. An
/// execution's id is the path's text: the server answers a malformed one
/// itself (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorRoute<'a> {
    /// `POST executions`: queue a command.
    Queue,
    /// `GET executions`: every execution, oldest first.
    List,
    /// `GET executions/<id>`: one execution and its output.
    Detail(&'a str),
    /// `GET executions/<id>/signed`: the entry `/pending/` hands out for it.
    SignedEntry(&'a str),
    /// `POST executions/<id>/cancel`.
    Cancel(&'a str),
    /// `POST runner-state`: what the next heartbeats answer.
    SetRunnerState,
    /// `GET state`: what the runner last reported.
    State,
    /// `GET requests`: the runner-API request log.
    Requests,
    /// `DELETE requests`.
    ClearRequests,
    /// `POST faults`: script a misbehaviour.
    AddFault,
    /// `DELETE faults`.
    ClearFaults,
    /// `POST inject-pending`: raw entries for the next `/pending/` answer.
    InjectPending,
}

impl<'a> OperatorRoute<'a> {
    /// The route a request names, if any.
    pub fn parse(method: &Method, path: &'a str) -> Option<Self> {
        let inner = path.strip_prefix(OPERATOR_PREFIX)?;
        let inner = inner.strip_suffix('/').unwrap_or(inner);
        let segments: Vec<&str> = inner.split('/').collect();
        let route = match (method.as_str(), segments.as_slice()) {
            ("POST", ["executions"]) => Self::Queue,
            ("GET", ["executions"]) => Self::List,
            ("GET", ["executions", id]) => Self::Detail(id),
            ("GET", ["executions", id, "signed"]) => Self::SignedEntry(id),
            ("POST", ["executions", id, "cancel"]) => Self::Cancel(id),
            ("POST", ["runner-state"]) => Self::SetRunnerState,
            ("GET", ["state"]) => Self::State,
            ("GET", ["requests"]) => Self::Requests,
            ("DELETE", ["requests"]) => Self::ClearRequests,
            ("POST", ["faults"]) => Self::AddFault,
            ("DELETE", ["faults"]) => Self::ClearFaults,
            ("POST", ["inject-pending"]) => Self::InjectPending,
            _ => return None,
        };
        Some(route)
    }

    /// The path the client requests.
    pub fn path(self) -> String {
        let tail = match self {
            Self::Queue | Self::List => "executions".to_string(),
            Self::Detail(id) => format!("executions/{id}"),
            Self::SignedEntry(id) => format!("executions/{id}/signed"),
            Self::Cancel(id) => format!("executions/{id}/cancel"),
            Self::SetRunnerState => "runner-state".into(),
            Self::State => "state".into(),
            Self::Requests | Self::ClearRequests => "requests".into(),
            Self::AddFault | Self::ClearFaults => "faults".into(),
            Self::InjectPending => "inject-pending".into(),
        };
        format!("{OPERATOR_PREFIX}{tail}")
    }

    pub fn method(self) -> Method {
        match self {
            Self::List | Self::Detail(_) | Self::SignedEntry(_) | Self::State | Self::Requests => Method::GET,
            Self::ClearRequests | Self::ClearFaults => Method::DELETE,
            Self::Queue | Self::Cancel(_) | Self::SetRunnerState | Self::AddFault | Self::InjectPending => {
                Method::POST
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_parses_back_from_its_method_and_path() {
        let id = "3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b";
        let routes = [
            OperatorRoute::Queue,
            OperatorRoute::List,
            OperatorRoute::Detail(id),
            OperatorRoute::SignedEntry(id),
            OperatorRoute::Cancel(id),
            OperatorRoute::SetRunnerState,
            OperatorRoute::State,
            OperatorRoute::Requests,
            OperatorRoute::ClearRequests,
            OperatorRoute::AddFault,
            OperatorRoute::ClearFaults,
            OperatorRoute::InjectPending,
        ];
        for route in routes {
            let path = route.path();
            assert_eq!(OperatorRoute::parse(&route.method(), &path), Some(route), "{path}");
            let slashed = format!("{path}/");
            assert_eq!(OperatorRoute::parse(&route.method(), &slashed), Some(route), "{slashed}");
        }
    }

    #[test]
    fn unknown_paths_and_methods_are_no_route() {
        assert_eq!(OperatorRoute::parse(&Method::PUT, "/api/operator/executions"), None);
        assert_eq!(OperatorRoute::parse(&Method::GET, "/api/operator/executions/x/y/z"), None);
        assert_eq!(OperatorRoute::parse(&Method::GET, "/api/runner/executions"), None);
        assert_eq!(OperatorRoute::parse(&Method::GET, "/api/operator/"), None);
    }
}
