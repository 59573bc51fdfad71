//! Conversations: direct conversations between two users, and conversation lookups.

use confab_common::now_ms;

use crate::store::Conversation;
use crate::{GroupError, GroupService};

impl GroupService {
    /// Returns the direct conversation of `user_a` and `user_b`, creating it on first
    /// use; either order of the two users gives the same conversation.
    ///
    /// # Errors
    ///
    /// [`GroupError::SameUser`] when the two are one user, [`GroupError::NoSuchUser`]
    /// when either does not exist, or an internal error.
    pub(crate) async fn open_direct(
        &self,
        user_a: i64,
        user_b: i64,
    ) -> Result<Conversation, GroupError> {
        if user_a == user_b {
            return Err(GroupError::SameUser);
        }
        let (user_lo, user_hi) = (user_a.min(user_b), user_a.max(user_b));
        let store = &self.inner.store;
        if store.users_by_ids(&[user_lo, user_hi]).await?.len() != 2 {
            return Err(GroupError::NoSuchUser);
        }
        let conversation_id = match store.direct_conversation(user_lo, user_hi).await? {
            Some(id) => id,
            None => {
                let candidate = self.inner.ids.next_id();
                store
                    .create_direct(candidate, user_lo, user_hi, now_ms())
                    .await?
            }
        };
        store
            .conversation(conversation_id)
            .await?
            .ok_or(GroupError::Inconsistent("direct pair without conversation"))
    }

    /// Returns the conversation with this id, with its members unless it is a channel.
    ///
    /// # Errors
    ///
    /// [`GroupError::NoSuchConversation`], or an internal error.
    pub(crate) async fn get_conversation(&self, id: i64) -> Result<Conversation, GroupError> {
        self.inner
            .store
            .conversation(id)
            .await?
            .ok_or(GroupError::NoSuchConversation)
    }

    /// Returns every conversation `user_id` is a member of (direct, groups and
    /// channels), with its members unless it is a channel, ordered by id; empty for
    /// an unknown user.
    ///
    /// # Errors
    ///
    /// Internal errors only.
    pub(crate) async fn list_conversations(
        &self,
        user_id: i64,
    ) -> Result<Vec<Conversation>, GroupError> {
        self.inner.store.conversations_of(user_id).await
    }

    /// Returns those of `others` who share a direct conversation or a group with
    /// `user_id` (a channel does not count: its subscribers are an audience, not
    /// contacts), ascending. Presence is visible only to them.
    ///
    /// # Errors
    ///
    /// Internal errors only.
    pub(crate) async fn shared_with(
        &self,
        user_id: i64,
        others: &[i64],
    ) -> Result<Vec<i64>, GroupError> {
        self.inner.store.shared_with(user_id, others).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::store::ConversationKind;
    use crate::test_support::{TestDb, backend_tests};

    backend_tests!(
        open_direct_same_conversation_both_ways,
        open_direct_refuses_bad_pairs,
        list_conversations_of_member,
        get_conversation_unknown,
    );
    backend_tests!(multi_thread: open_direct_concurrent);

    /// Returns the ids of two new users of `service`.
    async fn two_users(service: &GroupService) -> (i64, i64) {
        let a = service.ensure_user("alice").await.unwrap().id;
        let b = service.ensure_user("bob").await.unwrap().id;
        (a, b)
    }

    /// Spawns `n` concurrent OpenDirect calls on one pair (in both orders) and
    /// returns the distinct conversation ids they got.
    async fn open_concurrently(service: &GroupService, a: i64, b: i64, n: usize) -> HashSet<i64> {
        let calls: Vec<_> = (0..n)
            .map(|i| {
                let service = service.clone();
                let (x, y) = if i % 2 == 0 { (a, b) } else { (b, a) };
                tokio::spawn(async move { service.open_direct(x, y).await.unwrap().id })
            })
            .collect();
        let mut ids = HashSet::new();
        for call in calls {
            ids.insert(call.await.unwrap());
        }
        ids
    }

    /// OpenDirect returns one conversation per pair, whichever user opens it, with
    /// both members in ascending order.
    async fn open_direct_same_conversation_both_ways(db: TestDb) {
        let service = db.service().await;
        let (a, b) = two_users(&service).await;
        let first = service.open_direct(b, a).await.unwrap();
        let second = service.open_direct(a, b).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(first.kind, ConversationKind::Direct);
        assert_eq!(first.member_ids, vec![a.min(b), a.max(b)]);
        assert_eq!(service.get_conversation(first.id).await.unwrap(), first);
    }

    /// OpenDirect refuses a user with themselves and unknown users.
    async fn open_direct_refuses_bad_pairs(db: TestDb) {
        let service = db.service().await;
        let (a, _) = two_users(&service).await;
        assert!(matches!(
            service.open_direct(a, a).await,
            Err(GroupError::SameUser)
        ));
        assert!(matches!(
            service.open_direct(a, 42).await,
            Err(GroupError::NoSuchUser)
        ));
        assert!(matches!(
            service.open_direct(42, a).await,
            Err(GroupError::NoSuchUser)
        ));
    }

    /// Races ten OpenDirect calls on a new pair and checks that they agree on one
    /// conversation and leave no orphan behind, also when a late loser comes after
    /// the race; returns the users and the conversation id.
    async fn race_open_direct(service: &GroupService) -> (i64, i64, i64) {
        let (a, b) = two_users(service).await;
        let ids = open_concurrently(service, a, b, 10).await;
        assert_eq!(ids.len(), 1, "{ids:?}");
        let id = *ids.iter().next().unwrap();
        let store = &service.inner.store;
        let count = "SELECT COUNT(*) FROM conversations";
        assert_eq!(store.scalar_for_tests(count, &[]).await, 1);

        // A late loser of the race: its conversation is rolled back, the winner's returned.
        let (lo, hi) = (a.min(b), a.max(b));
        let late = store
            .create_direct(service.inner.ids.next_id(), lo, hi, 0)
            .await;
        assert_eq!(late.unwrap(), id);
        assert_eq!(store.scalar_for_tests(count, &[]).await, 1);
        assert_eq!(service.list_conversations(a).await.unwrap().len(), 1);
        (a, b, id)
    }

    /// Ten concurrent OpenDirect calls on one pair agree on one conversation and
    /// leave no orphan conversation behind (in-memory SQLite: one connection, so
    /// the calls interleave between queries; PostgreSQL: separate connections).
    async fn open_direct_concurrent(db: TestDb) {
        race_open_direct(&db.service().await).await;
    }

    /// The race of `open_direct_concurrent` on a SQLite file, where the calls run on
    /// separate connections. Reopening the file keeps the data (migrations run once).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn open_direct_concurrent_on_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("group.db");
        let service = GroupService::open_sqlite(&path, 3, crate::GroupLimits::default())
            .await
            .unwrap();
        let (a, b, id) = race_open_direct(&service).await;
        drop(service);

        let reopened = GroupService::open_sqlite(&path, 3, crate::GroupLimits::default())
            .await
            .unwrap();
        assert_eq!(reopened.open_direct(a, b).await.unwrap().id, id);
    }

    /// ListConversations returns every conversation of the user with its members,
    /// and nothing for a user in none.
    async fn list_conversations_of_member(db: TestDb) {
        let service = db.service().await;
        let (a, b) = two_users(&service).await;
        let c = service.ensure_user("carol").await.unwrap().id;
        let lonely = service.ensure_user("lonely").await.unwrap().id;
        let ab = service.open_direct(a, b).await.unwrap();
        let ca = service.open_direct(c, a).await.unwrap();
        service.open_direct(b, c).await.unwrap();

        let mut expected = vec![ab, ca];
        expected.sort_by_key(|c| c.id);
        assert_eq!(service.list_conversations(a).await.unwrap(), expected);
        assert_eq!(service.list_conversations(b).await.unwrap().len(), 2);
        assert!(service.list_conversations(lonely).await.unwrap().is_empty());
        assert!(service.list_conversations(777).await.unwrap().is_empty());
    }

    /// GetConversation of an unknown id is NoSuchConversation.
    async fn get_conversation_unknown(db: TestDb) {
        let service = db.service().await;
        let result = service.get_conversation(5).await;
        assert!(matches!(result, Err(GroupError::NoSuchConversation)));
    }
}
