//! Tests of groups and channels: creation, membership changes, roles, metadata,
//! versions, limits and concurrency.

use std::collections::HashSet;

use super::*;
use crate::GroupLimits;
use crate::groups::MetadataUpdate;
use crate::test_support::{TestDb, backend_tests, on_postgres};

/// Returns the ids of `n` new users named `{prefix}{i}`.
async fn users(service: &GroupService, prefix: &str, n: usize) -> Vec<i64> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(
            service
                .ensure_user(&format!("{prefix}{i}"))
                .await
                .unwrap()
                .id,
        );
    }
    ids
}

fn named(name: &str) -> Metadata {
    Metadata {
        name: name.into(),
        ..Metadata::default()
    }
}

/// Creates a group of `owner` and `members`; returns its conversation.
async fn group(service: &GroupService, owner: i64, members: &[i64]) -> Conversation {
    service
        .create_conversation(ConversationKind::Group, owner, named("team"), members)
        .await
        .unwrap()
        .conversation
}

/// Creates a channel owned by `owner`; returns its conversation.
async fn channel(service: &GroupService, owner: i64) -> Conversation {
    service
        .create_conversation(ConversationKind::Channel, owner, named("news"), &[])
        .await
        .unwrap()
        .conversation
}

async fn role_of(service: &GroupService, conversation_id: i64, user_id: i64) -> Role {
    service
        .get_member(conversation_id, user_id)
        .await
        .unwrap()
        .role
}

/// Returns the number of rows in `members` for the conversation, to check the
/// stored `member_count` against.
async fn counted_members(service: &GroupService, conversation_id: i64) -> u32 {
    let sql = "SELECT COUNT(*) FROM members WHERE conversation_id = $1";
    let count = service
        .inner
        .store
        .scalar_for_tests(sql, &[conversation_id])
        .await;
    u32::try_from(count).unwrap()
}

fn small_limits(max_group_size: u32, max_channel_size: u32) -> GroupLimits {
    GroupLimits {
        max_group_size,
        max_channel_size,
    }
}

backend_tests!(
    create_group,
    create_channel,
    create_refuses_invalid_input,
    add_members_rights_and_idempotence,
    remove_member_rules,
    leave_hands_over_ownership,
    join_channel_not_group,
    set_role_owner_only,
    update_metadata_partial_and_noop,
    get_and_list_members_with_paging,
    direct_refuses_every_mutation,
    version_rises_by_one_per_change,
    group_of_1024_in_one_call,
    size_limits_at_max_and_beyond,
);

/// CreateConversation of a group: the creator is owner, the others members
/// (duplicates and the creator ignored), the name trimmed, version 1, and the
/// notice Created by the creator.
async fn create_group(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 3).await;
    let (owner, a, b) = (ids[0], ids[1], ids[2]);
    let created = service
        .create_conversation(
            ConversationKind::Group,
            owner,
            Metadata {
                name: "  Team  ".into(),
                topic: "plans".into(),
                avatar_url: "https://example.com/a.png".into(),
            },
            &[b, a, b, owner],
        )
        .await
        .unwrap();
    let conversation = &created.conversation;
    assert_eq!(conversation.kind, ConversationKind::Group);
    let mut expected = vec![owner, a, b];
    expected.sort_unstable();
    assert_eq!(conversation.member_ids, expected);
    assert_eq!(conversation.member_count, 3);
    assert_eq!(conversation.version, 1);
    assert_eq!(conversation.metadata.name, "Team");
    assert_eq!(conversation.metadata.topic, "plans");
    assert_eq!(
        created.notice,
        Some(Notice {
            actor_id: owner,
            kind: NoticeKind::Created
        })
    );
    assert!(created.removed_user_ids.is_empty());
    assert_eq!(role_of(&service, conversation.id, owner).await, Role::Owner);
    assert_eq!(role_of(&service, conversation.id, a).await, Role::Member);
    let stored = service.get_conversation(conversation.id).await.unwrap();
    assert_eq!(&stored, conversation);
    assert_eq!(counted_members(&service, conversation.id).await, 3);
}

/// CreateConversation of a channel: the owner alone, member ids never listed
/// (also not by ListConversations), and initial members refused.
async fn create_channel(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 2).await;
    let created = channel(&service, ids[0]).await;
    assert_eq!(created.kind, ConversationKind::Channel);
    assert!(created.member_ids.is_empty());
    assert_eq!(created.member_count, 1);
    assert_eq!(created.version, 1);
    assert_eq!(role_of(&service, created.id, ids[0]).await, Role::Owner);

    let listed = service.list_conversations(ids[0]).await.unwrap();
    assert_eq!(listed, vec![created]);

    let with_members = service
        .create_conversation(ConversationKind::Channel, ids[0], named("x"), &[ids[1]])
        .await;
    assert!(matches!(with_members, Err(GroupError::ChannelMembers)));
}

/// CreateConversation refuses bad names, topics, avatar URLs and kinds, and
/// unknown members or creators.
async fn create_refuses_invalid_input(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 2).await;
    let creator = ids[0];
    let create = |kind, metadata: Metadata, members: Vec<i64>| {
        let service = service.clone();
        async move {
            service
                .create_conversation(kind, creator, metadata, &members)
                .await
        }
    };
    let group = ConversationKind::Group;
    for name in ["", "   ", "a\u{7}b", "new\nline", &"x".repeat(101)] {
        let result = create(group, named(name), vec![]).await;
        assert!(
            matches!(result, Err(GroupError::InvalidName(_))),
            "{name:?}"
        );
    }
    let longest = format!(" {} ", "é".repeat(100));
    assert!(create(group, named(&longest), vec![]).await.is_ok());

    let topic = |topic: String| Metadata {
        topic,
        ..named("n")
    };
    let result = create(group, topic("t".repeat(501)), vec![]).await;
    assert!(matches!(result, Err(GroupError::InvalidTopic)));
    assert!(create(group, topic("t".repeat(500)), vec![]).await.is_ok());

    let avatar = |avatar_url: &str| Metadata {
        avatar_url: avatar_url.into(),
        ..named("n")
    };
    let too_long = format!("https://example.com/{}", "a".repeat(2029));
    assert_eq!(too_long.len(), 2049);
    for url in [
        "ftp://example.com/a.png",
        "javascript:alert(1)",
        "https://",
        "https:///path",
        "example.com/a.png",
        "https://exa mple.com",
        &too_long,
    ] {
        let result = create(group, avatar(url), vec![]).await;
        assert!(matches!(result, Err(GroupError::InvalidAvatarUrl)), "{url}");
    }
    for url in [
        "",
        "http://a",
        "HTTPS://example.com/a.png",
        &too_long[..2048],
    ] {
        assert!(create(group, avatar(url), vec![]).await.is_ok(), "{url}");
    }

    let direct = create(ConversationKind::Direct, named("n"), vec![]).await;
    assert!(matches!(direct, Err(GroupError::InvalidKind)));
    let unknown = create(group, named("n"), vec![ids[1], 42]).await;
    assert!(matches!(unknown, Err(GroupError::NoSuchUser)));
    let unknown_creator = service
        .create_conversation(group, 42, named("n"), &[ids[1]])
        .await;
    assert!(matches!(unknown_creator, Err(GroupError::NoSuchUser)));
}

/// The size limits count the owner: a group or channel reaches exactly its
/// maximum, and one more member is refused with RESOURCE_EXHAUSTED's message.
async fn size_limits_at_max_and_beyond(db: TestDb) {
    let service = db.service_with(small_limits(4, 3)).await;
    let ids = users(&service, "user", 6).await;
    let too_big = service
        .create_conversation(ConversationKind::Group, ids[0], named("g"), &ids[1..5])
        .await
        .unwrap_err();
    assert_eq!(too_big.to_string(), "a group holds at most 4 members");
    let full = group(&service, ids[0], &ids[1..4]).await;
    assert_eq!(full.member_count, 4);
    let add = service.add_members(full.id, ids[0], &[ids[4]]).await;
    assert!(matches!(
        add,
        Err(GroupError::TooManyMembers {
            kind: "group",
            max: 4
        })
    ));
    // Re-adding members of a full group is still a harmless no-op.
    let again = service.add_members(full.id, ids[0], &ids[1..4]).await;
    assert_eq!(again.unwrap().notice, None);

    let news = channel(&service, ids[0]).await;
    service.join(news.id, ids[1]).await.unwrap();
    service.join(news.id, ids[2]).await.unwrap();
    let refused = service.join(news.id, ids[3]).await.unwrap_err();
    assert_eq!(refused.to_string(), "a channel holds at most 3 members");
    let add = service.add_members(news.id, ids[0], &[ids[3]]).await;
    assert!(matches!(add, Err(GroupError::TooManyMembers { .. })));
    assert_eq!(
        service
            .get_conversation(news.id)
            .await
            .unwrap()
            .member_count,
        3
    );
}

/// AddMembers: admins and the owner add; a plain member is refused; a
/// non-member gets the very answer of an unknown conversation; a re-add changes
/// nothing; unknown users are refused.
async fn add_members_rights_and_idempotence(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 6).await;
    let (owner, admin, member, outsider) = (ids[0], ids[1], ids[2], ids[3]);
    let team = group(&service, owner, &[admin, member]).await;
    service
        .set_role(team.id, owner, admin, Role::Admin)
        .await
        .unwrap();

    let added = service
        .add_members(team.id, admin, &[ids[4]])
        .await
        .unwrap();
    assert_eq!(
        added.notice,
        Some(Notice {
            actor_id: admin,
            kind: NoticeKind::MembersAdded(vec![ids[4]])
        })
    );
    assert_eq!(added.conversation.version, 3);
    assert!(added.conversation.member_ids.contains(&ids[4]));

    let by_member = service.add_members(team.id, member, &[ids[5]]).await;
    assert!(matches!(by_member, Err(GroupError::Forbidden(_))));

    let by_outsider = service
        .add_members(team.id, outsider, &[ids[5]])
        .await
        .unwrap_err();
    let unknown = service
        .add_members(777, outsider, &[ids[5]])
        .await
        .unwrap_err();
    assert!(matches!(by_outsider, GroupError::NoSuchConversation));
    assert_eq!(by_outsider.to_string(), unknown.to_string());
    assert_eq!(by_outsider.code(), unknown.code());

    let again = service
        .add_members(team.id, owner, &[ids[4], admin, owner])
        .await
        .unwrap();
    assert_eq!(again.notice, None);
    assert_eq!(again.conversation.version, 3);
    assert_eq!(
        again.conversation,
        service.get_conversation(team.id).await.unwrap()
    );

    let unknown_user = service.add_members(team.id, owner, &[ids[5], 42]).await;
    assert!(matches!(unknown_user, Err(GroupError::NoSuchUser)));
    assert_eq!(service.get_conversation(team.id).await.unwrap().version, 3);
    assert_eq!(counted_members(&service, team.id).await, 4);
}

/// RemoveMember of someone else: nobody removes the owner, only the owner
/// removes admins, members remove nobody, non-members are NotAMember; a removal
/// reports the user in `removed_user_ids`.
async fn remove_member_rules(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 6).await;
    let (owner, admin, admin2, member, member2, outsider) =
        (ids[0], ids[1], ids[2], ids[3], ids[4], ids[5]);
    let team = group(&service, owner, &[admin, admin2, member, member2]).await;
    for user in [admin, admin2] {
        service
            .set_role(team.id, owner, user, Role::Admin)
            .await
            .unwrap();
    }
    let forbidden = |result: Result<MembershipChange, GroupError>| {
        matches!(result, Err(GroupError::Forbidden(_)))
    };
    assert!(forbidden(
        service.remove_member(team.id, admin, owner).await
    ));
    assert!(forbidden(
        service.remove_member(team.id, admin, admin2).await
    ));
    assert!(forbidden(
        service.remove_member(team.id, member, member2).await
    ));
    let absent = service.remove_member(team.id, admin, outsider).await;
    assert!(matches!(absent, Err(GroupError::NotAMember)));
    let by_outsider = service.remove_member(team.id, outsider, member).await;
    assert!(matches!(by_outsider, Err(GroupError::NoSuchConversation)));

    let removed = service.remove_member(team.id, admin, member).await.unwrap();
    assert_eq!(
        removed.notice,
        Some(Notice {
            actor_id: admin,
            kind: NoticeKind::MemberRemoved(member)
        })
    );
    assert_eq!(removed.removed_user_ids, vec![member]);
    assert!(!removed.conversation.member_ids.contains(&member));
    assert_eq!(removed.conversation.member_count, 4);

    let admin_removed = service.remove_member(team.id, owner, admin2).await.unwrap();
    assert_eq!(admin_removed.removed_user_ids, vec![admin2]);
    assert_eq!(counted_members(&service, team.id).await, 3);
}

/// Leaving: an owner hands ownership to the longest-standing admin, then (with no
/// admin) to the longest-standing member; the last member leaves an empty
/// conversation behind.
async fn leave_hands_over_ownership(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 5).await;
    let (owner, early_admin, late_admin, early_member, late_member) =
        (ids[0], ids[1], ids[2], ids[3], ids[4]);
    let team = group(
        &service,
        owner,
        &[early_admin, late_admin, early_member, late_member],
    )
    .await;
    for user in [early_admin, late_admin] {
        service
            .set_role(team.id, owner, user, Role::Admin)
            .await
            .unwrap();
    }
    // Join times against the id order, so that seniority, not id, decides.
    for (user, joined_at_ms) in [
        (early_admin, 300),
        (late_admin, 400),
        (early_member, 100),
        (late_member, 200),
    ] {
        let sql = "UPDATE members SET joined_at_ms = $1 WHERE user_id = $2";
        let store = &service.inner.store;
        assert_eq!(store.execute_for_tests(sql, &[joined_at_ms, user]).await, 1);
    }

    let left = service.remove_member(team.id, owner, owner).await.unwrap();
    assert_eq!(
        left.notice,
        Some(Notice {
            actor_id: owner,
            kind: NoticeKind::MemberLeft
        })
    );
    assert_eq!(left.removed_user_ids, vec![owner]);
    assert_eq!(role_of(&service, team.id, early_admin).await, Role::Owner);
    assert_eq!(role_of(&service, team.id, late_admin).await, Role::Admin);

    service
        .remove_member(team.id, early_admin, early_admin)
        .await
        .unwrap();
    assert_eq!(role_of(&service, team.id, late_admin).await, Role::Owner);
    service
        .remove_member(team.id, late_admin, late_admin)
        .await
        .unwrap();
    // No admin left: the longest-standing member.
    assert_eq!(role_of(&service, team.id, early_member).await, Role::Owner);
    assert_eq!(role_of(&service, team.id, late_member).await, Role::Member);

    // A plain member leaves without any hand-over.
    let member_left = service
        .remove_member(team.id, late_member, late_member)
        .await
        .unwrap();
    assert_eq!(member_left.conversation.member_ids, vec![early_member]);
    let last = service
        .remove_member(team.id, early_member, early_member)
        .await
        .unwrap();
    assert!(last.conversation.member_ids.is_empty());
    assert_eq!(last.conversation.member_count, 0);
    let empty = service.get_conversation(team.id).await.unwrap();
    assert_eq!(empty.member_count, 0);
    assert_eq!(empty.version, last.conversation.version);
}

/// Join: channels take anyone, once (a second join changes nothing); groups are
/// joined by invitation only (a stranger gets the same not-found as for an unknown
/// id); unknown and foreign direct conversations are not found, a member's own
/// direct conversation is fixed.
async fn join_channel_not_group(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 3).await;
    let news = channel(&service, ids[0]).await;
    let joined = service.join(news.id, ids[1]).await.unwrap();
    assert_eq!(
        joined.notice,
        Some(Notice {
            actor_id: ids[1],
            kind: NoticeKind::MembersAdded(vec![ids[1]])
        })
    );
    assert_eq!(joined.conversation.member_count, 2);
    assert!(joined.conversation.member_ids.is_empty());
    assert_eq!(joined.conversation.version, 2);
    let again = service.join(news.id, ids[1]).await.unwrap();
    assert_eq!(again.notice, None);
    assert_eq!(again.conversation.version, 2);
    assert_eq!(role_of(&service, news.id, ids[1]).await, Role::Member);
    let unknown_user = service.join(news.id, 42).await;
    assert!(matches!(unknown_user, Err(GroupError::NoSuchUser)));

    let team = group(&service, ids[0], &[ids[1]]).await;
    let refused = service.join(team.id, ids[1]).await.unwrap_err();
    assert!(matches!(refused, GroupError::Forbidden(_)));
    assert_eq!(refused.to_string(), "groups are joined by invitation");
    // A stranger learns nothing, not even that the group exists.
    assert!(matches!(
        service.join(team.id, ids[2]).await,
        Err(GroupError::NoSuchConversation)
    ));
    assert!(matches!(
        service.join(777, ids[1]).await,
        Err(GroupError::NoSuchConversation)
    ));

    let direct = service.open_direct(ids[0], ids[1]).await.unwrap();
    assert!(matches!(
        service.join(direct.id, ids[2]).await,
        Err(GroupError::NoSuchConversation)
    ));
    assert!(matches!(
        service.join(direct.id, ids[0]).await,
        Err(GroupError::DirectIsFixed)
    ));
}

/// SetRole: the owner alone promotes and demotes; the same role again changes
/// nothing; owner is no role to set, and the owner's own role is fixed.
async fn set_role_owner_only(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 4).await;
    let (owner, a, b, outsider) = (ids[0], ids[1], ids[2], ids[3]);
    let team = group(&service, owner, &[a, b]).await;

    let promoted = service
        .set_role(team.id, owner, a, Role::Admin)
        .await
        .unwrap();
    assert_eq!(
        promoted.notice,
        Some(Notice {
            actor_id: owner,
            kind: NoticeKind::RoleChanged {
                user_id: a,
                role: Role::Admin
            }
        })
    );
    assert_eq!(promoted.conversation.version, 2);
    assert_eq!(role_of(&service, team.id, a).await, Role::Admin);

    let by_admin = service.set_role(team.id, a, b, Role::Admin).await;
    assert!(matches!(by_admin, Err(GroupError::Forbidden(_))));
    let same = service
        .set_role(team.id, owner, a, Role::Admin)
        .await
        .unwrap();
    assert_eq!(same.notice, None);
    assert_eq!(same.conversation.version, 2);
    let to_owner = service.set_role(team.id, owner, a, Role::Owner).await;
    assert!(matches!(to_owner, Err(GroupError::InvalidRole)));
    let own = service.set_role(team.id, owner, owner, Role::Member).await;
    assert!(matches!(own, Err(GroupError::OwnerRoleFixed)));
    let absent = service
        .set_role(team.id, owner, outsider, Role::Admin)
        .await;
    assert!(matches!(absent, Err(GroupError::NotAMember)));

    let demoted = service
        .set_role(team.id, owner, a, Role::Member)
        .await
        .unwrap();
    assert_eq!(demoted.conversation.version, 3);
    assert_eq!(role_of(&service, team.id, a).await, Role::Member);
}

/// UpdateConversation: admins only; set fields change, unset fields keep their
/// value; the notice carries all values after the change; an update that
/// changes nothing has no notice and keeps the version; bad values are refused.
async fn update_metadata_partial_and_noop(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 3).await;
    let (owner, member, outsider) = (ids[0], ids[1], ids[2]);
    let team = group(&service, owner, &[member]).await;

    let topic_only = MetadataUpdate {
        topic: Some("new topic".into()),
        ..MetadataUpdate::default()
    };
    let updated = service
        .update_conversation(team.id, owner, topic_only.clone())
        .await
        .unwrap();
    let after = Metadata {
        name: "team".into(),
        topic: "new topic".into(),
        avatar_url: String::new(),
    };
    assert_eq!(updated.conversation.metadata, after);
    assert_eq!(updated.conversation.version, 2);
    assert_eq!(
        updated.notice,
        Some(Notice {
            actor_id: owner,
            kind: NoticeKind::MetadataChanged(after.clone())
        })
    );

    let same = service
        .update_conversation(team.id, owner, topic_only)
        .await
        .unwrap();
    assert_eq!(same.notice, None);
    assert_eq!(same.conversation.version, 2);
    let nothing = service
        .update_conversation(team.id, owner, MetadataUpdate::default())
        .await
        .unwrap();
    assert_eq!(nothing.notice, None);

    let rename = MetadataUpdate {
        name: Some(" renamed ".into()),
        avatar_url: Some("https://example.com/b.png".into()),
        ..MetadataUpdate::default()
    };
    let by_member = service
        .update_conversation(team.id, member, rename.clone())
        .await;
    assert!(matches!(by_member, Err(GroupError::Forbidden(_))));
    let by_outsider = service
        .update_conversation(team.id, outsider, rename.clone())
        .await;
    assert!(matches!(by_outsider, Err(GroupError::NoSuchConversation)));
    let renamed = service
        .update_conversation(team.id, owner, rename)
        .await
        .unwrap();
    assert_eq!(renamed.conversation.metadata.name, "renamed");
    assert_eq!(renamed.conversation.metadata.topic, "new topic");
    assert_eq!(renamed.conversation.version, 3);

    let bad = MetadataUpdate {
        name: Some(String::new()),
        ..MetadataUpdate::default()
    };
    let refused = service.update_conversation(team.id, owner, bad).await;
    assert!(matches!(refused, Err(GroupError::InvalidName(_))));
    assert_eq!(service.get_conversation(team.id).await.unwrap().version, 3);
}

/// GetMember answers a member's role and join time, NotAMember otherwise;
/// ListMembers pages by ascending user id with `has_more`.
async fn get_and_list_members_with_paging(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 7).await;
    let team = group(&service, ids[0], &ids[1..]).await;
    let owner = service.get_member(team.id, ids[0]).await.unwrap();
    assert_eq!(owner.role, Role::Owner);
    assert_eq!(owner.joined_at_ms, team.created_at_ms);
    let outsider = service.ensure_user("outsider").await.unwrap().id;
    assert!(matches!(
        service.get_member(team.id, outsider).await,
        Err(GroupError::NotAMember)
    ));
    assert!(matches!(
        service.get_member(777, ids[0]).await,
        Err(GroupError::NotAMember)
    ));

    let mut sorted = ids.clone();
    sorted.sort_unstable();
    let (first, more) = service.list_members(team.id, 0, 3).await.unwrap();
    assert!(more);
    let (second, more) = service
        .list_members(team.id, first[2].user_id, 3)
        .await
        .unwrap();
    assert!(more);
    let (third, more) = service
        .list_members(team.id, second[2].user_id, 3)
        .await
        .unwrap();
    assert!(!more);
    let paged: Vec<i64> = [first, second, third]
        .concat()
        .iter()
        .map(|m| m.user_id)
        .collect();
    assert_eq!(paged, sorted);

    let (all, more) = service.list_members(team.id, 0, 0).await.unwrap();
    assert_eq!((all.len(), more), (7, false));
    assert!(matches!(
        service.list_members(777, 0, 0).await,
        Err(GroupError::NoSuchConversation)
    ));
}

/// A direct conversation refuses every mutation to its members, and is not
/// found by anyone else.
async fn direct_refuses_every_mutation(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 3).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let direct = service.open_direct(a, b).await.unwrap();
    let id = direct.id;
    let fixed = |result: Result<MembershipChange, GroupError>| {
        matches!(result, Err(GroupError::DirectIsFixed))
    };
    assert!(fixed(service.add_members(id, a, &[c]).await));
    assert!(fixed(service.remove_member(id, a, b).await));
    assert!(fixed(service.remove_member(id, a, a).await));
    assert!(fixed(service.join(id, a).await));
    assert!(fixed(service.set_role(id, a, b, Role::Admin).await));
    let rename = MetadataUpdate {
        name: Some("x".into()),
        ..MetadataUpdate::default()
    };
    assert!(fixed(service.update_conversation(id, a, rename).await));
    assert!(matches!(
        service.add_members(id, c, &[c]).await,
        Err(GroupError::NoSuchConversation)
    ));
    let after = service.get_conversation(id).await.unwrap();
    assert_eq!(after, direct);
    assert_eq!((after.version, after.member_count), (1, 2));
}

/// The version starts at 1 and rises by exactly one per real change, whatever
/// the change; refused and no-op calls leave it.
async fn version_rises_by_one_per_change(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 4).await;
    let (owner, a, b, c) = (ids[0], ids[1], ids[2], ids[3]);
    let id = group(&service, owner, &[a]).await.id;
    let rename = MetadataUpdate {
        name: Some("renamed".into()),
        ..MetadataUpdate::default()
    };
    let changes = [
        service.add_members(id, owner, &[b, c]).await,
        service.set_role(id, owner, a, Role::Admin).await,
        service.update_conversation(id, a, rename).await,
        service.remove_member(id, a, b).await,
        service.remove_member(id, c, c).await,
    ];
    let versions: Vec<i64> = changes
        .into_iter()
        .map(|change| change.unwrap().conversation.version)
        .collect();
    assert_eq!(versions, vec![2, 3, 4, 5, 6]);
    assert!(service.remove_member(id, owner, owner).await.is_ok());
    assert!(service.add_members(id, b, &[c]).await.is_err());
    assert_eq!(service.get_conversation(id).await.unwrap().version, 7);
}

/// Ten concurrent AddMembers on separate connections, each adding distinct users
/// to a group near its limit (`small_limits(20, 100)`): exactly as many succeed as
/// fit, the group ends at its limit, and each success took its own version.
async fn concurrent_adds_respect_the_limit(service: GroupService) {
    let ids = users(&service, "user", 30).await;
    let owner = ids[0];
    // 10 members; room for 10 more: 5 of the 10 adds of 2 users fit.
    let id = group(&service, owner, &ids[1..10]).await.id;
    let calls: Vec<_> = ids[10..30]
        .chunks(2)
        .map(|pair| {
            let service = service.clone();
            let pair = pair.to_vec();
            tokio::spawn(async move { service.add_members(id, owner, &pair).await })
        })
        .collect();
    let mut versions = HashSet::new();
    let mut refused = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(change) => assert!(versions.insert(change.conversation.version)),
            Err(GroupError::TooManyMembers { .. }) => refused += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!(versions, (2..=6).collect());
    assert_eq!(refused, 5);
    let after = service.get_conversation(id).await.unwrap();
    assert_eq!((after.member_count, after.version), (20, 6));
    assert_eq!(counted_members(&service, id).await, 20);
}

/// `concurrent_adds_respect_the_limit` on a SQLite file, where the calls run on
/// separate connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_adds_respect_the_limit_on_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("group.db");
    let service = GroupService::open_sqlite(&path, 3, small_limits(20, 100))
        .await
        .unwrap();
    concurrent_adds_respect_the_limit(service).await;
}

/// `concurrent_adds_respect_the_limit` on PostgreSQL, where the calls run on
/// separate connections under READ COMMITTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_adds_respect_the_limit_on_postgres() {
    on_postgres(|db| async move {
        let service = db.service_with(small_limits(20, 100)).await;
        concurrent_adds_respect_the_limit(service).await;
    })
    .await;
}

/// A group of 1,024 members (the default limit) is created in one call, in one
/// transaction; ListMembers caps a page at 1000.
async fn group_of_1024_in_one_call(db: TestDb) {
    let service = db.service().await;
    let ids = users(&service, "user", 1024).await;
    let started = std::time::Instant::now();
    let created = service
        .create_conversation(ConversationKind::Group, ids[0], named("all"), &ids[1..])
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(created.conversation.member_count, 1024);
    assert_eq!(created.conversation.member_ids.len(), 1024);
    assert_eq!(
        counted_members(&service, created.conversation.id).await,
        1024
    );
    // Generous, for slow debug builds on shared machines: one INSERT per member
    // in autocommit would take far longer on a file.
    assert!(elapsed.as_secs() < 5, "{elapsed:?}");

    let (page, more) = service
        .list_members(created.conversation.id, 0, 5000)
        .await
        .unwrap();
    assert_eq!((page.len(), more), (1000, true));
    let extra = service.ensure_user("extra").await.unwrap().id;
    let full = service
        .add_members(created.conversation.id, ids[0], &[extra])
        .await;
    assert!(matches!(full, Err(GroupError::TooManyMembers { .. })));
}
