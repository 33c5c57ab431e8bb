//! Getting each execution's output chunks and completion to the control
//! plane in order, whatever the network does.
//!
//! Every execution has an [`super::outbox::Outbox`] whose task sends each
//! message ([`deliver`]) until the server acknowledges it, retrying with
//! [`Backoff`] through timeouts, 5xx, 3xx and cut answers and outages of any
//! length, and
//! waiting while authentication is failing (nothing is sent until a
//! heartbeat succeeds again). A retried chunk keeps its number, so the
//! server de-duplicates. Only a definitive refusal (a 4xx other than
//! 401/403/408/425/429) drops a message, with an error in the log.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::client::{ApiError, Client};
use crate::backoff::Backoff;
use crate::protocol::api::{CompleteRequest, ExecutionId, OutputRequest};

/// The first retry comes soon (most failures are a single odd answer);
/// later ones double up to the maximum.
const FIRST_REDELIVERY_DELAY: Duration = Duration::from_millis(100);
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
        crate::health::metrics().set_authenticated(state == AuthState::Valid);
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

/// Sends one message until it is acknowledged or definitively refused.
/// The client makes one attempt per call; the waits are here, and only here.
pub(super) async fn deliver(client: &Client, gate: &AuthGate, id: &ExecutionId, message: &Message) {
    let weight = message.weight();
    crate::health::metrics().message_queued(weight);
    deliver_until_settled(client, gate, id, message).await;
    crate::health::metrics().message_done(weight);
}

async fn deliver_until_settled(client: &Client, gate: &AuthGate, id: &ExecutionId, message: &Message) {
    let mut backoff = Backoff::exponential(FIRST_REDELIVERY_DELAY, MAX_REDELIVERY_DELAY);
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
        if error.is_refusal() {
            tracing::error!(
                "the control plane refused {}: {error}; dropped, not retrying",
                describe(message)
            );
            return;
        }
        let delay = backoff.next_delay(error.retry_after());
        tracing::warn!("could not deliver {} ({error}); retrying in {delay:?}", describe(message));
        tokio::time::sleep(delay).await;
    }
}

impl Message {
    /// Roughly what the message weighs on the wire (for the backlog metric).
    fn weight(&self) -> usize {
        match self {
            Message::Output(chunk) => 64 + chunk.segments.iter().map(|s| 32 + s.content.len()).sum::<usize>(),
            Message::Complete(_) => 64,
        }
    }
}

fn describe(message: &Message) -> String {
    match message {
        Message::Output(chunk) => format!("output chunk {}", chunk.chunk_number),
        Message::Complete(_) => "the completion".to_string(),
    }
}
