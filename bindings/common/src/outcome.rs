//! The outcome of one accepted D2C message as a binding hands it out: a handle that can be
//! polled without waiting and waited for (with a timeout, any number of times, from any task).
//!
//! Invariants: the core outcome future is polled by one waiter at a time; once it resolved, its
//! result is kept and every later poll or wait returns it at once; a wait that times out loses
//! nothing (the next one goes on waiting for the same outcome).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hubmsg_core::device::Delivery;
use hubmsg_core::{Error, ErrorKind, Outcome, Result};
use parking_lot::Mutex;

type OutcomeFuture = Pin<Box<dyn Future<Output = Result<Outcome>> + Send>>;

/// The name bindings give an outcome: "delivered", "expired", "dropped" or "rejected".
pub fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Delivered => "delivered",
        Outcome::Expired => "expired",
        Outcome::Dropped => "dropped",
        Outcome::Rejected => "rejected",
    }
}

/// One message's outcome; cheap to clone (clones share it).
#[derive(Clone)]
pub struct SharedOutcome {
    message_id: Arc<str>,
    seq: u64,
    fut: Arc<tokio::sync::Mutex<Option<OutcomeFuture>>>,
    result: Arc<Mutex<Option<Result<Outcome>>>>,
}

impl SharedOutcome {
    /// Takes over a core delivery handle.
    pub fn new(d: Delivery) -> SharedOutcome {
        SharedOutcome {
            message_id: d.message_id.as_str().into(),
            seq: d.seq,
            fut: Arc::new(tokio::sync::Mutex::new(Some(Box::pin(d.outcome())))),
            result: Arc::default(),
        }
    }

    /// The message id (the one given, or the generated UUID).
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// The message's sequence number in the outbox.
    pub fn sequence_number(&self) -> u64 {
        self.seq
    }

    /// The outcome once known, without waiting (`None` while pending, or while another task is
    /// waiting for it at this instant).
    pub fn poll(&self) -> Option<Result<Outcome>> {
        if let Some(r) = self.result.lock().clone() {
            return Some(r);
        }
        let mut g = self.fut.try_lock().ok()?;
        let fut = g.as_mut()?;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => {
                *g = None;
                *self.result.lock() = Some(r.clone());
                Some(r)
            }
            std::task::Poll::Pending => None,
        }
    }

    /// Waits for the outcome (`None`: as long as it takes). `Timeout` when it is still pending
    /// after `timeout` (the message stays queued); `Closed` when the client closed first.
    pub fn wait(&self, timeout: Option<Duration>) -> impl Future<Output = Result<Outcome>> + Send + 'static {
        let fut = self.fut.clone();
        let result = self.result.clone();
        let id = self.message_id.clone();
        async move {
            let get = async {
                let mut g = fut.lock().await;
                if let Some(f) = g.as_mut() {
                    let r = f.await;
                    *g = None;
                    *result.lock() = Some(r);
                }
                result.lock().clone().expect("set once the future is gone")
            };
            match timeout {
                Some(t) => tokio::time::timeout(t, get)
                    .await
                    .map_err(|_| Error::new(ErrorKind::Timeout, format!("message '{id}' has no outcome after {t:?}; it stays queued")))?,
                None => get.await,
            }
        }
    }
}

/// The outcomes of one batch of accepted messages (`send_batch`), for a binding that hands out
/// one handle per message backed by one shared object: a message's [`SharedOutcome`] (several
/// allocations) is made only when its outcome is first asked for; its id and sequence number are
/// read from the core handle until then.
pub struct OutcomeBatch {
    slots: Mutex<Vec<Slot>>,
}

/// One message of an [`OutcomeBatch`]: the core handle until its outcome is asked for (`Core`
/// holds it until then: `None` is never seen outside [`OutcomeBatch::outcome`]), then the shared
/// one made from it.
enum Slot {
    Core(Option<Delivery>),
    Shared(SharedOutcome),
}

impl OutcomeBatch {
    /// Takes over the core handles of a batch, in order.
    pub fn new(deliveries: Vec<Delivery>) -> OutcomeBatch {
        OutcomeBatch { slots: Mutex::new(deliveries.into_iter().map(|d| Slot::Core(Some(d))).collect()) }
    }

    /// The number of messages.
    pub fn len(&self) -> usize {
        self.slots.lock().len()
    }

    /// Whether the batch has no message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Message `index`'s id and outbox sequence number; `None` past the end.
    pub fn identity(&self, index: usize) -> Option<(String, u64)> {
        match self.slots.lock().get(index)? {
            Slot::Core(Some(d)) => Some((d.message_id.clone(), d.seq)),
            Slot::Shared(o) => Some((o.message_id().to_string(), o.sequence_number())),
            Slot::Core(None) => unreachable!("a core slot holds its handle"),
        }
    }

    /// Message `index`'s outcome handle (the same one on every call); `None` past the end.
    pub fn outcome(&self, index: usize) -> Option<SharedOutcome> {
        let mut slots = self.slots.lock();
        let slot = slots.get_mut(index)?;
        if let Slot::Core(d) = slot {
            *slot = Slot::Shared(SharedOutcome::new(d.take().expect("a core slot holds its handle")));
        }
        match slot {
            Slot::Shared(o) => Some(o.clone()),
            Slot::Core(_) => unreachable!("made shared above"),
        }
    }
}
