//! How the client prints messages, times and errors.

use confab_proto::v1::{Message, Role, notice};
use tonic::{Code, Status};

/// Returns `[HH:MM:SS]` of a server timestamp, in UTC.
pub(super) fn clock(ms_since_epoch: i64) -> String {
    format!("[{}]", time_of_day(ms_since_epoch))
}

/// Returns `HH:MM:SS` of a server timestamp, in UTC.
pub(super) fn time_of_day(ms_since_epoch: i64) -> String {
    let seconds_of_day = ms_since_epoch.div_euclid(1000).rem_euclid(86_400);
    let (hours, minutes, seconds) = (
        seconds_of_day / 3600,
        seconds_of_day % 3600 / 60,
        seconds_of_day % 60,
    );
    format!("{hours:02}:{minutes:02}:{seconds:02}")
}

/// Returns `[HH:MM:SS] name: text` on one line.
pub(super) fn message_line(message: &Message, sender_name: &str) -> String {
    format!(
        "{} {}: {}",
        clock(message.sent_at_ms),
        one_line(sender_name),
        one_line(&message.text)
    )
}

/// Returns `[HH:MM:SS] * alice added bob` for a notice, else [`message_line`];
/// `name_of` names users.
pub(super) fn any_message_line(message: &Message, name_of: &dyn Fn(i64) -> String) -> String {
    let Some(notice) = &message.notice else {
        return message_line(message, &name_of(message.sender_id));
    };
    let actor = name_of(notice.actor_id);
    let what = match &notice.kind {
        Some(notice::Kind::Created(_)) => format!("{actor} created the conversation"),
        Some(notice::Kind::MembersAdded(added)) => {
            let names: Vec<String> = added.user_ids.iter().map(|id| name_of(*id)).collect();
            format!("{actor} added {}", names.join(", "))
        }
        Some(notice::Kind::MemberRemoved(removed)) => {
            format!("{actor} removed {}", name_of(removed.user_id))
        }
        Some(notice::Kind::MemberLeft(_)) => format!("{actor} left"),
        Some(notice::Kind::MetadataChanged(changed)) => format!(
            "{actor} changed the name to {:?}, the topic to {:?}",
            changed.name, changed.topic
        ),
        Some(notice::Kind::RoleChanged(changed)) => {
            let role = match changed.role() {
                Role::Owner => "the owner",
                Role::Admin => "an admin",
                Role::Member | Role::Unspecified => "a member",
            };
            format!("{actor} made {} {role}", name_of(changed.user_id))
        }
        None => format!("{actor} changed something"),
    };
    format!("{} * {}", clock(message.sent_at_ms), one_line(&what))
}

/// Replaces control characters (newlines, terminal escapes) with spaces, so
/// that what others send stays one plain line.
pub(super) fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Turns a gRPC status into one readable error line.
pub(super) fn status_error(what: &str, status: &Status) -> anyhow::Error {
    let detail = match (status.code(), status.message()) {
        (Code::Unavailable, message) => format!("server unavailable: {message}"),
        (Code::Unauthenticated, "") => "not authenticated (run `confab client login`)".to_owned(),
        (code, "") => format!("{code:?}"),
        (_, message) => message.to_owned(),
    };
    anyhow::anyhow!("{what}: {}", one_line(&detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_utc_time_of_day() {
        assert_eq!(clock(0), "[00:00:00]");
        assert_eq!(clock(((13 * 3600 + 4 * 60 + 5) * 1000) + 999), "[13:04:05]");
        assert_eq!(clock(-1000), "[23:59:59]");
    }

    #[test]
    fn control_characters_become_spaces() {
        assert_eq!(one_line("a\nb\u{1b}[2Jc"), "a b [2Jc");
    }
}
