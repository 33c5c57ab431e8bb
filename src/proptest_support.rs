//! What the property tests share: their configuration and byte mutations.
//!
//! The properties throw arbitrary and mutated input at every decoder of
//! outside input (the worker's frames, the control plane's answers, the
//! files of the state directory, `dc.toml`): none may panic, whatever it is
//! given (docs/security.md, "no panic is reachable from any input").

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config;

/// `cases` cases per property (the suite's time budget), and no regression
/// files written into `src/`: each panic found has a unit test of its own.
pub fn config(cases: u32) -> Config {
    Config { failure_persistence: None, ..Config::with_cases(cases) }
}

/// One change to a byte string, where a torn write, a flipped bit or a
/// hostile peer would make it.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Cut everything from here on (a torn write).
    Truncate(Index),
    /// Flip one bit.
    FlipBit(Index, u8),
    /// Replace one byte.
    SetByte(Index, u8),
    /// Insert bytes.
    Insert(Index, Vec<u8>),
    /// Remove a run of bytes.
    Remove(Index, u8),
    /// Write a little-endian u32 (a length field) from an interesting set.
    SetU32(Index, u32),
}

/// Values that break careless length arithmetic.
pub fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(u32::MAX),
        Just(u32::MAX - 1),
        Just(i32::MAX as u32),
        Just(1 << 31),
        Just(16 * 1024 * 1024),
        Just(16 * 1024 * 1024 + 1),
        Just(4 * 1024 * 1024 + 1),
        any::<u32>(),
    ]
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
        (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::SetByte(at, byte)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
        (any::<Index>(), 1u8..16).prop_map(|(at, len)| Mutation::Remove(at, len)),
        (any::<Index>(), interesting_u32()).prop_map(|(at, value)| Mutation::SetU32(at, value)),
    ]
}

/// One to four mutations.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..5)
}

/// `bytes` with `mutations` applied in turn.
pub fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let len = bytes.len();
        match mutation {
            Mutation::Truncate(at) => bytes.truncate(at.index(len + 1)),
            Mutation::Insert(at, inserted) => {
                let at = at.index(len + 1);
                bytes.splice(at..at, inserted.iter().copied());
            }
            _ if len == 0 => {}
            Mutation::FlipBit(at, bit) => bytes[at.index(len)] ^= 1 << bit,
            Mutation::SetByte(at, byte) => bytes[at.index(len)] = *byte,
            Mutation::Remove(at, run) => {
                let at = at.index(len);
                bytes.drain(at..(at + usize::from(*run)).min(len));
            }
            Mutation::SetU32(at, value) => {
                let at = at.index(len);
                for (slot, byte) in bytes[at..].iter_mut().zip(value.to_le_bytes()) {
                    *slot = byte;
                }
            }
        }
    }
    bytes
}

/// Any JSON value, nested a few levels: what a hostile control plane may
/// put where an answer was expected.
pub fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        // The strings the runner looks at: ids, states, base64.
        Just(Value::String("3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b".into())),
        Just(Value::String("suspended".into())),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(json_key(), inner, 0..8)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Object keys: mostly the fields of the runner API's answers.
fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(
            &[
                "ok",
                "commands_in_sync",
                "pending_executions",
                "runner_state",
                "suspension_reason",
                "synced_count",
                "commands_hash",
                "executions",
                "id",
                "command",
                "args",
                "timeout",
                "use_metadata_only_mode",
                "issued_at",
                "signature",
                "cancel_requested",
                "force_kill",
                "detail",
                "error",
            ][..]
        )
        .prop_map(String::from),
        ".{0,8}",
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn mutations_apply_to_bytes_of_any_length(len in 0usize..12, changes in mutations()) {
            mutate(vec![0; len], &changes);
        }
    }
}
