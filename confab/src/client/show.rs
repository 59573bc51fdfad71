//! How the client prints messages, times and errors.

use confab_proto::v1::Message;
use tonic::{Code, Status};

/// Returns `[HH:MM:SS]` of a server timestamp, in UTC.
pub(super) fn clock(ms_since_epoch: i64) -> String {
    let seconds_of_day = ms_since_epoch.div_euclid(1000).rem_euclid(86_400);
    let (hours, minutes, seconds) = (
        seconds_of_day / 3600,
        seconds_of_day % 3600 / 60,
        seconds_of_day % 60,
    );
    format!("[{hours:02}:{minutes:02}:{seconds:02}]")
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
