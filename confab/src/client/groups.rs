//! `group ...`: create groups, manage members, show a group and its receipts.

use std::process::ExitCode;

use confab_proto::v1::{
    AddMembersRequest, Conversation, CreateGroupRequest, GetConversationRequest, HistoryRequest,
    LeaveRequest, ListMembersRequest, Member, ReceiptsRequest, RemoveMemberRequest, Role,
};

use super::session::Session;
use super::show;

/// Largest page of `ListMembers`.
const MEMBERS_PAGE: u32 = 1000;

/// How many recent messages `group info` looks through for one of yours.
const INFO_SCAN: u32 = 100;

/// What `confab client group` does.
#[derive(Debug, clap::Subcommand)]
pub(super) enum GroupCommand {
    /// Creates a group with you as owner.
    Create {
        /// The group's name.
        name: String,
        /// Other members, by username, comma-separated.
        #[arg(long, value_delimiter = ',')]
        members: Vec<String>,
        /// What the group is about.
        #[arg(long, default_value = "")]
        topic: String,
    },
    /// Adds users to a group (admins only).
    Add {
        /// The group's id.
        id: i64,
        /// Usernames.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Removes a user from a group (admins only).
    Remove {
        /// The group's id.
        id: i64,
        /// Username.
        user: String,
    },
    /// Leaves a group.
    Leave {
        /// The group's id.
        id: i64,
    },
    /// Lists a group's members and their roles.
    Members {
        /// The group's id.
        id: i64,
    },
    /// Shows a group and how far your last message in it got.
    Info {
        /// The group's id.
        id: i64,
    },
}

/// Runs one `group` command.
pub(super) async fn run(session: &mut Session, command: GroupCommand) -> anyhow::Result<ExitCode> {
    match command {
        GroupCommand::Create {
            name,
            members,
            topic,
        } => create(session, name, &members, topic).await,
        GroupCommand::Add { id, users } => add(session, id, &users).await,
        GroupCommand::Remove { id, user } => remove(session, id, &user).await,
        GroupCommand::Leave { id } => {
            session
                .call("cannot leave", async |mut client| {
                    client
                        .leave(LeaveRequest {
                            conversation_id: id,
                        })
                        .await
                })
                .await?;
            println!("left #{id}");
            Ok(ExitCode::SUCCESS)
        }
        GroupCommand::Members { id } => members(session, id).await,
        GroupCommand::Info { id } => info(session, id).await,
    }
}

async fn create(
    session: &mut Session,
    name: String,
    members: &[String],
    topic: String,
) -> anyhow::Result<ExitCode> {
    let mut member_ids = Vec::with_capacity(members.len());
    for member in members.iter().filter(|member| !member.trim().is_empty()) {
        member_ids.push(session.user_id(member.trim()).await?);
    }
    let request = CreateGroupRequest {
        name,
        member_ids,
        topic,
        avatar_url: String::new(),
    };
    let group = session
        .call("cannot create the group", async |mut client| {
            client.create_group(request.clone()).await
        })
        .await?;
    println!(
        "created group {} #{} with {} members: `confab client chat --conversation {}`",
        show::one_line(&group.name),
        group.id,
        group.member_count,
        group.id
    );
    Ok(ExitCode::SUCCESS)
}

async fn add(session: &mut Session, id: i64, users: &[String]) -> anyhow::Result<ExitCode> {
    let mut user_ids = Vec::with_capacity(users.len());
    for user in users {
        user_ids.push(session.user_id(user).await?);
    }
    let request = AddMembersRequest {
        conversation_id: id,
        user_ids,
    };
    let group = session
        .call("cannot add", async |mut client| {
            client.add_members(request.clone()).await
        })
        .await?;
    println!(
        "added {} to #{id}: {} members",
        users.join(", "),
        group.member_count
    );
    Ok(ExitCode::SUCCESS)
}

async fn remove(session: &mut Session, id: i64, user: &str) -> anyhow::Result<ExitCode> {
    let user_id = session.user_id(user).await?;
    let request = RemoveMemberRequest {
        conversation_id: id,
        user_id,
    };
    let group = session
        .call("cannot remove", async |mut client| {
            client.remove_member(request).await
        })
        .await?;
    println!("removed {user} from #{id}: {} members", group.member_count);
    Ok(ExitCode::SUCCESS)
}

async fn members(session: &mut Session, id: i64) -> anyhow::Result<ExitCode> {
    let mut all: Vec<Member> = Vec::new();
    loop {
        let request = ListMembersRequest {
            conversation_id: id,
            after_user_id: all.last().map_or(0, |member| member.user_id),
            limit: MEMBERS_PAGE,
        };
        let page = session
            .call("cannot list members", async |mut client| {
                client.list_members(request).await
            })
            .await?;
        all.extend(page.members);
        if !page.has_more {
            break;
        }
    }
    if all.iter().any(|member| !session.knows(member.user_id)) {
        session.learn_names().await?;
    }
    for member in &all {
        let role = match member.role() {
            Role::Owner => " (owner)",
            Role::Admin => " (admin)",
            Role::Member | Role::Unspecified => "",
        };
        println!("{}{role}", show::one_line(&session.name_of(member.user_id)));
    }
    Ok(ExitCode::SUCCESS)
}

/// Returns the conversation `id` (members only).
pub(super) async fn get(session: &mut Session, id: i64) -> anyhow::Result<Conversation> {
    session
        .call(&format!("cannot open #{id}"), async |mut client| {
            client
                .get(GetConversationRequest {
                    conversation_id: id,
                })
                .await
        })
        .await
}

async fn info(session: &mut Session, id: i64) -> anyhow::Result<ExitCode> {
    let group = get(session, id).await?;
    println!("{} #{}", show::one_line(&group.name), group.id);
    if !group.topic.is_empty() {
        println!("topic: {}", show::one_line(&group.topic));
    }
    println!("{} members", group.member_count);
    let request = HistoryRequest {
        conversation_id: id,
        before: 0,
        after: 0,
        limit: INFO_SCAN,
    };
    let page = session
        .call("cannot read history", async |mut client| {
            client.history(request).await
        })
        .await?;
    let me = session.login().user_id;
    let Some(last) = page
        .messages
        .iter()
        .find(|message| message.sender_id == me && message.notice.is_none())
    else {
        println!("no recent message of yours");
        return Ok(ExitCode::SUCCESS);
    };
    let request = ReceiptsRequest {
        conversation_id: id,
        message_id: last.id,
        per_member: false,
    };
    let receipts = session
        .call("cannot read receipts", async |mut client| {
            client.receipts(request).await
        })
        .await?;
    println!(
        "your last message #{} {:?}: delivered to {} of {}, read by {}",
        last.id,
        show::one_line(&last.text),
        receipts.delivered_count,
        receipts.member_count,
        receipts.read_count
    );
    Ok(ExitCode::SUCCESS)
}
