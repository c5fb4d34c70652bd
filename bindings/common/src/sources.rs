//! The core streams every binding pumps through an [`Inbox`](crate::Inbox): C2D messages of a
//! device, feedback batches of a service, and D2C events of a consumer group (with the control
//! requests an event stream serves from inside its pump: checkpoint and close).

use hubmsg_core::device::{C2dMessage, C2dReceiver};
use hubmsg_core::service::{Event, EventStream, FeedbackBatch, FeedbackStream};
use hubmsg_core::{Error, Result};
use tokio::sync::{mpsc, oneshot};

use crate::inbox::Source;

/// A device's C2D messages.
pub struct C2dSource(pub C2dReceiver);

impl Source for C2dSource {
    type Item = C2dMessage;
    async fn next(&mut self) -> Option<Result<C2dMessage>> {
        self.0.recv().await.map(Ok)
    }
}

/// A service's feedback batches.
pub struct FeedbackSource(pub FeedbackStream);

impl Source for FeedbackSource {
    type Item = FeedbackBatch;
    async fn next(&mut self) -> Option<Result<FeedbackBatch>> {
        self.0.next().await.map(Ok)
    }
}

enum Ctl {
    Checkpoint(oneshot::Sender<Result<()>>),
    Close(oneshot::Sender<()>),
}

/// A consumer group's events; its [`EventsControl`] asks it to checkpoint or close.
pub struct EventsSource {
    stream: EventStream,
    ctl: mpsc::UnboundedReceiver<Ctl>,
}

/// Sends control requests to the pump that owns an [`EventsSource`]. Cheap to clone.
#[derive(Clone)]
pub struct EventsControl(mpsc::UnboundedSender<Ctl>);

impl EventsSource {
    /// Wraps an open event stream.
    pub fn new(stream: EventStream) -> (EventsSource, EventsControl) {
        let (tx, ctl) = mpsc::unbounded_channel();
        (EventsSource { stream, ctl }, EventsControl(tx))
    }
}

impl EventsControl {
    /// Asks the hub to persist the group's checkpoints and waits until they are durable.
    /// `Closed` once the stream is closed (or was never pumped).
    pub async fn checkpoint(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.0.send(Ctl::Checkpoint(tx)).map_err(|_| Error::closed("event stream"))?;
        rx.await.map_err(|_| Error::closed("event stream"))?
    }

    /// Leaves the group (its partitions move to the other members) and ends the stream; waits
    /// until the pump has done it (returns at once when it is gone already).
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.0.send(Ctl::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

impl Source for EventsSource {
    type Item = Event;
    async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            tokio::select! {
                ev = self.stream.next() => return ev,
                ctl = self.ctl.recv() => match ctl {
                    Some(Ctl::Checkpoint(tx)) => {
                        let _ = tx.send(self.stream.checkpoint().await);
                    }
                    Some(Ctl::Close(tx)) => {
                        self.stream.close().await;
                        let _ = tx.send(());
                        return None;
                    }
                    None => {
                        self.stream.close().await;
                        return None;
                    }
                },
            }
        }
    }
}
