//! History paging.

use super::*;

/// History pages newest first via `before`, bounds with `after`, and `has_more` is right.
#[tokio::test]
async fn history_pagination() -> Result<()> {
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let mut alice_client = server.conversations(&alice).await?;
    let mut bob_client = server.conversations(&bob).await?;
    let mut sent = Vec::new();
    for n in 0..120 {
        let request = SendMessage {
            conversation_id: conversation,
            client_msg_id: format!("m-{n}"),
            text: format!("message {n}"),
        };
        let client = if n % 3 == 0 {
            &mut bob_client
        } else {
            &mut alice_client
        };
        sent.push(client.send(request).await?.into_inner().message_id);
    }
    assert!(
        sent.windows(2).all(|w| w[0] < w[1]),
        "ids increase in send order"
    );

    let page1 = server.history(&alice, conversation, 0, 0, 50).await?;
    let page2 = server
        .history(&alice, conversation, page1.messages[49].id, 0, 50)
        .await?;
    let page3 = server
        .history(&bob, conversation, page2.messages[49].id, 0, 50)
        .await?;
    let newest_first: Vec<i64> = sent.iter().rev().copied().collect();
    let ids = |page: &confab_proto::v1::HistoryResponse| {
        page.messages.iter().map(|m| m.id).collect::<Vec<_>>()
    };
    assert_eq!(ids(&page1), newest_first[..50]);
    assert!(page1.has_more);
    assert_eq!(ids(&page2), newest_first[50..100]);
    assert!(page2.has_more);
    assert_eq!(ids(&page3), newest_first[100..]);
    assert!(!page3.has_more, "the oldest page has no more");
    assert_eq!(page1.messages[0].text, "message 119");

    // `after` bounds from below: the 50 messages after the 70th, and nothing older in range.
    let above = server
        .history(&alice, conversation, 0, sent[69], 50)
        .await?;
    assert_eq!(ids(&above), newest_first[..50]);
    assert!(
        !above.has_more,
        "nothing older than the last one within `after`"
    );
    let tail = server
        .history(&alice, conversation, 0, sent[99], 50)
        .await?;
    assert_eq!(ids(&tail), newest_first[..20]);
    assert!(!tail.has_more);
    // Both bounds: messages 11..=20 (ids strictly between the 10th and the 21st).
    let window = server
        .history(&alice, conversation, sent[20], sent[9], 50)
        .await?;
    let expected: Vec<i64> = sent[10..20].iter().rev().copied().collect();
    assert_eq!(ids(&window), expected);
    assert!(!window.has_more);
    let default_limit = server.history(&alice, conversation, 0, 0, 0).await?;
    assert_eq!(default_limit.messages.len(), 50, "limit 0 means 50");
    Ok(())
}
