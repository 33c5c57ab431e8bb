//! The runner API's paths, one enum for both sides: the runner's client
//! builds them ([`Route::path`]) and `dccontrol` reads them
//! ([`Route::parse`]), so the two cannot drift apart.
//!
//! Paths end with a slash, as in the hosted service (a Django app); one
//! without it is unknown, which catches a runner building paths wrongly.

use http::Method;

/// Where every runner-API path starts.
pub const RUNNER_PREFIX: &str = "/api/runner/";

/// One endpoint of the runner API. An execution's id is kept as the text
/// of the path: the server answers a malformed one itself (400, not 404).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Heartbeat,
    Sync,
    Pending,
    Execution(&'a str, ExecutionAction),
}

/// What a runner does to one execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionAction {
    Start,
    Output,
    Complete,
    CancelStatus,
}

impl<'a> Route<'a> {
    /// The endpoint `path` names, if any.
    pub fn parse(path: &'a str) -> Option<Self> {
        let inner = path.strip_prefix(RUNNER_PREFIX)?.strip_suffix('/')?;
        let segments: Vec<&str> = inner.split('/').collect();
        let route = match segments.as_slice() {
            ["heartbeat"] => Self::Heartbeat,
            ["commands", "sync"] => Self::Sync,
            ["pending"] => Self::Pending,
            ["executions", id, action] => Self::Execution(id, ExecutionAction::parse(action)?),
            _ => return None,
        };
        Some(route)
    }

    /// The path the runner requests.
    pub fn path(self) -> String {
        match self {
            Self::Heartbeat => format!("{RUNNER_PREFIX}heartbeat/"),
            Self::Sync => format!("{RUNNER_PREFIX}commands/sync/"),
            Self::Pending => format!("{RUNNER_PREFIX}pending/"),
            Self::Execution(id, action) => format!("{RUNNER_PREFIX}executions/{id}/{}/", action.segment()),
        }
    }

    /// The one method the endpoint takes.
    pub fn method(self) -> Method {
        match self {
            Self::Pending | Self::Execution(_, ExecutionAction::CancelStatus) => Method::GET,
            _ => Method::POST,
        }
    }
}

impl ExecutionAction {
    const ALL: [Self; 4] = [Self::Start, Self::Output, Self::Complete, Self::CancelStatus];

    fn segment(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Output => "output",
            Self::Complete => "complete",
            Self::CancelStatus => "cancel-status",
        }
    }

    fn parse(segment: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|action| action.segment() == segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_parses_back_from_its_path() {
        let id = "3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b";
        let mut routes = vec![Route::Heartbeat, Route::Sync, Route::Pending];
        routes.extend(ExecutionAction::ALL.map(|action| Route::Execution(id, action)));
        for route in routes {
            let path = route.path();
            assert_eq!(Route::parse(&path), Some(route), "{path}");
        }
        assert_eq!(
            Route::Execution(id, ExecutionAction::CancelStatus).path(),
            format!("/api/runner/executions/{id}/cancel-status/")
        );
        assert_eq!(Route::Sync.path(), "/api/runner/commands/sync/");
    }

    #[test]
    fn paths_without_the_slash_or_with_unknown_parts_are_no_route() {
        for path in [
            "/api/runner/heartbeat",
            "/api/runner/executions/x/stop/",
            "/api/operator/heartbeat/",
            "/api/runner/",
        ] {
            assert_eq!(Route::parse(path), None, "{path}");
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(512))]

        /// Any path parses to a route or none, and a route is its path.
        #[test]
        fn any_path_is_a_route_or_none(path in "(/api/runner/)?((executions|commands|[a-z-]{0,8}|.{0,6})/?){0,4}") {
            if let Some(route) = Route::parse(&path) {
                proptest::prop_assert_eq!(route.path(), path);
            }
        }
    }
}
