//! Getting each execution's output chunks and completion to the control
//! plane in order, whatever the network does.
//!
//! Every execution has an [`super::outbox::Outbox`] whose task sends each
//! message ([`deliver`]) until the server acknowledges it, retrying with
//! backoff through timeouts, 5xx answers and outages of any length, and
//! waiting while authentication is failing (nothing is sent until a
//! heartbeat succeeds again). A retried chunk keeps its number, so the
//! server de-duplicates. Only a definitive refusal (a 4xx other than
//! 401/403/429) drops a message, with an error in the log.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::api::{CompleteRequest, ExecutionId, OutputRequest};
use super::client::{ApiError, Client};

const MAX_REDELIVERY_DELAY: Duration = Duration::from_secs(30);

/// Whether the control plane currently accepts our key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthState {
    /// Before the first heartbeat answered.
    Unknown,
    Valid,
    /// A call was refused with 401/403: only heartbeats go out until one succeeds.
    Failed,
}

/// Shared view of [`AuthState`], updated by whichever call learns something.
#[derive(Clone)]
pub struct AuthGate {
    state: Arc<watch::Sender<AuthState>>,
}

impl Default for AuthGate {
    fn default() -> Self {
        Self { state: Arc::new(watch::channel(AuthState::Unknown).0) }
    }
}

impl AuthGate {
    pub fn get(&self) -> AuthState {
        *self.state.borrow()
    }

    /// Returns whether the state changed.
    pub fn set(&self, state: AuthState) -> bool {
        self.state.send_if_modified(|current| std::mem::replace(current, state) != state)
    }

    pub fn subscribe(&self) -> watch::Receiver<AuthState> {
        self.state.subscribe()
    }

    pub async fn wait_valid(&self) {
        let mut state = self.state.subscribe();
        let _ = state.wait_for(|s| *s == AuthState::Valid).await;
    }

    /// Records what an API error says about authentication.
    pub fn observe(&self, error: &ApiError) {
        if error.is_auth() && self.set(AuthState::Failed) {
            tracing::warn!("the control plane refused our key ({error}); pausing all but heartbeats");
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Message {
    Output(OutputRequest),
    Complete(CompleteRequest),
}

/// Sends one message until the control plane acknowledges or definitively refuses it.
pub(super) async fn deliver(client: &Client, gate: &AuthGate, id: &ExecutionId, message: &Message) {
    let mut delay = Duration::from_secs(1);
    loop {
        gate.wait_valid().await;
        let result = match message {
            Message::Output(chunk) => client.output(id, chunk).await,
            Message::Complete(completion) => client.complete(id, completion).await,
        };
        let error = match result {
            Ok(()) => return,
            Err(error) => error,
        };
        gate.observe(&error);
        if error.is_auth() {
            continue; // wait for the gate to reopen
        }
        if !error.is_retryable() {
            tracing::error!(execution = %id, "the control plane refused {}: {error}; not retrying", describe(message));
            return;
        }
        tracing::warn!(execution = %id, "could not deliver {} ({error}); retrying in {delay:?}", describe(message));
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_REDELIVERY_DELAY);
    }
}

fn describe(message: &Message) -> String {
    match message {
        Message::Output(chunk) => format!("output chunk {}", chunk.chunk_number),
        Message::Complete(_) => "the completion".to_string(),
    }
}
