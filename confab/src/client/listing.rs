//! `conversations` and `history`.

use std::process::ExitCode;

use confab_proto::v1::{
    ConversationKind, ConversationSummary, HistoryRequest, ListConversationsRequest, Message,
};

use super::session::Session;
use super::show;

/// The server's largest history page.
const MAX_PAGE: u32 = 200;

/// Prints every conversation, most recent first: who or which group, its id,
/// the unread count and the last message.
pub(super) async fn conversations(session: &mut Session) -> anyhow::Result<ExitCode> {
    let mut summaries = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListConversationsRequest {
            limit: MAX_PAGE,
            page_token: page_token.clone(),
        };
        let response = session
            .call("cannot list conversations", async |mut client| {
                client.list(request.clone()).await
            })
            .await?;
        summaries.extend(response.conversations);
        if response.next_page_token.is_empty() {
            break;
        }
        page_token = response.next_page_token;
    }
    if summaries.is_empty() {
        println!("no conversations yet: `confab client chat <name>` starts one");
    }
    let me = session.login();
    for summary in &summaries {
        println!("{}", summary_line(summary, me.user_id, &me.username));
    }
    Ok(ExitCode::SUCCESS)
}

/// `alice, bob (#123) 2 unread  [HH:MM:SS] alice: last text`; a group shows
/// its name: `group friends (#124)  ...`.
fn summary_line(summary: &ConversationSummary, my_id: i64, my_name: &str) -> String {
    let (id, kind, name) = summary.conversation.as_ref().map_or(
        (0, ConversationKind::Unspecified, ""),
        |conversation| {
            (
                conversation.id,
                conversation.kind(),
                conversation.name.as_str(),
            )
        },
    );
    let who = match kind {
        ConversationKind::Group => format!("group {}", show::one_line(name)),
        ConversationKind::Channel => format!("channel {}", show::one_line(name)),
        ConversationKind::Direct | ConversationKind::Unspecified => {
            let mut peers: Vec<&str> = summary
                .member_names
                .iter()
                .filter(|(id, _)| **id != my_id)
                .map(|(_, name)| name.as_str())
                .collect();
            peers.sort_unstable();
            show::one_line(&peers.join(", "))
        }
    };
    let unread = match summary.unread_count {
        0 => String::new(),
        n => format!(" {n} unread"),
    };
    let Some(last) = &summary.last_message else {
        return format!("{who} (#{id}){unread}  no messages yet");
    };
    let name_of = |user_id: i64| {
        if user_id == my_id {
            my_name.to_owned()
        } else {
            summary
                .member_names
                .get(&user_id)
                .cloned()
                .unwrap_or_else(|| format!("user {user_id}"))
        }
    };
    format!(
        "{who} (#{id}){unread}  {}",
        show::any_message_line(last, &name_of)
    )
}

/// Prints one page of the conversation with `peer`, oldest to newest, each
/// message with its id, and how to page further back.
pub(super) async fn history(
    session: &mut Session,
    peer: &str,
    limit: u32,
    before: i64,
) -> anyhow::Result<ExitCode> {
    let conversation = session.open_direct(peer).await?;
    let page = session
        .call("cannot read history", async |mut client| {
            let request = HistoryRequest {
                conversation_id: conversation.id,
                before,
                after: 0,
                limit: limit.clamp(1, MAX_PAGE),
            };
            client.history(request).await
        })
        .await?;
    let me = session.login();
    for message in page.messages.iter().rev() {
        let sender = if message.sender_id == me.user_id {
            me.username.as_str()
        } else {
            peer
        };
        println!("{}", history_line(message, sender));
    }
    match page.messages.last() {
        None => println!("no messages"),
        Some(oldest) if page.has_more => {
            println!(
                "-- older: confab client history {peer} --before {}",
                oldest.id
            );
        }
        Some(_) => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// `#<id> [HH:MM:SS] name: text`.
fn history_line(message: &Message, sender: &str) -> String {
    format!("#{} {}", message.id, show::message_line(message, sender))
}
