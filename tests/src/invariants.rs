//! The invariants of DESIGN.md section 13, checked over what a load recorded
//! (every ack, every event each device received, per connection) and the
//! history read back through `Conversations.History`:
//!
//! 1. every acknowledged message is in history, exactly once (nothing lost);
//! 2. every member device received every message of its conversations, and
//!    after deduplication by `seq` each exactly once;
//! 3. within a conversation every device saw the messages in increasing id
//!    order: as each device saw all of them, the same order everywhere;
//! 4. each device's sequence has no gap, a `seq` never carries two different
//!    events, and every reconnection resumed from the cursor the device had.
//!
//! The records are plain data, so the checker is tested on hand-made ones.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use anyhow::{Result, bail};

/// How many violations a failure lists.
const SHOWN_VIOLATIONS: usize = 30;

/// One event a device received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Its place in the user's sequence (never 0: ephemeral events are not recorded).
    pub seq: u64,
    /// The message's conversation; 0 for an event that carries no message.
    pub conversation_id: i64,
    /// The message id; 0 for an event that carries no message.
    pub message_id: i64,
    /// When the log accepted the message (server clock, ms since the Unix epoch).
    pub sent_at_ms: i64,
    /// When the device read it, since the load started.
    pub at: Duration,
}

/// One connection of a device, from its `Hello` to its end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// The gateway it was made to.
    pub gateway: usize,
    /// The cursor the `Hello` carried.
    pub cursor: u64,
    /// Every event with a seq, in the order it arrived (catch-up first).
    pub deliveries: Vec<Delivery>,
}

/// A send the server acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// Where it was sent.
    pub conversation_id: i64,
    /// The id the ack carried.
    pub message_id: i64,
    /// The ack said the message was stored already (a retry).
    pub duplicate: bool,
}

/// Everything one device did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Whose device.
    pub user_id: i64,
    /// Its `device_id`.
    pub device_id: String,
    /// Its connections, in order.
    pub sessions: Vec<Session>,
    /// Its acknowledged sends, in order (a retry acknowledged twice appears twice).
    pub acks: Vec<Ack>,
    /// Connection attempts that failed (refused, or no `SyncComplete`).
    pub failed_connects: usize,
    /// Sends answered with an error frame, or not answered in time.
    pub send_failures: usize,
}

/// A conversation of the load and its members (unchanged during the load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRecord {
    /// Its id.
    pub id: i64,
    /// The user ids of its members.
    pub members: Vec<i64>,
}

/// What a load recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recording {
    /// Every conversation the load used.
    pub conversations: Vec<ConversationRecord>,
    /// Every device.
    pub devices: Vec<DeviceRecord>,
}

/// One message as `History` returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryMessage {
    /// Its id.
    pub id: i64,
    /// Its sender.
    pub sender_id: i64,
    /// The sender's idempotency key (empty for notices).
    pub client_msg_id: String,
}

/// History per conversation id, every page concatenated as returned (newest first).
pub type History = BTreeMap<i64, Vec<HistoryMessage>>;

/// The counts a check went through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Conversations checked.
    pub conversations: usize,
    /// Devices checked.
    pub devices: usize,
    /// Connections over all devices.
    pub sessions: usize,
    /// Distinct acknowledged messages.
    pub messages_acknowledged: usize,
    /// Acks that answered a retry of a stored message (`duplicate: true`).
    pub retries_deduplicated: usize,
    /// Messages in history (notices included).
    pub history_messages: usize,
    /// Events delivered, after deduplication by seq, over all devices.
    pub events_delivered: usize,
    /// Events a device received again (a seq it had processed already).
    pub duplicates_seen: usize,
    /// Acknowledged messages missing from history.
    pub lost: usize,
    /// (device, message) pairs a member device never received.
    pub missed: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "checked {} conversations, {} devices ({} connections): {} messages acknowledged \
             ({} retries deduplicated), {} in history, {} events delivered, {} duplicates \
             seen by clients before dedup, lost {}, missed {}",
            self.conversations,
            self.devices,
            self.sessions,
            self.messages_acknowledged,
            self.retries_deduplicated,
            self.history_messages,
            self.events_delivered,
            self.duplicates_seen,
            self.lost,
            self.missed,
        )
    }
}

/// Checks every invariant and returns the counts.
///
/// # Errors
///
/// Fails with the violations found (the first [`SHOWN_VIOLATIONS`] of them)
/// and the counts.
pub fn check(recording: &Recording, history: &History) -> Result<Report> {
    let mut violations = Vec::new();
    let mut report = Report {
        conversations: recording.conversations.len(),
        devices: recording.devices.len(),
        ..Report::default()
    };
    let stored = check_history(history, &mut report, &mut violations);
    check_acks(recording, &stored, &mut report, &mut violations);
    for device in &recording.devices {
        check_device(recording, history, device, &mut report, &mut violations);
    }
    if violations.is_empty() {
        return Ok(report);
    }
    let shown = violations
        .iter()
        .take(SHOWN_VIOLATIONS)
        .map(|violation| format!("  - {violation}"))
        .collect::<Vec<_>>()
        .join("\n");
    bail!(
        "{} invariant violations ({report}):\n{shown}",
        violations.len()
    )
}

/// Where a stored message is.
#[derive(Debug, Clone, Copy)]
struct Stored<'a> {
    conversation_id: i64,
    message: &'a HistoryMessage,
}

/// Checks that history is newest first without repeats, and indexes it by id.
fn check_history<'a>(
    history: &'a History,
    report: &mut Report,
    violations: &mut Vec<String>,
) -> HashMap<i64, Stored<'a>> {
    let mut stored = HashMap::new();
    for (&conversation_id, messages) in history {
        report.history_messages += messages.len();
        for pair in messages.windows(2) {
            if pair[0].id <= pair[1].id {
                violations.push(format!(
                    "history of {conversation_id} is not newest first: {} before {}",
                    pair[0].id, pair[1].id
                ));
            }
        }
        for message in messages {
            let entry = Stored {
                conversation_id,
                message,
            };
            if stored.insert(message.id, entry).is_some() {
                violations.push(format!(
                    "message {} is in history more than once (conversation {conversation_id})",
                    message.id
                ));
            }
        }
    }
    stored
}

/// Checks that every acknowledged message is stored, once, as acknowledged,
/// and that retries and distinct sends map to the right ids.
fn check_acks(
    recording: &Recording,
    stored: &HashMap<i64, Stored<'_>>,
    report: &mut Report,
    violations: &mut Vec<String>,
) {
    // (sender, client_msg_id) -> message id, over all devices of a user.
    let mut by_key: HashMap<(i64, &str), i64> = HashMap::new();
    let mut by_id: HashMap<i64, (i64, &str)> = HashMap::new();
    for device in &recording.devices {
        for ack in &device.acks {
            report.retries_deduplicated += usize::from(ack.duplicate);
            let key = (device.user_id, ack.client_msg_id.as_str());
            if let Some(&earlier) = by_key.get(&key)
                && earlier != ack.message_id
            {
                violations.push(format!(
                    "{}: {} was acknowledged as {earlier} and then as {}",
                    device.device_id, ack.client_msg_id, ack.message_id
                ));
            }
            by_key.insert(key, ack.message_id);
            if let Some(&other) = by_id.get(&ack.message_id)
                && other != key
            {
                violations.push(format!(
                    "message {} acknowledges two sends: {other:?} and {key:?}",
                    ack.message_id
                ));
            }
            by_id.insert(ack.message_id, key);
        }
    }
    report.messages_acknowledged = by_id.len();
    let acked_in: HashMap<i64, i64> = recording
        .devices
        .iter()
        .flat_map(|device| &device.acks)
        .map(|ack| (ack.message_id, ack.conversation_id))
        .collect();
    for (&message_id, &(sender_id, client_msg_id)) in &by_id {
        let Some(found) = stored.get(&message_id) else {
            report.lost += 1;
            violations.push(format!(
                "acknowledged message {message_id} ({client_msg_id}) is not in history: lost"
            ));
            continue;
        };
        let conversation_id = acked_in.get(&message_id).copied().unwrap_or_default();
        if found.conversation_id != conversation_id
            || found.message.sender_id != sender_id
            || found.message.client_msg_id != client_msg_id
        {
            violations.push(format!(
                "message {message_id} was acknowledged as {client_msg_id} of {sender_id} in \
                 {conversation_id}, history has {:?} in {}",
                found.message, found.conversation_id
            ));
        }
    }
}

/// Checks one device's sequence, resumes, completeness and order.
fn check_device(
    recording: &Recording,
    history: &History,
    device: &DeviceRecord,
    report: &mut Report,
    violations: &mut Vec<String>,
) {
    let name = &device.device_id;
    report.sessions += device.sessions.len();
    // seq -> (conversation, message): the device's view after dedup by seq.
    let mut events: BTreeMap<u64, (i64, i64)> = BTreeMap::new();
    let mut cursor = 0;
    for (number, session) in device.sessions.iter().enumerate() {
        if session.cursor != cursor {
            violations.push(format!(
                "{name}: connection {number} resumed from {} after processing up to {cursor}",
                session.cursor
            ));
            cursor = session.cursor;
        }
        for delivery in &session.deliveries {
            let event = (delivery.conversation_id, delivery.message_id);
            if delivery.seq <= cursor {
                report.duplicates_seen += 1;
                if let Some(&first) = events.get(&delivery.seq)
                    && first != event
                {
                    violations.push(format!(
                        "{name}: seq {} carried {first:?}, then {event:?}",
                        delivery.seq
                    ));
                }
                continue;
            }
            if delivery.seq != cursor + 1 {
                violations.push(format!(
                    "{name}: gap in connection {number}: seq {} after {cursor}",
                    delivery.seq
                ));
                // The device resumes from its cursor, as a client does.
                break;
            }
            if let Some(first) = events.insert(delivery.seq, event)
                && first != event
            {
                violations.push(format!(
                    "{name}: seq {} carried {first:?}, then {event:?}",
                    delivery.seq
                ));
            }
            cursor = delivery.seq;
        }
    }
    report.events_delivered += events.len();

    // conversation -> message ids in seq order.
    let mut seen: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut seq_of: HashMap<i64, u64> = HashMap::new();
    for (&seq, &(conversation_id, message_id)) in &events {
        if message_id == 0 {
            continue;
        }
        if let Some(first) = seq_of.insert(message_id, seq) {
            violations.push(format!(
                "{name}: message {message_id} delivered at seq {first} and again at {seq}"
            ));
            continue;
        }
        seen.entry(conversation_id).or_default().push(message_id);
    }
    for (&conversation_id, ids) in &seen {
        for pair in ids.windows(2) {
            if pair[0] >= pair[1] {
                violations.push(format!(
                    "{name}: order inversion in {conversation_id}: {} before {}",
                    pair[0], pair[1]
                ));
            }
        }
    }
    for conversation in &recording.conversations {
        let stored = history.get(&conversation.id).map_or(&[][..], Vec::as_slice);
        let received: BTreeSet<i64> = seen
            .get(&conversation.id)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default();
        let stored_ids: BTreeSet<i64> = stored.iter().map(|message| message.id).collect();
        if !conversation.members.contains(&device.user_id) {
            if !received.is_empty() {
                violations.push(format!(
                    "{name}: received {} messages of {}, which its user is not in",
                    received.len(),
                    conversation.id
                ));
            }
            continue;
        }
        let missed: Vec<i64> = stored_ids.difference(&received).copied().collect();
        if !missed.is_empty() {
            report.missed += missed.len();
            violations.push(format!(
                "{name}: never received {} messages of {} (first {:?})",
                missed.len(),
                conversation.id,
                &missed[..missed.len().min(5)]
            ));
        }
        let unknown: Vec<i64> = received.difference(&stored_ids).copied().collect();
        if !unknown.is_empty() {
            violations.push(format!(
                "{name}: received {} messages of {} that history does not have (first {:?})",
                unknown.len(),
                conversation.id,
                &unknown[..unknown.len().min(5)]
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: i64 = 1;
    const BOB: i64 = 2;
    const CONVERSATION: i64 = 100;

    fn delivery(seq: u64, message_id: i64) -> Delivery {
        Delivery {
            seq,
            conversation_id: CONVERSATION,
            message_id,
            sent_at_ms: 0,
            at: Duration::ZERO,
        }
    }

    fn session(cursor: u64, messages: &[(u64, i64)]) -> Session {
        Session {
            gateway: 0,
            cursor,
            deliveries: messages
                .iter()
                .map(|&(seq, id)| delivery(seq, id))
                .collect(),
        }
    }

    fn ack(client_msg_id: &str, message_id: i64) -> Ack {
        Ack {
            client_msg_id: client_msg_id.to_owned(),
            conversation_id: CONVERSATION,
            message_id,
            duplicate: false,
        }
    }

    fn stored(id: i64, sender_id: i64, client_msg_id: &str) -> HistoryMessage {
        HistoryMessage {
            id,
            sender_id,
            client_msg_id: client_msg_id.to_owned(),
        }
    }

    /// Alice sent 10 and 30, Bob 20; Alice's device got all three over two
    /// connections (with one duplicate at the resume), Bob's in one.
    fn sound() -> (Recording, History) {
        let alice = DeviceRecord {
            user_id: ALICE,
            device_id: "alice-0".to_owned(),
            sessions: vec![
                session(0, &[(1, 10), (2, 20)]),
                session(2, &[(2, 20), (3, 30)]),
            ],
            acks: vec![ack("a-1", 10), ack("a-2", 30)],
            ..DeviceRecord::default()
        };
        let bob = DeviceRecord {
            user_id: BOB,
            device_id: "bob-0".to_owned(),
            sessions: vec![session(0, &[(1, 10), (2, 20), (3, 30)])],
            acks: vec![ack("b-1", 20)],
            ..DeviceRecord::default()
        };
        let recording = Recording {
            conversations: vec![ConversationRecord {
                id: CONVERSATION,
                members: vec![ALICE, BOB],
            }],
            devices: vec![alice, bob],
        };
        let history = History::from([(
            CONVERSATION,
            vec![
                stored(30, ALICE, "a-2"),
                stored(20, BOB, "b-1"),
                stored(10, ALICE, "a-1"),
            ],
        )]);
        (recording, history)
    }

    fn violation(recording: &Recording, history: &History) -> String {
        match check(recording, history) {
            Ok(report) => panic!("the check passed: {report}"),
            Err(error) => format!("{error:#}"),
        }
    }

    /// A sound recording passes, with the counts it went through.
    #[test]
    fn a_sound_recording_passes() -> Result<()> {
        let (recording, history) = sound();
        let report = check(&recording, &history)?;
        assert_eq!(report.messages_acknowledged, 3);
        assert_eq!(report.history_messages, 3);
        assert_eq!(report.events_delivered, 6);
        assert_eq!(report.duplicates_seen, 1);
        assert_eq!(report.sessions, 3);
        assert_eq!((report.lost, report.missed), (0, 0));
        Ok(())
    }

    /// A retry acknowledged with the original id is fine, and counted.
    #[test]
    fn a_deduplicated_retry_passes() -> Result<()> {
        let (mut recording, history) = sound();
        let mut retry = ack("a-2", 30);
        retry.duplicate = true;
        recording.devices[0].acks.push(retry);
        let report = check(&recording, &history)?;
        assert_eq!(report.retries_deduplicated, 1);
        assert_eq!(report.messages_acknowledged, 3);
        Ok(())
    }

    /// A seq skipped on a connection is a gap.
    #[test]
    fn a_gap_fails() {
        let (mut recording, history) = sound();
        recording.devices[1].sessions = vec![session(0, &[(1, 10), (3, 30)])];
        let error = violation(&recording, &history);
        assert!(
            error.contains("gap in connection 0: seq 3 after 1"),
            "{error}"
        );
    }

    /// An acknowledged message that history lacks is lost.
    #[test]
    fn a_lost_message_fails() {
        let (mut recording, history) = sound();
        recording.devices[1].acks.push(ack("b-2", 40));
        let error = violation(&recording, &history);
        assert!(
            error.contains("acknowledged message 40 (b-2) is not in history: lost"),
            "{error}"
        );
        assert!(error.contains("lost 1"), "{error}");
    }

    /// A message that history returns twice is a duplicate.
    #[test]
    fn a_duplicate_in_history_fails() {
        let (recording, mut history) = sound();
        let page = history.get_mut(&CONVERSATION).expect("the conversation");
        page.insert(1, stored(20, BOB, "b-1"));
        let error = violation(&recording, &history);
        assert!(
            error.contains("message 20 is in history more than once"),
            "{error}"
        );
    }

    /// Two messages of one conversation seen in decreasing id order are an
    /// order inversion.
    #[test]
    fn an_order_inversion_fails() {
        let (mut recording, history) = sound();
        recording.devices[1].sessions = vec![session(0, &[(1, 20), (2, 10), (3, 30)])];
        let error = violation(&recording, &history);
        assert!(
            error.contains("order inversion in 100: 20 before 10"),
            "{error}"
        );
    }

    /// A member device that never got a message missed it, even without a gap
    /// in its sequence.
    #[test]
    fn a_missed_message_fails() {
        let (mut recording, history) = sound();
        recording.devices[1].sessions = vec![session(0, &[(1, 10), (2, 30)])];
        let error = violation(&recording, &history);
        assert!(
            error.contains("bob-0: never received 1 messages of 100 (first [20])"),
            "{error}"
        );
    }

    /// Resuming from another cursor than the one processed, and a seq reused
    /// for another message, are violations.
    #[test]
    fn a_bad_resume_and_a_reused_seq_fail() {
        let (mut recording, history) = sound();
        recording.devices[0].sessions[1] = session(1, &[(2, 30), (3, 30)]);
        let error = violation(&recording, &history);
        assert!(
            error.contains("resumed from 1 after processing up to 2"),
            "{error}"
        );
        assert!(
            error.contains("seq 2 carried (100, 20), then (100, 30)"),
            "{error}"
        );
    }
}
