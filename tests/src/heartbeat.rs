//! A device whose app stays in the foreground: a task sends a `Heartbeat` on a
//! timer (the client's own behaviour, so a timer is right here) while the test
//! reads the frames the task hands over.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confab_proto::v1::{
    Event, Heartbeat, Presence, ServerFrame, client_frame, event, server_frame,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::WAIT;
use crate::conn::{Conn, Reply, Transport};

/// A connection that heartbeats every `period` until [`Heartbeating::stop`].
#[derive(Debug)]
pub struct Heartbeating<T> {
    /// Every frame the connection read, except the answers to the heartbeats.
    frames: mpsc::UnboundedReceiver<ServerFrame>,
    /// Frames read from `frames` and skipped by a `next_*`: queued again on stop.
    skipped: Vec<ServerFrame>,
    /// Tells the task to hand the connection back.
    stop: Option<oneshot::Sender<()>>,
    /// The task owning the connection.
    task: JoinHandle<Result<Conn<T>>>,
}

impl<T: Transport + 'static> Conn<T> {
    /// Hands the connection to a task that heartbeats every `period` (the
    /// first one at once).
    pub fn keep_alive(self, period: Duration) -> Heartbeating<T> {
        let (frames_in, frames) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(beat(self, period, frames_in, stopped));
        Heartbeating {
            frames,
            skipped: Vec::new(),
            stop: Some(stop),
            task,
        }
    }
}

impl<T: Transport + 'static> Heartbeating<T> {
    /// Returns the next presence event; other frames are kept for
    /// [`Heartbeating::stop`]. An error frame (a refused heartbeat) fails.
    ///
    /// # Errors
    ///
    /// Fails when the connection ends, on an error frame, or after [`WAIT`].
    pub async fn next_presence(&mut self) -> Result<Presence> {
        loop {
            let frame = match tokio::time::timeout(WAIT, self.frames.recv()).await {
                Err(_) => bail!("no presence event within {WAIT:?}"),
                Ok(Some(frame)) => frame,
                Ok(None) => return Err(self.failure().await),
            };
            match &frame.kind {
                Some(server_frame::Kind::Event(Event {
                    seq: 0,
                    kind: Some(event::Kind::Presence(presence)),
                })) => return Ok(*presence),
                Some(server_frame::Kind::Error(error)) => bail!("error frame: {error:?}"),
                _ => self.skipped.push(frame),
            }
        }
    }

    /// Stops heartbeating once the heartbeats sent are answered, and returns
    /// the connection with every frame not taken queued again, in order.
    ///
    /// # Errors
    ///
    /// Fails when the connection failed meanwhile.
    pub async fn stop(mut self) -> Result<Conn<T>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let mut conn = self.task.await.context("the heartbeat task panicked")??;
        let mut unread = std::mem::take(&mut self.skipped);
        while let Ok(frame) = self.frames.try_recv() {
            unread.push(frame);
        }
        conn.queue_front(unread);
        Ok(conn)
    }

    /// The error the task ended with (it ends early only on a failure).
    async fn failure(&mut self) -> anyhow::Error {
        match (&mut self.task).await {
            Ok(Err(error)) => error.context("the heartbeating connection failed"),
            Ok(Ok(_)) => anyhow::anyhow!("the heartbeating connection stopped"),
            Err(error) => anyhow::anyhow!("the heartbeat task panicked: {error}"),
        }
    }
}

/// Heartbeats on the timer and forwards frames until told to stop; then waits
/// for the answers to the heartbeats sent, so that none is left on the way.
async fn beat<T: Transport>(
    mut conn: Conn<T>,
    period: Duration,
    frames: mpsc::UnboundedSender<ServerFrame>,
    mut stop: oneshot::Receiver<()>,
) -> Result<Conn<T>> {
    let mut ticks = tokio::time::interval(period);
    let mut unanswered: HashSet<u64> = HashSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticks.tick() => {
                let heartbeat = client_frame::Kind::Heartbeat(Heartbeat {});
                unanswered.insert(conn.send_kind(heartbeat).await?);
            }
            frame = conn.next_frame() => {
                let frame = frame?;
                let answers_a_beat = matches!(frame.kind, Some(server_frame::Kind::Done(_)))
                    && unanswered.remove(&frame.r#ref);
                if !answers_a_beat {
                    // The receiver is gone only when the test dropped it.
                    let _ = frames.send(frame);
                }
            }
        }
    }
    for r#ref in unanswered {
        let reply = conn
            .reply_to(r#ref)
            .await
            .context("waiting for a heartbeat's answer")?;
        anyhow::ensure!(
            matches!(reply, Reply::Done),
            "heartbeat: expected done, got {reply:?}"
        );
    }
    Ok(conn)
}
